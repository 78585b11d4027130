"""The Iterative RPO loop (Pang et al. 2024) and its baselines, on the resumable stages of rpo.stages.

  M_0 = model.path, or an SFT warm start on the gold solutions (init.num_steps > 0)
  for t = 1..T:  sample N per train prompt from M_{t-1} at temperature_t -> reward each
                 -> K (correct, incorrect) pairs per prompt -> reference log-probs under M_{t-1}
                 -> train M_t from M_{t-1} with DPO + NLL -> select the export best on held-out
                 training problems -> evaluate M_t (greedy, maj@k)

irpo.method picks what each iteration trains on (TRAINING_DATA), so the paper's baselines are configs:
  irpo      pairs, loss.kind dpo_nll (alpha = 0 is "DPO without NLL")
  star      SFT on the model's own correct, finished samples (each distinct completion once)
  sft_gold  SFT on the gold solutions (no sampling)
and irpo.iterations = 0 evaluates M_0 only (zero-shot, or the SFT warm start).

Stages and their artifacts (workdir/...), each written atomically; a stage whose artifact
exists is skipped (rpo.stages.artifact), so killing the process at any moment and rerunning
the same command resumes at the first unfinished stage (training resumes from its last orbax
checkpoint, sampling from its last finished chunk):
  data/{train,heldout,test}.jsonl  prompts (text and ids), gold answers and gold responses
  tokenizer/                  the tokenizer (saved into every model directory too)
  iter0/train/                the warm start's training phase (checkpoints/, metrics.jsonl, final/)
  iter<t>/samples/part-*.jsonl  N samples per train prompt of the iteration, with answer and reward
  iter<t>/pairs.jsonl, pairs_stats.json   preference pairs (with reference log-probs and texts)
  iter<t>/sft.jsonl           the SFT rows (star, sft_gold)
  iter<t>/train/final/        M_t as an HF directory (with the tokenizer): loads in transformers
  iter<t>/select.json         the held-out accuracy of each export, and the one kept (select/ holds its samples)
  iter<t>/eval.json   test metrics; eval_greedy/ and eval_samples/ hold every scored completion
  results.json, accuracy.png  one row per iteration; the accuracy plot
  metrics.jsonl, events.out.tfevents.*    per-iteration scalars, as JSON lines and for TensorBoard
                              (each training phase logs its steps the same way in iter<t>/train/)

Config fields: see configs/arith_tiny.py, which sets every one of them.
"""

from __future__ import annotations

import os

import numpy as np
from absl import logging

from rpo import stages
from rpo.configlib import bad

CONFIG_NAME = "irpo_config.json"


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


def run(cfg, workdir: str) -> list[dict]:
    """The whole experiment, the loop of the module docstring; returns the results rows (also workdir/results.json)."""
    from rpo import report

    check_config(cfg)
    ctx = stages.open_run(cfg, workdir, config_name=CONFIG_NAME)  # data/, tokenizer/, the config recorded
    training_data = TRAINING_DATA[cfg.irpo.method]
    log = report.MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    results = []
    try:
        # M_0: model.path, or an SFT warm start on the gold solutions.
        model_path = (stages.warm_start(cfg, ctx.models, ctx.data["train"], ctx.tokenizer, workdir)
                      if cfg.init.num_steps else cfg.model.path)
        steps = cfg.init.num_steps
        metrics, fresh = stages.evaluate(ctx, model_path, os.path.join(workdir, "iter0"))
        results.append({"iteration": 0, **metrics, "train_steps": steps})
        _record(log if fresh else None, results, workdir)

        for t in range(1, cfg.irpo.iterations + 1):
            it_dir = os.path.join(workdir, f"iter{t}")
            prompts = iteration_prompts(cfg, t, ctx.data["train"])
            # irpo: sample -> reward -> pairs -> reference log-probs (preference_pairs); star, sft_gold: SFT rows.
            train_path, kind, stats = training_data(ctx, t, it_dir, model_path, prompts)
            train_dir = os.path.join(it_dir, "train")
            stages.train_phase(cfg, cfg.train, ctx.models, model_path=model_path, train_path=train_path, kind=kind,
                               out_dir=train_dir, tokenizer=ctx.tokenizer, desc=f"iter{t} train ({cfg.irpo.method})",
                               export_every=cfg.select.every)
            model_path, choice = stages.select_checkpoint(ctx, train_dir, it_dir)  # M_t
            steps += choice["chosen_step"]
            metrics, fresh = stages.evaluate(ctx, model_path, it_dir)
            held = choice["heldout_accuracy"].get(str(choice["chosen_step"]))
            results.append({"iteration": t, **metrics, **stats, "train_steps": steps, "selected_step":
                            choice["chosen_step"], **({"heldout_accuracy": held} if held is not None else {})})
            _record(log if fresh else None, results, workdir)
    finally:
        log.close()
    return results


