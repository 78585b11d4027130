"""The stages that IRPO (rpo.irpo), GRPO (rpo.grpo), CoT-Self-Instruct (rpo.self_instruct) and reward-model DPO
(rpo.rm_dpo) are built from, each resumable.

  artifact(path, make)      a stage's output file: read back if it exists, else make() written atomically; so a
                            run killed at any moment and rerun goes on at the first stage whose file is missing
  check_same_run            a workdir holds one experiment: a resume with another config is refused
  open_run                  a task-based run's start: the task, its tokenizer, the models, data/ (prepare_data)
  task_tokenizer, chat_wrap, prompt_text, encode, prepare_data, load_prompts_file, context_length, save_tokenizer
  Models                    M_t loaded from its HF directory onto the run's mesh, one at a time
  sample_and_score          N samples per prompt, scored, in resumable chunks (part-*.jsonl)
  evaluate                  greedy accuracy, maj@k and pass@k on the test split (eval.json)
  train_phase               one rpo.train phase (SFT, or a preference loss on pairs); done.json marks it finished
  warm_start                M_0 by SFT on the gold solutions (iter0/)
  select_checkpoint         the export of a phase best on held-out training problems (select.json)
  reference_pairs           preference pairs with their reference log-probs (pairs.jsonl, pairs_stats.json)
  add_reference             the reference log-probs of preference pairs
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, NamedTuple, Sequence

import ml_collections
import numpy as np
from absl import logging

from rpo import files, sharding
from rpo.configlib import ConfigError

DONE = "done.json"  # a training phase's marker: its final/ model and tokenizer are complete


# ---------------------------------------------------------------------------------------
# Resuming: artifacts and the run's identity
# ---------------------------------------------------------------------------------------


def artifact(path: str, make: Callable[[], Any], *, read: bool = True):
    """A stage's output: the file at `path` read back if it exists (the stage is skipped), else make()'s value,
    written atomically (rpo.files: a kill leaves the whole file or none; a make() that raises leaves none) and
    returned. JSON (.json) or JSON lines (.jsonl: make() returns a list of rows). make() may write files of its own
    first; this one, written last, marks the stage done. read=False: a file the caller uses by its path is not read
    back (None is returned then)."""
    kind = os.path.splitext(path)[1]
    if kind not in (".json", ".jsonl"):
        raise ValueError(f"{path}: an artifact is a .json or .jsonl file")
    if os.path.exists(path):
        if not read:
            return None
        if kind == ".jsonl":
            return files.read_jsonl(path)
        with open(path) as f:
            return json.load(f)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    value = make()
    (files.write_jsonl if kind == ".jsonl" else files.write_json)(path, value)
    return value


def sampling_seed(seed: int, stream: str, step: int = 0) -> int:
    """The seed of one stage's sampling, derived from the run's seed so that no two stages (or iterations, or GRPO
    steps) draw the same keys. The offsets are arbitrary distinct constants, kept as first written so that
    existing run directories resume with the same samples; sample_and_score adds each chunk's first row index.
    Known overlap, kept for that reason: at seed 0, GRPO's first rollout step ("rollout", 0) draws the uniforms of
    the evaluations' first chunk ("eval"), on other prompts; no other pair of streams meets within a run of fewer
    than 7,900 rows per sampling call."""
    seeds = {
        "eval": seed + 7919,                               # every evaluation (its keys repeat per model)
        "iteration": seed + 1_000_003 * step,              # IRPO / reward-model DPO iteration `step`
        "respond": seed + 17,                              # CoT-Self-Instruct's K solutions
        "rollout": seed * 1_000_003 + 7_919 * (step + 1),  # GRPO's global step `step`
    }
    if stream not in seeds:
        raise ValueError(f"unknown sampling stream {stream!r}; one of {sorted(seeds)}")
    return seeds[stream]


# Fields that may change between runs in the same workdir (extending a finished run; the
# temperatures of the iterations already run must stay).
_MUTABLE = ("irpo.iterations", "irpo.temperatures", "workdir")


def check_loop_blocks(cfg) -> None:
    """The checks of the blocks every iterated method shares: init (the warm start), select, eval."""
    from rpo.configlib import bad

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


def record_iteration(log, results: list[dict], workdir: str) -> dict:
    """The last results row: its numbers to the metrics log (None: the row was read back, not computed now, so it
    is not logged twice) and every row to workdir/results.json. Returns that row."""
    from rpo import report

    row = results[-1]
    if log is not None:
        log.log(row["iteration"], {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "iteration"},
                split="iteration")
    report.write_results(os.path.join(workdir, "results.json"), results)
    return row


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
    """The first field whose value differs. A field one side lacks and the other declares empty ("", off) is
    the same: a config recorded before the field was declared still resumes."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_diff(a.get(k), b.get(k), f"{prefix}{k}.")
            if d is not None:
                return d
        return None
    return None if a == b or (a in (None, "") and b in (None, "")) else prefix.rstrip(".")


