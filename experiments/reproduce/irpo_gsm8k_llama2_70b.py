r"""Reproduction: Iterative RPO on GSM8K with Llama-2-70B-Chat (Pang et al. 2024, Table 1). NOT RUN HERE: no
machine of this size was available to this project; the config loads and passes rpo.irpo.check_config
(tests/test_reproduce.py), nothing more was verified.

Settings (configs/irpo.py task=gsm8k, the paper's): N = 30 samples per prompt at temperatures 0.8, 0.8, 1.3, 1.3,
K = 10 pairs per prompt with the gold solution among the winners, 4 iterations of up to 5000 steps, batch 16
pairs, AdamW lr 7e-7, beta 0.1, alpha 1 (NLL on the winner, length-normalised), M_t the reference of
iteration t+1; zero-shot prompt ending "Final answer: ...", in Llama-2-Chat's chat template; greedy accuracy
and maj@32 on the GSM8K test split after every iteration.

Commands (model= an HF directory of Llama-2-70b-chat-hf, data= a directory of the official train.jsonl /
test.jsonl; both must exist at that path on every worker, and --workdir must be on a filesystem every worker
mounts; my-v5p-64 and us-east5-a stand for your TPU VM and its zone):

  ./launch.sh tpu my-v5p-64 us-east5-a \
      experiments/reproduce/irpo_gsm8k_llama2_70b.py:model=/mnt/models/Llama-2-70b-chat-hf,data=/mnt/data/gsm8k \
      --workdir=/mnt/runs/irpo_gsm8k_llama2_70b
  RPO_SRUN_FLAGS="--nodes=4 --gpus-per-node=8" ./launch.sh slurm \
      experiments/reproduce/irpo_gsm8k_llama2_70b.py:model=/shared/models/Llama-2-70b-chat-hf,data=/shared/data/gsm8k \
      --workdir=/shared/runs/irpo_gsm8k_llama2_70b

The paper's baseline rows: the same command with `,baseline=sft_gold`, `,baseline=star`, `,baseline=dpo`
(alpha 0) and another --workdir; the zero-shot row is iteration 0 of the IRPO run (`,baseline=zero_shot` runs
only that). Each baseline trains as many iterations and steps as IRPO from the same M_0; the paper's own
baseline budgets are not recorded here. Variants: model=, data=, baseline=, nochat, workdir=.

Hardware: 32 accelerators with >= 80 GB each: a TPU v5p-64 slice (32 chips, 95 GB HBM each, 8 workers) or
4 nodes x 8 H100 80 GB. Mesh data=1, fsdp=16, tensor=2 (see experiments/reproduce/_common.py: the 1.12 TB of
fp32 params, grads and AdamW moments is 35 GB a device; a step's 16 pairs are one per fsdp shard). 32 v4 chips
(32 GB each) are too small. Untested at this scale; the sampling chunk sizes are configs/irpo.py's.

Paper's numbers (Llama-2-70B-Chat, GSM8K test, greedy accuracy %; PAPER below): zero-shot 55.6, SFT on gold
63.5, STaR 65.2, DPO without NLL 61.8; Iterative RPO iterations 1-4: 73.1, 78.0, 81.1, 81.6; iteration 4 with
majority voting over 32 samples: 88.7.
"""

from __future__ import annotations

import os

import ml_collections

from rpo.files import load_module

HERE = os.path.dirname(os.path.abspath(__file__))
PAPER = {"zero_shot": 55.6, "sft_gold": 63.5, "star": 65.2, "dpo": 61.8, "irpo": (73.1, 78.0, 81.1, 81.6),
         "irpo_maj32": 88.7}


def _common():
    """experiments/reproduce/_common.py, loaded by path."""
    return load_module(os.path.join(HERE, "_common.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return _common().irpo_llama2_70b("gsm8k", arg, os.path.abspath(__file__))
