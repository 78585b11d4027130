"""The Iterative RPO loop (Pang et al. 2024) and its baselines, as resumable stages.

  M_0 = model.path, or an SFT warm start on the gold solutions (init.num_steps > 0)
  for t = 1..T:  sample N per train prompt from M_{t-1} at temperature_t -> reward each
                 -> K (correct, incorrect) pairs per prompt -> reference log-probs under M_{t-1}
                 -> train M_t from M_{t-1} with DPO + NLL -> evaluate M_t (greedy, maj@k)

irpo.method picks what each iteration trains on, so the paper's baselines are configs:
  irpo      pairs, loss.kind dpo_nll (alpha = 0 is "DPO without NLL")
  star      SFT on the model's own correct, finished samples (each distinct completion once)
  sft_gold  SFT on the gold solutions (no sampling)
and irpo.iterations = 0 evaluates M_0 only (zero-shot, or the SFT warm start).

Stages and their artifacts (workdir/...), each written atomically; a stage whose artifact
exists is skipped, so killing the process at any moment and rerunning the same command
resumes at the first unfinished stage (training resumes from its last orbax checkpoint,
sampling from its last finished chunk):
  data/{train,test}.jsonl     prompts (text and ids), gold answers and gold responses
  tokenizer/                  the tokenizer (saved into every model directory too)
  iter0/train/                the warm start's training phase (checkpoints/, metrics.jsonl, final/)
  iter<t>/samples/part-*.jsonl  N samples per train prompt of the iteration, with answer and reward
  iter<t>/pairs.jsonl, pairs_stats.json   preference pairs (with reference log-probs and texts)
  iter<t>/sft.jsonl           the SFT rows (star, sft_gold)
  iter<t>/train/final/        M_t as an HF directory (with the tokenizer): loads in transformers
  iter<t>/eval.json   test metrics; eval_greedy/ and eval_samples/ hold every scored completion
  results.json, accuracy.png  one row per iteration; the accuracy plot
  metrics.jsonl, events.out.tfevents.*    per-iteration scalars, as JSON lines and for TensorBoard
                              (each training phase logs its steps the same way in iter<t>/train/)

Config fields: see configs/arith_tiny.py, which sets every one of them.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Callable, Sequence

import ml_collections
import numpy as np
from absl import logging

from rpo import files, sharding
from rpo.configlib import ConfigError, bad

DONE = "done.json"  # a training phase's marker: its final/ model and tokenizer are complete


# ---------------------------------------------------------------------------------------
# Config checks and the run's identity
# ---------------------------------------------------------------------------------------

METHODS = ("irpo", "star", "sft_gold")
# Fields that may change between runs in the same workdir (extending a finished run; the
# temperatures of the iterations already run must stay).
_MUTABLE = ("irpo.iterations", "irpo.temperatures", "workdir")


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
    if not isinstance(cfg.init.num_steps, int) or cfg.init.num_steps < 0:
        bad("init.num_steps", f"must be an int >= 0, got {cfg.init.num_steps!r}")
    if not cfg.model.path and not cfg.init.num_steps:
        bad("init.num_steps", "0 (no warm start) needs model.path: M_0 would be a random model")
    if not isinstance(cfg.select.every, int) or cfg.select.every < 0:
        bad("select.every", f"must be an int >= 0 (0: keep the last step), got {cfg.select.every!r}")
    if not isinstance(cfg.select.heldout, int) or cfg.select.heldout < 0:
        bad("select.heldout", f"must be an int >= 0, got {cfg.select.heldout!r}")
    if cfg.select.every and not cfg.select.heldout:
        bad("select.heldout", "0, but select.every > 0 selects checkpoints on held-out training problems")
    if cfg.eval.maj_k < 2:
        bad("eval.maj_k", f"must be >= 2 (a majority of one sample is the sample), got {cfg.eval.maj_k}")


def check_same_run(cfg, workdir: str, *, record: bool, name: str = "irpo_config.json") -> None:
    """A workdir holds one experiment: refuse to resume it with a different config (recorded in
    workdir/name). With `record`, a workdir without a recorded config gets this one: the IRPO run
    calls it so once its data is prepared (a run that failed on a bad field before that can be
    rerun fixed)."""
    path = os.path.join(workdir, name)
    mine = json.loads(cfg.to_json_best_effort())
    if os.path.exists(path):
        theirs = json.load(open(path))
        done = min(len(theirs["irpo"]["temperatures"]), len(mine["irpo"]["temperatures"]),
                   max(theirs["irpo"]["iterations"], 0)) if "irpo" in mine and "irpo" in theirs else 0
        if done and mine["irpo"]["temperatures"][:done] != theirs["irpo"]["temperatures"][:done]:
            diff = "irpo.temperatures"
        else:
            diff = _first_diff(_stable(mine), _stable(theirs))
        if diff is not None:
            raise ValueError(
                f"{workdir} holds a run of another config (field {diff} differs from {path}); "
                f"resume with the same config or use a new --workdir"
            )
    elif record:
        files.write_json(path, mine)


def _stable(cfg_dict: dict) -> dict:
    out = json.loads(json.dumps(cfg_dict))
    for field in _MUTABLE:
        head, _, leaf = field.rpartition(".")
        (out.get(head, {}) if head else out).pop(leaf, None)
    return out


def _first_diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_diff(a.get(k), b.get(k), f"{prefix}{k}.")
            if d is not None:
                return d
        return None
    return None if a == b else prefix.rstrip(".")


# ---------------------------------------------------------------------------------------
# Data: prompts, gold responses, token ids
# ---------------------------------------------------------------------------------------


def task_tokenizer(cfg, task):
    from rpo.models.hf import load_tokenizer

    path = cfg.tokenizer or cfg.model.path
    if path:
        if not os.path.isdir(path):
            field = "tokenizer" if cfg.tokenizer else "model.path"
            raise ConfigError(f"config field {field}: {path}: no such directory (an HF model directory; nothing is "
                             "downloaded from the Hub)")
        return load_tokenizer(path)
    if task.name == "arith":
        from rpo.data.synthetic import char_tokenizer

        return char_tokenizer()
    raise ConfigError("config field tokenizer: empty, and model.path is empty too: name an HF directory")


def prompt_text(cfg, task, tokenizer, example) -> str:
    return chat_wrap(cfg, tokenizer, task.prompt(example))


def chat_wrap(cfg, tokenizer, text: str) -> str:
    """text as the user's turn of the tokenizer's chat template when data.chat_template is set."""
    if cfg.data.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("config field data.chat_template: the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text


def encode(tokenizer, text: str, bos: bool) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if bos and tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def prepare_data(cfg, task, tokenizer, workdir: str, context: int) -> dict[str, list[dict]]:
    """data/{train,heldout,test}.jsonl: one row per example. The last select.heldout rows of the task's
    train split are held out (never trained on; checkpoint selection scores them). A prompt that leaves
    no room for the answer in the model's context is an error, or (data.long_prompts='skip') skipped
    and counted."""
    out = {}
    os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
    held = os.path.join(workdir, "data", "heldout.jsonl")
    for split in ("train", "test"):
        path = os.path.join(workdir, "data", f"{split}.jsonl")
        if os.path.exists(path):
            out[split] = files.read_jsonl(path)
            if split == "train":
                out["heldout"] = files.read_jsonl(held)
            continue
        train_file = cfg.task.get("train_file", "")
        examples = load_prompts_file(train_file) if split == "train" and train_file else task.load(split)
        rows, skipped, long_targets, unreachable = [], [], 0, 0
        room = max(cfg.irpo.max_new_tokens, cfg.eval.max_new_tokens)
        for ex in examples:
            prompt = prompt_text(cfg, task, tokenizer, ex)
            prompt_ids = encode(tokenizer, prompt, cfg.data.add_bos)
            if len(prompt_ids) + room > context:
                if cfg.data.long_prompts == "error":
                    raise ValueError(
                        f"{ex.uid}: the prompt has {len(prompt_ids)} tokens; with {room} new tokens it passes the "
                        f"model's context of {context} (set data.long_prompts='skip' to skip such prompts)"
                    )
                skipped.append(ex.uid)
                continue
            target = task.target(ex) if ex.solution else None
            if target is not None:
                target_ids = encode(tokenizer, target, False) + [tokenizer.eos_token_id]
                if len(prompt_ids) + len(target_ids) > cfg.seq_len:  # no gold response to train on
                    target, long_targets = None, long_targets + 1
                elif len(target_ids) > cfg.irpo.max_new_tokens:  # sampling can never write it
                    unreachable += 1
            row = {"uid": ex.uid, "prompt": prompt, "prompt_ids": prompt_ids, "answer": ex.answer,
                   "question": ex.question, "solution": ex.solution, "choices": [list(c) for c in ex.choices]}
            if target is not None:
                row["target"] = target
                row["target_ids"] = target_ids
            rows.append(row)
        if skipped:
            logging.info(f"{split}: skipped {len(skipped)} prompts too long for the context (first: {skipped[0]})")
        if long_targets:
            logging.info(f"{split}: {long_targets} gold responses do not fit seq_len={cfg.seq_len} with their prompt: "
                         f"not trained on")
        if unreachable:
            logging.warning(f"{split}: {unreachable} gold responses are longer than irpo.max_new_tokens="
                            f"{cfg.irpo.max_new_tokens}: samples of that length are cut off")
        bad_rows = list(getattr(task, "skipped_rows", {}).get(split, []))
        if bad_rows:
            logging.info(f"{split}: {len(bad_rows)} malformed dataset rows skipped (first: {bad_rows[0]})")
        if split == "train":
            h = cfg.select.heldout
            if h and h >= len(rows):
                raise ConfigError(f"config field select.heldout={h}: the train split has only {len(rows)} usable rows")
            rows, out["heldout"] = (rows[:-h], rows[-h:]) if h else (rows, [])
            files.write_jsonl(held, out["heldout"])  # before train.jsonl, whose presence marks the split done
        if not rows:
            raise ValueError(f"task {task.name}: the {split} split has no usable rows")
        files.write_json(os.path.join(workdir, "data", f"{split}_stats.json"),
                         {"rows": len(rows), "heldout_rows": len(out.get("heldout", [])) if split == "train" else 0,
                          "skipped_long_prompts": len(skipped), "skipped_uids": skipped[:100],
                          "gold_too_long_for_seq_len": long_targets, "gold_longer_than_max_new_tokens": unreachable,
                          "skipped_bad_rows": len(bad_rows), "bad_rows": bad_rows[:100]})
        files.write_jsonl(path, rows)
        logging.info(f"{split}: {len(rows)} prompts -> {path}")
        out[split] = rows
    return out


def load_prompts_file(path: str) -> list:
    """Training prompts from a JSONL file (task.train_file, e.g. a CoT-Self-Instruct dataset.jsonl): one
    object per line with "question" and "answer" (optional "uid", "solution", "category")."""
    from rpo.data import Example

    if not os.path.isfile(path):
        raise ConfigError(f"config field task.train_file: {path} does not exist")
    out = []
    for n, obj in files.jsonl_rows(path):
        for field in ("question", "answer"):
            if not isinstance(obj.get(field), str) or not obj[field].strip():
                raise ValueError(f"{path}:{n}: no {field!r} string")
        out.append(Example(str(obj.get("uid", f"{os.path.basename(path)}/{n}")), obj["question"], obj["answer"],
                           str(obj.get("solution", "")), category=str(obj.get("category", ""))))
    if not out:
        raise ConfigError(f"config field task.train_file: {path} has no rows")
    return out


def _examples(rows):
    from rpo.data import Example

    return [Example(r["uid"], r["question"], r["answer"], r.get("solution", ""),
                    tuple(tuple(c) for c in r.get("choices", []))) for r in rows]


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


class Models:
    """Loads M_t from its HF directory, placed on the run's mesh, and keeps the last one loaded
    (sampling and reference log-probs both read M_{t-1}; both evaluations read M_t) until
    `release()`, which a training phase calls first so two models never share the devices."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.rules = sharding.rules_from_config(cfg.sharding_rules)
        self.mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
        self._loaded = None  # (path, ModelConfig, params)

    def load(self, path: str):
        from rpo.models.hf import load_model

        if self._loaded is None or self._loaded[0] != path:
            self.release()
            mc = ml_collections.ConfigDict(self.cfg.model.to_dict())
            mc.path = path
            self._loaded = (path, *load_model(
                mc, shardings_for=lambda c: sharding.param_shardings(c, self.mesh, self.rules)))
        return self._loaded[1:]

    def release(self) -> None:
        self._loaded = None


