"""MATH grading speed: rpo.rewards.math_score (math-verify in worker processes) against the hand-written grader
it replaced, on the same 10,000 (gold, completion) pairs, on 2 cores.

  python experiments/bench_grading.py [--data ../shared/data/math500/test.jsonl] [--pairs 10000] [--repeats 3]
                                      [--old-rev 81920d8] [--cores 2]

Pairs: for each MATH500 row (its solution, its final answer after "The answer is:") 20 completions: five ways of
ending the solution (as written with its \\boxed{}, Minerva's "Final Answer: The final answer is $X$. I hope it is
correct.", "The answer is: X" (PRM800K's trailer, no $), "Final answer: $X$", a last sentence "So we get $X$.")
x the row's answer or the next row's x the whole solution or only its last 300 characters; rows are reused in
order until there are --pairs.
Both graders run math_score(completions, golds, strict=False), the flexible mode the MATH configs use. The old
grader is `git show <old-rev>:rpo/rewards.py` written to a temporary package, so its workers import it and not
ours. Each run starts from a fresh worker pool (started before the clock, with one warm-up request per worker) and
empty caches; the process is pinned to --cores cores (the workers inherit it). Reports the median of --repeats
runs of each and writes experiments/results/bench_grading.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rpo import rewards  # noqa: E402

TRAILER = "The answer is:"


ENDINGS = ("boxed", "minerva", "answer_is_bare", "final_answer", "so_we_get")


def make_pairs(path: str, n: int) -> tuple[list[str], list[str], list[bool], list[str]]:
    """(completions, golds, whether the completion's answer is the gold one by construction, its ENDINGS kind)."""
    rows = []
    for k, line in enumerate(open(path)):
        solution, _, final = json.loads(line)["answer"].rpartition(TRAILER)
        if not final.strip() or rewards.extract_boxed(solution) is None:
            raise ValueError(f"{path}:{k + 1}: no {TRAILER!r} answer or no \\boxed{{}} in the solution")
        rows.append((solution.strip(), final.strip()))
    completions, golds, right, kinds = [], [], [], []
    k = 0
    while len(completions) < n:
        (solution, final), (_, other) = rows[k % len(rows)], rows[(k + 1) % len(rows)]
        box = "\\boxed{" + rewards.extract_boxed(solution) + "}"
        body = solution.replace(box, rewards.extract_boxed(solution))  # the box sits in $...$ already
        for answer in (final, other):
            endings = [solution.replace(box, "\\boxed{" + answer + "}"),
                       f"{body}\nFinal Answer: The final answer is ${answer}$. I hope it is correct.",
                       f"{body}\n{TRAILER} {answer}", f"{body}\nFinal answer: ${answer}$", f"{body} So we get ${answer}$."]
            for ending, text in zip(ENDINGS, endings):
                for part in (text, text[-300:]):
                    completions.append(part)
                    golds.append(final)
                    right.append(answer == final)
                    kinds.append(ending)
        k += 1
    return completions[:n], golds[:n], right[:n], kinds[:n]


def load_old(rev: str, where: str):
    """The rpo.rewards of git revision `rev`, as a module whose workers import that same file."""
    source = subprocess.run(["git", "show", f"{rev}:rpo/rewards.py"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    os.makedirs(os.path.join(where, "rpo"))
    open(os.path.join(where, "rpo", "__init__.py"), "w").close()
    path = os.path.join(where, "rpo", "rewards.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("old_rewards", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_rewards"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def fresh(module) -> None:
    """A new worker pool, started and warm, and empty caches."""
    if module._pool_instance is not None:
        module._pool_instance.close()
    module._pool_instance = None
    module._cache.clear()
    if hasattr(module, "normalize_math"):
        module.normalize_math.cache_clear()
    workers = module._pool().max_workers
    module.math_equiv_batch([(f"x+{i}", f"{i}+x") for i in range(workers)])
    assert len(module._pool().workers) == workers
    module._cache.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "math500", "test.jsonl"))
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--old-rev", default="81920d8", help="the last revision with the hand-written MATH grader")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "bench_grading.md"))
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cores)
    completions, golds, right, kinds = make_pairs(args.data, args.pairs)
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        old = load_old(args.old_rev, tmp)
        times: dict[str, list[float]] = {"old": [], "new": []}
        verdicts = {}
        for _ in range(args.repeats):
            for name, module in (("old", old), ("new", rewards)):
                fresh(module)
                t0 = time.perf_counter()
                _, verdicts[name] = module.math_score(completions, golds)
                times[name].append(time.perf_counter() - t0)
                print(f"{name}: {times[name][-1]:.1f} s, {sum(verdicts[name])} correct", flush=True)
        workers = {name: module._pool().max_workers for name, module in (("old", old), ("new", rewards))}
        old._pool_instance.close()

    load_after = os.getloadavg()[0]
    med = {name: statistics.median(t) for name, t in times.items()}
    agree = {name: sum(v == r for v, r in zip(verdicts[name], right)) for name in verdicts}
    same = sum(a == b for a, b in zip(verdicts["old"], verdicts["new"]))
    n = len(completions)
    command = (f"python experiments/bench_grading.py --pairs {args.pairs} --repeats {args.repeats} "
               f"--old-rev {args.old_rev} --cores {args.cores}")
    lines = [
        f"# MATH grading speed ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, the benchmark pinned to {len(cores)}. "
        f"Command: `{command}`. Data: {n} (gold, completion) pairs built from MATH500 solutions (see the script's "
        "docstring); flexible mode. Each run: a fresh worker pool (started and warm before the clock) and empty "
        f"caches. Workers: {workers['old']} (old), {workers['new']} (new). Load average (1 min) of the machine, "
        f"shared with other jobs: {load_before:.1f} before, {load_after:.1f} after.",
        "",
        f"| grader | median of {args.repeats} runs | per pair | runs | matches the constructed label |",
        "|---|---|---|---|---|",
        f"| old: hand-written LaTeX parser + sympy ({args.old_rev}) | {med['old']:.1f} s | "
        f"{1e3 * med['old'] / n:.2f} ms | {', '.join(f'{t:.1f}' for t in times['old'])} s | "
        f"{agree['old']} / {n} |",
        f"| new: math-verify 0.9.0 | {med['new']:.1f} s | {1e3 * med['new'] / n:.2f} ms | "
        f"{', '.join(f'{t:.1f}' for t in times['new'])} s | {agree['new']} / {n} |",
        "",
        f"New / old time: {med['new'] / med['old']:.2f}x. The two graders give the same verdict on {same} of {n} "
        f"pairs. The constructed label is the row's own answer (true) or the next row's (false); it is not a "
        "ground truth where two rows share a value.",
        "",
        "| ending | pairs | old matches the label | new matches the label |",
        "|---|---|---|---|",
    ]
    for ending in ENDINGS:
        idx = [i for i, kind in enumerate(kinds) if kind == ending]
        hits = {name: sum(verdicts[name][i] == right[i] for i in idx) for name in verdicts}
        lines.append(f"| {ending} | {len(idx)} | {hits['old']} | {hits['new']} |")
    lines.append("")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
