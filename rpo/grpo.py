"""GRPO (Shao et al. 2024, DeepSeekMath Sec. 4) beside Iterative RPO, on the same sampler, task scorers, sharded
train step and resumable stages.

  M_0 = model.path, or an SFT warm start on the gold solutions (init.num_steps > 0), as in rpo.irpo
  for t = 1..grpo.iterations:   a training phase from M_{t-1} with a fresh optimizer; each of its
                                grpo.steps_per_iteration steps:
        prompts_per_step training prompts (a seeded permutation per epoch, continuing across phases)
        -> G = group_size samples each from the current policy (rpo.sampling: temperature, top-k, top-p;
           its per-token log-probs are pi_old, the distribution each token was drawn from)
        -> rewards from the task (1 for a correct final answer; with grpo.require_finished, only when the
           sample ended by itself rather than at max_new_tokens)
        -> group-normalised advantages (mean-centred; divided by the group's std + adv_eps with scale_rewards)
        -> with beta > 0, the reference's per-token log-probs (M_0 or M_{t-1}: grpo.reference)
        -> mu optimizer steps on that one batch (rpo.train.grpo_step: the clipped-ratio objective per
           token, the k3 KL term, the normalisation of grpo.normalization over every sample of the step; see
           rpo.losses). With beta = 0 a zero-advantage sample adds nothing to the loss or its gradient, so it
           is left out of the batch (the normaliser still counts it; the batch is padded to one of
           grpo.train.row_buckets sizes, each compiled once): the same update for less compute.
     then, as IRPO does, the export (every select.every steps) best on the held-out training problems
     is M_t, evaluated on the test split (greedy, maj@k, pass@k: rpo.stages.evaluate).

So a GRPO "iteration" is a slice of the run that the results table and checkpoint selection treat like an IRPO
iteration; configs/grpo_tiny.py sizes it to draw as many samples as an IRPO iteration does.

Temperature and top-p in the ratio: both sides of r = pi_theta / pi_old are the sampling distribution (logits
divided by the temperature, then top-k and top-p, renormalised); pi_old comes from the sampler, pi_theta from
rpo.losses.sampling_scores on the train side, so the ratio is 1 at the sampling parameters (tested against the
sampler's own log-probs). The KL term uses the same transform of the reference's logits (as TRL does with the
temperature).

Bad input: grpo.group_size < 2 is a config error (a group of one has no relative advantage). A group whose
rewards are all equal has zero advantage: counted per step (zero_adv_fraction); when every group of a step has
zero advantage and beta = 0 the gradient is exactly zero, so the optimizer update is skipped (AdamW's momentum
would still move the weights) and counted (skipped_steps). A reward function that raises stops the run naming the
step, prompt and sample (grpo.on_reward_error='error'), or (='skip') the groups it hit are left out of the step
and counted (reward_errors, skipped_groups).

Stages and artifacts (workdir/...), resumable like rpo.irpo's (rpo.stages):
  data/, tokenizer/, iter0/ (warm start, eval.json)          as rpo.irpo
  iter<t>/train/checkpoints/   orbax state (params, AdamW, step): a killed phase resumes at its last checkpoint
                               (rollouts are a pure function of the state, the seed and the step)
  iter<t>/train/metrics.jsonl  one row per step: reward_mean, reward_std, reward_group_std, zero_adv_fraction,
                               response_length, truncated_fraction, loss, clip_fraction (clip/low, clip/high), kl,
                               entropy, ratio, grad_norm, lr, skipped_groups, reward_errors, skipped (+ TensorBoard)
  iter<t>/train/exports/step-*/, final/, done.json   HF models (with the tokenizer)
  iter<t>/train/rollouts/step-*.jsonl   every grpo.rollouts_every steps: texts, rewards, advantages
  iter<t>/select.json, eval.json
  results.json, accuracy.png, grpo_curves.png (the step metrics of every phase), metrics.jsonl
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Callable

import ml_collections
import numpy as np
from absl import logging

from rpo import files, stages
from rpo.configlib import ConfigError, bad

CONFIG_NAME = "grpo_config.json"
REFERENCES = ("initial", "previous")
ON_ERROR = ("error", "skip")
# The step metrics drawn in grpo_curves.png, (column, its spread column or None).
CURVES = (("reward_mean", "reward_std"), ("zero_adv_fraction", None), ("response_length", None),
          ("clip_fraction", None), ("kl", None), ("entropy", None))


class RewardError(RuntimeError):
    """A reward function raised; the message names the step, the prompt and the sample."""


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


def check_config(cfg) -> None:
    from rpo import losses

    g = cfg.grpo
    for field in ("iterations", "steps_per_iteration", "prompts_per_step", "max_new_tokens", "mu", "chunk_prompts"):
        if not isinstance(g[field], int) or g[field] < 1:
            bad(f"grpo.{field}", f"must be a positive int, got {g[field]!r}")
    if not isinstance(g.group_size, int) or g.group_size < 2:
        bad("grpo.group_size", f"{g.group_size!r}: a group of one sample has no relative advantage (its advantage "
                               f"is always 0); use >= 2")
    if not isinstance(g.rollouts_every, int) or g.rollouts_every < 0:
        bad("grpo.rollouts_every", f"must be an int >= 0 (0: never), got {g.rollouts_every!r}")
    if not g.temperature > 0:
        bad("grpo.temperature", f"must be > 0 (GRPO needs sampled groups; 0 is greedy), got {g.temperature!r}")
    if not 0.0 < g.top_p <= 1.0:
        bad("grpo.top_p", f"must be in (0, 1], got {g.top_p!r}")
    if not isinstance(g.top_k, int) or g.top_k < 0:
        bad("grpo.top_k", f"must be an int >= 0 (0: off), got {g.top_k!r}")
    if not 0.0 <= g.clip_low < 1.0:
        bad("grpo.clip_low", f"must be in [0, 1), got {g.clip_low!r}")
    if not g.clip_high >= 0.0:
        bad("grpo.clip_high", f"must be >= 0, got {g.clip_high!r}")
    if not g.beta >= 0.0:
        bad("grpo.beta", f"must be >= 0 (0: no KL term, no reference model), got {g.beta!r}")
    if not g.adv_eps > 0.0:
        bad("grpo.adv_eps", f"must be > 0, got {g.adv_eps!r}")
    if g.normalization not in losses.NORMALIZATIONS:
        bad("grpo.normalization", f"{g.normalization!r} is not one of {losses.NORMALIZATIONS}")
    if g.reference not in REFERENCES:
        bad("grpo.reference", f"{g.reference!r} is not one of {REFERENCES}")
    if g.on_reward_error not in ON_ERROR:
        bad("grpo.on_reward_error", f"{g.on_reward_error!r} is not one of {ON_ERROR}")
    t = g.train
    for field in ("grad_accum", "chunk_size", "log_every", "checkpoint_every", "keep_checkpoints", "row_buckets"):
        if not isinstance(t[field], int) or t[field] < 1:
            bad(f"grpo.train.{field}", f"must be a positive int, got {t[field]!r}")
    rows = g.prompts_per_step * g.group_size
    if rows % t.grad_accum:
        bad("grpo.train.grad_accum", f"{t.grad_accum} does not divide prompts_per_step x group_size = {rows}")
    stages.check_loop_blocks(cfg)
    if "irpo" in cfg:
        bad("irpo", "a GRPO config has no irpo block (its sampling fields are grpo.*); delete it")


def loss_fields(cfg) -> ml_collections.ConfigDict:
    """What rpo.train's GRPO step reads (its `g`)."""
    g = cfg.grpo
    return ml_collections.ConfigDict(dict(
        clip_low=float(g.clip_low), clip_high=float(g.clip_high), beta=float(g.beta), kl_ratio=bool(g.kl_ratio),
        normalization=g.normalization, temperature=float(g.temperature), top_k=int(g.top_k), top_p=float(g.top_p),
        chunk_size=int(g.train.chunk_size), max_new_tokens=int(g.max_new_tokens)))


