r"""Reproduction: Iterative RPO on MATH with Llama-2-70B-Chat (Pang et al. 2024). NOT RUN HERE: no machine of
this size was available to this project; the config loads and passes rpo.irpo.check_config
(tests/test_reproduce.py), nothing more was verified.

Settings (configs/irpo.py task=math, the paper's): N = 20 samples per prompt at temperatures 0.8, 0.8, 1.0,
K = 15 pairs per prompt, 3 iterations of up to 5000 steps, batch 16 pairs, AdamW lr 7e-7, beta 0.1, alpha 1
(NLL on the winner, length-normalised), M_t the reference of iteration t+1; 4-shot prompt with \boxed{}
answers (sympy equivalence), in Llama-2-Chat's chat template; rows of 2048 tokens, up to 1024 new tokens;
greedy accuracy and maj@16 on the test split given in data= after every iteration.

Commands (model= an HF directory of Llama-2-70b-chat-hf, data= a directory of MATH train.jsonl / test.jsonl;
both must exist at that path on every worker, and --workdir must be on a filesystem every worker mounts;
my-v5p-64 and us-east5-a stand for your TPU VM and its zone):

  ./launch.sh tpu my-v5p-64 us-east5-a \
      experiments/reproduce/irpo_math_llama2_70b.py:model=/mnt/models/Llama-2-70b-chat-hf,data=/mnt/data/math \
      --workdir=/mnt/runs/irpo_math_llama2_70b
  RPO_SRUN_FLAGS="--nodes=4 --gpus-per-node=8" ./launch.sh slurm \
      experiments/reproduce/irpo_math_llama2_70b.py:model=/shared/models/Llama-2-70b-chat-hf,data=/shared/data/math \
      --workdir=/shared/runs/irpo_math_llama2_70b

Baselines: the same command with `,baseline=sft_gold|star|dpo|zero_shot` and another --workdir. Variants:
model=, data=, baseline=, nochat, workdir=.

Hardware: as experiments/reproduce/irpo_gsm8k_llama2_70b.py: 32 accelerators with >= 80 GB each (TPU v5p-64,
or 4 nodes x 8 H100 80 GB), mesh data=1, fsdp=16, tensor=2. Untested at this scale.

Paper's numbers (Llama-2-70B-Chat, MATH test, greedy accuracy %; PAPER below): 12.5 before training, 20.8
after 3 iterations of Iterative RPO. Per-iteration and baseline values: not recorded here.
"""

from __future__ import annotations

import os

import ml_collections

from rpo.files import load_module

HERE = os.path.dirname(os.path.abspath(__file__))
PAPER = {"zero_shot": 12.5, "irpo_final": 20.8}


def _common():
    """experiments/reproduce/_common.py, loaded by path."""
    return load_module(os.path.join(HERE, "_common.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return _common().irpo_llama2_70b("math", arg, os.path.abspath(__file__))