def iteration_prompts(cfg, t: int, train_rows: list[dict]) -> list[dict]:
    """The train prompts of iteration t: all of them, or irpo.prompts_per_iteration drawn
    without replacement by a seeded permutation (fresh prompts each iteration until the
    split runs out, then the next pass)."""
    per = cfg.irpo.prompts_per_iteration
    if not per or per >= len(train_rows):
        return train_rows
    order = np.random.default_rng([cfg.seed, 17]).permutation(len(train_rows))
    return [train_rows[int(order[((t - 1) * per + k) % len(order)])] for k in range(per)]


# ---------------------------------------------------------------------------------------
# What each iteration trains on (irpo.method)
# ---------------------------------------------------------------------------------------


def preference_pairs(ctx: stages.Context, t: int, it_dir: str, model_path: str, prompts: list[dict]
                     ) -> tuple[str, str, dict]:
    """IRPO's training data: N samples per prompt from M_{t-1}, rewarded -> K (winner, loser) pairs per prompt ->
    their reference log-probs under M_{t-1}. Returns (iter<t>/pairs.jsonl, "pairs", results columns)."""
    samples = rewarded(sample(ctx, t, it_dir, model_path, prompts))
    path, pstats = stages.reference_pairs(ctx.models, model_path, it_dir, t, ctx.cfg,
                                          lambda: build_pairs(ctx.cfg, t, prompts, samples))
    return path, "pairs", {**sample_stats(samples), **{k: pstats[k] for k in _PAIR_STATS}}


def own_correct_samples(ctx: stages.Context, t: int, it_dir: str, model_path: str, prompts: list[dict]
                        ) -> tuple[str, str, dict]:
    """STaR's training data (irpo.method='star'): SFT rows of the model's own winners, each distinct completion of
    a prompt once. Returns (iter<t>/sft.jsonl, "sft", results columns)."""
    samples = rewarded(sample(ctx, t, it_dir, model_path, prompts))

    def rows() -> list[dict]:
        seen, out = set(), []
        for s in samples:
            key = (s["prompt_index"], tuple(s["completion_ids"]))
            if s["winner"] and key not in seen:
                seen.add(key)
                r = prompts[s["prompt_index"]]
                out.append({"prompt_ids": r["prompt_ids"], "response_ids": s["completion_ids"], "uid": r["uid"]})
        if not out:
            raise RuntimeError(f"iteration {t}: no correct sample to train on (star)")
        return out

    path = os.path.join(it_dir, "sft.jsonl")
    return path, "sft", {**sample_stats(samples), "star_rows": len(stages.artifact(path, rows))}


def gold_solutions(ctx: stages.Context, t: int, it_dir: str, model_path: str, prompts: list[dict]
                   ) -> tuple[str, str, dict]:
    """The SFT-on-gold baseline's training data (irpo.method='sft_gold'): the gold solutions of the iteration's
    prompts; nothing is sampled. Returns (iter<t>/sft.jsonl, "sft", {})."""
    def rows() -> list[dict]:
        out = stages.gold_rows(prompts)
        if not out:
            raise ValueError(f"irpo.method='sft_gold': task {ctx.task.name} has no gold response that fits seq_len="
                             f"{ctx.cfg.seq_len} (see data/train_stats.json)")
        return out

    path = os.path.join(it_dir, "sft.jsonl")
    stages.artifact(path, rows, read=False)
    return path, "sft", {}


TRAINING_DATA = {"irpo": preference_pairs, "star": own_correct_samples, "sft_gold": gold_solutions}
METHODS = tuple(TRAINING_DATA)


# ---------------------------------------------------------------------------------------
# Samples, rewards, pairs
# ---------------------------------------------------------------------------------------


def sample(ctx: stages.Context, t: int, it_dir: str, model_path: str, prompts: list[dict]) -> list[dict]:
    """irpo.samples_per_prompt samples of each prompt from M_{t-1} at the iteration's temperature, each with the
    task's answer and whether it is correct: iter<t>/samples/."""
    i = ctx.cfg.irpo
    return stages.sample_and_score(
        ctx.models, model_path, ctx.task, ctx.tokenizer, prompts, os.path.join(it_dir, "samples"),
        n=i.samples_per_prompt, temperature=i.temperatures[t - 1], top_p=i.top_p, top_k=i.top_k,
        max_new_tokens=i.max_new_tokens, chunk=i.chunk_prompts, desc=f"iter{t} sample",
        seed=stages.sampling_seed(ctx.cfg.seed, "iteration", t),
    )


def rewarded(samples: list[dict]) -> list[dict]:
    """The samples, each marked a winner when correct and finished: a correct answer followed by text cut off at
    max_new_tokens is not a response to reinforce."""
    for s in samples:
        s["winner"] = s["correct"] and s["finish_reason"] != "length"
    return samples


