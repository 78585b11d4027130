"""Trains M_0 of the embedded default: a small Llama pre-trained on arithmetic chains, never on the task's
own training problems.

The paper's M_0 (Llama-2-70B-Chat) is a competent model that has never seen GSM8K's training set and solves it
zero-shot at a middling rate, in a solution style of its own. This script makes the miniature of that model: it
pre-trains configs/arith_tiny.py's random model shape on a corpus of the `pretrain` block — problems of a
broader distribution (1 to 3 steps, where the task has 3), drawn from their own seeded stream with every
problem of the task's train and test splits removed, written in the model's own `equations` style (the task's
gold solutions are `prose`) — and keeps the export of step `pretrain.keep_step`: the step whose accuracy on the
task is middling, as the paper's M_0's was.

  python experiments/arith_m0.py                      # runs/arith_m0/ -> experiments/models/arith_m0/
  python experiments/arith_m0.py --workdir DIR --out DIR

The run resumes when interrupted (rpo.train's checkpoints). The corpus, the training curve and the kept step are
recorded in <out>/m0.json; the model directory loads in rpo and in transformers. Its accuracy on the task's test
split is what `python -m rpo.main --config=configs/arith_tiny.py:baseline=zero_shot` measures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def corpus_rows(cfg, tokenizer) -> list[dict]:
    """The pre-training corpus: pretrain.num_problems draws of the 'pretrain' stream (duplicates kept, as in
    web text), minus every problem of the task's splits; SFT rows in the model's own style."""
    import ml_collections

    from rpo.data import get_task
    from rpo.data.synthetic import PROMPT, make_problem

    p, t = cfg.pretrain, cfg.task
    if t.num_test > p.excluded_test:
        raise ValueError(f"config field task.num_test={t.num_test}: M_0's corpus excludes only the first "
                         f"pretrain.excluded_test={p.excluded_test} test problems")
    task = get_task(ml_collections.ConfigDict({**t.to_dict(), "num_test": p.excluded_test}))  # same corpus
    task_questions = {ex.question for split in ("train", "test") for ex in task.load(split)}
    rng = random.Random(f"{t.seed}/pretrain")
    rows = []
    for _ in range(p.num_problems):
        prob = make_problem(rng, min_steps=p.min_steps, max_steps=p.max_steps, max_value=t.max_value, ops=t.ops)
        if prob.question not in task_questions:
            rows.append({"prompt_ids": tokenizer.encode(PROMPT.format(question=prob.question)),
                         "response_ids": tokenizer.encode(prob.solution("equations")) + [tokenizer.eos_token_id]})
    return rows


def main() -> None:
    import ml_collections

    from rpo import files, train
    from rpo.data.synthetic import char_tokenizer
    from rpo.files import load_module

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "arith_tiny.py"))
    ap.add_argument("--workdir", default=os.path.join(ROOT, "runs", "arith_m0"))
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "models", "arith_m0"))
    args = ap.parse_args()
    cfg = load_module(args.config).get_config()
    p = cfg.pretrain
    tokenizer = char_tokenizer()
    os.makedirs(args.workdir, exist_ok=True)
    corpus = os.path.join(args.workdir, "corpus.jsonl")
    if not os.path.exists(corpus):
        files.write_jsonl(corpus, corpus_rows(cfg, tokenizer))
    digest = hashlib.sha256(open(corpus, "rb").read()).hexdigest()

    phase = ml_collections.ConfigDict(p.phase.to_dict())
    phase.model = ml_collections.ConfigDict(dict(path="", dtype="float32", seed=cfg.model.seed,
                                                 random=cfg.model.random.to_dict()))
    phase.data = ml_collections.ConfigDict(dict(kind="sft", train_path=corpus, eval_path="", seq_len=p.seq_len,
                                                pad_id=cfg.data.pad_id, truncate=False, compute_ref=False))
    phase.mesh = ml_collections.ConfigDict(cfg.mesh.to_dict())
    phase.sharding_rules = cfg.sharding_rules
    phase.seed = cfg.seed
    phase.eval_every, phase.eval_batches = phase.num_steps, 0

    class Kept(Exception):
        pass

    def stop_at_kept(step, metrics):  # the schedule is a num_steps run's; M_0 is its export at keep_step
        if step >= p.keep_step:
            raise Kept

    try:
        train.run(phase, args.workdir, on_step=stop_at_kept)
    except Kept:
        pass

    kept = train.export_path(args.workdir, p.keep_step)
    if not os.path.isdir(kept):
        raise SystemExit(f"config field pretrain.keep_step={p.keep_step}: no export at {kept} "
                         f"(pretrain.phase.export_every={phase.export_every})")
    tmp = args.out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(kept, tmp)
    tokenizer.save_pretrained(tmp)
    curve = [json.loads(line) for line in open(os.path.join(args.workdir, "metrics.jsonl"))]
    files.write_json(os.path.join(tmp, "m0.json"), {
        "made_by": "python experiments/arith_m0.py", "config": os.path.relpath(args.config, ROOT),
        "kept_step": p.keep_step, "corpus_rows": sum(1 for _ in open(corpus)), "corpus_sha256": digest,
        "pretrain": p.to_dict(), "train_loss": {r["step"]: round(r["loss"], 4) for r in curve
                       if r["split"] == "train" and r["step"] <= p.keep_step},
    })
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    print(f"M_0 = step {p.keep_step} -> {args.out}")


if __name__ == "__main__":
    main()
