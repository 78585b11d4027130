r"""Reproduction setting: CoT-Self-Instruct for verifiable math problems with Qwen3-4B (Yu et al. 2025,
https://arxiv.org/abs/2507.23751), optionally followed by Iterative RPO on the problems it keeps. NOT RUN HERE:
no accelerator of this size was available to this project; the config loads and passes
rpo.self_instruct.check_config and rpo.irpo.check_config (tests/test_reproduce.py), nothing more was verified.

What it runs (rpo/self_instruct.py): from the seed problems in seeds= (JSONL: "question", optional "answer",
"category"; seeds are paired within a category when they have one), Qwen3-4B, in its chat template, reasons
about two seeds and writes one new problem and its \boxed{} answer (rpo's cot_verifiable template); malformed
generations and near-duplicates (ROUGE-L F1 >= 0.7 against the seeds and earlier questions) are rejected; then
the Answer-Consistency filter: 16 fresh solutions per problem with the MATH task's 4-shot prompt, answers
compared by the MATH task's sympy equivalence, and the problem is kept when their majority answer equals the
generated one (a tie for the top rejects). Output: <workdir>/dataset.jsonl, rejected.jsonl, counts.json.
With the variant irpo, Iterative RPO then trains Qwen3-4B on dataset.jsonl with configs/irpo.py's MATH settings
(N = 20, K = 15, temperatures 0.8, 0.8, 1.0, 3 iterations of up to 5000 steps, batch 16 pairs, AdamW lr 7e-7,
beta 0.1, alpha 1) and evaluates on the MATH test split in data=. That chaining is this project's; the paper's
own training on its synthetic data is not reproduced by this config.

Commands (model= an HF directory of Qwen3-4B, seeds= the seed JSONL, data= a directory of MATH train.jsonl /
test.jsonl, needed with irpo; the paths must exist on every worker; my-v5p-16 and us-east5-a stand for your
TPU VM and its zone):

  RPO_SRUN_FLAGS="--nodes=1 --gpus-per-node=8" ./launch.sh slurm \
    experiments/reproduce/cot_self_instruct_qwen3_4b.py:model=/nfs/Qwen3-4B,seeds=/nfs/seeds.jsonl
  RPO_SRUN_FLAGS="--nodes=1 --gpus-per-node=8" ./launch.sh slurm \
    experiments/reproduce/cot_self_instruct_qwen3_4b.py:model=/nfs/Qwen3-4B,seeds=/nfs/seeds.jsonl,data=/nfs/math,irpo
  ./launch.sh tpu my-v5p-16 us-east5-a \
    experiments/reproduce/cot_self_instruct_qwen3_4b.py:model=/mnt/Qwen3-4B,seeds=/mnt/seeds.jsonl \
    --workdir=/mnt/runs/cot_self_instruct_qwen3_4b

(slurm: the checkout is on a filesystem every node mounts, so the default workdir under runs/reproduce/ is too.)

Variants: model= (required), seeds= (required), data= (required with irpo), irpo, workdir=.

Token budgets and sampling: rpo.irpo.chat_wrap applies the chat template without enable_thinking, so Qwen3
answers in its default thinking mode (a <think> block first); generations and solutions may use 4096 new
tokens, and a solution cut off there has no answer and does not vote. Sampling uses Qwen3's recommended
thinking-mode setting (temperature 0.6, top-p 0.95, top-k 20). 5000 generations, 16 solutions each, the
budgets and the sampling settings are this config's choices: the paper's values are not recorded here.

Hardware: 8 accelerators with >= 80 GB each: one node of 8 H100 80 GB (single host), or a TPU v5p-16 slice
(8 chips, 2 workers: --workdir on a filesystem both mount). Mesh data=1, fsdp=all devices, tensor=1; training
(irpo) has grad_accum 2, so a micro-batch of 8 pairs splits over 1, 2, 4 or 8 devices. Untested.

Paper's numbers: not recorded here. (Its abstract reports gains over s1k and OpenMathReasoning on MATH500,
AMC23, AIME24 and GPQA-Diamond, from training on the synthetic prompts; which seed set and which Qwen3-4B
checkpoint it used for which step was not verified here.)
"""

from __future__ import annotations

import os

import ml_collections

from rpo.files import load_module

HERE = os.path.dirname(os.path.abspath(__file__))
PAPER: dict[str, float] = {}  # no number of the paper's is recorded here


def _common():
    """experiments/reproduce/_common.py, loaded by path."""
    return load_module(os.path.join(HERE, "_common.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    common = _common()
    me = os.path.abspath(__file__)
    opts = common.parse_variants(arg, ("model", "seeds", "data", "irpo", "workdir"), me)
    model = common.require(opts, "model", "Qwen3-4B HF directory", me)
    seeds = common.require(opts, "seeds", "seed problems JSONL", me)
    data = common.require(opts, "data", "directory of MATH train.jsonl / test.jsonl", me) if "irpo" in opts else ""
    base = common.load_module(os.path.join(common.ROOT, "configs", "irpo.py"))
    c = base.get_config(f"task=math,model={model},data={data},chat")
    c.mode = "self_instruct"
    c.workdir = opts.get("workdir", os.path.join("runs", "reproduce", "cot_self_instruct_qwen3_4b"
                                                 + ("-irpo" if "irpo" in opts else "")))
    c.synth = ml_collections.ConfigDict(dict(
        kind="verifiable", method="cot",
        template="",  # rpo/data/templates/self_instruct/cot_verifiable.txt
        judge_template="",  # RIP only
        seeds_file=seeds, max_seeds=0,  # all seeds
        num_generations=5000, temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=4096, chunk_prompts=64,
        filter="answer_consistency",
        num_solutions=16, solve_temperature=0.6, solve_max_new_tokens=4096,
        min_vote_share=0.0, ties="reject",
        self_consistency_threshold=0.5,  # self_consistency only
        rip_percentile=50.0, reward_model="", reward_batch_size=16, judge_max_new_tokens=16,  # RIP only
        dedup_threshold=0.7,
        then_irpo="irpo" in opts,
    ))
    # IRPO after synthesis (variant irpo): MATH's settings from configs/irpo.py, with room for thinking.
    c.irpo.max_new_tokens = 4096
    c.eval.max_new_tokens = 4096
    c.seq_len = 5120
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.train.grad_accum = 2
    return c