def sample_stats(samples: list[dict]) -> dict:
    """The results columns of an iteration's samples."""
    stats = {"train_sample_accuracy": float(np.mean([s["correct"] for s in samples])),
             "correct_but_cut_off": sum(s["correct"] and not s["winner"] for s in samples)}
    winners = [s for s in samples if s["winner"]]
    if winners and "steps_correct" in winners[0]:  # the share of winners whose every step is right
        stats["winner_precision"] = float(np.mean([s["steps_correct"] for s in winners]))
    return stats


def build_pairs(cfg, t: int, prompts: list[dict], samples: list[dict]) -> tuple[list[dict], dict]:
    """K (winner, loser) pairs per prompt (rpo.pairs: the paper's walk; the gold solution as a winner with
    irpo.add_gold), seeded by cfg.seed + t; (rows, stats)."""
    from rpo import pairs as pairs_lib

    i = cfg.irpo
    by_prompt = [[] for _ in prompts]
    for s in samples:
        by_prompt[s["prompt_index"]].append(
            pairs_lib.Sample(s["completion_ids"], s["winner"], valid=s["answer"] is not None, text=s["text"]))
    groups = [pairs_lib.PromptSamples(r["prompt_ids"], by_prompt[n], uid=r["uid"],
                                      gold=pairs_lib.Sample(r["target_ids"], True, text=r["target"])
                                      if "target_ids" in r else None)
              for n, r in enumerate(prompts)]
    rows, stats = pairs_lib.build_pairs(
        groups, pairs_per_prompt=i.pairs_per_prompt, repeat=not i.distinct_pairs, add_gold=i.add_gold,
        max_len=cfg.seq_len, max_pairs=i.max_pairs or None, seed=cfg.seed + t, with_text=True,
    )
    if not rows:
        raise RuntimeError(f"iteration {t}: no preference pairs ({stats}); every prompt was all-correct or all-wrong")
    logging.info(f"iter{t} pairs: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    return rows, stats


# The pair counts copied into results.json (pairs_stats.json has them all).
_PAIR_STATS = ("pairs", "prompts_paired", "prompts_all_correct", "prompts_all_wrong", "prompts_no_valid",
               "prompts_dropped", "prompts_gold_added", "pairs_too_long")


def _record(log, results, workdir) -> None:
    from rpo import report

    row = stages.record_iteration(log, results, workdir)
    report.plot_results(results, os.path.join(workdir, "accuracy.png"))
    logging.info("iteration {iteration}: greedy {greedy_accuracy:.3f}".format(**row)
                 + (f", maj@{row['maj_k']} {row['maj_accuracy']:.3f}" if "maj_accuracy" in row else ""))


# ---------------------------------------------------------------------------------------
# Config checks
# ---------------------------------------------------------------------------------------


def check_config(cfg) -> None:
    i = cfg.irpo
    if i.method not in METHODS:
        bad("irpo.method", f"{i.method!r} is not one of {METHODS}")
    if not isinstance(i.iterations, int) or i.iterations < 0:
        bad("irpo.iterations", f"must be an int >= 0, got {i.iterations!r}")
    if len(i.temperatures) < i.iterations:
        bad("irpo.temperatures", f"{len(i.temperatures)} values for {i.iterations} iterations")
    if not isinstance(i.prompts_per_iteration, int) or i.prompts_per_iteration < 0:
        bad("irpo.prompts_per_iteration", f"must be an int >= 0 (0: all), got {i.prompts_per_iteration!r}")
    for field, value in (("irpo.samples_per_prompt", i.samples_per_prompt),
                         ("irpo.pairs_per_prompt", i.pairs_per_prompt),
                         ("irpo.max_new_tokens", i.max_new_tokens), ("irpo.chunk_prompts", i.chunk_prompts),
                         ("eval.max_new_tokens", cfg.eval.max_new_tokens), ("eval.maj_k", cfg.eval.maj_k),
                         ("seq_len", cfg.seq_len)):
        if not isinstance(value, int) or value < 1:
            bad(field, f"must be a positive int, got {value!r}")
    if cfg.data.long_prompts not in ("error", "skip"):
        bad("data.long_prompts", f"{cfg.data.long_prompts!r} is not 'error' or 'skip'")
    if i.method == "irpo" and cfg.train.loss.kind == "sft":
        bad("train.loss.kind", "'sft' does not train on pairs (irpo.method='irpo')")
    if i.method != "irpo" and cfg.train.loss.kind != "sft":
        bad("train.loss.kind", f"irpo.method={i.method!r} trains by SFT: set it to 'sft'")
    stages.check_loop_blocks(cfg)