# ---------------------------------------------------------------------------------------
# Sampling and scoring
# ---------------------------------------------------------------------------------------


def task_fields(task, texts: list[str], rows: list[dict]) -> list[dict]:
    """The default scoring of sample_and_score: each completion's answer and reward under the task, and
    whether every step of it is right where the task can check steps (the synthetic task)."""
    examples = _examples(rows)
    answers, correct = task.score(texts, examples)
    fields = [{"answer": a, "correct": bool(c)} for a, c in zip(answers, correct)]
    if hasattr(task, "steps_correct"):
        for f, ok in zip(fields, task.steps_correct(texts, examples)):
            f["steps_correct"] = bool(ok)
    return fields


def sample_and_score(models: Models, model_path: str, task, tokenizer, rows, out_dir: str, *, n: int,
                     temperature: float, top_p: float, top_k: int, max_new_tokens: int, chunk: int, seed: int,
                     desc: str, stop: Sequence[str] | None = None, score: Callable | None = None) -> list[dict]:
    """N samples per prompt (rows[i]["prompt_ids"]), scored; written in chunks of prompts to
    out_dir/part-<k>.jsonl (a killed run keeps its finished chunks). Returns one row per sample.
    stop defaults to task.stop; score(texts, rows) -> one dict of fields per completion (rows[m]
    is completion m's prompt row) defaults to task_fields (answer, correct)."""
    from rpo import report, sampling

    stop = task.stop if stop is None else stop
    score = score or functools.partial(task_fields, task)

    os.makedirs(out_dir, exist_ok=True)
    starts = range(0, len(rows), chunk)
    parts = [os.path.join(out_dir, f"part-{k:05d}.jsonl") for k in range(len(starts))]
    todo = [k for k, p in enumerate(parts) if not os.path.exists(p)]
    if todo:
        model_config, params = models.load(model_path)
        eos = sorted(set(model_config.eos_token_ids) | ({tokenizer.eos_token_id} - {None}))
        if not eos:
            raise ValueError(f"{model_path}: neither the model config nor the tokenizer names an EOS token")
        bar = report.progress(desc=desc, total=len(rows) * n, unit="samples")
        bar.update(n * sum(min(chunk, len(rows) - starts[k]) for k in range(len(starts)) if k not in todo))
        for k in todo:
            block = rows[starts[k]: starts[k] + chunk]
            out = sampling.generate(
                model_config, params, [r["prompt_ids"] for r in block], n=n, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=eos, stop=list(stop),
                tokenizer=tokenizer, seed=seed + starts[k], mesh=models.mesh, rules=models.rules, progress=False,
            )
            texts = tokenizer.batch_decode([t for per in out.tokens for t in per], skip_special_tokens=True)
            fields = score(texts, [r for r in block for _ in range(n)])
            samples = []
            for i, r in enumerate(block):
                for j in range(n):
                    m = i * n + j
                    samples.append({"uid": r["uid"], "prompt_index": starts[k] + i, "sample": j,
                                    "completion_ids": out.tokens[i][j], "text": texts[m],
                                    "finish_reason": out.finish_reasons[i][j], **fields[m]})
            files.write_jsonl(parts[k], samples)
            bar.update(len(block) * n)
        bar.close()
    return [s for p in parts for s in files.read_jsonl(p)]


