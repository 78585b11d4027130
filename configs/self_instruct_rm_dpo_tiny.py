"""CoT-Self-Instruct -> RIP -> reward-model DPO: the paper's protocol for non-verifiable instructions (Yu et al. 2025
keep prompts whose K responses all score well under a reward model, then train with DPO on best-vs-worst pairs of
that reward model's choosing), on a small instruction model.

  python -m rpo.main --config=configs/self_instruct_rm_dpo_tiny.py:model=<HF dir>,rm=<HF dir>,seeds=<jsonl>

model= is an instruction-following causal LM (it writes the prompts with rpo's cot_instruction template and is
the policy DPO trains, e.g. the SmolLM2-135M-Instruct directory configs/smollm2.py prepares), rm= an HF
*ForSequenceClassification reward model (with its tokenizer), seeds= a JSONL of seed instructions ("question" per
line, optional "category"). No warm start: a model trained here from scratch cannot follow an instruction template.
The synthesis fields are configs/self_instruct_tiny.py's with synth.kind='instruction' and synth.filter='rip'
(the reward model scores synth.num_solutions responses per prompt); the DPO fields are configs/rm_dpo_tiny.py's.
rpo/chain.py runs the two; the DPO run's outputs are in <workdir>/rm_dpo/ (results.json, reward.png).

Variants (comma-separated): model=, rm=, seeds= (required), quick, chat (wrap prompts in the model's chat
template), workdir=<dir>.
"""

from __future__ import annotations

import os

import ml_collections

from rpo import configlib
from rpo.files import load_module

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    me = os.path.abspath(__file__)
    opts = configlib.variants(arg, ("model", "rm", "seeds", "quick", "chat", "workdir"), me)
    for key, what in (("model", "an instruction model's HF directory"), ("rm", "a reward model's HF directory"),
                      ("seeds", "a JSONL of seed instructions")):
        if not opts.get(key):
            raise ValueError(f"{me}: the variant {key}=<{what}> is required")
    quick = "quick" in opts
    c = load_module(os.path.join(HERE, "self_instruct_tiny.py")).get_config("quick" if quick else None)
    c.workdir = opts.get("workdir", "runs/self_instruct_rm_dpo_tiny")
    c.model.path = opts["model"]
    c.init.num_steps = 0  # the model follows instructions already
    c.data.chat_template = "chat" in opts
    c.synth.update(kind="instruction", method="cot", template="",  # rpo's cot_instruction.txt
                   filter="rip", reward_model=opts["rm"], seeds_file=opts["seeds"])
    c.rm_dpo, c.train = load_module(os.path.join(HERE, "rm_dpo_tiny.py")).rm_dpo_blocks(
        {"rm": opts["rm"], "prompts": ""}, quick)  # prompts: <workdir>/dataset.jsonl, set by rpo/chain.py
    c.rm_dpo.reward_max_len = c.seq_len
    c.chain = ml_collections.ConfigDict(dict(then="rm_dpo", model_path=""))
    return c
