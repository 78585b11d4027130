"""DPO on pairs a reward model chooses: CoT-Self-Instruct's protocol for non-verifiable prompts (Yu et al. 2025
train on their synthetic instructions this way), as resumable stages.

  prompts (rm_dpo.prompts_file: JSONL with "question", e.g. a CoT-Self-Instruct dataset.jsonl of instructions)
  for t = 1..rm_dpo.iterations (1: offline, responses from M_0; more: online, each iteration from M_{t-1}):
      K responses per prompt from M_{t-1} (rpo.sampling)
      -> each scored by the reward model (rpo.models.reward: an HF *ForSequenceClassification checkpoint, its
         first label's score of (prompt, response) as rpo.models.reward.encode_pair builds it)
      -> one pair per prompt: the best response as chosen, the worst as rejected (a prompt whose K scores are all
         equal, or whose best and worst are the same tokens, or that does not fit seq_len, makes no pair: counted)
      -> reference log-probs under M_{t-1}, then rpo.train's DPO step (train.loss.kind 'dpo'), as IRPO trains
      -> M_t evaluated on the held-out prompts: the reward model's mean score of its greedy responses, and how
         often that beats M_0's greedy response to the same prompt (win rate, ties count half)

Stages and artifacts (workdir/...), each skipped when its file exists (rpo.stages.artifact):
  prompts.jsonl, eval_prompts.jsonl  the training and held-out prompts (uid, question, prompt text and ids)
  tokenizer/                         the policy's tokenizer
  iter0/eval.json, iter0/eval_greedy/  M_0's greedy responses and their scores
  iter<t>/responses/part-*.jsonl     K responses per prompt;  iter<t>/scores.jsonl  their reward-model scores
  iter<t>/pairs.jsonl, pairs_stats.json   best-vs-worst pairs with reference log-probs and both scores
  iter<t>/train/                     the DPO phase (checkpoints/, metrics.jsonl, final/ = M_t)
  iter<t>/eval.json                  held-out reward mean and win rate against M_0
  results.json, reward.png, metrics.jsonl   one row per iteration
"""

from __future__ import annotations

import os

import numpy as np
from absl import logging

from rpo import files, stages
from rpo.configlib import ConfigError, bad

CONFIG_NAME = "rm_dpo_config.json"


def check_config(cfg) -> None:
    r = cfg.rm_dpo
    if not r.reward_model:
        bad("rm_dpo.reward_model", "empty: name an HF *ForSequenceClassification directory")
    if not os.path.isdir(r.reward_model):
        bad("rm_dpo.reward_model", f"{r.reward_model} is not a directory")
    if not r.prompts_file:
        bad("rm_dpo.prompts_file", "empty: name a JSONL file of prompts (\"question\" per line)")
    for field in ("iterations", "max_new_tokens", "chunk_prompts", "reward_batch_size", "reward_max_len",
                  "eval_prompts", "eval_max_new_tokens"):
        if not isinstance(r[field], int) or r[field] < 1:
            bad(f"rm_dpo.{field}", f"must be a positive int, got {r[field]!r}")
    if not isinstance(r.responses_per_prompt, int) or r.responses_per_prompt < 2:
        bad("rm_dpo.responses_per_prompt", f"{r.responses_per_prompt!r}: best vs worst needs at least 2 responses")
    if not r.temperature > 0:
        bad("rm_dpo.temperature", f"must be > 0 (K greedy responses would be one), got {r.temperature!r}")
    if cfg.train.loss.kind not in ("dpo", "dpo_nll", "ipo"):
        bad("train.loss.kind", f"{cfg.train.loss.kind!r}: the pairs train a preference loss (dpo, dpo_nll, ipo)")
    if not cfg.model.path:
        bad("model.path", "empty: the policy must be an HF directory (a model that follows instructions)")


