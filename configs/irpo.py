"""Iterative RPO on a real task (GSM8K, MATH, ARC-Challenge) from an HF checkpoint, with the
paper's settings (Pang et al. 2024; ../shared/DESIGN.md) as defaults.

  python -m rpo.main --config=configs/irpo.py:task=gsm8k,model=/path/to/hf_model,data=/path/to/gsm8k
  python -m rpo.main --config=configs/irpo.py:task=math,model=...,data=/path/to/math_jsonl_dir
  python -m rpo.main --config=configs/irpo.py:task=arc,model=...,data=/path/to/ARC-V1-Feb2018.zip_or_dir

Variants (comma-separated key=value): task=gsm8k|math|arc, model=<HF dir> (M_0; its tokenizer
is used), data=<directory of the official files> (task.source_dir), baseline=sft_gold|star|dpo|
zero_shot, chat (apply the model's chat template), runlocal (a few prompts and steps: a smoke
test of the whole loop on a laptop), workdir=<dir>.
Per task (the paper's Table 1 settings): samples per prompt N, temperatures per iteration,
pairs per prompt K, iterations and steps per iteration; batch 16 pairs, AdamW lr 7e-7,
beta 0.1, alpha 1 (NLL on the winner, length-normalised).
"""

from __future__ import annotations

import ml_collections

from rpo import configlib

PAPER = {  # task -> N, temperatures, K, iterations, max steps per iteration, eval tokens
    "gsm8k": dict(n=30, temperatures=(0.8, 0.8, 1.3, 1.3), k=10, iterations=4, steps=5000, max_new_tokens=512),
    "arc": dict(n=30, temperatures=(0.8, 0.8, 1.3), k=20, iterations=3, steps=4000, max_new_tokens=512),
    "math": dict(n=20, temperatures=(0.8, 0.8, 1.0), k=15, iterations=3, steps=5000, max_new_tokens=1024),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = configlib.variants(
        arg, ("task", "baseline", "model", "data", "chat", "runlocal", "workdir"), "configs/irpo.py")
    task = opts.get("task", "gsm8k")
    if task not in PAPER:
        raise ValueError(f"--config variant task={task!r}: use one of {sorted(PAPER)}")
    p = PAPER[task]
    baseline = opts.get("baseline", "irpo")

    c = ml_collections.ConfigDict()
    c.mode = "irpo"
    c.workdir = opts.get("workdir", f"runs/irpo_{task}" + ("" if baseline == "irpo" else f"-{baseline}"))
    c.seed = 0
    c.task = ml_collections.ConfigDict(dict(
        name=task, source_dir=opts.get("data", ""), tfds_dir="", strict=False, skip_bad_rows=False, max_examples=0,
        train_file="",  # a JSONL of training problems in place of the train split (CoT-Self-Instruct's dataset.jsonl)
    ))
    c.data = ml_collections.ConfigDict(dict(chat_template="chat" in opts, add_bos=True, pad_id=0,
                                            long_prompts="skip"))
    c.tokenizer = ""  # '' = the model's
    c.model = ml_collections.ConfigDict(dict(path=opts.get("model", ""), dtype="bfloat16", seed=0))
    c.seq_len = 2048 if task == "math" else 1024

    def phase(kind, steps, lr):
        return configlib.phase(
            kind, steps, lr, batch_size=16, warmup_steps=100, grad_accum=4, remat=True, checkpoint_every=250,
            keep_checkpoints=2, loss_args=dict(chunk_size=256),
            optimizer=dict(schedule="constant", end_lr_fraction=1.0, b2=0.95))

    c.init = phase("sft", 1, 7e-7)
    c.init.num_steps = 0  # M_0 is the checkpoint itself
    c.irpo = ml_collections.ConfigDict(dict(
        method="irpo", iterations=p["iterations"], prompts_per_iteration=0, samples_per_prompt=p["n"],
        temperatures=p["temperatures"], top_p=1.0, top_k=0, max_new_tokens=p["max_new_tokens"],
        pairs_per_prompt=p["k"], distinct_pairs=False, add_gold=task == "gsm8k", max_pairs=0, chunk_prompts=64,
    ))
    c.train = phase("dpo_nll", p["steps"], 7e-7)
    # The paper keeps, per iteration, the checkpoint that does best on 1k held-out training problems.
    c.select = ml_collections.ConfigDict(dict(every=500, heldout=1000))
    c.eval = ml_collections.ConfigDict(dict(max_new_tokens=p["max_new_tokens"], maj_k=32 if task == "gsm8k" else 16,
                                            temperature=0.8, top_p=1.0, top_k=0, chunk_prompts=64))
    c.mesh = configlib.mesh(data=1, fsdp=-1)
    c.sharding_rules = configlib.sharding_rules()

    if baseline in ("sft_gold", "star"):
        c.irpo.method = baseline
        c.train.loss.kind = "sft"
    elif baseline == "dpo":
        c.train.loss.alpha = 0.0
    elif baseline == "zero_shot":
        c.irpo.iterations = 0
    elif baseline != "irpo":
        raise ValueError(f"--config variant baseline={baseline!r}: use sft_gold, star, dpo or zero_shot")

    if "runlocal" in opts:  # the whole loop on a handful of prompts, in minutes on a laptop
        c.task.max_examples = 16
        c.model.dtype = "float32"
        c.seq_len = 768
        c.irpo.update(samples_per_prompt=4, pairs_per_prompt=2, max_new_tokens=128, iterations=1)
        c.train.update(num_steps=4, batch_size=4, grad_accum=1, checkpoint_every=2)
        c.select.update(every=0, heldout=0)  # a handful of prompts spares none for selection: keep the last step
        c.train.optim.warmup_steps = 1
        c.eval.update(max_new_tokens=128, maj_k=2)
        c.mesh.fsdp = 1
        c.mesh.data = -1
    return c