def evaluate(models: Models, model_path: str, task, tokenizer, rows, it_dir: str, cfg) -> tuple[dict, bool]:
    """Greedy accuracy, maj@k and pass@k on the test rows, written to it_dir/eval.json.
    Returns (metrics, whether they were computed now rather than read back)."""
    from rpo import consistency

    path = os.path.join(it_dir, "eval.json")
    if os.path.exists(path):
        return json.load(open(path)), False
    e = cfg.eval
    common = dict(top_p=e.top_p, top_k=e.top_k, max_new_tokens=e.max_new_tokens, chunk=e.chunk_prompts,
                  seed=cfg.seed + 7919)
    greedy = sample_and_score(models, model_path, task, tokenizer, rows, os.path.join(it_dir, "eval_greedy"), n=1,
                              temperature=0.0, desc=f"{os.path.basename(it_dir)} eval greedy", **common)
    metrics = {"greedy_accuracy": float(np.mean([s["correct"] for s in greedy]))}
    if "steps_correct" in greedy[0]:
        metrics["greedy_steps_correct"] = float(np.mean([s["steps_correct"] for s in greedy]))
    k = e.maj_k
    samples = sample_and_score(models, model_path, task, tokenizer, rows, os.path.join(it_dir, "eval_samples"),
                               n=k, temperature=e.temperature, desc=f"{os.path.basename(it_dir)} eval maj@{k}",
                               **common)
    answers = [[s["answer"] for s in samples[i * k: (i + 1) * k]] for i in range(len(rows))]
    correct = np.asarray([[s["correct"] for s in samples[i * k: (i + 1) * k]] for i in range(len(rows))])
    ids, valid = consistency.answer_ids(answers, same=getattr(task, "same_answers", None))  # MATH: by value
    metrics.update({
        "maj_accuracy": float(consistency.maj_at_k(ids, valid, correct, k)), "maj_k": k,
        "sample_accuracy": float(correct.mean()), f"pass_at_{k}": float(consistency.pass_at_k(correct, k)),
        "vote_share": float(np.mean(consistency.vote_share(ids, valid))),
    })
    metrics["test_prompts"] = len(rows)
    files.write_json(path, metrics)
    return metrics, True