def load_prompts(cfg, tokenizer, workdir: str, context: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompt rows: the file's rows in order, the last rm_dpo.eval_prompts held out. A prompt with
    no room for max_new_tokens in the context is an error or (data.long_prompts='skip') skipped and counted."""
    held = os.path.join(workdir, "eval_prompts.jsonl")
    train = stages.artifact(os.path.join(workdir, "prompts.jsonl"),
                            lambda: _train_prompts(cfg, tokenizer, workdir, context, held))
    return train, files.read_jsonl(held)


def _train_prompts(cfg, tokenizer, workdir: str, context: int, held_path: str) -> list[dict]:
    """The rows of prompts.jsonl; writes prompts_stats.json and the held-out rows to held_path first."""
    r = cfg.rm_dpo
    if not os.path.isfile(r.prompts_file):
        raise ConfigError(f"config field rm_dpo.prompts_file: {r.prompts_file} does not exist")
    rows, skipped = [], []
    room = max(r.max_new_tokens, r.eval_max_new_tokens)
    for n, obj in files.jsonl_rows(r.prompts_file):
        q = obj.get("question")
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{r.prompts_file}:{n}: no 'question' string")
        uid = str(obj.get("uid", f"{os.path.basename(r.prompts_file)}/{n}"))
        text = stages.chat_wrap(cfg, tokenizer, q)
        ids = stages.encode(tokenizer, text, cfg.data.add_bos)
        if len(ids) + room > context:
            if cfg.data.long_prompts == "error":
                raise ValueError(f"{r.prompts_file}:{n}: the prompt has {len(ids)} tokens; with {room} new tokens it "
                                 f"passes the context of {context} (data.long_prompts='skip' skips such prompts)")
            skipped.append(uid)
            continue
        rows.append({"uid": uid, "question": q, "prompt": text, "prompt_ids": ids})
    if len(rows) <= r.eval_prompts:
        raise ConfigError(f"config field rm_dpo.eval_prompts={r.eval_prompts}: {r.prompts_file} has only {len(rows)} "
                         f"usable prompts")
    train, held = rows[: -r.eval_prompts], rows[-r.eval_prompts:]
    if skipped:
        logging.info(f"skipped {len(skipped)} prompts too long for the context (first: {skipped[0]})")
    files.write_json(os.path.join(workdir, "prompts_stats.json"), {"train": len(train), "eval": len(held),
                                                                    "skipped_long_prompts": len(skipped)})
    files.write_jsonl(held_path, held)
    return train  # prompts.jsonl, written last: its presence marks the stage done


def reward_scores(cfg, prompts: list[str], responses: list[str]) -> np.ndarray:
    """The reward model's score of each (prompt, response) (rpo.models.reward.score_texts; float64)."""
    from rpo.models import reward
    from rpo.models.hf import load_tokenizer

    r = cfg.rm_dpo
    config, params, _ = reward.load_reward_model(r.reward_model, dtype=cfg.model.dtype)
    tok = load_tokenizer(r.reward_model)
    try:
        out = reward.score_texts(config, params, tok, prompts, responses, batch_size=r.reward_batch_size,
                                 max_len=r.reward_max_len, chat_template=cfg.data.chat_template)
    except ValueError as e:
        raise ValueError(f"reward model {r.reward_model} (rm_dpo.reward_max_len={r.reward_max_len}): {e}") from e
    return np.asarray(out, np.float64)


def _respond(models, model_path, tokenizer, rows, out_dir, cfg, *, n, temperature, max_new_tokens, seed, desc):
    r = cfg.rm_dpo
    none = lambda texts, block: [{} for _ in texts]  # noqa: E731
    return stages.sample_and_score(models, model_path, None, tokenizer, rows, out_dir, n=n, temperature=temperature,
                                   top_p=r.top_p, top_k=r.top_k, max_new_tokens=max_new_tokens, chunk=r.chunk_prompts,
                                   seed=seed, desc=desc, stop=[], score=none)


def _scored(cfg, rows, responses, path) -> list[dict]:
    """responses with a 'score' each (rows[i] is the prompt of responses[i]), written to `path` once."""
    def score() -> list[dict]:
        scores = reward_scores(cfg, [r["question"] for r in rows], [x["text"] for x in responses])
        return [{"uid": x["uid"], "sample": x["sample"], "score": float(s)} for x, s in zip(responses, scores)]

    return [dict(x, score=s["score"]) for x, s in zip(responses, stages.artifact(path, score))]


def best_vs_worst(prompts: list[dict], responses: list[list[dict]], *, max_len: int) -> tuple[list[dict], dict]:
    """One pair per prompt: its highest-scoring response as chosen, its lowest as rejected (the first of ties).
    Skipped and counted: all scores equal (ties), chosen and rejected the same tokens (same_tokens), a side too
    long for max_len tokens with its prompt (too_long)."""
    pairs, stats = [], {"prompts": len(prompts), "pairs": 0, "ties": 0, "same_tokens": 0, "too_long": 0}
    for p, rs in zip(prompts, responses):
        scores = np.asarray([x["score"] for x in rs])
        best, worst = int(np.argmax(scores)), int(np.argmin(scores))
        if scores[best] == scores[worst]:
            stats["ties"] += 1
            continue
        c, w = rs[best], rs[worst]
        if c["completion_ids"] == w["completion_ids"]:
            stats["same_tokens"] += 1
            continue
        if len(p["prompt_ids"]) + max(len(c["completion_ids"]), len(w["completion_ids"])) > max_len:
            stats["too_long"] += 1
            continue
        pairs.append({"uid": p["uid"], "prompt_ids": p["prompt_ids"], "chosen_ids": c["completion_ids"],
                      "rejected_ids": w["completion_ids"], "chosen_score": c["score"], "rejected_score": w["score"],
                      "chosen_text": c["text"], "rejected_text": w["text"]})
    stats["pairs"] = len(pairs)
    return pairs, stats


def _pairs(t: int, prompts: list[dict], responses: list[dict], k: int, max_len: int) -> tuple[list[dict], dict]:
    """Iteration t's best-vs-worst pairs of the k scored responses per prompt; (rows, stats)."""
    pairs, stats = best_vs_worst(prompts, [responses[i * k: (i + 1) * k] for i in range(len(prompts))], max_len=max_len)
    if not pairs:
        raise RuntimeError(f"iteration {t}: no pair ({stats}); every prompt's responses scored alike")
    logging.info(f"iter{t} pairs: " + ", ".join(f"{a}={b}" for a, b in stats.items()))
    return pairs, stats


def evaluate(cfg, models, model_path, tokenizer, held, it_dir, baseline: list[float] | None) -> tuple[dict, bool]:
    """Greedy responses to the held-out prompts, scored: it_dir/eval.json {eval_reward_mean, eval_reward_std,
    win_rate_vs_m0 (against `baseline`, M_0's scores, when given; ties count half)}."""
    return stages.evaluation(it_dir, lambda: _held_out_metrics(cfg, models, model_path, tokenizer, held, it_dir,
                                                               baseline))


def _held_out_metrics(cfg, models, model_path, tokenizer, held, it_dir, baseline: list[float] | None) -> dict:
    r = cfg.rm_dpo
    greedy = _respond(models, model_path, tokenizer, held, os.path.join(it_dir, "eval_greedy"), cfg, n=1,
                      temperature=0.0, max_new_tokens=r.eval_max_new_tokens, seed=cfg.seed,
                      desc=f"{os.path.basename(it_dir)} eval greedy")
    greedy = _scored(cfg, held, greedy, os.path.join(it_dir, "eval_scores.jsonl"))
    s = np.asarray([x["score"] for x in greedy])
    out = {"eval_reward_mean": float(s.mean()), "eval_reward_std": float(s.std()), "eval_prompts": len(held)}
    if baseline is not None:
        b = np.asarray(baseline)
        out["win_rate_vs_m0"] = float(np.mean((s > b) + 0.5 * (s == b)))
    return out


def run(cfg, workdir: str) -> list[dict]:
    """The whole protocol; returns the results rows (also workdir/results.json)."""
    from rpo import report

    check_config(cfg)
    os.makedirs(workdir, exist_ok=True)
    stages.check_same_run(cfg, workdir, record=True, name=CONFIG_NAME)
    from rpo.models.hf import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model.path)
    context = stages.context_length(cfg)
    train_rows, held = load_prompts(cfg, tokenizer, workdir, stages.model_context(cfg)[0])
    stages.save_tokenizer(tokenizer, os.path.join(workdir, "tokenizer"))
    models = stages.Models(cfg)
    r = cfg.rm_dpo
    log = report.MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    results = []
    try:
        model_path = cfg.model.path
        m0, fresh = evaluate(cfg, models, model_path, tokenizer, held, os.path.join(workdir, "iter0"), None)
        baseline = [x["score"] for x in files.read_jsonl(os.path.join(workdir, "iter0", "eval_scores.jsonl"))]
        results.append({"iteration": 0, **m0})
        _record(log if fresh else None, results, workdir)
        for t in range(1, r.iterations + 1):
            it_dir = os.path.join(workdir, f"iter{t}")
            k = r.responses_per_prompt
            responses = _respond(models, model_path, tokenizer, train_rows, os.path.join(it_dir, "responses"), cfg,
                                 n=k, temperature=r.temperature, max_new_tokens=r.max_new_tokens,
                                 seed=stages.sampling_seed(cfg.seed, "iteration", t), desc=f"iter{t} respond x{k}")
            responses = _scored(cfg, [p for p in train_rows for _ in range(k)], responses,
                                os.path.join(it_dir, "scores.jsonl"))
            pairs_path, stats = stages.reference_pairs(models, model_path, it_dir, t, cfg,
                                                       lambda: _pairs(t, train_rows, responses, k, context))
            model_path = stages.train_phase(cfg, cfg.train, models, model_path=model_path, train_path=pairs_path,
                                            kind="pairs", out_dir=os.path.join(it_dir, "train"), tokenizer=tokenizer,
                                            desc=f"iter{t} train ({cfg.train.loss.kind})")
            metrics, fresh = evaluate(cfg, models, model_path, tokenizer, held, it_dir, baseline)
            sc = np.asarray([x["score"] for x in responses])
            results.append({"iteration": t, **metrics, "train_reward_mean": float(sc.mean()),
                            **{f"pairs_{a}" if a != "pairs" else a: b for a, b in stats.items()}})
            _record(log if fresh else None, results, workdir)
    finally:
        log.close()
    return results


def _record(log, results, workdir) -> None:
    from rpo import report

    row = stages.record_iteration(log, results, workdir)
    report.plot_curves([dict(x, step=x["iteration"]) for x in results], os.path.join(workdir, "reward.png"),
                       (("eval_reward_mean", "eval_reward_std"), ("win_rate_vs_m0", None)),
                       title="reward-model DPO (held-out prompts, by iteration)")
    logging.info("iteration {iteration}: held-out reward {eval_reward_mean:.4g}".format(**row)
                 + (f", win rate vs M_0 {row['win_rate_vs_m0']:.3f}" if "win_rate_vs_m0" in row else ""))
