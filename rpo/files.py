"""Artifacts on disk, written atomically: the interface between stages.

Every file rpo writes goes through `atomic_write`: a temporary name beside the target, fsync,
then a rename. A reader, or a run resumed after a crash, sees the old file or the new one,
never half of one; a failed write leaves no temporary behind.

On several processes (rpo.distributed) a write is collective: every process calls it, in the
same order; process 0 writes the file and the others write into /dev/null, between two barriers.
So no process sees a file appear while another is deciding whether it exists, and once the call
returns every process can read what process 0 wrote (on the shared workdir).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from types import ModuleType
from typing import Iterable, Iterator

from rpo import distributed


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator:
    distributed.sync(f"rpo.files: before writing {path}")
    if not distributed.is_main():
        with open(os.devnull, mode) as f:
            yield f
        distributed.sync(f"rpo.files: wrote {path}")
        return
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
    distributed.sync(f"rpo.files: wrote {path}")


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """One JSON object per line."""
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_json(path: str, obj, indent: int = 2) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent)


class DataError(ValueError):
    """A data file row is malformed; the message names the file and line."""


def jsonl_rows(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a line that is not a JSON object
    raises DataError naming path:line."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: a row must be a JSON object")
            yield n, obj


def read_jsonl(path: str) -> list[dict]:
    return [obj for _, obj in jsonl_rows(path)]


def load_module(path: str) -> ModuleType:
    """A Python file loaded by path as a module (config files are not a package)."""
    spec = importlib.util.spec_from_file_location("rpo_file_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