# ---------------------------------------------------------------------------------------
# Training phases
# ---------------------------------------------------------------------------------------


def _phase_config(cfg, block, *, model_path: str, train_path: str, kind: str, export_every: int = 0):
    """The rpo.train config of one training phase: the block's optimisation fields plus the
    run's model, mesh, data layout and seed (the data order)."""
    p = ml_collections.ConfigDict(block.to_dict())
    p.seed = cfg.seed
    p.export_every = export_every
    p.model = ml_collections.ConfigDict(cfg.model.to_dict())
    p.model.path = model_path
    p.data = ml_collections.ConfigDict(dict(
        kind=kind, train_path=train_path, eval_path="", seq_len=cfg.seq_len, pad_id=cfg.data.pad_id,
        truncate=False, compute_ref=False,
    ))
    p.mesh = ml_collections.ConfigDict(cfg.mesh.to_dict())
    p.sharding_rules = cfg.sharding_rules
    p.eval_every = p.num_steps
    p.eval_batches = 0
    return p


def train_phase(cfg, block, models: Models, *, model_path: str, train_path: str, kind: str, out_dir: str, tokenizer,
                desc: str, export_every: int = 0) -> str:
    """Runs (or resumes) one rpo.train phase into out_dir; returns the HF directory of the result
    (and every export_every steps an HF directory under out_dir/exports/, each with the tokenizer)."""
    from rpo import distributed, report, train

    final = os.path.join(out_dir, "final")
    if os.path.exists(os.path.join(out_dir, DONE)):
        return final
    models.release()  # rpo.train loads its own copy into the training shardings
    pcfg = _phase_config(cfg, block, model_path=model_path, train_path=train_path, kind=kind,
                         export_every=export_every)
    bar = report.progress(desc=desc, total=pcfg.num_steps, unit="steps")

    def on_step(step, metrics):
        bar.set_postfix(loss=f"{float(metrics['loss']):.4g}", refresh=False)
        bar.update(step - bar.n)

    train.run(pcfg, out_dir, on_step=on_step, echo=False)
    bar.close()
    if distributed.is_main():  # the models are complete only once DONE is written (a collective write)
        for path in [final] + [e for _, e in exports(out_dir)]:
            tokenizer.save_pretrained(path)
    files.write_json(os.path.join(out_dir, DONE), {"steps": pcfg.num_steps, "kind": kind, "train_path": train_path})
    return final