class Context(NamedTuple):
    """What the stages of a task-based run (IRPO, GRPO) share."""

    cfg: Any
    task: Any
    tokenizer: Any
    models: "Models"
    data: dict  # {"train", "heldout", "test"}: rows of data/*.jsonl (prepare_data)


def open_run(cfg, workdir: str, *, config_name: str, data_cfg=None) -> Context:
    """A task-based run's start in workdir: the config checked against the one recorded there (and recorded once
    the data is prepared), the task and its tokenizer (saved to workdir/tokenizer/), the models, and data/
    (prepare_data with data_cfg, default cfg)."""
    from rpo.data import get_task

    os.makedirs(workdir, exist_ok=True)
    check_same_run(cfg, workdir, record=False, name=config_name)
    task = get_task(cfg.task)
    tokenizer = task_tokenizer(cfg, task)
    if not cfg.model.path and len(tokenizer) > cfg.model.random.vocab_size:
        raise ConfigError(f"config field model.random.vocab_size: {cfg.model.random.vocab_size} < the tokenizer's "
                          f"{len(tokenizer)} tokens")
    models = Models(cfg)
    data = prepare_data(cfg if data_cfg is None else data_cfg, task, tokenizer, workdir, context_length(cfg))
    check_same_run(cfg, workdir, record=True, name=config_name)
    save_tokenizer(tokenizer, os.path.join(workdir, "tokenizer"))
    return Context(cfg, task, tokenizer, models, data)


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
    data = os.path.join(workdir, "data")
    out = {split: artifact(os.path.join(data, f"{split}.jsonl"),
                           functools.partial(_split_rows, cfg, task, tokenizer, split, context, data))
           for split in ("train", "test")}
    out["heldout"] = files.read_jsonl(os.path.join(data, "heldout.jsonl"))  # written with train.jsonl
    return out


def _split_rows(cfg, task, tokenizer, split: str, context: int, data: str) -> list[dict]:
    """The rows of data/<split>.jsonl; writes data/<split>_stats.json (and, for train, data/heldout.jsonl) first."""
    train_file = cfg.task.train_file
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
    heldout = []
    if split == "train":
        h = cfg.select.heldout
        if h and h >= len(rows):
            raise ConfigError(f"config field select.heldout={h}: the train split has only {len(rows)} usable rows")
        rows, heldout = (rows[:-h], rows[-h:]) if h else (rows, [])
        files.write_jsonl(os.path.join(data, "heldout.jsonl"), heldout)
    if not rows:
        raise ValueError(f"task {task.name}: the {split} split has no usable rows")
    files.write_json(os.path.join(data, f"{split}_stats.json"),
                     {"rows": len(rows), "heldout_rows": len(heldout),
                      "skipped_long_prompts": len(skipped), "skipped_uids": skipped[:100],
                      "gold_too_long_for_seq_len": long_targets, "gold_longer_than_max_new_tokens": unreachable,
                      "skipped_bad_rows": len(bad_rows), "bad_rows": bad_rows[:100]})
    logging.info(f"{split}: {len(rows)} prompts -> {os.path.join(data, split + '.jsonl')}")
    return rows


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


def gold_rows(rows: list[dict]) -> list[dict]:
    """SFT rows of the gold responses (prompt rows with target_ids: those that fit seq_len)."""
    return [{"prompt_ids": r["prompt_ids"], "response_ids": r["target_ids"], "uid": r["uid"]}
            for r in rows if "target_ids" in r]


