"""What the reproduction configs in experiments/reproduce/ share: loading configs/irpo.py by path, parsing
variants, and the settings of Iterative RPO on Llama-2-70B-Chat (Pang et al. 2024) on a 32-device mesh.

Not a config itself (no get_config); each reproduction config loads this file by path, as configs are not a
package. Variants are comma-separated key=value (a bare key means key=1); an unknown key or a missing required
one stops with an error naming the config file.
"""

from __future__ import annotations

import os

import ml_collections

from rpo import configlib
from rpo.files import load_module

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASELINES = ("irpo", "sft_gold", "star", "dpo", "zero_shot")
# Llama-2-70B in training: fp32 master params (280 GB), fp32 grads (280 GB) and AdamW moments (560 GB) take
# 1.12 TB, 35 GB a device on 32 devices. The batch of 16 pairs splits over data x fsdp = 16 devices (one pair
# each, grad_accum 1: train.run needs batch_size / grad_accum divisible by data x fsdp); the rest of the
# devices form the tensor axis (32 devices: tensor 2; 64: tensor 4). Llama-2-70B's 64 query and 8 kv heads
# split over tensor <= 8.
LLAMA2_70B_MESH = dict(data=1, fsdp=16, tensor=-1)


def require(opts: dict[str, str], key: str, what: str, config_file: str) -> str:
    if not opts.get(key):
        raise ValueError(f"{config_file}: the variant {key}=<{what}> is required")
    return opts[key]


def irpo_llama2_70b(task: str, arg: str | None, config_file: str, *,
                    baselines: tuple[str, ...] = BASELINES) -> ml_collections.ConfigDict:
    """configs/irpo.py for `task` with the paper's settings, on Llama-2-70B-Chat, for a 32-device mesh.

    Variants: model=<Llama-2-70B-Chat HF dir> (required), data=<the task's files> (required),
    baseline=<one of `baselines`>, nochat (no chat template), workdir=<dir>."""
    opts = configlib.variants(arg, ("model", "data", "baseline", "nochat", "workdir"), config_file)
    model = require(opts, "model", "Llama-2-70B-Chat HF directory", config_file)
    data = require(opts, "data", f"directory of the {task} files", config_file)
    baseline = opts.get("baseline", "irpo")
    if baseline not in baselines:
        raise ValueError(f"{config_file}: variant baseline={baseline!r} is not one of {baselines}")
    name = os.path.splitext(os.path.basename(config_file))[0]
    base = load_module(os.path.join(ROOT, "configs", "irpo.py"))
    c = base.get_config(",".join([f"task={task}", f"model={model}", f"data={data}", f"baseline={baseline}"]
                                 + ([] if "nochat" in opts else ["chat"])))
    c.workdir = opts.get("workdir", os.path.join("runs", "reproduce", name + ("" if baseline == "irpo" else
                                                                             f"-{baseline}")))
    c.mesh.update(LLAMA2_70B_MESH)
    c.train.grad_accum = 1
    return c