def exports(train_dir: str) -> list[tuple[int, str]]:
    """(step, HF directory) of the exports of a training phase (rpo.train's export_every), by step."""
    d = os.path.join(train_dir, "exports")
    names = sorted(n for n in os.listdir(d) if n.startswith("step-") and "." not in n) if os.path.isdir(d) else []
    return [(int(n[len("step-"):]), os.path.join(d, n)) for n in names]


def select_checkpoint(models: Models, task, tokenizer, heldout: list[dict], train_dir: str, it_dir: str, cfg
                      ) -> tuple[str, dict]:
    """The model of a training phase that answers most held-out training problems right (greedy), among
    its exports and its final step; the earliest wins a tie. Returns (HF directory, it_dir/select.json:
    every candidate's held-out accuracy and the chosen step). select.every = 0 keeps the final step."""
    path = os.path.join(it_dir, "select.json")
    if os.path.exists(path):
        choice = json.load(open(path))
        return choice["path"], choice
    final = os.path.join(train_dir, "final")
    steps = json.load(open(os.path.join(train_dir, DONE)))["steps"]
    candidates = dict(exports(train_dir))
    candidates.setdefault(steps, final)
    scores = {}
    if cfg.select.every:
        e = cfg.eval
        for step, model_path in sorted(candidates.items()):
            greedy = sample_and_score(
                models, model_path, task, tokenizer, heldout, os.path.join(it_dir, "select", f"step-{step:06d}"), n=1,
                temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=e.max_new_tokens, chunk=e.chunk_prompts, seed=0,
                desc=f"{os.path.basename(it_dir)} select step {step}")
            scores[step] = float(np.mean([g["correct"] for g in greedy]))
        chosen = max(scores, key=lambda k: (scores[k], -k))
    else:
        chosen = steps
    choice = {"chosen_step": chosen, "path": candidates[chosen], "heldout_prompts": len(heldout),
              "heldout_accuracy": {str(k): v for k, v in scores.items()}}
    files.write_json(path, choice)
    if scores:
        logging.info(f"{os.path.basename(it_dir)}: step {chosen} selected (held-out greedy " +
                     ", ".join(f"{k}: {v:.3f}" for k, v in sorted(scores.items())) + ")")
    return candidates[chosen], choice