def _examples(rows):
    from rpo.data import Example

    return [Example(r["uid"], r["question"], r["answer"], r.get("solution", ""),
                    tuple(tuple(c) for c in r.get("choices", []))) for r in rows]


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
# Sampling, scoring, evaluation
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


def evaluate(ctx: Context, model_path: str, it_dir: str) -> tuple[dict, bool]:
    """Greedy accuracy, maj@k and pass@k of model_path on the test rows, written to it_dir/eval.json.
    Returns (metrics, whether they were computed now rather than read back)."""
    return evaluation(it_dir, lambda: _test_metrics(ctx, model_path, it_dir))


def evaluation(it_dir: str, make: Callable[[], dict]) -> tuple[dict, bool]:
    """The artifact it_dir/eval.json, and whether make() computed it now (a resumed run logs only new ones)."""
    path = os.path.join(it_dir, "eval.json")
    fresh = not os.path.exists(path)
    return artifact(path, make), fresh


def _test_metrics(ctx: Context, model_path: str, it_dir: str) -> dict:
    from rpo import consistency

    cfg, rows, e = ctx.cfg, ctx.data["test"], ctx.cfg.eval
    common = dict(top_p=e.top_p, top_k=e.top_k, max_new_tokens=e.max_new_tokens, chunk=e.chunk_prompts,
                  seed=sampling_seed(cfg.seed, "eval"))
    greedy = sample_and_score(ctx.models, model_path, ctx.task, ctx.tokenizer, rows,
                              os.path.join(it_dir, "eval_greedy"), n=1, temperature=0.0,
                              desc=f"{os.path.basename(it_dir)} eval greedy", **common)
    metrics = {"greedy_accuracy": float(np.mean([s["correct"] for s in greedy]))}
    if "steps_correct" in greedy[0]:
        metrics["greedy_steps_correct"] = float(np.mean([s["steps_correct"] for s in greedy]))
    k = e.maj_k
    samples = sample_and_score(ctx.models, model_path, ctx.task, ctx.tokenizer, rows,
                               os.path.join(it_dir, "eval_samples"), n=k, temperature=e.temperature,
                               desc=f"{os.path.basename(it_dir)} eval maj@{k}", **common)
    answers = [[s["answer"] for s in samples[i * k: (i + 1) * k]] for i in range(len(rows))]
    correct = np.asarray([[s["correct"] for s in samples[i * k: (i + 1) * k]] for i in range(len(rows))])
    ids, valid = consistency.answer_ids(answers, same=getattr(ctx.task, "same_answers", None))  # MATH: by value
    metrics.update({
        "maj_accuracy": float(consistency.maj_at_k(ids, valid, correct, k)), "maj_k": k,
        "sample_accuracy": float(correct.mean()), f"pass_at_{k}": float(consistency.pass_at_k(correct, k)),
        "vote_share": float(np.mean(consistency.vote_share(ids, valid))),
    })
    metrics["test_prompts"] = len(rows)
    return metrics


# ---------------------------------------------------------------------------------------
# Training phases, checkpoint selection, reference log-probs
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

    def run() -> dict:
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
        return {"steps": pcfg.num_steps, "kind": kind, "train_path": train_path}

    artifact(os.path.join(out_dir, DONE), run)
    return final


def warm_start(cfg, models: Models, train_rows: list[dict], tokenizer, workdir: str) -> str:
    """M_0 by SFT on the gold solutions of the training rows (init.num_steps > 0): iter0/sft.jsonl, iter0/train/.
    Returns its HF directory."""
    def gold() -> list[dict]:
        rows = gold_rows(train_rows)
        if not rows:
            raise ConfigError(f"config field seq_len={cfg.seq_len}: no train prompt has a gold response that fits "
                              f"with it (see data/train_stats.json); the warm start has nothing to train on")
        return rows

    it_dir = os.path.join(workdir, "iter0")
    sft_path = os.path.join(it_dir, "sft.jsonl")
    artifact(sft_path, gold, read=False)
    return train_phase(cfg, cfg.init, models, model_path=cfg.model.path, train_path=sft_path, kind="sft",
                       out_dir=os.path.join(it_dir, "train"), tokenizer=tokenizer,
                       desc="iter0 warm start (SFT on gold)")


