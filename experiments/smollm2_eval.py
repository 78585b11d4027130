"""SmolLM2-135M-Instruct's zero-shot greedy accuracy (the model as rpo.models.smollm2 prepares it).

  nice -n 10 .venv/bin/python experiments/smollm2_eval.py --task gsm8k --n 500 --data ../shared/data/gsm8k --chunk 32
  nice -n 10 .venv/bin/python experiments/smollm2_eval.py --task arith --n 500
  (arith: configs/arith_tiny.py's task block, test split, scored flexibly; see configs/smollm2.py)

The prompts are configs/smollm2.py's (the task's zero-shot prompt as the user's turn of the chat
template), decoded greedily by rpo.sampling up to --max-new-tokens, stopping at <|im_end|> or the
task's stop strings, and scored by the task (GSM8K: flexible extraction, "Final answer:" first, then
the last number; rpo.rewards). Uses the first --n test problems. Resumable: the completions are
written in chunks under --workdir and a rerun skips the finished ones. Prints, and writes to
<workdir>/summary.json, the accuracy with its 95% Wilson interval (scipy), the test-set size, how
often the model wrote the "Final answer:" format, and how many replies were cut off.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="gsm8k", choices=("gsm8k", "arith"))
    ap.add_argument("--n", type=int, default=500, help="the first N test problems")
    ap.add_argument("--data", default="", help="gsm8k: the directory of the official test.jsonl")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="default 512 (gsm8k), 256 (arith)")
    ap.add_argument("--chunk", type=int, default=32,
                    help="prompts per sampling call and per resumable file (128 GSM8K prompts x 512 tokens held 6 GB)")
    ap.add_argument("--model", default="", help="an HF directory (default: SmolLM2 prepared from its wheel)")
    ap.add_argument("--workdir", default="")
    args = ap.parse_args()

    from scipy.stats import binomtest

    from rpo import stages
    from rpo.data import get_task
    from rpo.files import load_module

    smollm2_cfg = load_module(os.path.join(ROOT, "configs", "smollm2.py"))
    arg = f"{args.task},runlocal" + (f",model={args.model}" if args.model else "") + (
        f",data={args.data}" if args.data else "")
    cfg = smollm2_cfg.get_config(arg)
    if args.task == "arith":
        cfg.task.num_test = max(cfg.task.num_test, args.n)
    else:
        cfg.task.max_examples = args.n
    args.max_new_tokens = args.max_new_tokens or (512 if args.task == "gsm8k" else 256)
    workdir = args.workdir or os.path.join(ROOT, "runs", f"smollm2_eval_{args.task}_{args.n}")
    os.makedirs(workdir, exist_ok=True)
    task = get_task(cfg.task)
    tokenizer = stages.task_tokenizer(cfg, task)
    examples = task.load("test")[: args.n]
    rows = []
    for ex in examples:
        prompt = stages.prompt_text(cfg, task, tokenizer, ex)
        rows.append({"uid": ex.uid, "prompt": prompt, "prompt_ids": stages.encode(tokenizer, prompt, cfg.data.add_bos),
                     "answer": ex.answer, "question": ex.question, "solution": ex.solution,
                     "choices": [list(c) for c in ex.choices]})
    t0 = time.time()
    samples = stages.sample_and_score(
        stages.Models(cfg), cfg.model.path, task, tokenizer, rows, os.path.join(workdir, "greedy"), n=1,
        temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens, chunk=args.chunk, seed=0,
        desc=f"{args.task} greedy")
    k = sum(s["correct"] for s in samples)
    n = len(samples)
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    finish = collections.Counter(s["finish_reason"] for s in samples)
    summary = {
        "task": args.task, "test_problems": n, "correct": k, "accuracy": k / n,
        "ci95_wilson": [round(ci.low, 4), round(ci.high, 4)],
        "final_answer_format": sum("Final answer:" in s["text"] for s in samples),
        "no_answer_extracted": sum(s["answer"] is None for s in samples),
        "finish_reasons": dict(finish), "max_new_tokens": args.max_new_tokens,
        "mean_completion_tokens": sum(len(s["completion_ids"]) for s in samples) / n,
        "model": cfg.model.path, "prompt_example": rows[0]["prompt"], "seconds_this_call": round(time.time() - t0),
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