# ---------------------------------------------------------------------------------------
# Rewards and advantages
# ---------------------------------------------------------------------------------------


def group_advantages(rewards_PG, *, scale: bool, eps: float) -> np.ndarray:
    """Group-normalised advantages [P, G] (float64) of rewards [P, G] (G samples of each of P prompts): the reward
    less its group's mean, divided by (the group's standard deviation with Bessel's correction + eps) when `scale`
    (DeepSeekMath's outcome supervision; the std as TRL computes it). A group whose rewards are all equal gets 0."""
    r = np.asarray(rewards_PG, np.float64)
    if r.ndim != 2 or r.shape[1] < 2:
        raise ValueError(f"rewards of shape {r.shape}: need [prompts, G] with G >= 2 (a group of one sample has no "
                         f"relative advantage)")
    adv = r - r.mean(axis=1, keepdims=True)
    if scale:
        adv = adv / (r.std(axis=1, ddof=1, keepdims=True) + eps)
    return adv


def task_rewards(task, require_finished: bool) -> Callable:
    """The default reward: (texts, prompt rows, finish reasons) -> 1.0 for a correct final answer (task.score), else
    0.0; with require_finished a sample cut off at max_new_tokens gets 0.0 (IRPO's winners are finished too)."""
    def rewards(texts, rows, reasons):
        fields = stages.task_fields(task, texts, rows)
        return [float(f["correct"] and (reason != "length" or not require_finished))
                for f, reason in zip(fields, reasons)]
    return rewards


