"""Reward-model DPO (rpo.rm_dpo) on a small model: K responses per prompt scored by a reward model, best vs worst
as a DPO pair, trained by rpo.train's DPO step; CoT-Self-Instruct's protocol for non-verifiable prompts.

  python -m rpo.main --config=configs/rm_dpo_tiny.py:model=<policy HF dir>,rm=<reward model HF dir>,prompts=<jsonl>

model= is an HF causal LM that follows instructions (with its tokenizer), rm= an HF *ForSequenceClassification
directory (with its tokenizer), prompts= a JSONL file with a "question" per line (e.g. a CoT-Self-Instruct
dataset.jsonl of instructions; configs/self_instruct_rm_dpo_tiny.py chains the two). The last rm_dpo.eval_prompts
prompts are held out: each iteration reports the reward model's mean score of the greedy responses to them and the
win rate against M_0. Data layout, mesh and sharding rules are configs/arith_tiny.py's.

Variants (comma-separated): model=, rm=, prompts= (required unless set later, e.g. by a chain), quick (seconds, for
tests), workdir=<dir> (default runs/rm_dpo_tiny).
"""

from __future__ import annotations

import os

import ml_collections

from rpo import configlib
from rpo.files import load_module

HERE = os.path.dirname(os.path.abspath(__file__))


def rm_dpo_blocks(opts: dict, quick: bool) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """(rm_dpo, train): the protocol's fields and its DPO phase (configs/self_instruct_rm_dpo_tiny.py uses them)."""
    arith = load_module(os.path.join(HERE, "arith_tiny.py")).get_config("quick" if quick else None)
    train = ml_collections.ConfigDict(arith.train.to_dict())
    train.loss.update(kind="dpo", beta=0.1, alpha=0.0)  # the paper's beta for its DPO runs (as issue 17 states it)
    train.update(num_steps=4 if quick else 100, batch_size=2 if quick else 16, log_every=1 if quick else 10,
                 checkpoint_every=2 if quick else 25)
    train.optim.update(lr=1e-3 if quick else 1e-4, warmup_steps=1 if quick else 10)
    rm_dpo = ml_collections.ConfigDict(dict(
        reward_model=opts.get("rm", ""),  # an HF *ForSequenceClassification directory
        prompts_file=opts.get("prompts", ""),  # JSONL, "question" per line
        iterations=1 if quick else 2,  # 1: offline (responses of M_0); more: online, from M_{t-1}
        responses_per_prompt=3 if quick else 8,  # K (best vs worst of K)
        temperature=0.8, top_p=1.0, top_k=0, max_new_tokens=8 if quick else 64, chunk_prompts=64,
        reward_batch_size=16, reward_max_len=arith.seq_len,  # tokens of (prompt + response) under the RM's tokenizer
        eval_prompts=2 if quick else 16, eval_max_new_tokens=8 if quick else 64,
    ))
    return rm_dpo, train


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = configlib.variants(arg, ("model", "rm", "prompts", "quick", "workdir"), "configs/rm_dpo_tiny.py")
    quick = "quick" in opts
    c = load_module(os.path.join(HERE, "arith_tiny.py")).get_config("quick" if quick else None)
    c.mode = "rm_dpo"
    c.workdir = opts.get("workdir", "runs/rm_dpo_tiny")
    c.model.path = opts.get("model", "")
    c.rm_dpo, c.train = rm_dpo_blocks(opts, quick)
    for block in ("task", "irpo", "select", "eval", "init", "pretrain"):  # the task's: prompts come from a file
        if block in c:
            del c[block]
    return c
