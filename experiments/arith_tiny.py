"""Table 1 of Iterative RPO (Pang et al. 2024) in miniature, on the embedded default, with seeds and intervals.

From one M_0 (experiments/models/arith_m0/, never trained on the task's problems) and the task's fixed training
set, every method runs `python -m rpo.main --config=configs/arith_tiny.py[:baseline=...] --config.seed=S` for each
seed: Iterative RPO (DPO + NLL), SFT on the gold solutions, STaR (SFT on its own correct samples), DPO without the
NLL term, each with the same prompts, iterations and steps per iteration; and GRPO (configs/grpo_tiny.py) with
IRPO's sampling budget per iteration. Each iteration's model is selected the same way (the export best on the
held-out training problems). Zero-shot is M_0 itself. Writes
experiments/results/arith_tiny.md: per method and iteration, greedy accuracy and maj@k on the test split as the
mean over seeds with a 95% t-interval, the paired difference to IRPO, winner precision; then the same rows in the
layout of the paper's Table 1; and the paper's Figures 2-4 in miniature (PNG files beside it):
  arith_tiny_fig_nll.png   log-probs of chosen and rejected over training: IRPO (DPO + NLL) vs DPO without NLL
  arith_tiny_fig_sft.png   the same pairs under STaR's training (SFT on chosen-like samples) vs IRPO's

  python experiments/arith_tiny.py [--runs runs/table] [--seeds 0,1,2] [--only irpo,sft_gold,star,dpo,grpo]

Each run resumes when interrupted (rerun this script); a baseline reuses the IRPO run's evaluation of M_0 for the
same seed (the same computation), so M_0 is evaluated once per seed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "experiments", "results")
METHODS = {  # name -> (config file and variant, what it is)
    "irpo": ("configs/arith_tiny.py", "Iterative RPO: DPO + NLL on (correct, incorrect) pairs of its own samples"),
    "sft_gold": ("configs/arith_tiny.py:baseline=sft_gold", "SFT on the gold solutions (a human's style)"),
    "star": ("configs/arith_tiny.py:baseline=star", "STaR: SFT on its own correct samples"),
    "dpo": ("configs/arith_tiny.py:baseline=dpo", "DPO without the NLL term (alpha = 0)"),
    "grpo": ("configs/grpo_tiny.py", "GRPO (rpo/grpo.py) at IRPO's sampling budget: per iteration as many "
             "samples (prompts_per_iteration x N, in groups of N) and as many candidate exports for selection"),
}
# The paper's Table 1 (Pang et al. 2024): Llama-2-70B-Chat, GSM8K test, greedy accuracy in %.
PAPER_GSM8K = {"zero_shot": 55.6, "sft_gold": 63.5, "star": 65.2, "dpo": 61.8, "irpo": (73.1, 78.0, 81.1, 81.6)}
PAPER_GSM8K_MAJ32 = 88.7  # Iterative RPO iteration 4, majority vote over 32 samples
TABLE1_NAMES = {"sft_gold": "SFT on gold", "star": "STaR", "dpo": "DPO without NLL",
                "grpo": "GRPO at IRPO's sampling budget (not in the paper)"}


def workdir(runs: str, name: str, seed: int) -> str:
    return os.path.join(runs, name, f"seed{seed}")


def run(name: str, runs: str, seed: int) -> list[dict]:
    config, _ = METHODS[name]
    wd = workdir(runs, name, seed)
    if name != "irpo":  # M_0's evaluation for this seed is the IRPO run's, computed once
        src, dst = os.path.join(workdir(runs, "irpo", seed), "iter0"), os.path.join(wd, "iter0")
        if not os.path.exists(os.path.join(dst, "eval.json")):
            shutil.copytree(src, dst, dirs_exist_ok=True)
    cmd = [sys.executable, "-m", "rpo.main", f"--config={config}",
           f"--workdir={wd}", f"--config.seed={seed}"]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    if not os.path.exists(os.path.join(wd, "wall_seconds.json")):
        with open(os.path.join(wd, "wall_seconds.json"), "w") as f:
            json.dump({"seconds": time.time() - t0}, f)
    return json.load(open(os.path.join(wd, "results.json")))


def interval(values) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval over seeds (nan half-width for one seed)."""
    from scipy import stats

    v = np.asarray(values, float)
    if len(v) < 2:
        return float(v.mean()), math.nan
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def fmt(values, scale=100.0) -> str:
    m, h = interval(values)
    return f"{scale * m:.1f} ± {scale * h:.1f}" if not math.isnan(h) else f"{scale * m:.1f}"


