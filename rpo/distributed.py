"""Multi-host JAX: when to start jax.distributed, which process writes, global arrays from per-process rows.

On several hosts every process (one per host on a Cloud TPU pod; one per GPU or per node under
SLURM) runs the same command. Once jax.distributed is up, `jax.devices()` lists the devices of
every process and a mesh built from them (rpo.sharding.make_mesh) spans the processes.

Conventions:
  * SPMD host code. Every process runs the same Python and reaches the same collectives (jitted
    computations on a mesh that spans processes, `sync`, `fetch`) and the same rpo.files writes,
    in the same order. Never guard one of those with `is_main()`: that process would wait alone.
  * Process 0 is the main process. rpo.files writes artifacts there only, between two barriers
    (the other processes run the same code into /dev/null), so every process sees the same files
    before and after each write; rpo.report's logs, event files and progress bars are process 0's.
    The workdir must therefore be one filesystem shared by all hosts (orbax, which writes its
    checkpoints from every process, needs that too).
  * Input batches: each process packs only the rows its own devices hold (`process_rows`), and
    `jax.make_array_from_process_local_data` assembles the global array. Results are brought back
    whole to every process by `fetch`.

`initialize()` starts jax.distributed according to the environment (the first rule that applies):
  RPO_DISTRIBUTED=off                     never: one process
  RPO_COORDINATOR, RPO_NUM_PROCESSES, RPO_PROCESS_ID
                                          all three: with these values (process 0's host:port, the
                                          number of processes, this one's index); one process if
                                          RPO_NUM_PROCESSES=1
  RPO_DISTRIBUTED=on                      jax.distributed.initialize() without arguments: jax finds
                                          the cluster itself (TPU metadata, SLURM, Open MPI)
  a SLURM step of more than one task      the same; launch with srun, one task per host or per GPU
  a Cloud TPU pod                         the same; detected by TPU_PROCESS_ADDRESSES or
                                          TPU_WORKER_HOSTNAMES naming more than one host, or
                                          MEGASCALE_NUM_SLICES > 1 (a pod whose environment names no
                                          workers needs RPO_DISTRIBUTED=on)
  otherwise                               nothing: one process
On CPU, processes exchange data through gloo (jax's default CPU collectives).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping

import numpy as np

_EXPLICIT = ("RPO_COORDINATOR", "RPO_NUM_PROCESSES", "RPO_PROCESS_ID")


def _int(env: Mapping[str, str], name: str, default: str | None = None) -> int:
    value = env.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}={value!r}: not an integer") from None


def launch_plan(env: Mapping[str, str]) -> dict[str, Any] | None:
    """What `initialize` does in `env`: None (one process) or the keyword arguments of
    jax.distributed.initialize ({} lets jax detect the cluster). Raises naming the bad variable."""
    mode = env.get("RPO_DISTRIBUTED", "auto").strip().lower() or "auto"
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"environment variable RPO_DISTRIBUTED={env['RPO_DISTRIBUTED']!r}: use auto, on or off")
    if mode == "off":
        return None
    given = [name for name in _EXPLICIT if env.get(name)]
    if given:
        missing = [name for name in _EXPLICIT if name not in given]
        if missing:
            raise ValueError(f"environment variables {', '.join(given)} are set but {', '.join(missing)} is not: "
                             f"give all three of {', '.join(_EXPLICIT)}")
        num, pid, address = _int(env, "RPO_NUM_PROCESSES"), _int(env, "RPO_PROCESS_ID"), env["RPO_COORDINATOR"]
        if num < 1:
            raise ValueError(f"environment variable RPO_NUM_PROCESSES={num}: must be at least 1")
        if not 0 <= pid < num:
            raise ValueError(f"environment variable RPO_PROCESS_ID={pid}: must be in [0, RPO_NUM_PROCESSES={num})")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"environment variable RPO_COORDINATOR={address!r}: must be host:port")
        return None if num == 1 else {"coordinator_address": address, "num_processes": num, "process_id": pid}
    if mode == "on":
        return {}
    slurm_tasks = _int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS", "1")
    if slurm_tasks > 1 and all(name in env for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID")):
        return {}
    tpu_hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in tpu_hosts.split(",") if h.strip()]) > 1 or _int(env, "MEGASCALE_NUM_SLICES", "1") > 1:
        return {}
    return None


def initialize(env: Mapping[str, str] | None = None) -> bool:
    """Starts jax.distributed when the environment (default os.environ) asks for it (see the module
    docstring); must run before anything touches a jax device. Returns whether it is running."""
    import jax

    if jax.distributed.is_initialized():
        return True
    plan = launch_plan(os.environ if env is None else env)
    if plan is None:
        return False
    jax.distributed.initialize(**plan)
    return True


def _jax_if_distributed():
    jax = sys.modules.get("jax")  # without jax imported, jax.distributed cannot be running
    return jax if jax is not None and jax.distributed.is_initialized() else None


def process_index() -> int:
    """This process's index (0 on a single process). Never starts a jax backend."""
    jax = _jax_if_distributed()
    return 0 if jax is None else jax.process_index()


def process_count() -> int:
    jax = _jax_if_distributed()
    return 1 if jax is None else jax.process_count()


def is_main() -> bool:
    """Whether this is process 0, the one that writes logs and shared artifacts."""
    return process_index() == 0


def sync(name: str) -> None:
    """A barrier across all processes (nothing on one process). `name` must be the same on every
    process: a mismatch raises, naming it."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_rows(sharding, shape: tuple[int, ...], dim: int = 0) -> np.ndarray:
    """Indices along dimension `dim` of a global array of `shape` under `sharding` that this
    process's devices hold, in order: the rows a process packs for
    jax.make_array_from_process_local_data (all of them on one process)."""
    n = shape[dim]
    blocks = {index[dim].indices(n)[:2] for index in sharding.addressable_devices_indices_map(tuple(shape)).values()}
    return np.concatenate([np.arange(lo, hi) for lo, hi in sorted(blocks)])


def fetch(tree):
    """Every array of `tree` whole, as numpy, on every process. A collective for an array spread
    over several processes: every process must call it."""
    import jax

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(one, tree)
