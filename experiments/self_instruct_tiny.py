"""CoT-Self-Instruct on the synthetic task, end to end, and whether its filter keeps correct problems.

  python experiments/self_instruct_tiny.py [--workdir runs/self_instruct_tiny_exp]

Runs `python -m rpo.main --config=configs/self_instruct_tiny.py:irpo` (resumable: rerunning the
script resumes the run), then checks every parsed problem against the truth: an arith problem is a
chain of operations ('23 +15 -9'), so a problem's true answer can be read off its text
(rpo.data.synthetic.question_steps). The table says, for
the problems Answer-Consistency kept and for those it rejected, how often the model's own generated
answer is the true one: the filter is worth something when the kept share is higher. Writes
experiments/results/self_instruct_tiny.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def true_answer(question: str) -> int | None:
    """The answer a problem's text implies ('23 +15 -9': the chain applied left to right), or None when the text
    does not read as a problem of the task."""
    from rpo.data.synthetic import question_steps

    try:
        return question_steps(question)[-1][3]
    except (ValueError, IndexError):
        return None


def _jsonl(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=os.path.join(ROOT, "runs", "self_instruct_tiny_exp"))
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "self_instruct_tiny.md"))
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "rpo.main", f"--config={ROOT}/configs/self_instruct_tiny.py:irpo",
           f"--workdir={args.workdir}"]
    print("running:", " ".join(cmd), file=sys.stderr)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.time() - t0

    counts = json.load(open(os.path.join(args.workdir, "counts.json")))
    kept = _jsonl(os.path.join(args.workdir, "dataset.jsonl"))
    rejected = _jsonl(os.path.join(args.workdir, "rejected.jsonl"))
    filter_reasons = {"majority_differs", "tie", "no_valid_solution", "low_vote_share"}
    groups = {"kept by the filter": kept,
              "rejected by the filter": [r for r in rejected if r["reason"] in filter_reasons]}
    rows = []
    for name, items in groups.items():
        truths = [true_answer(r["question"]) for r in items]
        readable = [(r, t) for r, t in zip(items, truths) if t is not None]
        right = sum(str(t) == r["answer"] for r, t in readable)
        rows.append((name, len(items), len(readable), right))
    results = json.load(open(os.path.join(args.workdir, "irpo", "results.json")))

    lines = [f"# CoT-Self-Instruct on the synthetic task ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {os.uname().machine}, {os.cpu_count()} CPU cores, no accelerator. "
             f"Command: `python experiments/self_instruct_tiny.py` (runs `python -m rpo.main "
             f"--config=configs/self_instruct_tiny.py:irpo --workdir={os.path.relpath(args.workdir, ROOT)}`). "
             f"Wall time of this invocation (a resumed run counts only what it redid): {wall / 60:.1f} min.", "",
             f"{counts['generations']} generations from {counts['seeds']} seeds; kept {counts['kept']}.", "",
             "| rejection reason | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(counts["reasons"].items(), key=lambda kv: -kv[1])]
    lines += ["", "Is the model's own answer to the problem it wrote the true one? (true answer read off the text; "
              "'readable' = the text parses as a problem of the task)", "",
              "| problems | count | readable | generated answer true | share true of readable |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {c} | {r} | {t} | {t / r:.2f} |" if r else f"| {n} | {c} | 0 | 0 | - |" for n, c, r, t in rows]
    lines += ["", "IRPO on the kept problems (test split: 200 problems of the task; iteration 0 is the warm-started "
              "synthesizing model):", "", "| iteration | greedy accuracy | maj accuracy | pairs |", "|---|---|---|---|"]
    lines += [f"| {r['iteration']} | {r['greedy_accuracy']:.3f} | {r['maj_accuracy']:.3f} | {r.get('pairs', '')} |"
              for r in results]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
