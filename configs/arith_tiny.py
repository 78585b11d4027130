"""The embedded default: Iterative RPO on the synthetic arithmetic task, on a laptop CPU.

A small Llama-architecture model is trained from scratch: an SFT warm start on the gold
solutions gives M_0, then 3 IRPO iterations (sample, reward, pairs, DPO + NLL, evaluate).

  python -m rpo.main --config=configs/arith_tiny.py                     # IRPO (the default job)
  python -m rpo.main --config=configs/arith_tiny.py:baseline=sft_gold   # SFT on gold, same steps
  python -m rpo.main --config=configs/arith_tiny.py:baseline=star       # STaR
  python -m rpo.main --config=configs/arith_tiny.py:baseline=dpo        # DPO without NLL
  python -m rpo.main --config=configs/arith_tiny.py:baseline=zero_shot  # M_0 only

Variants (comma-separated): baseline=<name>, quick (a seconds-long run for tests),
workdir=<dir>. The workdir defaults to runs/arith_tiny[-<baseline>]; rerunning the same
command resumes it. Results: <workdir>/results.json and accuracy.png.
"""

from __future__ import annotations

import ml_collections

BASELINES = ("irpo", "sft_gold", "star", "dpo", "zero_shot")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = dict(kv.split("=", 1) if "=" in kv else (kv, "1") for kv in (arg or "").split(",") if kv)
    baseline = opts.get("baseline", "irpo")
    if baseline not in BASELINES:
        raise ValueError(f"--config variant baseline={baseline!r}: use one of {BASELINES}")
    c = ml_collections.ConfigDict()
    c.mode = "irpo"
    c.workdir = opts.get("workdir", "runs/arith_tiny" + ("" if baseline == "irpo" else f"-{baseline}"))
    c.seed = 0

    c.task = ml_collections.ConfigDict(dict(
        name="arith", seed=0, num_train=20000, num_test=200, min_steps=2, max_steps=3, max_value=20, ops="+-",
        strict=True,
    ))
    c.data = ml_collections.ConfigDict(dict(
        chat_template=False, add_bos=False, pad_id=0,
        long_prompts="error",  # 'error' | 'skip' (counted in data/<split>_stats.json)
    ))
    c.tokenizer = ""  # an HF directory; '' = model.path's, or the task's own (arith: characters)

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # an HF directory for M_0 (or the warm start's init); '' = random init
    c.model.dtype = "float32"
    c.model.seed = 0
    c.model.random = ml_collections.ConfigDict(dict(
        model_type="llama", vocab_size=104, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
        num_kv_heads=4, head_dim=32, max_position_embeddings=256, eos_token_ids=(1,), pad_token_id=0,
    ))
    c.seq_len = 144  # training rows (prompt + response); also the model context used for checks

    def optim(lr, warmup, schedule="cosine"):
        return ml_collections.ConfigDict(dict(
            lr=lr, schedule=schedule, warmup_steps=warmup, end_lr_fraction=0.1, weight_decay=0.0, b1=0.9, b2=0.99,
            eps=1e-8, clip_norm=1.0,
        ))

    def phase(kind, steps, lr, warmup, batch):
        return ml_collections.ConfigDict(dict(
            loss=ml_collections.ConfigDict(dict(kind=kind, beta=0.1, alpha=1.0, label_smoothing=0.0, chunk_size=64)),
            optim=optim(lr, warmup), batch_size=batch, grad_accum=1, num_steps=steps, remat=False, seed=0,
            log_every=50, checkpoint_every=50, keep_checkpoints=1,
        ))

    # M_0: SFT on the gold solutions from the random init.
    c.init = phase("sft", 400, 3e-3, 20, 32)  # init.num_steps 0: M_0 is model.path itself

    c.irpo = ml_collections.ConfigDict(dict(
        method="irpo", iterations=3, prompts_per_iteration=512, samples_per_prompt=8, temperatures=(0.8, 0.8, 1.0),
        top_p=1.0, top_k=0, max_new_tokens=48, pairs_per_prompt=4,
        distinct_pairs=False,  # True: never repeat a pair (the paper's walk repeats when a set runs out)
        add_gold=True, max_pairs=0,  # 0: no cap
        chunk_prompts=256,
    ))
    c.train = phase("dpo_nll", 100, 5e-4, 10, 16)

    c.eval = ml_collections.ConfigDict(dict(
        max_new_tokens=48, maj_k=8, temperature=0.8, top_p=1.0, top_k=0, chunk_prompts=256,
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = (
        ("batch", ("data", "fsdp")), ("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"),
        ("kv_heads", "tensor"), ("mlp", "tensor"), ("head_dim", None), ("layers", None),
    )

    if baseline == "sft_gold" or baseline == "star":
        c.irpo.method = baseline
        c.train.loss.kind = "sft"
    elif baseline == "dpo":
        c.train.loss.alpha = 0.0
    elif baseline == "zero_shot":
        c.irpo.iterations = 0

    if "quick" in opts:  # seconds, for tests: one-step sums, a tinier model, few rows and steps
        c.task.update(num_train=32, num_test=16, min_steps=1, max_steps=1, max_value=9)
        c.irpo.prompts_per_iteration = 0
        c.model.random.update(hidden_size=32, intermediate_size=64, num_layers=2, head_dim=8)
        c.init.update(num_steps=60, batch_size=8, log_every=10, checkpoint_every=10)
        c.init.optim.update(lr=1e-2, warmup_steps=5)
        c.train.update(num_steps=4, batch_size=4, log_every=2, checkpoint_every=2)
        c.train.optim.warmup_steps = 2
        c.irpo.update(iterations=min(c.irpo.iterations, 2), samples_per_prompt=4, chunk_prompts=16,
                      temperatures=(0.7, 0.7), max_new_tokens=32)
        c.eval.update(max_new_tokens=32, maj_k=4)
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """IRPO's loss settings (beta, alpha) x the iteration learning rate: 8 points, each a full run.

      ./launch.sh sweep configs/arith_tiny.py          # runs/arith_tiny_sweep/<point>/, then a summary table
      ./launch.sh sweep configs/arith_tiny.py:quick    # 2 short points (beta only), on the quick variant
    """
    from rpo.sweep import product

    opts = dict(kv.split("=", 1) if "=" in kv else (kv, "1") for kv in (arg or "").split(",") if kv)
    if "quick" in opts:
        return product({"train.loss.beta": (0.1, 0.5)})
    return product({"train.loss.beta": (0.1, 0.5), "train.loss.alpha": (1.0, 4.0), "train.optim.lr": (5e-4, 5e-5)})
