"""CoT-Self-Instruct, then a training method on the prompts it kept, in one run: the paper's two protocols.

  verifiable      CoT-Self-Instruct -> Answer-Consistency (or Self-Consistency) -> GRPO on the kept problems, each
                  rewarded against its generated (or majority) answer         chain.then = 'grpo'    (rpo.grpo)
  non-verifiable  CoT-Self-Instruct -> RIP (reward-model scores of K responses) -> DPO on best-vs-worst pairs of the
                  same reward model                                            chain.then = 'rm_dpo'  (rpo.rm_dpo)

A config of mode 'self_instruct' with a `chain` block runs this instead of rpo.self_instruct alone (synth.then_irpo,
the IRPO chain, must then be False):
  chain.then        'grpo' | 'rm_dpo'
  chain.model_path  the model the method trains; '' = the synthesising model (model.path, or the warm start's
                    workdir/init/train/final)
The method runs in workdir/<then>/ with the config's own blocks (grpo.*, or rm_dpo.* and train.*, and the shared
data, model, mesh fields); its training prompts are workdir/dataset.jsonl (task.train_file for GRPO: "question" and
"answer"; rm_dpo.prompts_file for DPO: "question"). Blocks that belong to the synthesis (synth, chain) or to IRPO
(irpo; and train for GRPO, whose optimisation is grpo.train) are left out of the method's config.
"""

from __future__ import annotations

import os

import ml_collections

from rpo.configlib import ConfigError

THEN = ("grpo", "rm_dpo")


def chained(cfg) -> bool:
    """Whether a self_instruct config chains a method (has a `chain` block naming one)."""
    return "chain" in cfg and bool(cfg.chain.then)


def check_config(cfg) -> None:
    if cfg.chain.then not in THEN:
        raise ConfigError(f"config field chain.then: {cfg.chain.then!r} is not one of {THEN}")
    if cfg.synth.then_irpo:
        raise ConfigError("config fields synth.then_irpo and chain.then: chain one method after the synthesis, not two")
    if cfg.chain.then == "rm_dpo" and cfg.synth.kind != "instruction":
        raise ConfigError(f"config field chain.then='rm_dpo' trains on instructions: synth.kind is {cfg.synth.kind!r}")
    if cfg.chain.then == "grpo" and cfg.synth.kind != "verifiable":
        raise ConfigError(f"config field chain.then='grpo' needs answers to reward: synth.kind is {cfg.synth.kind!r}")


def synthesis_model(cfg, workdir: str) -> str:
    """The model that wrote the prompts: the warm start's (rpo.self_instruct) or model.path."""
    return os.path.join(workdir, "init", "train", "final") if cfg.init.num_steps else cfg.model.path


def method_config(cfg, workdir: str) -> ml_collections.ConfigDict:
    """The config the chained method runs with (see the module docstring)."""
    m = ml_collections.ConfigDict(cfg.to_dict())
    then = cfg.chain.then
    dataset = os.path.join(workdir, "dataset.jsonl")
    drop = ["synth", "chain", "irpo"] + (["train"] if then == "grpo" else [])
    for block in drop:
        if block in m:
            del m[block]
    m.mode = then
    m.workdir = os.path.join(workdir, then)
    m.model.path = cfg.chain.model_path or synthesis_model(cfg, workdir)
    m.init.num_steps = 0
    if then == "grpo":
        m.task.train_file = dataset
    else:
        m.rm_dpo.prompts_file = dataset
    return m


def run(cfg, workdir: str) -> dict:
    """The synthesis (rpo.self_instruct.run), then the method on what it kept; returns counts.json's counts."""
    from rpo import grpo, rm_dpo, self_instruct

    check_config(cfg)
    counts = self_instruct.run(cfg, workdir)
    if not counts["kept"]:
        raise RuntimeError(f"chain.then={cfg.chain.then!r}: {workdir}/dataset.jsonl is empty, nothing to train on")
    m = method_config(cfg, workdir)
    (grpo.run if cfg.chain.then == "grpo" else rm_dpo.run)(m, m.workdir)
    return counts