def exports(train_dir: str) -> list[tuple[int, str]]:
    """(step, HF directory) of the exports of a training phase (rpo.train's export_every), by step."""
    d = os.path.join(train_dir, "exports")
    names = sorted(n for n in os.listdir(d) if n.startswith("step-") and "." not in n) if os.path.isdir(d) else []
    return [(int(n[len("step-"):]), os.path.join(d, n)) for n in names]


def select_checkpoint(ctx: Context, train_dir: str, it_dir: str) -> tuple[str, dict]:
    """The model of a training phase that answers most held-out training problems right (greedy), among
    its exports and its final step; the earliest wins a tie. Returns (HF directory, it_dir/select.json:
    every candidate's held-out accuracy and the chosen step). select.every = 0 keeps the final step."""
    def choose() -> dict:
        final = os.path.join(train_dir, "final")
        with open(os.path.join(train_dir, DONE)) as f:
            steps = json.load(f)["steps"]
        candidates = dict(exports(train_dir))
        candidates.setdefault(steps, final)
        scores = {}
        if ctx.cfg.select.every:
            e = ctx.cfg.eval
            for step, model_path in sorted(candidates.items()):
                greedy = sample_and_score(
                    ctx.models, model_path, ctx.task, ctx.tokenizer, ctx.data["heldout"],
                    os.path.join(it_dir, "select", f"step-{step:06d}"), n=1, temperature=0.0, top_p=1.0, top_k=0,
                    max_new_tokens=e.max_new_tokens, chunk=e.chunk_prompts, seed=0,
                    desc=f"{os.path.basename(it_dir)} select step {step}")
                scores[step] = float(np.mean([g["correct"] for g in greedy]))
            chosen = max(scores, key=lambda k: (scores[k], -k))
            logging.info(f"{os.path.basename(it_dir)}: step {chosen} selected (held-out greedy " +
                         ", ".join(f"{k}: {v:.3f}" for k, v in sorted(scores.items())) + ")")
        else:
            chosen = steps
        return {"chosen_step": chosen, "path": candidates[chosen], "heldout_prompts": len(ctx.data["heldout"]),
                "heldout_accuracy": {str(k): v for k, v in scores.items()}}

    choice = artifact(os.path.join(it_dir, "select.json"), choose)
    return choice["path"], choice


def reference_pairs(models: Models, model_path: str, it_dir: str, t: int, cfg, make: Callable[[], tuple]
                    ) -> tuple[str, dict]:
    """Iteration t's preference pairs with their reference log-probs under model_path (M_{t-1}): make() -> (rows,
    stats), seeded, so a kill between the two files rebuilds the same pairs; it_dir/pairs_stats.json is written
    first and it_dir/pairs.jsonl (with the log-probs) last, marking the stage done. Returns (pairs.jsonl, stats)."""
    pairs = functools.cache(make)
    stats = artifact(os.path.join(it_dir, "pairs_stats.json"), lambda: pairs()[1])
    path = os.path.join(it_dir, "pairs.jsonl")
    artifact(path, lambda: add_reference(models, model_path, pairs()[0], cfg, desc=f"iter{t} reference log-probs"),
             read=False)
    return path, stats


def add_reference(models: Models, model_path: str, pair_rows: list[dict], cfg, desc: str) -> list[dict]:
    """The pairs with their reference log-probs under model_path (M_{t-1}, the model they were sampled from)."""
    from rpo import report, train

    model_config, params = models.load(model_path)
    t = cfg.train
    with report.progress(desc=desc, total=len(pair_rows), unit="pairs") as bar:
        return train.add_reference_logps(
            model_config, params, pair_rows, None, batch_size=t.batch_size // t.grad_accum, seq_len=cfg.seq_len,
            pad_id=cfg.data.pad_id, truncate=False, chunk_size=t.loss.chunk_size, mesh=models.mesh,
            rules=models.rules, on_batch=bar.update,
        )
