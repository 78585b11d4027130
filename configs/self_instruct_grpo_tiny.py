"""CoT-Self-Instruct -> Answer-Consistency -> GRPO on the kept problems, on the synthetic task: the paper's protocol
for verifiable reasoning (Yu et al. 2025 train with GRPO on their filtered synthetic problems), on a laptop CPU.

  python -m rpo.main --config=configs/self_instruct_grpo_tiny.py          # synthesize, filter, then GRPO
  python -m rpo.main --config=configs/self_instruct_grpo_tiny.py:quick    # seconds-to-minutes, for tests

The synthesis is configs/self_instruct_tiny.py's (a small model warm-started on gold solutions and synthesis
demonstrations writes problems from seed pairs; Answer-Consistency with K solutions keeps those whose majority
answer equals the generated one); GRPO then trains the synthesising model on the kept problems, each rewarded
against its generated answer, with configs/grpo_tiny.py's GRPO fields, and evaluates on the task's test split.
rpo/chain.py runs the two; GRPO's outputs are in <workdir>/grpo/ (results.json, accuracy.png, grpo_curves.png).

Variants (comma-separated): quick, filter=answer_consistency|self_consistency, workdir=<dir>.
"""

from __future__ import annotations

import os

import ml_collections

from rpo import configlib
from rpo.files import load_module

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = configlib.variants(arg, ("quick", "filter", "workdir"), "configs/self_instruct_grpo_tiny.py")
    quick = "quick" in opts
    variants = (["quick"] if quick else []) + ([f"filter={opts['filter']}"] if "filter" in opts else [])
    c = load_module(os.path.join(HERE, "self_instruct_tiny.py")).get_config(",".join(variants))
    c.workdir = opts.get("workdir", "runs/self_instruct_grpo_tiny")
    c.grpo = load_module(os.path.join(HERE, "grpo_tiny.py")).get_config("quick" if quick else None).grpo
    c.grpo.update(iterations=1 if quick else 2)  # over the kept problems (a few dozen), not arith_tiny's thousands
    c.chain = ml_collections.ConfigDict(dict(
        then="grpo",  # rpo/chain.py: GRPO on <workdir>/dataset.jsonl, in <workdir>/grpo
        model_path="",  # '' = the synthesising model
    ))
    return c
