"""The embedded default: Iterative RPO on the synthetic arithmetic task, on a laptop CPU, in the paper's regime.

M_0 (experiments/models/arith_m0/, made by experiments/arith_m0.py) is a small Llama pre-trained on arithmetic
chains of 1-3 steps in its own solution style, never on the task's training problems; it solves the task's
3-step problems zero-shot at a middling rate. The task has a fixed training set (task.num_train problems, the
last select.heldout of them held out for checkpoint selection) whose gold solutions are written in another
(human) style. Iterative RPO runs 3 iterations of: sample N solutions per training problem, reward the correct
final answers, build pairs, train with DPO + NLL from M_{t-1}, keep the export that does best on the held-out
problems, evaluate on task.num_test problems (greedy and maj@k).

  python -m rpo.main --config=configs/arith_tiny.py                     # IRPO (the default job)
  python -m rpo.main --config=configs/arith_tiny.py:baseline=sft_gold   # SFT on the gold solutions
  python -m rpo.main --config=configs/arith_tiny.py:baseline=star       # STaR: SFT on its own correct samples
  python -m rpo.main --config=configs/arith_tiny.py:baseline=dpo        # DPO without NLL
  python -m rpo.main --config=configs/arith_tiny.py:baseline=zero_shot  # M_0 only
  python -m rpo.main --config=configs/arith_tiny.py --config.seed=1     # another seed (sampling, data order)

Variants (comma-separated): baseline=<name>, quick (a seconds-long run for tests: a tinier model warm-started
from random weights), workdir=<dir>. The workdir defaults to runs/arith_tiny[-<baseline>]; rerunning the same
command resumes it. Results: <workdir>/results.json and accuracy.png. The table of every method over seeds is
experiments/arith_tiny.py's; the sweep that chose these settings is get_sweep below.
"""

from __future__ import annotations

import os

import ml_collections

from rpo import configlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M0 = os.path.join(ROOT, "experiments", "models", "arith_m0")
BASELINES = ("irpo", "sft_gold", "star", "dpo", "zero_shot")
VARIANTS = ("baseline", "quick", "sweep", "workdir")  # get_config and get_sweep get the same argument


