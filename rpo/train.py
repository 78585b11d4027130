"""The sharded train step and the loop of one training phase (DPO + NLL, DPO, IPO or SFT).

Data files (JSONL, one row per line; token ids are ints in [0, vocab)):
  pairs  {"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...],
          optional "ref_chosen_logp": float, "ref_rejected_logp": float}
         chosen/rejected ids are the responses only (CoT + answer, eos included if wanted);
         the ref fields (both or neither) are the reference model's summed response
         log-probs, written by `add_reference_logps`. Other keys are kept and ignored.
  sft    {"prompt_ids": [...], "response_ids": [...]}
A malformed row (bad JSON, missing/ill-typed field, empty response, id out of range,
non-finite ref log-prob) raises DataError naming the file and the 1-based line number.

Batches. Shape letters as in rpo.models.decoder, plus P = the sides of a row (2 for pairs:
0 chosen, 1 rejected; 1 for SFT) and M = micro-batches of gradient accumulation.
Training rows are right-padded to the config's seq_len, with explicit masks and positions:
  tokens_BPT int32      prompt ids then response ids, then pad_id
  positions_BPT int32   0..len-1 on real tokens, 0 on padding
  mask_BPT bool         True on real tokens (attention sees only those)
  loss_mask_BPT bool    True on response tokens (their log-probs count)
  ref_logps_BP float32  reference log-probs (zeros for SFT)
  row_mask_B bool       False for padding pairs/rows (a partial batch), which count nowhere
A row longer than seq_len raises, unless data.truncate is set: then the response's tail is
cut (the prompt is kept whole) and the reference log-probs must be computed the same way.
The train step takes every array with a leading M axis ([M, B/M, ...]). `device_batch` places a
batch on the mesh: each process packs only the rows its devices hold, so the mesh may span
processes (rpo.distributed); on one process it is exactly split_micro(make_batch(...)).

Exact gradient accumulation. The step first counts, over the whole [M, B/M] batch, the
normaliser: real pairs (preference losses, a mean over pairs, whose NLL term is already
normalised per pair by that pair's winner length) or real response tokens (SFT, a mean over
tokens). Each micro-batch contributes sum(per-row loss) / normaliser, so the sum over
micro-batches is the loss of the one big batch, whatever the real-pair count per micro-batch.

Config fields read here (see configs/train_tiny.py for every default):
  model.path ('' = random model from model.random.*), model.dtype (compute), model.seed
  data.train_path, data.eval_path, data.kind ('pairs' | 'sft'), data.seq_len, data.pad_id,
  data.truncate, data.compute_ref
  loss.kind ('dpo_nll' | 'dpo' | 'ipo' | 'sft'), loss.beta, loss.alpha, loss.label_smoothing,
  loss.chunk_size (sequence chunk of the log-prob computation)
  optim.lr, optim.schedule ('constant' | 'linear' | 'cosine'), optim.warmup_steps,
  optim.end_lr_fraction, optim.weight_decay, optim.b1, optim.b2, optim.eps, optim.clip_norm
  batch_size (pairs per step), grad_accum, num_steps, remat, seed, mesh.{data,fsdp,tensor},
  sharding_rules, eval_every, eval_batches, log_every, checkpoint_every, keep_checkpoints,
  export_every (0: none; else the model every that many steps as an HF directory, export_path())
Outputs under workdir: metrics.jsonl (one JSON object per logged step: split train/eval) and
the same scalars as TensorBoard event files,
checkpoints/ (orbax, resumed from the latest on restart), final/ (HF safetensors model),
exports/step-<k>/ (HF directories every export_every steps: the candidates of checkpoint selection),
and {train,eval}_pairs_with_ref.jsonl when reference log-probs had to be computed.
On several processes every process runs `run` (it is SPMD: same steps, same collectives); orbax
saves and restores checkpoints from every process, while metrics, event files, the reference
log-prob files and final/ are written by process 0 (rpo.files, rpo.report), and final/ is
complete for every process when `run` returns.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from rpo import checkpoint as ckpt
from rpo import distributed, files, losses, report, sharding
from rpo.configlib import bad
from rpo.files import DataError
from rpo.models.config import ModelConfig
from rpo.models.decoder import Params, param_shapes
from rpo.models.hf import load_model

Batch = dict[str, Any]
State = dict[str, Any]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step."""


# ---------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------

_FIELDS = {"pairs": ("prompt_ids", "chosen_ids", "rejected_ids"), "sft": ("prompt_ids", "response_ids")}
_REF = ("ref_chosen_logp", "ref_rejected_logp")


def _check_ids(value, field, where, vocab_size):
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise DataError(f"{where}: field {field!r} must be a list of ints")
    if not value:
        why = " (the first response token would have no position predicting it; start the prompt with BOS)"
        raise DataError(f"{where}: field {field!r} is empty" + (why if field == "prompt_ids" else ""))
    if vocab_size is not None and value and (min(value) < 0 or max(value) >= vocab_size):
        raise DataError(f"{where}: field {field!r} holds an id outside [0, {vocab_size})")


