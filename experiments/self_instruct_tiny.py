"""CoT-Self-Instruct on the synthetic task, end to end, and whether its filter keeps correct problems.

  python experiments/self_instruct_tiny.py [--workdir runs/self_instruct_tiny_exp]

Runs `python -m rpo.main --config=configs/self_instruct_tiny.py:irpo` (resumable: rerunning the
script resumes the run), then checks every parsed problem against the truth: the arith task's
problems are sums and differences written with fixed verbs, so a problem's true answer can be read
off its text (names and item words may be garbled; the numbers and verbs decide). The table says, for
the problems Answer-Consistency kept and for those it rejected, how often the model's own generated
answer is the true one: the filter is worth something when the kept share is higher. Writes
experiments/results/self_instruct_tiny.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = {"finds": 1, "buys": 1, "gets": 1, "gives": -1, "loses": -1, "sells": -1}


def true_answer(question: str) -> int | None:
    """The answer a problem's text implies ('X has N ... . Y gets M. ... How many ...?'), or None when the
    text does not read as such a problem."""
    sentences = [s.strip() for s in question.split(".") if s.strip()]
    first = re.fullmatch(r"\w+ has (\d+) ?\w*", sentences[0]) if sentences else None
    if not first or not sentences[-1].startswith("How many") or len(sentences) < 3:
        return None
    value = int(first.group(1))
    for s in sentences[1:-1]:
        m = re.fullmatch(r"\w+ (\w+) (\d+)", s)
        if not m or m.group(1) not in OPS:
            return None
        value += OPS[m.group(1)] * int(m.group(2))
    return value if value >= 0 else None


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