def _phase(kind: str, steps: int, lr: float, warmup: int, batch: int) -> ml_collections.ConfigDict:
    return configlib.phase(kind, steps, lr, batch_size=batch, warmup_steps=warmup, optimizer=dict(b2=0.99),
                           export_every=0)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = configlib.variants(arg, VARIANTS, "configs/arith_tiny.py")
    baseline = opts.get("baseline", "irpo")
    if baseline not in BASELINES:
        raise ValueError(f"--config variant baseline={baseline!r}: use one of {BASELINES}")
    c = ml_collections.ConfigDict()
    c.mode = "irpo"
    c.workdir = opts.get("workdir", "runs/arith_tiny" + ("" if baseline == "irpo" else f"-{baseline}"))
    c.seed = 0  # sampling and data order (M_0 is fixed)

    c.task = ml_collections.ConfigDict(dict(
        name="arith", seed=0, num_train=5000, num_test=1000, min_steps=3, max_steps=3, max_value=99, ops="+-*",
        style="prose", strict=True,
        train_file="",  # a JSONL of training problems in place of the train split (CoT-Self-Instruct's dataset.jsonl)
    ))
    c.data = ml_collections.ConfigDict(dict(
        chat_template=False, add_bos=False, pad_id=0,
        long_prompts="error",  # 'error' | 'skip' (counted in data/<split>_stats.json)
    ))
    c.tokenizer = ""  # an HF directory; '' = model.path's, or the task's own (arith: characters)

    c.model = ml_collections.ConfigDict()
    c.model.path = M0  # M_0 (an HF directory); '' = random init, then the init phase (quick)
    c.model.dtype = "float32"
    c.model.seed = 0
    c.model.random = ml_collections.ConfigDict(dict(  # M_0's shape (experiments/arith_m0.py), and quick's
        model_type="llama", vocab_size=104, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
        num_kv_heads=4, head_dim=32, max_position_embeddings=256, eos_token_ids=(1,), pad_token_id=0,
    ))
    c.seq_len = 96  # training rows (prompt + response): the longest gold (prose) row is 80 tokens

    # How M_0 was made (read by experiments/arith_m0.py only): SFT of model.random on a corpus of problems
    # of 1-3 steps in the model's own 'equations' style, none of them in the task's splits.
    c.pretrain = ml_collections.ConfigDict(dict(
        num_problems=300000, min_steps=1, max_steps=3, seq_len=72, keep_step=1250,
        excluded_test=2000,  # the corpus leaves out the first 2000 test problems: task.num_test may be up to this
        phase=_phase("sft", 4000, 3e-3, 100, 64),
    ))
    c.pretrain.phase.update(log_every=100, checkpoint_every=250, export_every=250, keep_checkpoints=2)
    c.pretrain.phase.optim.end_lr_fraction = 0.05

    c.init = _phase("sft", 0, 1e-3, 10, 32)  # a warm start from model.path (0 steps: M_0 is model.path)

    c.irpo = ml_collections.ConfigDict(dict(
        method="irpo", iterations=3, prompts_per_iteration=500, samples_per_prompt=8, temperatures=(0.8, 0.8, 1.0),
        top_p=1.0, top_k=0, max_new_tokens=64, pairs_per_prompt=2,
        distinct_pairs=False,  # True: never repeat a pair (the paper's walk repeats when a set runs out)
        add_gold=False,  # True: the gold solution joins each prompt's winners (the paper, on GSM8K; see get_sweep)
        max_pairs=0,  # 0: no cap
        chunk_prompts=512,
    ))
    c.train = _phase("dpo_nll", 50, 1e-4, 5, 16)
    # Per iteration, the export (every `every` steps) that answers most of the `heldout` last training
    # problems right is M_t; every method is selected the same way.
    c.select = ml_collections.ConfigDict(dict(every=25, heldout=500))

    c.eval = ml_collections.ConfigDict(dict(
        max_new_tokens=64, maj_k=8, temperature=0.8, top_p=1.0, top_k=0, chunk_prompts=512,
    ))

    c.mesh = configlib.mesh()
    c.sharding_rules = configlib.sharding_rules()

    if baseline in ("sft_gold", "star"):
        c.irpo.method = baseline
        c.train.loss.kind = "sft"
        # Each method's best learning rate of get_sweep('sweep=lr') (experiments/results/arith_tiny_sweep.md): SFT
        # on the gold solutions hurts less the lower the rate (their style is not the model's); DPO is IRPO's.
        c.train.optim.lr = {"sft_gold": 3e-5, "star": 3e-4}[baseline]
    elif baseline == "dpo":
        c.train.loss.alpha = 0.0
    elif baseline == "zero_shot":
        c.irpo.iterations = 0

    if "quick" in opts:  # seconds, for tests: one-step problems, a tinier model warm-started here, few rows/steps
        c.task.update(num_train=40, num_test=16, min_steps=1, max_steps=1, max_value=9)
        c.model.path = ""
        c.model.random.update(hidden_size=32, intermediate_size=64, num_layers=2, head_dim=8)
        c.init.update(num_steps=60, batch_size=8, log_every=10, checkpoint_every=10)
        c.init.optim.update(lr=1e-2, warmup_steps=5)
        c.train.update(num_steps=4, batch_size=4, log_every=2, checkpoint_every=2)
        c.train.optim.warmup_steps = 2
        c.select.update(every=2, heldout=8)
        c.irpo.update(iterations=min(c.irpo.iterations, 2), samples_per_prompt=4, chunk_prompts=16,
                      temperatures=(0.7, 0.7), max_new_tokens=32,
                      add_gold=True)  # a 60-step model is rarely right: gold winners make the pairs
        c.eval.update(max_new_tokens=32, maj_k=4, chunk_prompts=16)
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """The sweeps that chose this config's settings (experiments/results/arith_tiny_sweep.md). Each point is a
    one-iteration run from M_0 (task.num_test problems): what a setting does to M_1.

      ./launch.sh sweep configs/arith_tiny.py               # = sweep=lr: each method's learning rate
      ./launch.sh sweep configs/arith_tiny.py:sweep=irpo    # IRPO's beta, alpha, pairs per prompt, temperature
      ./launch.sh sweep configs/arith_tiny.py:sweep=diag    # IRPO with alpha 4; STaR at IRPO's learning rate
      ./launch.sh sweep configs/arith_tiny.py:quick         # 2 short points (beta only), on the quick variant
    """
    from rpo.sweep import product

    opts = configlib.variants(arg, VARIANTS, "configs/arith_tiny.py")
    if "quick" in opts:
        return product({"train.loss.beta": (0.1, 0.5)})
    probe = {"irpo.iterations": 1, "eval.maj_k": 2}  # the probes compare greedy accuracy: maj@k is for the table
    sft = {"train.loss.kind": "sft"}
    if opts.get("sweep", "lr") == "lr":
        return ([{**probe, "train.optim.lr": lr} for lr in (3e-5, 1e-4, 3e-4)]
                + [{**probe, **sft, "irpo.method": "star", "train.optim.lr": lr} for lr in (3e-4, 1e-3)]
                + [{**probe, **sft, "irpo.method": "sft_gold", "train.optim.lr": lr} for lr in (3e-5, 1e-4, 3e-4, 1e-3)])
    if opts.get("sweep") == "diag":  # why STaR beats IRPO here: a stronger NLL term; STaR at IRPO's rate
        return [{**probe, "train.loss.alpha": 4.0},
                {**probe, **sft, "irpo.method": "star", "train.optim.lr": 1e-4}]
    if opts.get("sweep") == "irpo":
        return [{**probe, **point} for point in product({"train.loss.beta": (0.1, 0.5), "train.loss.alpha": (1.0, 4.0)})
                + product({"irpo.pairs_per_prompt": (4,), "irpo.temperatures": ((0.7, 0.8, 1.0), (1.0, 0.8, 1.0))})]
    raise ValueError(f"configs/arith_tiny.py get_sweep: use sweep=lr | sweep=irpo | sweep=diag | quick, got {arg!r}")
