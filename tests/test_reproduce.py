"""The reproduction configs (experiments/reproduce/) and Table 1 in miniature (experiments/arith_tiny.py's table
statistics, on results with known values). No model is loaded: configs are built and checked by rpo's own config
checks.

References written outside this project: the paper's settings (Pang et al. 2024, as tabled in the design notes:
N, temperatures, K, iterations, steps per iteration, batch 16, lr 7e-7, beta 0.1, alpha 1) and its reported
numbers, copied below; the synth fields rpo/self_instruct.py reads, found in its source.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex

import numpy as np
import pytest

from rpo import irpo, self_instruct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPRO = os.path.join(ROOT, "experiments", "reproduce")

# The paper's settings per task: N, temperatures of iterations 1..T, K, T, max steps per iteration.
PAPER_SETTINGS = {
    "gsm8k": dict(n=30, temperatures=(0.8, 0.8, 1.3, 1.3), k=10, iterations=4, steps=5000),
    "arc": dict(n=30, temperatures=(0.8, 0.8, 1.3), k=20, iterations=3, steps=4000),
    "math": dict(n=20, temperatures=(0.8, 0.8, 1.0), k=15, iterations=3, steps=5000),
}
# The paper's reported numbers (Llama-2-70B-Chat), %.
PAPER_NUMBERS = {
    "gsm8k": {"zero_shot": 55.6, "sft_gold": 63.5, "star": 65.2, "dpo": 61.8, "irpo": (73.1, 78.0, 81.1, 81.6),
              "irpo_maj32": 88.7},
    "arc": {"zero_shot": 77.8, "irpo_final": 86.7},
    "math": {"zero_shot": 12.5, "irpo_final": 20.8},
}
IRPO_FILES = {"gsm8k": "irpo_gsm8k_llama2_70b.py", "arc": "irpo_arc_llama2_70b.py", "math": "irpo_math_llama2_70b.py"}
COT_FILE = "cot_self_instruct_qwen3_4b.py"
LLAMA2_70B_HEADS, LLAMA2_70B_KV_HEADS = 64, 8


def load(path: str):
    spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def commands(doc: str) -> list[list[str]]:
    """The ./launch.sh command lines of a docstring (backslash continuations joined), as argv lists."""
    lines = [shlex.split(line) for line in re.sub(r"\\\n\s*", " ", doc).splitlines() if "./launch.sh" in line]
    return [argv[argv.index("./launch.sh"):] for argv in lines]


def config_args(argv: list[str], config_file: str) -> str:
    """The config variant string of a launch.sh command, checked to name `config_file`."""
    mode = argv[1]
    assert mode in ("tpu", "slurm"), argv
    config = argv[4] if mode == "tpu" else argv[2]
    path, _, arg = config.partition(":")
    assert os.path.join(ROOT, path) == config_file, f"{argv}: runs {path}, not {config_file}"
    return arg


@pytest.mark.parametrize("task", sorted(IRPO_FILES))
def test_irpo_config_carries_the_papers_settings(task):
    path = os.path.join(REPRO, IRPO_FILES[task])
    module = load(path)
    cmds = commands(module.__doc__)
    assert {c[1] for c in cmds} == {"tpu", "slurm"}, f"{path}: wants a TPU and a SLURM command"
    p = PAPER_SETTINGS[task]
    for argv in cmds:
        arg = config_args(argv, path)
        c = module.get_config(arg)
        irpo.check_config(c)
        opts = dict(kv.split("=", 1) for kv in arg.split(","))
        assert c.mode == "irpo" and c.task.name == task
        assert c.model.path == opts["model"] and c.task.source_dir == opts["data"]
        assert "Llama-2-70b-chat" in c.model.path and c.data.chat_template
        assert c.irpo.method == "irpo" and c.train.loss.kind == "dpo_nll"
        assert c.irpo.samples_per_prompt == p["n"] and c.irpo.pairs_per_prompt == p["k"]
        assert c.irpo.iterations == p["iterations"]
        assert tuple(c.irpo.temperatures[: p["iterations"]]) == p["temperatures"]
        assert c.train.num_steps == p["steps"] and c.init.num_steps == 0  # M_0 is the checkpoint itself
        assert c.irpo.add_gold == (task == "gsm8k")
        assert (c.train.batch_size, c.train.optim.lr) == (16, 7e-7)
        assert (c.train.loss.beta, c.train.loss.alpha) == (0.1, 1.0)
        assert c.eval.maj_k == (32 if task == "gsm8k" else 16)

        # The documented mesh on 32 devices (tensor=2): a step's batch splits over data x fsdp (train.run's rule),
        # and Llama-2-70B's heads over tensor.
        sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
        known = [v for v in sizes if v != -1]
        assert len(known) >= 2 and 32 % (known[0] * known[1]) == 0
        data, fsdp, tensor = [32 // (known[0] * known[1]) if v == -1 else v for v in sizes]
        assert data * fsdp * tensor == 32 and tensor == 2
        assert (c.train.batch_size // c.train.grad_accum) % (data * fsdp) == 0
        assert LLAMA2_70B_HEADS % tensor == 0 and LLAMA2_70B_KV_HEADS % tensor == 0


@pytest.mark.parametrize("task", sorted(IRPO_FILES))
def test_irpo_config_records_the_papers_numbers(task):
    assert load(os.path.join(REPRO, IRPO_FILES[task])).PAPER == PAPER_NUMBERS[task]


@pytest.mark.parametrize("task", sorted(IRPO_FILES))
def test_irpo_config_baselines(task):
    path = os.path.join(REPRO, IRPO_FILES[task])
    module = load(path)
    base = "model=/m/Llama-2-70b-chat-hf,data=/d"
    for baseline in ("sft_gold", "star", "dpo", "zero_shot"):
        if task == "arc" and baseline == "sft_gold":  # ARC has no gold solutions
            with pytest.raises(ValueError, match=re.escape(path)):
                module.get_config(f"{base},baseline={baseline}")
            continue
        c = module.get_config(f"{base},baseline={baseline}")
        irpo.check_config(c)
        assert c.workdir.endswith(f"-{baseline}")
        if baseline in ("sft_gold", "star"):
            assert c.irpo.method == baseline and c.train.loss.kind == "sft"
        elif baseline == "dpo":
            assert c.train.loss.kind == "dpo_nll" and c.train.loss.alpha == 0.0 and c.train.loss.beta == 0.1
        else:
            assert c.irpo.iterations == 0
    assert not module.get_config(f"{base},nochat").data.chat_template


@pytest.mark.parametrize("arg, message", [
    ("data=/d", "model="), ("model=/m", "data="), ("model=/m,data=/d,steps=3", "unknown variant"),
    ("model=/m,data=/d,baseline=ppo", "baseline='ppo'"),
])
def test_irpo_config_refuses_bad_variants(arg, message):
    path = os.path.join(REPRO, IRPO_FILES["gsm8k"])
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        load(path).get_config(arg)
    assert path in str(e.value)


def synth_fields_read_by_rpo() -> set[str]:
    """Every synth.<field> rpo/self_instruct.py reads (as `s.<field>`, `s["<field>"]` or `cfg.synth.<field>`)."""
    src = open(os.path.join(ROOT, "rpo", "self_instruct.py")).read()
    fields = set(re.findall(r"(?<![\w.])s\.(\w+)", src)) | set(re.findall(r"cfg\.synth\.(\w+)", src))
    check = src[src.index("def check_config"): src.index("def load_seeds")]
    for group in re.findall(r"for field in \(([^)]*)\)", check):
        fields |= set(re.findall(r'"(\w+)"', group))
    return fields


def test_cot_self_instruct_config():
    path = os.path.join(REPRO, COT_FILE)
    module = load(path)
    cmds = commands(module.__doc__)
    assert {c[1] for c in cmds} == {"tpu", "slurm"}
    tiny = load(os.path.join(ROOT, "configs", "self_instruct_tiny.py")).get_config("quick")
    read = synth_fields_read_by_rpo()
    assert {"num_solutions", "filter", "dedup_threshold", "then_irpo"} <= read  # the scan finds rpo's reads
    with_irpo = 0
    for argv in cmds:
        arg = config_args(argv, path)
        opts = dict(kv.split("=", 1) if "=" in kv else (kv, "1") for kv in arg.split(","))
        c = module.get_config(arg)
        self_instruct.check_config(c)
        irpo.check_config(c)
        s = c.synth
        assert read <= set(s.keys()), f"synth fields rpo reads but {COT_FILE} leaves unset: {read - set(s.keys())}"
        assert set(s.keys()) == set(tiny.synth.keys())
        assert c.mode == "self_instruct" and c.task.name == "math" and c.data.chat_template
        assert (s.kind, s.method, s.filter) == ("verifiable", "cot", "answer_consistency")
        assert s.num_solutions >= 2 and s.seeds_file == opts["seeds"] and c.model.path == opts["model"]
        assert "Qwen3-4B" in c.model.path and c.init.num_steps == 0
        assert s.then_irpo == ("irpo" in opts)
        with_irpo += s.then_irpo
        if s.then_irpo:  # IRPO on the kept problems: MATH's paper settings and the paper's loss
            assert c.task.source_dir == opts["data"]
            assert (c.irpo.samples_per_prompt, c.irpo.pairs_per_prompt, c.irpo.iterations) == (20, 15, 3)
            assert (c.train.optim.lr, c.train.loss.beta, c.train.loss.alpha, c.train.batch_size) == (7e-7, 0.1, 1.0, 16)
            assert c.seq_len >= c.irpo.max_new_tokens + 512
        for devices in (1, 2, 4, 8):  # the documented single node: a micro-batch splits over its devices
            assert (c.train.batch_size // c.train.grad_accum) % devices == 0
    assert with_irpo == 1
    assert module.PAPER == {}


@pytest.mark.parametrize("arg, message", [
    ("seeds=/s.jsonl", "model="), ("model=/m", "seeds="), ("model=/m,seeds=/s.jsonl,irpo", "data="),
    ("model=/m,seeds=/s.jsonl,k=4", "unknown variant"),
])
def test_cot_self_instruct_config_refuses_bad_variants(arg, message):
    path = os.path.join(REPRO, COT_FILE)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        load(path).get_config(arg)
    assert path in str(e.value)


def _fake_results(seeds=(0, 1, 2)) -> dict[str, dict[int, list[dict]]]:
    """results.json rows per method and seed, with accuracies known in advance."""
    rng = np.random.default_rng(0)
    out = {}
    for m, (name, gain) in enumerate({"irpo": 0.1, "sft_gold": 0.02, "star": 0.05, "dpo": -0.2}.items()):
        out[name] = {}
        for s in seeds:
            rows = [{"iteration": 0, "greedy_accuracy": 0.6, "maj_accuracy": 0.61 + 0.01 * s, "maj_k": 8,
                     "test_prompts": 2000, "train_steps": 0}]
            for t in (1, 2, 3):
                rows.append({"iteration": t, "greedy_accuracy": 0.6 + gain * t + rng.normal(0, 0.01),
                             "maj_accuracy": 0.6 + gain * t, "winner_precision": 0.9, "selected_step": 25 * t,
                             "train_steps": 25 * t * (t + 1) // 2, "maj_k": 8, "test_prompts": 2000})
            out[name][s] = rows
    return out


def test_table_reports_means_t_intervals_and_paired_differences():
    from scipy import stats

    arith = load(os.path.join(ROOT, "experiments", "arith_tiny.py"))
    results, seeds = _fake_results(), [0, 1, 2]
    lines = arith.table(results, seeds, 8, 2000)
    rows = {tuple(line.split(" | ")[:2]): line.split(" | ") for line in lines if line.startswith("| ")}
    star2 = rows[("| star", "2")]
    values = [results["star"][s][2]["greedy_accuracy"] for s in seeds]
    half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
    assert star2[2] == f"{100 * np.mean(values):.1f} ± {100 * half:.1f}"
    diffs = [results["irpo"][s][2]["greedy_accuracy"] - results["star"][s][2]["greedy_accuracy"] for s in seeds]
    half = stats.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / np.sqrt(3)
    assert star2[4] == f"{100 * np.mean(diffs):.1f} ± {100 * half:.1f}"
    assert star2[6] == "50, 50, 50" and rows[("| irpo", "1")][4] == "-"
    assert [k for k in rows if k[0] != "| method"] == [("| zero-shot (M_0)", "0")] + [
        (f"| {n}", str(t)) for n in ("irpo", "sft_gold", "star", "dpo") for t in (1, 2, 3)]
    # The zero-shot row: greedy is seed-independent (no interval width), maj@k is not.
    assert rows[("| zero-shot (M_0)", "0")][2] == "60.0 ± 0.0" and rows[("| zero-shot (M_0)", "0")][3].startswith("62.0 ± ")


def test_table1_in_miniature_lays_out_the_papers_rows_beside_its_numbers():
    arith = load(os.path.join(ROOT, "experiments", "arith_tiny.py"))
    results = _fake_results()
    section = arith.table1(results, [0, 1, 2], 8)
    rows = [line for line in section if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == [
        "| zero-shot (M_0)", "| SFT on gold (iteration 3)", "| STaR (iteration 3)", "| DPO without NLL (iteration 3)",
        "| Iterative RPO, iteration 1", "| Iterative RPO, iteration 2", "| Iterative RPO, iteration 3"]
    paper = PAPER_NUMBERS["gsm8k"]
    expected = [paper["zero_shot"], paper["sft_gold"], paper["star"], paper["dpo"], *paper["irpo"][:3]]
    assert [r.rstrip(" |").rsplit(" | ", 1)[1] for r in rows] == [f"{v}%" for v in expected]
    assert rows[4].split(" | ")[1] == arith.fmt([results["irpo"][s][1]["greedy_accuracy"] for s in (0, 1, 2)])