def score_step(reward_fn: Callable, texts, rows, reasons, *, on_error: str, where: str, group_size: int = 1
               ) -> np.ndarray:
    """Rewards [len(texts)] (float64) of samples m = i * group_size + j (sample j of prompt rows[m]). If reward_fn
    raises (or returns the wrong number of rewards, or a non-finite one) on the batch it is called sample by sample
    to find the ones at fault: on_error='error' stops naming the first (its prompt's uid and j); 'skip' gives them
    NaN (their groups are left out)."""
    try:
        out = np.asarray(reward_fn(texts, rows, reasons), np.float64)
        if out.shape != (len(texts),):
            raise ValueError(f"returned {out.shape[0] if out.ndim else 'a scalar'} rewards for {len(texts)} samples")
        if not np.all(np.isfinite(out)):
            raise ValueError(f"returned a non-finite reward for sample {int(np.flatnonzero(~np.isfinite(out))[0])}")
        return out
    except Exception as batch_error:  # noqa: BLE001  (a reward function's own errors are the subject here)
        out = np.full(len(texts), np.nan)
        for m in range(len(texts)):
            try:
                value = float(np.asarray(reward_fn(texts[m: m + 1], rows[m: m + 1], reasons[m: m + 1])).reshape(-1)[0])
                if not math.isfinite(value):
                    raise ValueError(f"non-finite reward {value}")
                out[m] = value
            except Exception as e:  # noqa: BLE001
                if on_error == "error":
                    raise RewardError(f"{where}: the reward function failed on sample {m % group_size} of prompt "
                                      f"{rows[m].get('uid', '?')}: {e!r} (grpo.on_reward_error='skip' leaves such "
                                      f"groups out and counts them)") from e
        if not np.isnan(out).any():  # every sample scored alone: the batch call itself was at fault
            raise RewardError(f"{where}: the reward function raised on the batch but not on any one sample: "
                              f"{batch_error!r}") from batch_error
        return out


# ---------------------------------------------------------------------------------------
# One training phase
# ---------------------------------------------------------------------------------------


def _ref_logprobs(ref_fn, ref_params, rows, *, batch, mesh, rules, seq_len, pad_id) -> None:
    from rpo import distributed, train

    for start in range(0, len(rows), batch):
        chunk = rows[start: start + batch]
        logp = distributed.fetch(ref_fn(ref_params, train.device_rollouts(chunk, batch, mesh=mesh, rules=rules,
                                                                          seq_len=seq_len, pad_id=pad_id)))
        for r, lp in zip(chunk, logp):
            n = len(r["prompt_ids"])
            r["ref_logprobs"] = lp[n: n + len(r["completion_ids"])].tolist()


_COMPILED: dict = {}  # the jitted functions of recent phases, so a phase like the last one compiles nothing