def _train_metrics(wd: str, t: int) -> list[dict]:
    path = os.path.join(wd, f"iter{t}", "train", "metrics.jsonl")
    return [r for r in map(json.loads, open(path)) if r["split"] == "train"]


def plot_chosen_rejected(series, ylabel: str, title: str, out: str, marker=None) -> None:
    """One PNG of chosen (solid) and rejected (dashed) log-probs over training steps; series: (label, color, steps,
    chosen, rejected) per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, color, steps, chosen, rejected in series:
        ax.plot(steps, chosen, color=color, marker=marker, label=f"{label}: chosen")
        ax.plot(steps, rejected, color=color, marker=marker, ls="--", label=f"{label}: rejected")
    ax.set_xlabel("training step (iteration 1)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


def figure_nll(runs: str, seed: int, out: str) -> None:
    """The paper's Figure 2/3 in miniature: mean log-probs of the chosen and rejected responses in the training
    batches over iteration 1's steps, IRPO (DPO + NLL) against DPO without NLL (same pairs: same M_0 and seed)."""
    series = []
    for name, color, label in (("irpo", "C0", "DPO + NLL (IRPO)"), ("dpo", "C3", "DPO")):
        rows = _train_metrics(workdir(runs, name, seed), 1)
        series.append((label, color, [r["step"] for r in rows], [r["logps/chosen"] for r in rows],
                       [r["logps/rejected"] for r in rows]))
    plot_chosen_rejected(series, "log-prob of the response (batch mean)", "Effect of the NLL term (seed %d)" % seed, out)


def pair_logps_over_training(pairs_path: str, train_dir: str, limit: int = 256) -> tuple[list[int], np.ndarray]:
    """Mean summed log-probs of chosen and rejected of the first `limit` pairs of pairs_path under each export of a
    training phase: (steps, [len(steps), 2])."""
    import tempfile

    from rpo import files, stages, train
    from rpo.models.hf import load_pretrained

    cfg = files.load_module(os.path.join(ROOT, "configs", "arith_tiny.py")).get_config()
    rows = files.read_jsonl(pairs_path)[:limit]
    steps, means = [0], []
    m0 = json.load(open(os.path.join(os.path.dirname(os.path.dirname(train_dir)), "irpo_config.json")))["model"]["path"]
    paths = [m0] + [p for _, p in stages.exports(train_dir)]
    steps += [s for s, _ in stages.exports(train_dir)]
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            config, params = load_pretrained(path)
            out = train.add_reference_logps(config, params, [dict(r) for r in rows], os.path.join(tmp, "p.jsonl"),
                                            batch_size=64, seq_len=cfg.seq_len, pad_id=cfg.data.pad_id,
                                            truncate=False, chunk_size=64)
            means.append([np.mean([r["ref_chosen_logp"] for r in out]), np.mean([r["ref_rejected_logp"] for r in out])])
    return steps, np.asarray(means)