def read_rows(path: str, kind: str, *, vocab_size: int | None = None) -> list[dict]:
    """Reads and validates a pairs or SFT JSONL file. Raises DataError naming file:line."""
    if kind not in _FIELDS:
        raise ValueError(f"data.kind={kind!r}: use one of {sorted(_FIELDS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such {kind} file")
    rows = []
    for lineno, row in files.jsonl_rows(path):
        where = f"{path}:{lineno}"
        for field in _FIELDS[kind]:
            if field not in row:
                raise DataError(f"{where}: required field {field!r} is missing")
            _check_ids(row[field], field, where, vocab_size)
        if kind == "pairs":
            have = [k in row for k in _REF]
            if any(have) and not all(have):
                raise DataError(f"{where}: give both {_REF[0]!r} and {_REF[1]!r} or neither")
            for k in _REF:
                if k in row and (isinstance(row[k], bool) or not isinstance(row[k], (int, float))
                                 or not math.isfinite(row[k])):
                    raise DataError(f"{where}: field {k!r} must be a finite number, got {row[k]!r}")
        row["_where"] = where
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows



def _pack(prompt, response, seq_len, pad_id, truncate, where):
    if len(prompt) + len(response) > seq_len:
        if not truncate or len(prompt) + 1 >= seq_len:
            raise DataError(
                f"{where}: prompt ({len(prompt)}) + response ({len(response)}) tokens exceed "
                f"data.seq_len={seq_len} (set data.truncate=True to cut the response)"
            )
        response = response[: seq_len - len(prompt)]
    n = len(prompt) + len(response)
    tokens = np.full(seq_len, pad_id, np.int32)
    tokens[:n] = prompt + response
    positions = np.zeros(seq_len, np.int32)
    positions[:n] = np.arange(n)
    mask = np.arange(seq_len) < n
    loss_mask = mask & (np.arange(seq_len) >= len(prompt))
    return tokens, positions, mask, loss_mask


def make_batch(rows: list[dict], kind: str, batch_size: int, *, seq_len: int, pad_id: int, truncate: bool) -> Batch:
    """Packs up to `batch_size` rows (the rest are padding rows) into numpy arrays [B, P, ...]."""
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_size}")
    sides = _FIELDS[kind][1:]
    p = len(sides)
    out = {
        "tokens_BPT": np.full((batch_size, p, seq_len), pad_id, np.int32),
        "positions_BPT": np.zeros((batch_size, p, seq_len), np.int32),
        "mask_BPT": np.zeros((batch_size, p, seq_len), bool),
        "loss_mask_BPT": np.zeros((batch_size, p, seq_len), bool),
        "ref_logps_BP": np.zeros((batch_size, p), np.float32),
        "row_mask_B": np.zeros((batch_size,), bool),
    }
    for i, row in enumerate(rows):
        for j, side in enumerate(sides):
            packed = _pack(row["prompt_ids"], row[side], seq_len, pad_id, truncate, row.get("_where", "row"))
            for name, value in zip(("tokens_BPT", "positions_BPT", "mask_BPT", "loss_mask_BPT"), packed):
                out[name][i, j] = value
        if kind == "pairs":
            out["ref_logps_BP"][i] = [row.get(_REF[0], 0.0), row.get(_REF[1], 0.0)]
        out["row_mask_B"][i] = True
    return out


