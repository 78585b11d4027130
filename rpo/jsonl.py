"""JSONL artifacts, written atomically: the interface between stages."""

from __future__ import annotations

import json
import os
from typing import Iterable


def write_atomic(path: str, rows: Iterable[dict]) -> None:
    """Writes one JSON object per line via a temporary file, fsync and a rename, so a reader
    (or a resumed run) never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
