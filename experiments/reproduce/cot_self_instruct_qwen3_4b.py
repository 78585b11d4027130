r"""Reproduction setting: CoT-Self-Instruct for verifiable math problems with Qwen3-4B (Yu et al. 2025,
https://arxiv.org/abs/2507.23751), then GRPO on the problems it keeps, as the paper trains on its synthetic data
(variant grpo); or Iterative RPO on them (variant irpo, this project's chaining). NOT RUN HERE: no accelerator of
this size was available to this project; the config loads and passes rpo.self_instruct.check_config,
rpo.irpo.check_config, rpo.chain.check_config and rpo.grpo.check_config (tests/test_reproduce.py,
tests/test_chain.py), nothing more was verified.

What it runs (rpo/self_instruct.py): from the seed problems in seeds= (JSONL: "question", optional "answer",
"category"; seeds are paired within a category when they have one), Qwen3-4B, in its chat template, reasons
about two seeds and writes one new problem and its \boxed{} answer (rpo's cot_verifiable template); malformed
generations and near-duplicates (ROUGE-L F1 >= 0.7 against the seeds and earlier questions) are rejected; then
the Answer-Consistency filter: 16 fresh solutions per problem with the MATH task's 4-shot prompt, answers
compared by the MATH task's sympy equivalence, and the problem is kept when their majority answer equals the
generated one (a tie for the top rejects). Output: <workdir>/dataset.jsonl, rejected.jsonl, counts.json.
With the variant grpo (rpo/chain.py, then rpo/grpo.py in <workdir>/grpo): GRPO trains policy= (default: the
synthesising model; issue 17 says the paper trains Qwen3-4B-Base) on dataset.jsonl, each rollout rewarded 1 when
its final answer equals the problem's generated answer under the MATH task's equivalence, and evaluates on the
MATH test split in data= (greedy, maj@16). The GRPO numbers taken from issue 17's summary of the paper, NOT
verified against the paper here (it was not readable offline): learning rate 1e-6, batch 128 (read here as 128
prompts per step), 32 rollouts per prompt, up to 4,096 tokens per rollout. Everything else in grpo.* is this
config's choice: 500 steps, temperature 1.0, clip 0.2, beta 0 (no KL term, no reference forward), per-sequence
normalisation (GRPO's), std-scaled advantages, one update per batch of rollouts.
With the variant irpo, Iterative RPO instead trains Qwen3-4B on dataset.jsonl with configs/irpo.py's MATH settings
(N = 20, K = 15, temperatures 0.8, 0.8, 1.0, 3 iterations of up to 5000 steps, batch 16 pairs, AdamW lr 7e-7,
beta 0.1, alpha 1) and evaluates on the MATH test split in data=.

Commands (model= an HF directory of Qwen3-4B, seeds= the seed JSONL, data= a directory of MATH train.jsonl /
test.jsonl, needed with grpo and irpo, policy= the model GRPO trains; the paths must exist on every worker;
my-v5p-16 and us-east5-a stand for your TPU VM and its zone):

  RPO_SRUN_FLAGS="--nodes=1 --gpus-per-node=8" ./launch.sh slurm \
    experiments/reproduce/cot_self_instruct_qwen3_4b.py:model=/nfs/Qwen3-4B,seeds=/nfs/seeds.jsonl,data=/nfs/math,grpo,policy=/nfs/Qwen3-4B-Base
  RPO_SRUN_FLAGS="--nodes=1 --gpus-per-node=8" ./launch.sh slurm \
    experiments/reproduce/cot_self_instruct_qwen3_4b.py:model=/nfs/Qwen3-4B,seeds=/nfs/seeds.jsonl,data=/nfs/math,irpo
  ./launch.sh tpu my-v5p-16 us-east5-a \
    experiments/reproduce/cot_self_instruct_qwen3_4b.py:model=/mnt/Qwen3-4B,seeds=/mnt/seeds.jsonl,data=/mnt/math,grpo,policy=/mnt/Qwen3-4B-Base \
    --workdir=/mnt/runs/cot_self_instruct_qwen3_4b

(slurm: the checkout is on a filesystem every node mounts, so the default workdir under runs/reproduce/ is too.
Without grpo or irpo the run stops after the synthesis.)

Variants: model= (required), seeds= (required), data= (required with grpo or irpo), grpo, policy= (with grpo),
irpo, workdir=.

Token budgets and sampling: rpo.stages.chat_wrap applies the chat template without enable_thinking, so Qwen3
answers in its default thinking mode (a <think> block first); generations and solutions may use 4096 new
tokens, and a solution cut off there has no answer and does not vote. Sampling uses Qwen3's recommended
thinking-mode setting (temperature 0.6, top-p 0.95, top-k 20). 5000 generations, 16 solutions each, the
budgets and the sampling settings are this config's choices: the paper's values are not recorded here.

Hardware: 8 accelerators with >= 80 GB each: one node of 8 H100 80 GB (single host), or a TPU v5p-16 slice
(8 chips, 2 workers: --workdir on a filesystem both mount). Mesh data=1, fsdp=all devices, tensor=1; training
(irpo) has grad_accum 2, so a micro-batch of 8 pairs splits over 1, 2, 4 or 8 devices. Untested.
GRPO estimate (arithmetic, not a measurement): a step samples 128 x 32 = 4,096 rollouts of up to 4,096 tokens.
Training state in fp32 (4.0B params: params, grads and two AdamW moments, 64 GB) is 8 GB a device under fsdp=8;
grpo.train.grad_accum 128 gives micro-batches of 32 rollouts, 4 a device, rematerialised per layer. Sampling runs
grpo.chunk_prompts = 8 prompts (256 rollouts) at a time: their generated keys and values at 4,096 tokens take
256 x 4,096 x 147 KB (36 layers x 8 kv heads x 128 x 2 x bf16) = 154 GB, 19 GB a device. Compute per step, at
~2,000 generated tokens per rollout on average: the update is ~6 x 4e9 x 4,096 x 2,500 tokens = 2.5e17 FLOPs
(about 80 s at 40% of 8 x 989 dense bf16 TFLOP/s; ~30% more with rematerialisation); sampling ~8.2M tokens is
memory-bound and, at an assumed 40k tokens/s over the node, ~200 s. So roughly 5 minutes a step, ~40 hours for the
500 steps set here, on one 8 x H100 node. The paper's own step count is not recorded here.

Paper's numbers: not recorded here. (Its abstract reports gains over s1k and OpenMathReasoning on MATH500,
AMC23, AIME24 and GPQA-Diamond, from training on the synthetic prompts; which seed set and which Qwen3-4B
checkpoint it used for which step was not verified here.)
"""

