"""One IRPO training phase (DPO + NLL) of a tiny random model on a tiny pairs file.

Every default of rpo.train lives here. The pairs file needs no reference log-probs: with
data.compute_ref=True they are computed by the initial model (M_t, the reference) and
written to <workdir>/train_pairs_with_ref.jsonl before training.

  python -m rpo.main --config=configs/train_tiny.py:make_data

The 'make_data' variant writes random pairs to <workdir>/pairs.jsonl and points both data
paths there (so the command above runs with nothing else on disk). Variants (comma-separated
key=value): make_data, sft (SFT on the chosen responses), alpha=<float>, steps=<int>,
workdir=<dir>.
"""

from __future__ import annotations

import json
import os

import ml_collections

from rpo import configlib


def _tiny_pairs(path: str, n: int = 32, vocab: int = 64, seed: int = 0) -> None:
    """Random pairs whose chosen and rejected responses share all tokens but two."""
    import numpy as np

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for _ in range(n):
            prompt = rng.integers(3, vocab, 6).tolist()
            chosen = rng.integers(3, vocab, 10).tolist()
            rejected = list(chosen)
            rejected[2], rejected[5] = int(rng.integers(3, vocab)), int(rng.integers(3, vocab))
            f.write(json.dumps({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
                                "response_ids": chosen}) + "\n")
    os.replace(path + ".tmp", path)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = configlib.variants(arg, ("make_data", "steps", "alpha", "sft", "workdir"), "configs/train_tiny.py")
    c = ml_collections.ConfigDict()
    c.mode = "train"
    c.workdir = opts.get("workdir", "runs/train_tiny")

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # an HF model directory; '' builds a random model from model.random
    c.model.dtype = "float32"  # compute dtype ('bfloat16' on accelerators); params stay float32
    c.model.seed = 0
    c.model.random = ml_collections.ConfigDict(dict(
        model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=8,
    ))

    sft = "sft" in opts
    c.data = ml_collections.ConfigDict()
    c.data.kind = "sft" if sft else "pairs"
    c.data.train_path = os.path.join(c.workdir, "pairs.jsonl")
    c.data.eval_path = os.path.join(c.workdir, "pairs.jsonl")  # '' for no held-out loss
    c.data.seq_len = 24
    c.data.pad_id = 0
    c.data.truncate = False  # True cuts over-long responses instead of failing
    c.data.compute_ref = True  # compute missing reference log-probs with the initial model

    c.loss = configlib.loss("sft" if sft else "dpo_nll", alpha=float(opts.get("alpha", 1.0)))
    c.optim = configlib.optim(1e-3, warmup_steps=2)

    c.batch_size = 8  # pairs per optimizer step
    c.grad_accum = 2  # micro-batches per step
    c.num_steps = int(opts.get("steps", 20))
    c.remat = False
    c.seed = 0  # data order

    c.mesh = configlib.mesh()
    c.sharding_rules = configlib.sharding_rules()

    c.log_every = 1
    c.eval_every = 10
    c.eval_batches = 0  # 0: the whole eval file
    c.checkpoint_every = 10
    c.export_every = 0  # > 0: an HF directory every that many steps under <workdir>/exports/
    c.keep_checkpoints = 2

    if "make_data" in opts:
        _tiny_pairs(c.data.train_path, vocab=c.model.random.vocab_size)
    return c