def figure_sft(runs: str, seed: int, out: str) -> dict:
    """The paper's Figure 3/4 in miniature: IRPO's iteration-1 pairs scored under every export of iteration 1 of
    STaR (SFT on its own correct samples) and of IRPO: SFT raises the rejected responses with the chosen ones,
    DPO + NLL pulls them apart. Returns the curves."""
    pairs = os.path.join(workdir(runs, "irpo", seed), "iter1", "pairs.jsonl")
    curves = {name: pair_logps_over_training(pairs, os.path.join(workdir(runs, name, seed), "iter1", "train"))
              for name in ("irpo", "star")}
    labels = {"irpo": ("DPO + NLL (IRPO)", "C0"), "star": ("SFT on own correct samples (STaR)", "C2")}
    plot_chosen_rejected([(*labels[name], steps, m[:, 0], m[:, 1]) for name, (steps, m) in curves.items()],
                         "mean log-prob of IRPO's iteration-1 pairs",
                         "Chosen and rejected under SFT vs DPO + NLL (seed %d)" % seed, out, marker="o")
    return {name: {"steps": steps, "chosen": m[:, 0].round(3).tolist(), "rejected": m[:, 1].round(3).tolist()}
            for name, (steps, m) in curves.items()}


def steps(row: dict) -> int:
    """Train steps behind a results row: IRPO and its baselines count train_steps, GRPO grpo_steps."""
    return row["train_steps"] if "train_steps" in row else row["grpo_steps"]


