"""Training checkpoints with orbax: the whole train state (params, optimizer state, step).

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact; `restore_latest` takes the newest
complete one. Restoring places every array with the sharding of the abstract target.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(directory: str, *, max_to_keep: int) -> ocp.CheckpointManager:
    """A CheckpointManager over `directory` (created if missing). The caller decides when to
    save (`save` always writes the step it is given)."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(directory, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Saves `state` as checkpoint `step` (asynchronously; `mngr.wait_until_finished()` blocks)."""
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)


def abstract(state_shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with shardings, the restore target (from jax.eval_shape output)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, shardings
    )


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any) -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint, or (None, None) when there is none."""
    step = mngr.latest_step()
    if step is None:
        return None, None
    try:
        state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # name the directory and step, keep the cause
        raise RuntimeError(f"{mngr.directory}: cannot restore checkpoint of step {step}: {e}") from e
    return step, state
