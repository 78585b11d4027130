"""Iterative RPO against its baselines on the synthetic arithmetic task (the embedded default).

Runs the README's main job (configs/arith_tiny.py: SFT warm start -> M_0, then 3 IRPO
iterations) and times it; then, from that same M_0 and with the same number of training
steps per iteration, the baselines: SFT on gold, STaR, and DPO without NLL. Writes the table,
then the same rows in the layout of the paper's Table 1 (Pang et al. 2024) beside the paper's
GSM8K numbers, to experiments/results/arith_tiny.md (and prints it).

  python experiments/arith_tiny.py [--runs runs/table] [--only irpo,sft_gold,star,dpo]

Each run is `python -m rpo.main --config=configs/arith_tiny.py[:baseline=...]` in its own
workdir, so rerunning this script resumes whatever was interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {  # name -> (config variant, what it is)
    "irpo": ("", "Iterative RPO: DPO + NLL on (correct, incorrect) pairs of its own samples, gold among winners"),
    "sft_gold": ("baseline=sft_gold", "SFT on the gold solutions"),
    "star": ("baseline=star", "STaR: SFT on its own correct samples"),
    "dpo": ("baseline=dpo", "DPO without the NLL term (alpha = 0)"),
}
# The paper's Table 1 (Pang et al. 2024): Llama-2-70B-Chat, GSM8K test, greedy accuracy in %.
PAPER_GSM8K = {"zero_shot": 55.6, "sft_gold": 63.5, "star": 65.2, "dpo": 61.8, "irpo": (73.1, 78.0, 81.1, 81.6)}
PAPER_GSM8K_MAJ32 = 88.7  # Iterative RPO iteration 4, majority vote over 32 samples
TABLE1_NAMES = {"sft_gold": "SFT on gold", "star": "STaR", "dpo": "DPO without NLL"}


def run(name: str, runs: str, m0: str | None) -> tuple[list[dict], float]:
    variant, _ = METHODS[name]
    workdir = os.path.join(runs, name)
    cmd = [sys.executable, "-m", "rpo.main", f"--config=configs/arith_tiny.py{':' + variant if variant else ''}",
           f"--workdir={workdir}"]
    if m0 is not None:  # the baselines start from IRPO's M_0
        cmd += [f"--config.model.path={m0}", "--config.init.num_steps=0"]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return json.load(open(os.path.join(workdir, "results.json"))), time.time() - t0


def table1(results: dict[str, list[dict]], k: int) -> list[str]:
    """The rows of `results` (method -> results.json rows, iteration 0 = M_0) in the layout of the paper's
    Table 1: zero-shot (M_0), each baseline after its last iteration, IRPO iteration by iteration; greedy
    accuracy and maj@k, with the paper's GSM8K greedy accuracy beside each row for reference."""
    irpo = results["irpo"]
    lines = [
        "## Table 1 in miniature",
        "",
        "The measured rows of the table above, re-laid in the layout of the paper's Table 1 (Pang et al. 2024): "
        "same run, same command (`python experiments/arith_tiny.py`). Each baseline is shown after its last "
        "iteration, with as many training steps after M_0 as the IRPO row of that iteration. The last column is "
        "the paper's GSM8K greedy accuracy with Llama-2-70B-Chat, for reference only: another model, task and "
        "scale.",
        "",
        f"| method | train steps after M_0 | greedy accuracy | maj@{k} | paper: GSM8K greedy, Llama-2-70B-Chat |",
        "|---|---|---|---|---|",
    ]

    def row(label: str, r: dict, steps: int, paper: str) -> str:
        return f"| {label} | {steps} | {r['greedy_accuracy']:.3f} | {r['maj_accuracy']:.3f} | {paper} |"

    lines.append(row("zero-shot (M_0: here the SFT warm start)", irpo[0], 0, f"{PAPER_GSM8K['zero_shot']}%"))
    for name, label in TABLE1_NAMES.items():
        if name in results and len(results[name]) > 1:
            last = results[name][-1]
            lines.append(row(f"{label} (iteration {last['iteration']})", last,
                             last["train_steps"] - results[name][0]["train_steps"], f"{PAPER_GSM8K[name]}%"))
    for r in irpo[1:]:
        t = r["iteration"]
        paper = f"{PAPER_GSM8K['irpo'][t - 1]}%" if t <= len(PAPER_GSM8K["irpo"]) else "-"
        lines.append(row(f"Iterative RPO, iteration {t}", r, r["train_steps"] - irpo[0]["train_steps"], paper))
    lines += ["", f"The paper's Iterative RPO iteration 4 (not run here): {PAPER_GSM8K['irpo'][3]}% greedy, "
              f"{PAPER_GSM8K_MAJ32}% with majority voting over 32 samples."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "table"))
    ap.add_argument("--only", default=",".join(METHODS))
    args = ap.parse_args()
    names = args.only.split(",")
    if names[0] != "irpo":
        raise SystemExit("--only: 'irpo' comes first (the baselines start from its M_0)")
    results, times = {}, {}
    for name in names:
        m0 = None if name == "irpo" else os.path.join(args.runs, "irpo", "iter0", "train", "final")
        results[name], times[name] = run(name, args.runs, m0)

    k = results["irpo"][0].get("maj_k")
    lines = [
        f"# IRPO vs baselines on the synthetic arithmetic task ({datetime.date.today()})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no accelerator. "
        f"Command: `python experiments/arith_tiny.py`. Test split: {results['irpo'][0]['test_prompts']} problems "
        "never seen in training. Every method starts from the same M_0 (the SFT warm start of the IRPO run) and "
        "trains the same number of steps with the same batch size per iteration.",
        "",
        f"| method | iteration | greedy accuracy | maj@{k} | pass@{k} | train steps after M_0 |",
        "|---|---|---|---|---|---|",
    ]
    m0 = results["irpo"][0]
    lines.append(f"| M_0 (SFT warm start; zero-shot row) | 0 | {m0['greedy_accuracy']:.3f} | {m0['maj_accuracy']:.3f} "
                 f"| {m0[f'pass_at_{k}']:.3f} | 0 |")
    for name in names:
        for row in results[name][1:]:
            steps = row["train_steps"] - results[name][0]["train_steps"]
            lines.append(f"| {name} | {row['iteration']} | {row['greedy_accuracy']:.3f} | {row['maj_accuracy']:.3f} "
                         f"| {row[f'pass_at_{k}']:.3f} | {steps} |")
    lines += ["", "Methods:"] + [f"- `{n}`: {METHODS[n][1]}" for n in names]
    lines += ["", f"Wall time of the main job (`python -m rpo.main`, warm start + 3 iterations, compile included): "
              f"{times['irpo'] / 60:.1f} min."]
    lines += [""] + table1(results, k)
    text = "\n".join(lines) + "\n"
    out = os.path.join(ROOT, "experiments", "results", "arith_tiny.md")
    with open(out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