def add_reference(models: Models, model_path: str, pair_rows: list[dict], out_path: str, cfg, desc: str) -> list[dict]:
    """Reference log-probs of each pair under M_{t-1} (the model the pairs were sampled from)."""
    from rpo import train

    from rpo import report

    model_config, params = models.load(model_path)
    t = cfg.train
    with report.progress(desc=desc, total=len(pair_rows), unit="pairs") as bar:
        return train.add_reference_logps(
            model_config, params, pair_rows, out_path, batch_size=t.batch_size // t.grad_accum, seq_len=cfg.seq_len,
            pad_id=cfg.data.pad_id, truncate=False, chunk_size=t.loss.chunk_size, mesh=models.mesh,
            rules=models.rules, on_batch=bar.update,
        )


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


def iteration_prompts(cfg, t: int, train_rows: list[dict]) -> list[dict]:
    """The train prompts of iteration t: all of them, or irpo.prompts_per_iteration drawn
    without replacement by a seeded permutation (fresh prompts each iteration until the
    split runs out, then the next pass)."""
    per = cfg.irpo.prompts_per_iteration
    if not per or per >= len(train_rows):
        return train_rows
    order = np.random.default_rng([cfg.seed, 17]).permutation(len(train_rows))
    return [train_rows[int(order[((t - 1) * per + k) % len(order)])] for k in range(per)]