def _cached(key, build):
    """build() once per key (the model, the loss and optimizer fields, the batch layout and the mesh): every phase
    of a run has the same key, and jax.jit keys its compilations on the function object, which would otherwise be
    new each phase. Keeps the 16 newest."""
    if key not in _COMPILED:
        while len(_COMPILED) >= 16:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = build()
    return _COMPILED[key]


def train_phase(cfg, t: int, models: stages.Models, task, tokenizer, rows: list[dict], *, model_path: str,
                ref_path: str, out_dir: str, reward_fn: Callable,
                on_step: Callable[[int, dict], None] | None = None) -> str:
    """Runs (or resumes) GRPO iteration t from model_path into out_dir; returns out_dir/final (an HF directory).
    on_step(step, metrics) is called after every step (a test hook: raising there simulates a crash)."""
    stages.artifact(os.path.join(out_dir, stages.DONE), functools.partial(
        _phase, cfg, t, models, task, tokenizer, rows, model_path=model_path, ref_path=ref_path, out_dir=out_dir,
        reward_fn=reward_fn, on_step=on_step))
    return os.path.join(out_dir, "final")


def _phase(cfg, t: int, models: stages.Models, task, tokenizer, rows: list[dict], *, model_path: str, ref_path: str,
           out_dir: str, reward_fn: Callable, on_step: Callable[[int, dict], None] | None) -> dict:
    """The steps of train_phase; returns what its done.json records."""
    import jax

    from rpo import checkpoint as ckpt
    from rpo import distributed, report, sampling, sharding, train
    from rpo.models.hf import load_model

    final = os.path.join(out_dir, "final")
    models.release()
    g, tc, lf = cfg.grpo, cfg.grpo.train, loss_fields(cfg)
    mesh, rules = models.mesh, models.rules
    os.makedirs(out_dir, exist_ok=True)
    mcfg = ml_collections.ConfigDict(cfg.model.to_dict())
    mcfg.path = model_path
    model_config, params = load_model(mcfg, shardings_for=lambda c: sharding.param_shardings(c, mesh, rules))
    rows_per_step = g.prompts_per_step * g.group_size
    micro = rows_per_step // tc.grad_accum
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro % shards:
        raise ConfigError(f"config fields grpo.prompts_per_step x group_size / grpo.train.grad_accum = {micro}: the "
                         f"micro-batch does not split over the mesh's data x fsdp = {shards} devices")
    longest = max(len(r["prompt_ids"]) for r in rows)
    if longest + g.max_new_tokens > cfg.seq_len:
        raise ConfigError(f"config field seq_len={cfg.seq_len}: a prompt of {longest} tokens + grpo.max_new_tokens="
                         f"{g.max_new_tokens} does not fit")
    eos = sorted(set(model_config.eos_token_ids) | ({tokenizer.eos_token_id} - {None}))
    if not eos:
        raise ValueError(f"{model_path}: neither the model config nor the tokenizer names an EOS token")
    pack = dict(seq_len=cfg.seq_len, pad_id=cfg.data.pad_id)
    total_updates = g.steps_per_iteration * g.mu
    key = (model_config, lf.to_json(sort_keys=True), tc.optim.to_json(sort_keys=True), tc.grad_accum, bool(tc.remat),
           total_updates, mesh, rules, cfg.seq_len, cfg.data.pad_id)

    def build():
        optimizer = train.make_optimizer(tc.optim, total_updates)
        ref_fn = train.make_rollout_logps_fn(model_config, lf, mesh, rules, train.make_rollout_batch([], micro, **pack))
        return optimizer, ref_fn

    optimizer, ref_fn = _cached(key, build)
    unit = row_unit(rows_per_step, tc.row_buckets, tc.grad_accum * shards)

    def step_fn(rows_in_batch):  # the jitted step for a batch of that many rows (a multiple of `unit`)
        def build_step():
            example = train.split_micro(train.make_rollout_batch([], rows_in_batch, **pack), tc.grad_accum)
            return train.make_grpo_step(model_config, lf, optimizer, mesh, rules, example, remat=tc.remat)
        return _cached(key + (rows_in_batch,), build_step)

    schedule = train.make_schedule(tc.optim, total_updates)
    ref_params = None
    if g.beta > 0:
        rcfg = ml_collections.ConfigDict(cfg.model.to_dict())
        rcfg.path = ref_path
        _, ref_params = load_model(rcfg, shardings_for=lambda c: sharding.param_shardings(c, mesh, rules))

    s_shard = train.state_shardings(model_config, optimizer, mesh, rules)
    mngr = ckpt.manager(os.path.join(out_dir, "checkpoints"), max_to_keep=tc.keep_checkpoints)
    shapes = jax.eval_shape(lambda p: train.init_state(p, optimizer), params)
    start, state = ckpt.restore_latest(mngr, ckpt.abstract(shapes, s_shard))
    if state is None:
        start, state = 0, jax.device_put(train.init_state(params, optimizer), s_shard)
    del params
    updates = int(distributed.fetch(state["step"]))  # optimizer updates so far (the schedule's count)
    log = report.MetricsLog(os.path.join(out_dir, "metrics.jsonl"))
    bar = report.progress(desc=f"iter{t} grpo", total=g.steps_per_iteration, unit="steps")
    bar.update(start)
    steps = g.steps_per_iteration
    try:
        for step in range(start, steps):
            gstep = (t - 1) * steps + step  # the data order and the sampling seed continue across phases
            prompts = [rows[i] for i in train.step_rows(len(rows), g.prompts_per_step, gstep, cfg.seed)]
            where = f"iteration {t} step {step + 1}"
            out = sampling.generate(
                model_config, state["params"], [r["prompt_ids"] for r in prompts], n=g.group_size,
                max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, eos_ids=eos,
                stop=list(task.stop), tokenizer=tokenizer, seed=stages.sampling_seed(cfg.seed, "rollout", gstep),
                batch_size=g.chunk_prompts, mesh=mesh, rules=rules, progress=False)
            flat = [(i, j) for i in range(len(prompts)) for j in range(g.group_size)]
            texts = tokenizer.batch_decode([out.tokens[i][j] for i, j in flat], skip_special_tokens=True)
            reasons = [out.finish_reasons[i][j] for i, j in flat]
            rewards = score_step(reward_fn, texts, [prompts[i] for i, _ in flat], reasons, on_error=g.on_reward_error,
                                 where=where, group_size=g.group_size).reshape(len(prompts), g.group_size)
            ok = ~np.isnan(rewards).any(axis=1)
            adv = np.zeros_like(rewards)
            if ok.any():
                adv[ok] = group_advantages(rewards[ok], scale=g.scale_rewards, eps=g.adv_eps)
            zero = ok & np.all(adv == 0.0, axis=1)
            batch_rows = [{"prompt_ids": prompts[i]["prompt_ids"], "completion_ids": out.tokens[i][j],
                           "logprobs": out.logprobs[i][j], "advantage": float(adv[i, j]),
                           "_where": f"{where}, prompt {prompts[i]['uid']}, sample {j}"}
                          for i in range(len(prompts)) if ok[i] for j in range(g.group_size)]
            lengths = np.asarray([len(out.tokens[i][j]) for i, j in flat], np.float64)
            scored = rewards[ok]
            metrics = {
                "reward_mean": float(scored.mean()) if scored.size else math.nan,
                "reward_std": float(scored.std()) if scored.size else math.nan,
                "reward_group_std": float(scored.std(axis=1, ddof=1).mean()) if scored.size else math.nan,
                "zero_adv_fraction": float(zero[ok].mean()) if ok.any() else math.nan,
                "response_length": float(lengths.mean()), "response_length_max": float(lengths.max()),
                "truncated_fraction": float(np.mean([r == "length" for r in reasons])),
                "reward_errors": float(np.isnan(rewards).sum()), "skipped_groups": float((~ok).sum()),
            }
            if not batch_rows or (bool(zero[ok].all()) and g.beta == 0):
                # No gradient at all: leave the weights and AdamW's moments (which would still move them) as they are.
                metrics["skipped"] = 1.0
            else:
                # The normaliser counts every sample of the step; with no KL term a zero-advantage sample adds
                # nothing to the loss or its gradient, so it is not run through the model.
                denom = np.float32(step_denominator(batch_rows, g.normalization, g.max_new_tokens))
                trained = batch_rows if g.beta > 0 else [r for r in batch_rows if r["advantage"] != 0.0]
                if ref_params is not None:
                    _ref_logprobs(ref_fn, ref_params, trained, batch=micro, mesh=mesh, rules=rules, **pack)
                size = -(-len(trained) // unit) * unit
                batch = train.device_rollouts(trained, size, mesh=mesh, rules=rules, grad_accum=tc.grad_accum, **pack)
                fn = step_fn(size)
                inner = []
                for _ in range(g.mu):
                    state, m = fn(state, batch, denom)
                    inner.append(distributed.fetch(m))
                    updates += 1
                metrics.update({k: float(np.mean([m[k] for m in inner])) for k in inner[0] if k not in ("tokens", "rows")})
                metrics["trained_rows"] = float(len(trained))
                metrics["clip_fraction"] = metrics.pop("clip/region")
                metrics["skipped"] = 0.0
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"{where}: loss is {metrics['loss']}; stopping (last checkpoint: "
                                             f"{mngr.latest_step()})")
            metrics["lr"] = float(schedule(max(updates - 1, 0)))  # the rate of the step's last update
            done = step + 1
            if g.rollouts_every and done % g.rollouts_every == 0:
                os.makedirs(os.path.join(out_dir, "rollouts"), exist_ok=True)
                files.write_jsonl(os.path.join(out_dir, "rollouts", f"step-{done:06d}.jsonl"), (
                    {"uid": prompts[i]["uid"], "sample": j, "text": texts[n], "reward": float(rewards[i, j]),
                     "advantage": float(adv[i, j]), "finish_reason": reasons[n], "completion_ids": out.tokens[i][j]}
                    for n, (i, j) in enumerate(flat)))
            if done % tc.log_every == 0 or done == steps:
                log.log(done, metrics, split="train")
            if cfg.select.every and done % cfg.select.every == 0 and not os.path.isdir(train.export_path(out_dir, done)):
                train.export(model_config, state["params"], train.export_path(out_dir, done))
            if done % tc.checkpoint_every == 0 or done == steps:
                ckpt.save(mngr, done, state)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(done, metrics)
    finally:
        mngr.wait_until_finished()
        mngr.close()
        log.close()
        bar.close()
    if not os.path.isdir(final) or start < steps:
        train.export(model_config, state["params"], final)
    if distributed.is_main():
        for path in [final] + [e for _, e in stages.exports(out_dir)]:
            tokenizer.save_pretrained(path)
    return {"steps": steps, "kind": "grpo"}


