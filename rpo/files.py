"""Artifacts on disk, written atomically: the interface between stages.

Every file rpo writes goes through `atomic_write`: a temporary name beside the target, fsync,
then a rename. A reader, or a run resumed after a crash, sees the old file or the new one,
never half of one; a failed write leaves no temporary behind.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterable, Iterator


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """One JSON object per line."""
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_json(path: str, obj, indent: int = 2) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent)
