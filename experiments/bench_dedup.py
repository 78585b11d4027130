"""Near-duplicate removal (rpo.filters.near_duplicates) against a brute-force ROUGE-L over every pair.

  python experiments/bench_dedup.py [--data ../shared/data/gsm8k/train.jsonl] [--texts 1000] [--repeats 5]

Texts: the first N GSM8K train questions, plus near-copies of every 10th (a word dropped), checked against the
next N questions as references (seeds). The baseline scores every (text, reference) pair and every (text, earlier
text) pair with rpo.filters.rouge_l, then applies the same rule; both must give the same verdicts. Reports the
median of --repeats runs of each, in the same process, and writes experiments/results/bench_dedup.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rpo import filters  # noqa: E402


def brute_force(texts, refs, threshold):
    out, kept = [], []
    for j, t in enumerate(texts):
        why = next((f"duplicate_of_seed:{i}" for i, r in enumerate(refs) if filters.rouge_l(t, r) >= threshold), None)
        why = why or next((f"duplicate_of:{k}" for k in kept if filters.rouge_l(t, texts[k]) >= threshold), None)
        out.append(why)
        if why is None:
            kept.append(j)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "gsm8k", "train.jsonl"))
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "bench_dedup.md"))
    args = ap.parse_args()
    questions = [json.loads(line)["question"] for line in open(args.data)]
    n = args.texts
    texts = list(questions[:n])
    for i in range(0, n, 10):  # near-copies: drop one word
        words = texts[i].split()
        texts.append(" ".join(words[:3] + words[4:]))
    refs = questions[n: 2 * n]

    fast, slow = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        got = filters.near_duplicates(texts, refs, threshold=args.threshold)
        fast.append(time.perf_counter() - t0)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        want = brute_force(texts, refs, args.threshold)
        slow.append(time.perf_counter() - t0)
    assert got == want, "near_duplicates disagrees with the brute force"
    f, s = statistics.median(fast), statistics.median(slow)
    table = "\n".join([
        f"| texts | references | duplicates found | near_duplicates (median of {args.repeats}) | "
        f"brute-force rouge_l over all pairs | speed-up |", "|---|---|---|---|---|---|",
        f"| {len(texts)} | {len(refs)} | {sum(x is not None for x in got)} | {f:.3f} s | {s:.2f} s | {s / f:.0f}x |"])
    text = (f"# Near-duplicate removal ({time.strftime('%Y-%m-%d')})\n\nMachine: {os.uname().machine}, "
            f"{os.cpu_count()} CPU cores. Command: `python experiments/bench_dedup.py --texts {n} --repeats "
            f"{args.repeats}`. Data: GSM8K train questions; threshold {args.threshold}. Both give the same verdicts.\n\n"
            f"{table}\n")
    print(text)
    with open(args.out, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
