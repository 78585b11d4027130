"""GRPO on the synthetic arithmetic task, beside the embedded IRPO default (configs/arith_tiny.py) at an equal
sampling budget.

  python -m rpo.main --config=configs/grpo_tiny.py                        # GRPO from arith_tiny's M_0
  python -m rpo.main --config=configs/grpo_tiny.py:normalization=token    # DAPO's token-level normalisation
  python -m rpo.main --config=configs/grpo_tiny.py:quick                  # seconds, for tests
  python -m rpo.main --config=configs/grpo_tiny.py --config.seed=1        # another seed (sampling, data order)

Everything IRPO's default fixes is taken from configs/arith_tiny.py (loaded by path): the task and its splits, M_0
(model.path), the held-out problems and checkpoint selection (select.*), the evaluation (eval.*), the mesh. The
sampling budget is IRPO's: an IRPO iteration samples irpo.samples_per_prompt completions of each of its
irpo.prompts_per_iteration prompts, so a GRPO iteration runs (prompts_per_iteration x samples_per_prompt) /
(prompts_per_step x group_size) steps, with group_size = samples_per_prompt, and there are as many iterations; each ends, as in IRPO, by keeping the
export best on the held-out problems. The GRPO defaults are DeepSeekMath's (clip 0.2, one update per batch of
rollouts, per-sequence normalisation, std-scaled advantages) except the KL term: beta = 0, as DAPO and Dr. GRPO
run, which spares the reference forward and lets zero-advantage samples skip the train pass (on 2 CPU cores the
train pass is most of a step); beta=0.04 is DeepSeekMath's. The learning rate is IRPO's DPO rate.
Results: <workdir>/results.json, accuracy.png, grpo_curves.png.

Variants (comma-separated): quick (arith_tiny's quick task and model, warm-started here), normalization=
sequence|token|constant, beta=<float>, workdir=<dir>. The workdir defaults to runs/grpo_tiny.
"""

from __future__ import annotations

import os

import ml_collections

from rpo import configlib
from rpo.files import load_module

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = configlib.variants(arg, ("quick", "normalization", "beta", "workdir"), "configs/grpo_tiny.py")
    quick = "quick" in opts
    c = load_module(os.path.join(HERE, "arith_tiny.py")).get_config("quick" if quick else None)
    c.mode = "grpo"
    c.workdir = opts.get("workdir", "runs/grpo_tiny" + ("-quick" if quick else ""))
    i = c.irpo
    group = i.samples_per_prompt
    prompts_per_step = 8 if quick else 25
    train_prompts = min(i.prompts_per_iteration or c.task.num_train, c.task.num_train - c.select.heldout)
    budget = train_prompts * i.samples_per_prompt  # IRPO's samples per iteration
    if budget % (prompts_per_step * group):
        raise ValueError(f"configs/grpo_tiny.py: IRPO's {budget} samples per iteration are not a whole number of "
                         f"GRPO steps of {prompts_per_step} x {group}")
    optim = ml_collections.ConfigDict(c.train.optim.to_dict())
    optim.update(schedule="constant", warmup_steps=2 if quick else 10)
    steps = budget // (prompts_per_step * group)
    if not quick:  # as many candidate exports per iteration as IRPO's (every 25 of 50 steps): every 10 of 20
        c.select.every = steps // 2
    c.grpo = ml_collections.ConfigDict(dict(
        iterations=i.iterations,
        steps_per_iteration=steps,
        prompts_per_step=prompts_per_step,
        group_size=group,  # G
        temperature=1.0, top_p=1.0, top_k=0,  # the policy's own distribution
        max_new_tokens=i.max_new_tokens,
        chunk_prompts=i.chunk_prompts,  # prompts per sampling batch
        mu=1,  # optimizer steps per batch of rollouts
        clip_low=0.2, clip_high=0.2,  # eps (DAPO's clip-higher: clip_high 0.28)
        beta=float(opts.get("beta", 0.0)),  # KL coefficient (k3); 0: no KL term, no reference forward
        kl_ratio=False,  # weight the KL term by the ratio (DeepSeek-V3.2's unbiased estimate)
        reference="initial",  # the KL's reference: 'initial' (M_0) or 'previous' (M_{t-1})
        normalization=opts.get("normalization", "sequence"),  # sequence (GRPO) | token (DAPO) | constant (Dr. GRPO)
        scale_rewards=True, adv_eps=1e-4,  # divide by the group's std + eps (Dr. GRPO: False)
        require_finished=True,  # a correct answer cut off at max_new_tokens earns 0
        on_reward_error="error",  # 'error' | 'skip' (leave the group out, counted)
        rollouts_every=25 if not quick else 2,  # write a step's rollouts (texts, rewards, advantages); 0: never
        train=ml_collections.ConfigDict(dict(
            optim=optim, grad_accum=1, remat=False, chunk_size=64, log_every=1,
            row_buckets=4,  # batch sizes a step may compile for (zero-advantage rows are left out when beta = 0)
            checkpoint_every=25 if not quick else 2, keep_checkpoints=1,
        )),
    ))
    del c.irpo  # IRPO's fields: GRPO's sampling is grpo.*, its optimisation grpo.train
    del c.train
    return c