def _iteration_data(cfg, t: int, it_dir: str, prev: str, models, task, tokenizer, train_rows) -> tuple[str, str, dict]:
    """Builds iteration t's training file; returns (path, data kind, stats)."""
    from rpo import pairs as pairs_lib

    i = cfg.irpo
    train_rows = iteration_prompts(cfg, t, train_rows)
    if i.method == "sft_gold":
        path = os.path.join(it_dir, "sft.jsonl")
        if not os.path.exists(path):
            rows = [{"prompt_ids": r["prompt_ids"], "response_ids": r["target_ids"], "uid": r["uid"]}
                    for r in train_rows if "target_ids" in r]
            if not rows:
                raise ValueError(f"irpo.method='sft_gold': task {task.name} has no gold response that fits seq_len="
                                 f"{cfg.seq_len} (see data/train_stats.json)")
            files.write_jsonl(path, rows)
        return path, "sft", {}

    samples = sample_and_score(
        models, prev, task, tokenizer, train_rows, os.path.join(it_dir, "samples"), n=i.samples_per_prompt,
        temperature=i.temperatures[t - 1], top_p=i.top_p, top_k=i.top_k, max_new_tokens=i.max_new_tokens,
        chunk=i.chunk_prompts, seed=cfg.seed + 1_000_003 * t, desc=f"iter{t} sample",
    )
    # A winner must be correct and finished: a correct answer followed by text cut off at
    # max_new_tokens is not a response to reinforce.
    for s in samples:
        s["winner"] = s["correct"] and s["finish_reason"] != "length"
    stats = {"train_sample_accuracy": float(np.mean([s["correct"] for s in samples])),
             "correct_but_cut_off": sum(s["correct"] and not s["winner"] for s in samples)}
    winners = [s for s in samples if s["winner"]]
    if winners and "steps_correct" in winners[0]:  # the share of winners whose every step is right
        stats["winner_precision"] = float(np.mean([s["steps_correct"] for s in winners]))
    if i.method == "star":
        path = os.path.join(it_dir, "sft.jsonl")
        if not os.path.exists(path):
            seen, rows = set(), []
            for s in samples:
                key = (s["prompt_index"], tuple(s["completion_ids"]))
                if s["winner"] and key not in seen:
                    seen.add(key)
                    r = train_rows[s["prompt_index"]]
                    rows.append({"prompt_ids": r["prompt_ids"], "response_ids": s["completion_ids"], "uid": r["uid"]})
            if not rows:
                raise RuntimeError(f"iteration {t}: no correct sample to train on (star)")
            files.write_jsonl(path, rows)
        stats["star_rows"] = sum(1 for _ in open(path))
        return path, "sft", stats

    path = os.path.join(it_dir, "pairs.jsonl")
    stats_path = os.path.join(it_dir, "pairs_stats.json")
    if not os.path.exists(path):
        by_prompt = [[] for _ in train_rows]
        for s in samples:
            by_prompt[s["prompt_index"]].append(
                pairs_lib.Sample(s["completion_ids"], s["winner"], valid=s["answer"] is not None, text=s["text"]))
        prompts = [pairs_lib.PromptSamples(r["prompt_ids"], by_prompt[n], uid=r["uid"],
                                           gold=pairs_lib.Sample(r["target_ids"], True, text=r["target"])
                                           if "target_ids" in r else None)
                   for n, r in enumerate(train_rows)]
        rows, pstats = pairs_lib.build_pairs(
            prompts, pairs_per_prompt=i.pairs_per_prompt, repeat=not i.distinct_pairs, add_gold=i.add_gold,
            max_len=cfg.seq_len, max_pairs=i.max_pairs or None, seed=cfg.seed + t, with_text=True,
        )
        if not rows:
            raise RuntimeError(
                f"iteration {t}: no preference pairs ({pstats}); every prompt was all-correct or all-wrong")
        logging.info(f"iter{t} pairs: " + ", ".join(f"{k}={v}" for k, v in pstats.items()))
        files.write_json(stats_path, pstats)  # before pairs.jsonl, whose presence marks the stage done
        add_reference(models, prev, rows, path, cfg, desc=f"iter{t} reference log-probs")
    pstats = json.load(open(stats_path))
    stats.update({k: pstats[k] for k in _PAIR_STATS})
    return path, "pairs", stats


# The pair counts copied into results.json (pairs_stats.json has them all).
_PAIR_STATS = ("pairs", "prompts_paired", "prompts_all_correct", "prompts_all_wrong", "prompts_no_valid",
               "prompts_dropped", "prompts_gold_added", "pairs_too_long")