def table(results: dict[str, dict[int, list[dict]]], seeds: list[int], k: int, n_test: int) -> list[str]:
    """Per method and iteration: mean ± 95% interval over seeds, and the paired difference to IRPO."""
    lines = [
        f"| method | iteration | greedy accuracy (%) | maj@{k} (%) | IRPO minus this, greedy (paired, pts) "
        f"| winner precision (%) | selected step | train steps after M_0 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    m0 = [results["irpo"][s][0] for s in seeds]
    lines.append(f"| zero-shot (M_0) | 0 | {fmt([r['greedy_accuracy'] for r in m0])} "
                 f"| {fmt([r['maj_accuracy'] for r in m0])} | "
                 f"{fmt([results['irpo'][s][-1]['greedy_accuracy'] - results['irpo'][s][0]['greedy_accuracy'] for s in seeds])}"
                 f" (last iteration) | - | - | 0 |")
    for name in results:
        for t in range(1, len(results[name][seeds[0]])):
            rows = [results[name][s][t] for s in seeds]
            diff = "-" if name == "irpo" else fmt(
                [results["irpo"][s][t]["greedy_accuracy"] - results[name][s][t]["greedy_accuracy"] for s in seeds])
            prec = [r["winner_precision"] for r in rows if "winner_precision" in r]
            lines.append(
                f"| {name} | {t} | {fmt([r['greedy_accuracy'] for r in rows])} | {fmt([r['maj_accuracy'] for r in rows])}"
                f" | {diff} | {fmt(prec) if prec else '-'} | {', '.join(str(r['selected_step']) for r in rows)} "
                f"| {fmt([steps(r) - steps(results[name][s][0]) for s, r in zip(seeds, rows)], 1.0)} |")
    lines += ["", f"Greedy and maj@{k} accuracy on the {n_test} test problems, mean over seeds {seeds} ± the half-width "
              f"of the 95% t-interval over seeds (t with {len(seeds) - 1} degrees of freedom); one run's binomial "
              f"standard error on {n_test} problems is at most {50 / math.sqrt(n_test):.1f} points. 'IRPO minus this' is "
              "the per-seed difference to IRPO at the same iteration (same seed: same M_0 evaluation, same test "
              "problems), with its own interval: a difference whose interval holds 0 is not a result. Winner precision: "
              "the share of the iteration's winning samples (correct final answer, finished) whose every step is right. "
              "Selected step: the export chosen on the held-out training problems, per seed."]
    return lines


def table1(results: dict[str, dict[int, list[dict]]], seeds: list[int], k: int) -> list[str]:
    """The rows in the layout of the paper's Table 1, with the paper's GSM8K numbers beside them."""
    lines = [
        "## Table 1 in miniature",
        "",
        "The rows above in the layout of the paper's Table 1 (Pang et al. 2024). Each baseline is shown after its last "
        "iteration. The last column is the paper's GSM8K greedy accuracy with Llama-2-70B-Chat, for reference only: "
        "another model, task and scale.",
        "",
        f"| method | greedy accuracy (%) | maj@{k} (%) | paper: GSM8K greedy, Llama-2-70B-Chat |",
        "|---|---|---|---|",
    ]

    def row(label, rows, paper):
        return (f"| {label} | {fmt([r['greedy_accuracy'] for r in rows])} | {fmt([r['maj_accuracy'] for r in rows])} "
                f"| {paper} |")

    lines.append(row("zero-shot (M_0)", [results["irpo"][s][0] for s in seeds], f"{PAPER_GSM8K['zero_shot']}%"))
    for name, label in TABLE1_NAMES.items():
        if name in results:
            last = len(results[name][seeds[0]]) - 1
            lines.append(row(f"{label} (iteration {last})", [results[name][s][last] for s in seeds],
                             f"{PAPER_GSM8K[name]}%" if name in PAPER_GSM8K else "-"))
    for t in range(1, len(results["irpo"][seeds[0]])):
        paper = f"{PAPER_GSM8K['irpo'][t - 1]}%" if t <= len(PAPER_GSM8K["irpo"]) else "-"
        lines.append(row(f"Iterative RPO, iteration {t}", [results["irpo"][s][t] for s in seeds], paper))
    lines += ["", f"The paper's Iterative RPO iteration 4 (not run here): {PAPER_GSM8K['irpo'][3]}% greedy, "
              f"{PAPER_GSM8K_MAJ32}% with majority voting over 32 samples."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "table"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", default=",".join(METHODS))
    args = ap.parse_args()
    names = args.only.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    if names[0] != "irpo":
        raise SystemExit("--only: 'irpo' comes first (the baselines reuse its evaluation of M_0)")
    results = {name: {s: run(name, args.runs, s) for s in seeds} for name in names}
    wall = [json.load(open(os.path.join(workdir(args.runs, "irpo", s), "wall_seconds.json")))["seconds"] for s in seeds]

    first = results["irpo"][seeds[0]][0]
    k, n_test = first["maj_k"], first["test_prompts"]
    lines = [
        f"# Iterative RPO vs baselines on the synthetic arithmetic task ({datetime.date.today()})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no accelerator. "
        f"Command: `python experiments/arith_tiny.py --seeds {args.seeds}`. M_0: experiments/models/arith_m0 "
        "(experiments/arith_m0.py). Every method starts from M_0 and draws on the same fixed training set (the "
        "iteration's prompts, the same per seed), with the same steps per iteration and the same checkpoint "
        "selection; zero-shot is M_0.",
        "",
    ] + table(results, seeds, k, n_test)
    lines += ["", "Methods:"] + [f"- `{n}`: {METHODS[n][1]}" for n in names]
    lines += ["", f"Wall time of the main job (`python -m rpo.main --config=configs/arith_tiny.py`, IRPO, one seed, "
              f"compile included): {', '.join(f'{w / 60:.1f}' for w in wall)} min (seeds {args.seeds}; a resumed run "
              "counts only its last part)."]
    lines += [""] + table1(results, seeds, k)
    if {"irpo", "dpo", "star"} <= set(names):
        seed = seeds[0]
        figure_nll(args.runs, seed, os.path.join(RESULTS, "arith_tiny_fig_nll.png"))
        curves = figure_sft(args.runs, seed, os.path.join(RESULTS, "arith_tiny_fig_sft.png"))
        lines += ["", "## Figures 2-4 in miniature", "",
                  f"![NLL](arith_tiny_fig_nll.png) `arith_tiny_fig_nll.png`: log-probs of chosen and rejected responses "
                  f"in the training batches of iteration 1, IRPO vs DPO without NLL (seed {seed}).", "",
                  f"![SFT](arith_tiny_fig_sft.png) `arith_tiny_fig_sft.png`: the first 256 of IRPO's iteration-1 pairs "
                  f"scored under each export of iteration 1 of IRPO and of STaR (seed {seed}): "
                  + "; ".join(f"{n} chosen {c['chosen'][0]} -> {c['chosen'][-1]}, rejected {c['rejected'][0]} -> "
                              f"{c['rejected'][-1]}" for n, c in curves.items()) + "."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "arith_tiny.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
