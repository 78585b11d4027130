"""A small reader and writer of the safetensors format, tensor by tensor.

The file is: an 8-byte little-endian header length, a JSON header mapping each tensor name
to {dtype, shape, data_offsets}, then the raw bytes. Reading memory-maps the file and hands
out one tensor at a time (bfloat16 through ml_dtypes), so loading a checkpoint never holds
the whole file in host memory. Writing streams tensors to disk one at a time.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Callable

import ml_dtypes
import numpy as np

from rpo.files import atomic_write

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(bool),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or lacks / misshapes a tensor."""


class SafetensorsFile:
    """Read-only view of one .safetensors file."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such file")
        self._file = open(path, "rb")
        try:
            (n,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(n))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            self._file.close()
            raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
        self._data_start = 8 + n
        header.pop("__metadata__", None)
        self.header: dict[str, dict] = header
        size = os.path.getsize(path)
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy array backed by the memory map."""
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        count = (end - begin) // dtype.itemsize
        arr = np.frombuffer(self._mmap, dtype=dtype, count=count, offset=self._data_start + begin)
        return arr.reshape(info["shape"])

    def close(self):
        if self._mmap is not None:
            self._mmap.close()
        self._file.close()


def write(path: str, entries: list[tuple[str, tuple, np.dtype, Callable[[], np.ndarray]]],
          metadata: dict[str, str] | None = None):
    """Writes tensors to `path`, one at a time: each entry is (name, shape, dtype, make) and
    make() is called only when that tensor's bytes are written, so at most one tensor is on
    the host at once. Written atomically (rpo.files.atomic_write)."""
    header: dict[str, dict] = {}
    offset = 0
    for name, shape, dtype, _ in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_write(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, make in entries:
            arr = np.ascontiguousarray(make(), dtype=dtype)
            if arr.shape != tuple(shape):
                raise CheckpointError(f"{path}: tensor {name} has shape {arr.shape}, expected {tuple(shape)}")
            f.write(arr.tobytes())