def run(cfg, workdir: str) -> list[dict]:
    """The whole experiment; returns the results rows (also in workdir/results.json)."""
    from rpo import report
    from rpo.data import get_task

    check_config(cfg)
    os.makedirs(workdir, exist_ok=True)
    check_same_run(cfg, workdir, record=False)
    task = get_task(cfg.task)
    tokenizer = task_tokenizer(cfg, task)
    models = Models(cfg)
    if not cfg.model.path and len(tokenizer) > cfg.model.random.vocab_size:
        raise ConfigError(f"config field model.random.vocab_size: {cfg.model.random.vocab_size} < the tokenizer's "
                         f"{len(tokenizer)} tokens")
    context = context_length(cfg)
    data = prepare_data(cfg, task, tokenizer, workdir, context)
    check_same_run(cfg, workdir, record=True)
    save_tokenizer(tokenizer, os.path.join(workdir, "tokenizer"))
    log = report.MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    results_path = os.path.join(workdir, "results.json")
    results = []
    try:
        # M_0
        it_dir = os.path.join(workdir, "iter0")
        model_path = cfg.model.path
        if cfg.init.num_steps:
            sft_path = os.path.join(it_dir, "sft.jsonl")
            if not os.path.exists(sft_path):
                os.makedirs(it_dir, exist_ok=True)
                gold = [{"prompt_ids": r["prompt_ids"], "response_ids": r["target_ids"], "uid": r["uid"]}
                        for r in data["train"] if "target_ids" in r]
                if not gold:
                    raise ConfigError(f"config field seq_len={cfg.seq_len}: no train prompt has a gold response "
                                     f"that fits with it (see data/train_stats.json); the warm start has nothing "
                                     f"to train on")
                files.write_jsonl(sft_path, gold)
            model_path = train_phase(cfg, cfg.init, models, model_path=cfg.model.path, train_path=sft_path, kind="sft",
                                     out_dir=os.path.join(it_dir, "train"), tokenizer=tokenizer,
                                     desc="iter0 warm start (SFT on gold)")
        step = cfg.init.num_steps
        metrics, fresh = evaluate(models, model_path, task, tokenizer, data["test"], it_dir, cfg)
        results.append({"iteration": 0, **metrics, "train_steps": step})
        _record(log if fresh else None, results, results_path, workdir)

        for t in range(1, cfg.irpo.iterations + 1):
            it_dir = os.path.join(workdir, f"iter{t}")
            os.makedirs(it_dir, exist_ok=True)
            path, kind, stats = _iteration_data(cfg, t, it_dir, model_path, models, task, tokenizer, data["train"])
            train_dir = os.path.join(it_dir, "train")
            train_phase(cfg, cfg.train, models, model_path=model_path, train_path=path, kind=kind, out_dir=train_dir,
                        tokenizer=tokenizer, desc=f"iter{t} train ({cfg.irpo.method})", export_every=cfg.select.every)
            model_path, choice = select_checkpoint(models, task, tokenizer, data["heldout"], train_dir, it_dir, cfg)
            step += choice["chosen_step"]
            metrics, fresh = evaluate(models, model_path, task, tokenizer, data["test"], it_dir, cfg)
            held = choice["heldout_accuracy"].get(str(choice["chosen_step"]))
            results.append({"iteration": t, **metrics, **stats, "train_steps": step, "selected_step":
                            choice["chosen_step"], **({"heldout_accuracy": held} if held is not None else {})})
            _record(log if fresh else None, results, results_path, workdir)
    finally:
        log.close()
    return results


def model_context(cfg) -> tuple[int, str]:
    """The model's context (max_position_embeddings) and where it is set."""
    if cfg.model.path:
        from rpo.models.config import load_config

        return load_config(cfg.model.path).max_position_embeddings, f"{cfg.model.path}/config.json"
    return cfg.model.random.max_position_embeddings, "model.random.max_position_embeddings"


def context_length(cfg) -> int:
    """seq_len, checked against the model's own context."""
    limit, where = model_context(cfg)
    if cfg.seq_len > limit:
        raise ConfigError(f"config field seq_len={cfg.seq_len}: longer than the model's context ({limit}, {where})")
    return cfg.seq_len


def save_tokenizer(tokenizer, path: str) -> None:
    """Once per run, atomically (a directory renamed into place), by process 0; every process
    returns once it is there."""
    from rpo import distributed

    if distributed.is_main() and not os.path.isdir(path):
        tmp = f"{path}.tmp{os.getpid()}"
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, path)
    distributed.sync("save_tokenizer")


def _record(log, results, path, workdir) -> None:
    from rpo import report

    row = results[-1]
    if log is not None:
        log.log(row["iteration"], {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "iteration"},
                split="iteration")
    report.write_results(path, results)
    report.plot_results(results, os.path.join(workdir, "accuracy.png"))
    logging.info("iteration {iteration}: greedy {greedy_accuracy:.3f}".format(**row)
                 + (f", maj@{row['maj_k']} {row['maj_accuracy']:.3f}" if "maj_accuracy" in row else ""))