from __future__ import annotations

import os

import ml_collections

from rpo import configlib
from rpo.files import load_module

HERE = os.path.dirname(os.path.abspath(__file__))
PAPER: dict[str, float] = {}  # no number of the paper's is recorded here


def _common():
    """experiments/reproduce/_common.py, loaded by path."""
    return load_module(os.path.join(HERE, "_common.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    common = _common()
    me = os.path.abspath(__file__)
    opts = configlib.variants(arg, ("model", "seeds", "data", "grpo", "policy", "irpo", "workdir"), me)
    model = common.require(opts, "model", "Qwen3-4B HF directory", me)
    seeds = common.require(opts, "seeds", "seed problems JSONL", me)
    if "grpo" in opts and "irpo" in opts:
        raise ValueError(f"{me}: variants grpo and irpo: chain one method after the synthesis")
    if "policy" in opts and "grpo" not in opts:
        raise ValueError(f"{me}: the variant policy= is the model GRPO trains: it needs the variant grpo")
    method = "grpo" if "grpo" in opts else "irpo" if "irpo" in opts else ""
    data = common.require(opts, "data", "directory of MATH train.jsonl / test.jsonl", me) if method else ""
    base = common.load_module(os.path.join(common.ROOT, "configs", "irpo.py"))
    c = base.get_config(f"task=math,model={model},data={data},chat")
    c.mode = "self_instruct"
    c.workdir = opts.get("workdir", os.path.join("runs", "reproduce", "cot_self_instruct_qwen3_4b"
                                                 + (f"-{method}" if method else "")))
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
    # GRPO after synthesis (variant grpo, rpo/chain.py): issue 17's account of the paper's settings (lr 1e-6, batch
    # 128, 32 rollouts, 4,096 tokens; unverified here), the rest this config's choices (see the docstring).
    c.grpo = ml_collections.ConfigDict(dict(
        iterations=1, steps_per_iteration=500, prompts_per_step=128, group_size=32,
        temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=4096, chunk_prompts=8, mu=1,
        clip_low=0.2, clip_high=0.2, beta=0.0, kl_ratio=False, reference="initial", normalization="sequence",
        scale_rewards=True, adv_eps=1e-4, require_finished=True, on_reward_error="error", rollouts_every=50,
        train=ml_collections.ConfigDict(dict(
            optim=ml_collections.ConfigDict(dict(
                lr=1e-6, schedule="constant", warmup_steps=10, end_lr_fraction=1.0, weight_decay=0.0, b1=0.9, b2=0.99,
                eps=1e-8, clip_norm=1.0)),
            grad_accum=128, remat=True, chunk_size=256, log_every=1, checkpoint_every=25, keep_checkpoints=2,
            row_buckets=4,
        )),
    ))
    c.chain = ml_collections.ConfigDict(dict(then="grpo" if method == "grpo" else "", model_path=opts.get("policy", "")))
    if method == "grpo":
        c.select.every = 100  # exports scored on 1,000 held-out MATH training problems (configs/irpo.py's select)
    return c