def split_micro(batch: Batch, micro: int) -> Batch:
    """[B, ...] -> [M, B/M, ...]."""
    b = batch["row_mask_B"].shape[0]
    if b % micro:
        raise ValueError(f"batch of {b} rows does not split into grad_accum={micro} micro-batches")
    return {k: v.reshape((micro, b // micro) + v.shape[1:]) for k, v in batch.items()}


def device_batch(rows: list[dict], kind: str, batch_size: int, *, mesh, rules, grad_accum: int | None = None,
                 seq_len: int, pad_id: int, truncate: bool) -> Batch:
    """`rows` (padded to batch_size) as global arrays on `mesh`, rows sharded over the batch axes:
    [B, ...], or [M, B/M, ...] with grad_accum=M. Each process packs only the rows its own devices
    hold (rpo.distributed.process_rows); the values are those of split_micro(make_batch(...))."""
    micro_count = grad_accum or 1
    if batch_size % micro_count:
        raise ValueError(f"batch of {batch_size} rows does not split into grad_accum={micro_count} micro-batches")
    micro = batch_size // micro_count
    lead = (micro_count, micro) if grad_accum else (micro,)
    dim = len(lead) - 1
    mine = distributed.process_rows(sharding.batch_sharding(mesh, len(lead), rules, dim), lead, dim)
    parts = [
        make_batch([rows[j] for j in (m * micro + mine).tolist() if j < len(rows)], kind, len(mine),
                   seq_len=seq_len, pad_id=pad_id, truncate=truncate)
        for m in range(micro_count)
    ]
    local = {k: np.stack([p[k] for p in parts]) if grad_accum else parts[0][k] for k in parts[0]}
    shapes = {k: lead + v.shape[len(lead):] for k, v in local.items()}
    return jax.make_array_from_process_local_data(batch_shardings(mesh, rules, local, dim), local, shapes)


def step_rows(num_rows: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Row indices of the batch of `step`: a fresh permutation each epoch, a pure function of
    (seed, step) so that a resumed run sees the same batches."""
    start = step * batch_size
    idx = []
    while len(idx) < batch_size:
        epoch, offset = divmod(start + len(idx), num_rows)
        perm = np.random.default_rng([seed, epoch]).permutation(num_rows)
        idx.extend(perm[offset: offset + batch_size - len(idx)].tolist())
    return np.asarray(idx)


# ---------------------------------------------------------------------------------------
# Loss of a batch, train step, eval step
# ---------------------------------------------------------------------------------------


def batch_logps(params: Params, batch: Batch, *, model_config: ModelConfig, chunk_size: int, remat: bool = False):
    """Summed response log-probs and response lengths of every side of a batch: [B, P] each."""
    b, p, t = batch["tokens_BPT"].shape
    flat = lambda x: x.reshape(b * p, t)  # noqa: E731
    logp_N, len_N = losses.sequence_logps(
        model_config, params, flat(batch["tokens_BPT"]), flat(batch["positions_BPT"]),
        flat(batch["mask_BPT"]), flat(batch["loss_mask_BPT"]), chunk_size=chunk_size, remat=remat,
    )
    return logp_N.reshape(b, p), len_N.reshape(b, p)


def batch_sums(params: Params, batch: Batch, *, model_config: ModelConfig, loss_cfg, remat: bool) -> dict[str, jax.Array]:
    """Sums over the real rows of one batch [B, P, ...]: 'loss' (sum of per-pair losses, or
    of per-token NLL for SFT), 'count' (the loss normaliser: pairs, or response tokens for
    SFT), 'pairs' (real rows) and 'sum/<metric>' for every per-pair metric."""
    logp_BP, len_BP = batch_logps(params, batch, model_config=model_config, chunk_size=loss_cfg.chunk_size, remat=remat)
    w_B = batch["row_mask_B"].astype(jnp.float32)
    pairs = jnp.sum(w_B)
    if loss_cfg.kind == "sft":
        tokens = jnp.sum(len_BP[:, 0] * w_B)
        nll = -jnp.sum(logp_BP[:, 0] * w_B)
        return {"loss": nll, "count": tokens, "pairs": pairs, "sum/logps/chosen": jnp.sum(logp_BP[:, 0] * w_B)}
    ref_BP = batch["ref_logps_BP"]
    loss_B, metrics = losses.preference_per_pair(
        loss_cfg.kind, logp_BP[:, 0], logp_BP[:, 1], ref_BP[:, 0], ref_BP[:, 1], len_BP[:, 0],
        beta=loss_cfg.beta, alpha=loss_cfg.alpha, label_smoothing=loss_cfg.label_smoothing,
    )
    out = {"loss": jnp.sum(loss_B * w_B), "count": pairs, "pairs": pairs}
    out.update({f"sum/{k}": jnp.sum(v * w_B) for k, v in metrics.items()})
    return out


def _means(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    out = {"loss": sums["loss"] / jnp.maximum(sums["count"], 1.0), "pairs": sums["pairs"], "count": sums["count"]}
    out.update({k[4:]: v / jnp.maximum(sums["pairs"], 1.0) for k, v in sums.items() if k.startswith("sum/")})
    return out


def make_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over optim.warmup_steps, then constant, linear or cosine decay to
    optim.end_lr_fraction * lr at num_steps."""
    lr, warm = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
    rest = max(1, num_steps - warm)
    end = lr * float(optim_cfg.end_lr_fraction)
    if optim_cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif optim_cfg.schedule == "linear":
        after = optax.linear_schedule(lr, end, rest)
    elif optim_cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, rest, alpha=float(optim_cfg.end_lr_fraction))
    else:
        raise ValueError(f"optim.schedule={optim_cfg.schedule!r}: use 'constant', 'linear' or 'cosine'")
    if warm <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def make_optimizer(optim_cfg, num_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (optim.clip_norm > 0) then AdamW; no weight decay on norms/biases."""
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: not any(s in jax.tree_util.keystr(path) for s in ("norm", "bias")), params
    )
    adamw = optax.adamw(
        make_schedule(optim_cfg, num_steps), b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay, mask=decay_mask,
    )
    if optim_cfg.clip_norm and optim_cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), adamw)
    return adamw


def init_state(params: Params, optimizer: optax.GradientTransformation) -> State:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


def state_shardings(model_config: ModelConfig, optimizer, mesh, rules) -> State:
    """Shardings of the train state: params by the logical rules, optimizer moments like
    their params, scalars replicated."""
    p_shard = sharding.param_shardings(model_config, mesh, rules)
    abstract_params = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32), param_shapes(model_config), is_leaf=lambda x: isinstance(x, tuple)
    )
    opt_shapes = jax.eval_shape(optimizer.init, abstract_params)
    rep = sharding.replicated(mesh)
    opt_shard = optax.tree_map_params(
        optimizer, lambda _, s: s, opt_shapes, p_shard, transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )
    return {"step": rep, "params": p_shard, "opt_state": opt_shard}


def batch_shardings(mesh, rules, batch: Batch, batch_dim: int) -> Batch:
    return {k: sharding.batch_sharding(mesh, np.ndim(v), rules, batch_dim) for k, v in batch.items()}


def train_step(state: State, batch: Batch, *, model_config: ModelConfig, cfg, optimizer) -> tuple[State, dict]:
    """One optimizer step on a batch [M, B/M, ...] (M micro-batches accumulated exactly)."""
    loss_cfg = cfg.loss
    if loss_cfg.kind == "sft":
        denom = jnp.sum(batch["row_mask_B"][..., None] & batch["loss_mask_BPT"][:, :, 0, 1:])
    else:
        denom = jnp.sum(batch["row_mask_B"])
    denom = jnp.maximum(denom.astype(jnp.float32), 1.0)

    def micro_grads(params, mb):
        def f(p):
            sums = batch_sums(p, mb, model_config=model_config, loss_cfg=loss_cfg, remat=cfg.remat)
            return sums["loss"] / denom, sums

        (_, sums), grads = jax.value_and_grad(f, has_aux=True)(params)
        return grads, sums

    params = state["params"]
    m = batch["row_mask_B"].shape[0]
    if m == 1:
        grads, sums = micro_grads(params, jax.tree.map(lambda x: x[0], batch))
    else:
        def body(acc, mb):
            g, s = micro_grads(params, mb)
            return jax.tree.map(jnp.add, acc, (g, s)), None

        zero_sums = jax.eval_shape(
            lambda p, mb: micro_grads(p, mb)[1], params, jax.tree.map(lambda x: x[0], batch)
        )
        zeros = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums))
        (grads, sums), _ = jax.lax.scan(body, zeros, batch)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates), "opt_state": opt_state}
    metrics = _means(sums)
    metrics["grad_norm"] = optax.global_norm(grads)
    return new_state, metrics


def make_train_step(model_config: ModelConfig, cfg, optimizer, mesh, rules, example_batch: Batch) -> Callable:
    """jax.jit of train_step with in/out shardings on `mesh` and the state donated."""
    s_shard = state_shardings(model_config, optimizer, mesh, rules)
    b_shard = batch_shardings(mesh, rules, example_batch, batch_dim=1)
    fn = lambda state, batch: train_step(state, batch, model_config=model_config, cfg=cfg, optimizer=optimizer)  # noqa: E731
    return jax.jit(fn, in_shardings=(s_shard, b_shard), out_shardings=(s_shard, sharding.replicated(mesh)),
                   donate_argnums=0)


def make_eval_step(model_config: ModelConfig, cfg, mesh, rules, example_batch: Batch) -> Callable:
    """jitted (params, batch [B, ...]) -> sums (see batch_sums), for held-out loss."""
    p_shard = sharding.param_shardings(model_config, mesh, rules)
    b_shard = batch_shardings(mesh, rules, example_batch, batch_dim=0)
    fn = lambda params, batch: batch_sums(params, batch, model_config=model_config, loss_cfg=cfg.loss, remat=False)  # noqa: E731
    return jax.jit(fn, in_shardings=(p_shard, b_shard), out_shardings=sharding.replicated(mesh))


def make_logps_fn(model_config: ModelConfig, mesh, rules, example_batch: Batch, *, chunk_size: int) -> Callable:
    """jitted (params, batch [B, P, ...]) -> (logps [B, P], lengths [B, P]), for reference log-probs."""
    p_shard = sharding.param_shardings(model_config, mesh, rules)
    b_shard = batch_shardings(mesh, rules, example_batch, batch_dim=0)
    fn = functools.partial(batch_logps, model_config=model_config, chunk_size=chunk_size)
    return jax.jit(fn, in_shardings=(p_shard, b_shard), out_shardings=sharding.replicated(mesh))


def add_reference_logps(
    model_config: ModelConfig, params: Params, rows: list[dict], out_path: str | None, *, batch_size: int,
    seq_len: int, pad_id: int, truncate: bool, chunk_size: int, mesh=None, rules=sharding.DEFAULT_RULES,
    on_batch: Callable[[int], Any] | None = None,
) -> list[dict]:
    """Computes the reference model's summed response log-probs of every pair by one jitted
    pass, sets 'ref_chosen_logp' / 'ref_rejected_logp' on the rows, and writes them to
    `out_path` atomically (None: the caller writes them). Returns the rows. on_batch(rows done in
    the batch): progress."""
    mesh = mesh if mesh is not None else sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    pack = dict(seq_len=seq_len, pad_id=pad_id, truncate=truncate)
    fn = make_logps_fn(model_config, mesh, rules, make_batch([], "pairs", batch_size, **pack), chunk_size=chunk_size)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        batch = device_batch(chunk, "pairs", batch_size, mesh=mesh, rules=rules, **pack)
        logp_BP, _ = distributed.fetch(fn(params, batch))
        for row, (c, r) in zip(chunk, logp_BP[: len(chunk)]):
            row[_REF[0]], row[_REF[1]] = float(c), float(r)
        if on_batch is not None:
            on_batch(len(chunk))
    if out_path is not None:
        files.write_jsonl(out_path, ({k: v for k, v in row.items() if not k.startswith("_")} for row in rows))
    return rows


# ---------------------------------------------------------------------------------------
# The training-phase driver
# ---------------------------------------------------------------------------------------


def _check_config(cfg) -> None:
    if cfg.loss.kind not in losses.LOSS_KINDS:
        bad("loss.kind", f"{cfg.loss.kind!r} is not one of {losses.LOSS_KINDS}")
    if (cfg.loss.kind == "sft") != (cfg.data.kind == "sft"):
        bad("data.kind", f"{cfg.data.kind!r} does not go with loss.kind={cfg.loss.kind!r}")
    for field in ("batch_size", "grad_accum", "num_steps", "data.seq_len", "loss.chunk_size", "log_every",
                  "eval_every", "checkpoint_every", "keep_checkpoints"):
        value = cfg
        for part in field.split("."):
            value = value[part]
        if not isinstance(value, int) or value < 1:
            bad(field, f"must be a positive int, got {value!r}")
    if not isinstance(cfg.export_every, int) or cfg.export_every < 0:
        bad("export_every", f"must be an int >= 0 (0: no exports), got {cfg.export_every!r}")
    if cfg.loss.kind != "sft" and not cfg.loss.beta > 0:
        bad("loss.beta", f"must be > 0, got {cfg.loss.beta!r}")
    if cfg.batch_size % cfg.grad_accum:
        bad("grad_accum", f"{cfg.grad_accum} does not divide batch_size={cfg.batch_size}")


_SHOWN = ("loss", "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected", "grad_norm", "lr")


def _show(step: int, split: str, metrics: dict) -> None:
    if not distributed.is_main():
        return
    short = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items() if k in _SHOWN)
    logging.info(f"{split} step {step}: {short}")


def export(model_config: ModelConfig, params: Params, path: str) -> None:
    """params as an HF directory at `path`, replacing any there atomically (a directory renamed into
    place). Every process takes part (the gather, rpo.files' barriers); process 0 writes and renames."""
    from rpo.models.hf import save_pretrained

    host_params = distributed.fetch(params)
    tmp, old = f"{path}.tmp", f"{path}.old"
    if distributed.is_main():  # left by a run killed while saving
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    distributed.sync(f"rpo.train: {tmp} cleared")
    save_pretrained(model_config, host_params, tmp)
    if distributed.is_main():
        if os.path.isdir(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    distributed.sync(f"rpo.train: {path} written")


def export_path(workdir: str, step: int) -> str:
    """Where `run` exports the model of step `step` (config field export_every)."""
    return os.path.join(workdir, "exports", f"step-{step:06d}")


def run(cfg, workdir: str, *, on_step: Callable[[int, dict], None] | None = None, echo: bool = True) -> Params:
    """One training phase. Resumes from the latest checkpoint in workdir/checkpoints.

    Returns the final params (also written to workdir/final as an HF model). `on_step(step,
    metrics)` is called after every step (a test hook: raising there simulates a crash).
    Raises NonFiniteLossError naming the step when the loss is NaN or infinite.
    """
    _check_config(cfg)
    os.makedirs(workdir, exist_ok=True)
    rules = sharding.rules_from_config(cfg.sharding_rules)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    # Streamed straight into the training shardings: the host never holds the whole model.
    model_config, params = load_model(cfg.model, shardings_for=lambda c: sharding.param_shardings(c, mesh, rules))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if (cfg.batch_size // cfg.grad_accum) % shards:
        raise ValueError(
            f"config fields batch_size={cfg.batch_size} / grad_accum={cfg.grad_accum}: the micro-batch does not "
            f"split over the mesh's data x fsdp = {shards} devices"
        )
    kind = cfg.data.kind
    pack = dict(seq_len=cfg.data.seq_len, pad_id=cfg.data.pad_id, truncate=cfg.data.truncate)
    train_rows = read_rows(cfg.data.train_path, kind, vocab_size=model_config.vocab_size)
    eval_rows = read_rows(cfg.data.eval_path, kind, vocab_size=model_config.vocab_size) if cfg.data.eval_path else []

    micro = cfg.batch_size // cfg.grad_accum
    if kind == "pairs":
        for name, rows in (("train", train_rows), ("eval", eval_rows)):
            missing = [r["_where"] for r in rows if _REF[0] not in r]
            if missing and len(missing) < len(rows):
                raise DataError(f"{missing[0]}: no reference log-probs while other rows of the file have them")
            if missing:
                if not cfg.data.compute_ref:
                    raise DataError(f"{missing[0]}: no reference log-probs (set data.compute_ref=True)")
                out = os.path.join(workdir, f"{name}_pairs_with_ref.jsonl")
                add_reference_logps(model_config, params, rows, out, batch_size=micro, chunk_size=cfg.loss.chunk_size,
                                    mesh=mesh, rules=rules, **pack)

    optimizer = make_optimizer(cfg.optim, cfg.num_steps)
    schedule = make_schedule(cfg.optim, cfg.num_steps)
    example = split_micro(make_batch([], kind, cfg.batch_size, **pack), cfg.grad_accum)
    step_fn = make_train_step(model_config, cfg, optimizer, mesh, rules, example)
    eval_fn = make_eval_step(model_config, cfg, mesh, rules, make_batch([], kind, micro, **pack)) if eval_rows else None

    s_shard = state_shardings(model_config, optimizer, mesh, rules)
    mngr = ckpt.manager(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.keep_checkpoints)
    shapes = jax.eval_shape(lambda p: init_state(p, optimizer), params)
    start, state = ckpt.restore_latest(mngr, ckpt.abstract(shapes, s_shard))
    if state is None:
        start = 0
        state = jax.device_put(init_state(params, optimizer), s_shard)
    del params
    log = report.MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    if start and distributed.is_main():
        logging.info(f"resumed from {mngr.directory} at step {start}")

    def evaluate(step):
        total = None
        batches = range(0, len(eval_rows), micro)
        if cfg.eval_batches > 0:
            batches = batches[: cfg.eval_batches]
        for b0 in batches:
            batch = device_batch(eval_rows[b0: b0 + micro], kind, micro, mesh=mesh, rules=rules, **pack)
            sums = distributed.fetch(eval_fn(state["params"], batch))
            total = sums if total is None else jax.tree.map(np.add, total, sums)
        log.log(step, _means(total), split="eval")
        if echo:
            _show(step, "eval", _means(total))

    try:
        for step in range(start, cfg.num_steps):
            rows = [train_rows[i] for i in step_rows(len(train_rows), cfg.batch_size, step, cfg.seed)]
            batch = device_batch(rows, kind, cfg.batch_size, grad_accum=cfg.grad_accum, mesh=mesh, rules=rules, **pack)
            state, metrics = step_fn(state, batch)
            metrics = distributed.fetch(metrics)
            metrics["lr"] = schedule(step)
            done = step + 1
            if not math.isfinite(float(metrics["loss"])):
                raise NonFiniteLossError(
                    f"step {done}: loss is {float(metrics['loss'])} ({cfg.loss.kind}, train file "
                    f"{cfg.data.train_path}); stopping (last checkpoint: {mngr.latest_step()})"
                )
            if done % cfg.log_every == 0 or done == cfg.num_steps:
                log.log(done, metrics, split="train")
                if echo:
                    _show(done, "train", metrics)
            if eval_fn is not None and (done % cfg.eval_every == 0 or done == cfg.num_steps):
                evaluate(done)
            if cfg.export_every and done % cfg.export_every == 0 and not os.path.isdir(export_path(workdir, done)):
                export(model_config, state["params"], export_path(workdir, done))
            if done % cfg.checkpoint_every == 0 or done == cfg.num_steps:
                ckpt.save(mngr, done, state)
            if on_step is not None:
                on_step(done, metrics)
    finally:
        mngr.wait_until_finished()
        mngr.close()
        log.close()

    final = os.path.join(workdir, "final")
    if start < cfg.num_steps or not os.path.isdir(final):  # a resumed run that trained on rewrites it
        export(model_config, state["params"], final)
    return state["params"]


# ---------------------------------------------------------------------------------------
# Rollout batches and the GRPO step (rpo.grpo drives them)
# ---------------------------------------------------------------------------------------
#
# A rollout row (a dict; rpo.grpo builds them from rpo.sampling's output):
#   {"prompt_ids": [...], "completion_ids": [...], "logprobs": [one float per completion token: the sampler's,
#    i.e. log pi_old], "advantage": float, optional "ref_logprobs": [per completion token, the reference's]}
# packed right-padded like the SFT rows above (the prompt then the completion, one side: no P axis):
#   tokens_BT, positions_BT, mask_BT, loss_mask_BT (True on completion tokens), old_logps_BT and ref_logps_BT
#   (float32, the per-token values at their tokens' positions, 0 elsewhere), adv_B float32, row_mask_B bool.
# The GRPO step takes them with a leading micro-batch axis ([M, B/M, ...]) and accumulates exactly: the normaliser
# (rows, tokens or rows x max_new_tokens, losses.grpo_denominator) is counted over the whole batch first, or given:
# rows that cannot move the loss (advantage 0 and no KL term) may be left out of the batch while still counting in
# the normaliser (rpo.grpo does so), which gives the same gradient for less compute.


def make_rollout_batch(rows: list[dict], batch_size: int, *, seq_len: int, pad_id: int) -> Batch:
    """Packs up to `batch_size` rollout rows (the rest are padding rows) into numpy arrays [B, ...]. A row whose
    prompt + completion passes seq_len, or whose logprobs do not match its completion, raises DataError."""
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rollouts do not fit a batch of {batch_size}")
    out = {
        "tokens_BT": np.full((batch_size, seq_len), pad_id, np.int32),
        "positions_BT": np.zeros((batch_size, seq_len), np.int32),
        "mask_BT": np.zeros((batch_size, seq_len), bool),
        "loss_mask_BT": np.zeros((batch_size, seq_len), bool),
        "old_logps_BT": np.zeros((batch_size, seq_len), np.float32),
        "ref_logps_BT": np.zeros((batch_size, seq_len), np.float32),
        "adv_B": np.zeros((batch_size,), np.float32),
        "row_mask_B": np.zeros((batch_size,), bool),
    }
    for i, row in enumerate(rows):
        where = row.get("_where", f"rollout {i}")
        prompt, completion = row["prompt_ids"], row["completion_ids"]
        for field in ("logprobs",) + (("ref_logprobs",) if "ref_logprobs" in row else ()):
            if len(row[field]) != len(completion):
                raise DataError(f"{where}: {len(row[field])} {field} for {len(completion)} completion tokens")
        packed = _pack(prompt, completion, seq_len, pad_id, False, where)
        for name, value in zip(("tokens_BT", "positions_BT", "mask_BT", "loss_mask_BT"), packed):
            out[name][i] = value
        n = len(prompt)
        out["old_logps_BT"][i, n: n + len(completion)] = row["logprobs"]
        if "ref_logprobs" in row:
            out["ref_logps_BT"][i, n: n + len(completion)] = row["ref_logprobs"]
        out["adv_B"][i] = row["advantage"]
        out["row_mask_B"][i] = True
    return out


def device_rollouts(rows: list[dict], batch_size: int, *, mesh, rules, grad_accum: int | None = None, seq_len: int,
                    pad_id: int) -> Batch:
    """Rollout rows (padded to batch_size) as global arrays on `mesh`, as device_batch does for pairs: [B, ...], or
    [M, B/M, ...] with grad_accum=M; each process packs only the rows its devices hold."""
    micro_count = grad_accum or 1
    if batch_size % micro_count:
        raise ValueError(f"batch of {batch_size} rollouts does not split into grad_accum={micro_count} micro-batches")
    micro = batch_size // micro_count
    lead = (micro_count, micro) if grad_accum else (micro,)
    dim = len(lead) - 1
    mine = distributed.process_rows(sharding.batch_sharding(mesh, len(lead), rules, dim), lead, dim)
    parts = [make_rollout_batch([rows[j] for j in (m * micro + mine).tolist() if j < len(rows)], len(mine),
                                seq_len=seq_len, pad_id=pad_id) for m in range(micro_count)]
    local = {k: np.stack([p[k] for p in parts]) if grad_accum else parts[0][k] for k in parts[0]}
    shapes = {k: lead + v.shape[len(lead):] for k, v in local.items()}
    return jax.make_array_from_process_local_data(batch_shardings(mesh, rules, local, dim), local, shapes)


def _rollout_logps(params, batch, *, model_config, g, remat):
    return losses.token_logps(model_config, params, batch["tokens_BT"], batch["positions_BT"], batch["mask_BT"],
                              batch["loss_mask_BT"], chunk_size=g.chunk_size, remat=remat,
                              temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)


def grpo_sums(params: Params, batch: Batch, denom, *, model_config: ModelConfig, g, remat: bool) -> dict[str, jax.Array]:
    """Sums over the real rows of one rollout batch [B, ...]: 'loss' (losses.grpo_numerator / denom), 'tokens',
    'rows', and 'tok/<name>' (sums over tokens of each per-token indicator of losses.grpo_token_loss, and of the
    entropy). `g` holds the GRPO fields: clip_low, clip_high, beta, kl_ratio, normalization, temperature, top_k,
    top_p, chunk_size (and max_new_tokens, for grpo_step's normaliser)."""
    logp_BT, ent_BT = _rollout_logps(params, batch, model_config=model_config, g=g, remat=remat)
    row_B = batch["row_mask_B"]
    mask_BT = batch["loss_mask_BT"] & row_B[:, None]
    tl, ind = losses.grpo_token_loss(logp_BT, batch["old_logps_BT"], batch["ref_logps_BT"], batch["adv_B"], mask_BT,
                                     clip_low=g.clip_low, clip_high=g.clip_high, beta=g.beta, kl_ratio=g.kl_ratio)
    out = {"loss": losses.grpo_numerator(tl, mask_BT, row_B, normalization=g.normalization) / denom,
           "tokens": jnp.sum(mask_BT.astype(jnp.float32)), "rows": jnp.sum(row_B.astype(jnp.float32)),
           "tok/entropy": jnp.sum(jax.lax.stop_gradient(ent_BT) * mask_BT)}
    out.update({f"tok/{k}": jnp.sum(v) for k, v in ind.items()})
    return out


def grpo_step(state: State, batch: Batch, denom=None, *, model_config: ModelConfig, g, optimizer,
              remat: bool = False) -> tuple[State, dict]:
    """One optimizer step on a rollout batch [M, B/M, ...] (M micro-batches accumulated exactly), the loss divided
    by `denom` (a float32 scalar; None: losses.grpo_denominator of this batch). Metrics: 'loss', 'grad_norm',
    'tokens', 'rows', and the token means 'entropy', 'kl', 'ratio', 'clip/low', 'clip/high', 'clip/region' (at
    the parameters before the step, over the batch's rows)."""
    if denom is None:
        mask = batch["loss_mask_BT"] & batch["row_mask_B"][..., None]
        denom = losses.grpo_denominator(mask, batch["row_mask_B"], normalization=g.normalization,
                                        max_new_tokens=g.max_new_tokens)

    def micro_grads(params, mb):
        def f(p):
            sums = grpo_sums(p, mb, denom, model_config=model_config, g=g, remat=remat)
            return sums["loss"], sums

        (_, sums), grads = jax.value_and_grad(f, has_aux=True)(params)
        return grads, sums

    params = state["params"]
    if batch["row_mask_B"].shape[0] == 1:
        grads, sums = micro_grads(params, jax.tree.map(lambda x: x[0], batch))
    else:
        def body(acc, mb):
            return jax.tree.map(jnp.add, acc, micro_grads(params, mb)), None

        shapes = jax.eval_shape(micro_grads, params, jax.tree.map(lambda x: x[0], batch))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (grads, sums), _ = jax.lax.scan(body, zeros, batch)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates), "opt_state": opt_state}
    tokens = jnp.maximum(sums["tokens"], 1.0)
    metrics = {"loss": sums["loss"], "tokens": sums["tokens"], "rows": sums["rows"], "grad_norm": optax.global_norm(grads)}
    metrics.update({k[4:]: v / tokens for k, v in sums.items() if k.startswith("tok/")})
    return new_state, metrics


def make_grpo_step(model_config: ModelConfig, g, optimizer, mesh, rules, example_batch: Batch, *, remat: bool = False
                   ) -> Callable:
    """jax.jit of (state, batch, denom) -> grpo_step(state, batch, denom) with in/out shardings on `mesh` and the
    state donated; denom is a float32 scalar (losses.grpo_denominator of the rows it normalises over)."""
    s_shard = state_shardings(model_config, optimizer, mesh, rules)
    b_shard = batch_shardings(mesh, rules, example_batch, batch_dim=1)
    rep = sharding.replicated(mesh)
    fn = lambda state, batch, denom: grpo_step(state, batch, denom, model_config=model_config, g=g,  # noqa: E731
                                               optimizer=optimizer, remat=remat)
    return jax.jit(fn, in_shardings=(s_shard, b_shard, rep), out_shardings=(s_shard, rep), donate_argnums=0)


def make_rollout_logps_fn(model_config: ModelConfig, g, mesh, rules, example_batch: Batch) -> Callable:
    """jitted (params, rollout batch [B, ...]) -> per-token log-probs [B, T] under the sampling transform of `g`
    (the reference's, for the KL term)."""
    p_shard = sharding.param_shardings(model_config, mesh, rules)
    b_shard = batch_shardings(mesh, rules, example_batch, batch_dim=0)
    fn = lambda params, batch: _rollout_logps(params, batch, model_config=model_config, g=g, remat=False)[0]  # noqa: E731
    return jax.jit(fn, in_shardings=(p_shard, b_shard), out_shardings=sharding.replicated(mesh))