def row_unit(rows_per_step: int, buckets: int, multiple: int) -> int:
    """The row granularity of a step's batch: rows_per_step / buckets, rounded up to a multiple of `multiple`
    (grad_accum x the mesh's batch shards), so a step compiles for at most `buckets` batch sizes."""
    unit = -(-rows_per_step // max(1, buckets))
    return -(-unit // multiple) * multiple


def step_denominator(rows: list[dict], normalization: str, max_new_tokens: int) -> float:
    """losses.grpo_denominator over every rollout of a step (rows with "completion_ids"): rows, completion tokens,
    or rows x max_new_tokens; at least 1."""
    n = len(rows)
    if normalization == "sequence":
        den = n
    elif normalization == "token":
        den = sum(len(r["completion_ids"]) for r in rows)
    elif normalization == "constant":
        den = n * max_new_tokens
    else:
        raise ValueError(f"GRPO normalization {normalization!r}")
    return float(max(den, 1))


def phase_summary(out_dir: str) -> dict:
    """Means over a phase's logged steps (its metrics.jsonl; the last row of a step logged twice after a resume)."""
    rows = {}
    for r in files.read_jsonl(os.path.join(out_dir, "metrics.jsonl")):
        rows[r["step"]] = r
    rows = [rows[k] for k in sorted(rows)]
    out = {}
    for key in ("reward_mean", "zero_adv_fraction", "response_length", "clip_fraction", "kl", "entropy"):
        vals = [r[key] for r in rows if key in r and math.isfinite(r[key])]
        if vals:
            out[f"train_{key}"] = float(np.mean(vals))
    out["skipped_steps"] = int(sum(r.get("skipped", 0) for r in rows))
    out["reward_errors"] = int(sum(r.get("reward_errors", 0) for r in rows))
    return out


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def _data_config(cfg):
    """What rpo.stages.prepare_data reads, with GRPO's sampling budget where it reads IRPO's (irpo.max_new_tokens:
    the room a prompt must leave in the context, and the gold-length warning)."""
    d = ml_collections.ConfigDict(cfg.to_dict())
    d.irpo = ml_collections.ConfigDict(dict(max_new_tokens=cfg.grpo.max_new_tokens))
    return d


def run(cfg, workdir: str, *, reward_fn: Callable | None = None,
        on_step: Callable[[int, int, dict], None] | None = None) -> list[dict]:
    """The whole GRPO experiment; returns the results rows (also workdir/results.json). reward_fn(texts, prompt
    rows, finish reasons) -> rewards replaces the task's (task_rewards); on_step(t, step, metrics) is a test hook."""
    from rpo import report

    check_config(cfg)
    ctx = stages.open_run(cfg, workdir, config_name=CONFIG_NAME, data_cfg=_data_config(cfg))
    reward_fn = reward_fn or task_rewards(ctx.task, cfg.grpo.require_finished)
    log = report.MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    results = []
    g = cfg.grpo
    try:
        model_path = (stages.warm_start(cfg, ctx.models, ctx.data["train"], ctx.tokenizer, workdir)
                      if cfg.init.num_steps else cfg.model.path)
        initial = model_path
        metrics, fresh = stages.evaluate(ctx, model_path, os.path.join(workdir, "iter0"))
        results.append({"iteration": 0, **metrics, "grpo_steps": 0, "samples": 0})
        _record(log if fresh else None, results, workdir)
        for t in range(1, g.iterations + 1):
            it_dir = os.path.join(workdir, f"iter{t}")
            train_dir = os.path.join(it_dir, "train")
            hook = None if on_step is None else (lambda step, m, t=t: on_step(t, step, m))
            train_phase(cfg, t, ctx.models, ctx.task, ctx.tokenizer, ctx.data["train"], model_path=model_path,
                        ref_path=initial if g.reference == "initial" else model_path, out_dir=train_dir,
                        reward_fn=reward_fn, on_step=hook)
            model_path, choice = stages.select_checkpoint(ctx, train_dir, it_dir)
            metrics, fresh = stages.evaluate(ctx, model_path, it_dir)
            held = choice["heldout_accuracy"].get(str(choice["chosen_step"]))
            results.append({"iteration": t, **metrics, **phase_summary(train_dir),
                            "grpo_steps": results[-1]["grpo_steps"] + choice["chosen_step"],
                            "samples": t * g.steps_per_iteration * g.prompts_per_step * g.group_size,
                            "selected_step": choice["chosen_step"], **({"heldout_accuracy": held} if held is not None
                                                                        else {})})
            _record(log if fresh else None, results, workdir)
    finally:
        log.close()
    return results


def _record(log, results, workdir) -> None:
    from rpo import report

    row = stages.record_iteration(log, results, workdir)
    report.plot_results(results, os.path.join(workdir, "accuracy.png"), title="GRPO")
    steps = step_rows(workdir, len(results) - 1)
    if steps:
        report.plot_curves(steps, os.path.join(workdir, "grpo_curves.png"), CURVES, title="GRPO steps")
    logging.info("iteration {iteration}: greedy {greedy_accuracy:.3f}".format(**row)
                 + (f", train reward {row['train_reward_mean']:.3f}" if "train_reward_mean" in row else ""))


def step_rows(workdir: str, iterations: int) -> list[dict]:
    """The logged step metrics of iterations 1..iterations, numbered by the run's global step."""
    out, offset = [], 0
    for t in range(1, iterations + 1):
        path = os.path.join(workdir, f"iter{t}", "train", "metrics.jsonl")
        if not os.path.exists(path):
            break
        by_step = {r["step"]: r for r in files.read_jsonl(path) if r.get("split") == "train"}
        out += [dict(by_step[s], step=offset + s) for s in sorted(by_step)]
        offset += json.load(open(os.path.join(workdir, f"iter{t}", "train", stages.DONE)))["steps"]
    return out
