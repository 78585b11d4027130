"""One process of tests/test_multihost.py: a one-step DPO+NLL training phase (rpo.train.run) and a
generate() call on a data=2 x fsdp=4 mesh, then the results as JSON.

  XLA_FLAGS=--xla_force_host_platform_device_count=<4 or 8> python tests/multihost_worker.py OUT_DIR MODEL_DIR PAIRS

MODEL_DIR is an HF directory of a tiny Llama, PAIRS a pairs file without reference log-probs.
With RPO_COORDINATOR / RPO_NUM_PROCESSES / RPO_PROCESS_ID set (2 processes x 4 CPU devices) the
mesh's data axis spans the two processes; without them one process holds all 8 devices. The
training phase runs in OUT_DIR/run (shared by the processes, as a multi-host workdir must be):
reference log-probs, the step, metrics, an orbax checkpoint, final/. Every process writes
OUT_DIR/result-<process index>.json: the updated params and the sampled tokens and log-probs (all
gathered whole on every process), what it read back from a file just written through rpo.files,
and the mesh's process layout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from rpo import distributed

distributed.initialize()  # before anything touches a jax device

import jax  # noqa: E402

from rpo import files, sampling, sharding  # noqa: E402
from rpo import train as T  # noqa: E402
from rpo.models.config import load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(model_dir: str, pairs: str, workdir: str):
    spec = importlib.util.spec_from_file_location("train_tiny", os.path.join(ROOT, "configs", "train_tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(f"workdir={workdir}")
    cfg.model.path = model_dir
    cfg.data.train_path, cfg.data.eval_path, cfg.data.seq_len = pairs, "", 20
    cfg.batch_size, cfg.grad_accum = 16, 2  # micro-batches of 8 rows: one per device of the 2 x 4 mesh
    cfg.num_steps, cfg.checkpoint_every = 1, 1
    cfg.optim.warmup_steps = 0  # a non-zero learning rate at the first step
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 4, 1
    return cfg


def _flat(params) -> dict[str, list[float]]:
    return {jax.tree_util.keystr(path): leaf.ravel().tolist()
            for path, leaf in jax.tree_util.tree_leaves_with_path(distributed.fetch(params))}


def main(out_dir: str, model_dir: str, pairs: str) -> None:
    cfg = _config(model_dir, pairs, os.path.join(out_dir, "run"))
    params = T.run(cfg, cfg.workdir, echo=False)
    mesh = sharding.make_mesh(2, 4, 1)

    # Five prompts in a bucket of 8 rows: process 1's devices hold one real prompt and 3 padding rows.
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20, 21], [30, 31, 32, 33], [40]]
    out = sampling.generate(load_config(model_dir), params, prompts, n=3, max_new_tokens=20, temperature=1.0,
                            top_p=0.9, eos_ids=(), seed=5, mesh=mesh)

    written = os.path.join(out_dir, "written.json")
    files.write_json(written, {"writer": distributed.process_index()})
    with open(written) as f:  # right after the call returns, on every process
        read_back = json.load(f)

    result = {
        "process_count": jax.process_count(),
        "devices": len(jax.devices()),
        "mesh_data_processes": [sorted({d.process_index for d in row.flat}) for row in mesh.devices],
        "params_fully_addressable": all(x.is_fully_addressable for x in jax.tree.leaves(params)),
        "params": _flat(params),
        "tokens": out.tokens,
        "logprobs": out.logprobs,
        "read_back": read_back,
    }
    with open(os.path.join(out_dir, f"result-{distributed.process_index()}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
