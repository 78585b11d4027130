"""What a researcher reads: progress bars, metrics (JSONL + TensorBoard), the results table and plot.

  progress(...)     a tqdm bar on stderr, redrawn at most every 0.5 s on a terminal and every
                    30 s otherwise, so a log file gets a line per 30 s, not one per step.
  EventWriter       TensorBoard event files written without TensorFlow or tensorboard: a
                    TFRecord file (each record: uint64 length, masked crc32c of the length,
                    the bytes, masked crc32c of the bytes; little-endian) of hand-encoded
                    `Event` protobufs {1 wall_time double, 2 step int64, 3 file_version
                    string, 5 summary {1 repeated value {1 tag string, 2 simple_value float}}}.
                    The first event holds file_version "brain.Event:2". Scalars are stored as
                    float32 (simple_value), as TensorBoard does.
  MetricsLog        one JSON object per line in a JSONL file (flushed per line), the same
                    scalars in an EventWriter beside it.
  write_results     results.json: a JSON list of rows, one per iteration, written atomically.
  format_table      the same rows as a Markdown table.
  plot_results      a PNG of every *_accuracy column against the iteration (matplotlib Agg,
                    imported on first use).
  plot_curves       a PNG of per-step training metrics (e.g. GRPO's reward, zero-advantage fraction,
                    response length, clip fraction, KL, entropy), one panel each, a spread as a band.
On several processes (rpo.distributed) only process 0 shows progress bars and writes logs and
event files; elsewhere they are silent no-ops, so callers need not branch. results.json and the
plot go through rpo.files (written by process 0, called by every process).
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from typing import IO, Iterable, Mapping, Sequence

from tqdm import tqdm

from rpo import distributed, files


def progress(
    iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it", file: IO | None = None
) -> tqdm:
    """A progress bar for one stage (wrap an iterable, or call .update(n) on it; close it or use `with`).
    Hidden on processes other than 0."""
    file = sys.stderr if file is None else file
    tty = hasattr(file, "isatty") and file.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=file, mininterval=0.5 if tty else 30.0,
                dynamic_ncols=tty, ascii=not tty, disable=not distributed.is_main())


# ---------------------------------------------------------------------------------------
# TensorBoard event files
# ---------------------------------------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli polynomial, reflected
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked checksum: rotate right by 15 bits, add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 values take 10 bytes, two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
    try:
        return struct.pack("<f", value)
    except OverflowError:  # beyond float32's range: infinity, as a float32 cast gives
        return struct.pack("<f", math.copysign(math.inf, value))


def encode_event(
    step: int, wall_time: float, *, file_version: str = "", scalars: Mapping[str, float] | None = None
) -> bytes:
    """The protobuf bytes of one Event (see the module docstring for the fields)."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + _float32(value))
            for tag, value in scalars.items()
        )
        out += _bytes_field(5, values)
    return out


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


class EventWriter:
    """Scalars to logdir/events.out.tfevents.<time>.<host>.<pid>[.<n>] (a new file per writer).
    On processes other than 0 it writes nothing and `path` is None."""

    def __init__(self, logdir: str):
        self.path, self._file = None, None
        if not distributed.is_main():
            return
        os.makedirs(logdir, exist_ok=True)
        base = os.path.join(logdir, f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}")
        self.path, n = base, 0
        while True:
            try:
                self._file = open(self.path, "xb")
                break
            except FileExistsError:
                n += 1
                self.path = f"{base}.{n}"
        self._file.write(tfrecord(encode_event(0, time.time(), file_version="brain.Event:2")))
        self._file.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars({tag: value}, step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """One event holding every value (as float32), written and flushed at once."""
        if not values or self._file is None:
            return
        values = {str(tag): float(value) for tag, value in values.items()}
        self._file.write(tfrecord(encode_event(int(step), time.time(), scalars=values)))
        self._file.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self.flush()
            self._file.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MetricsLog:
    """Rows {"step", "split", "time", **metrics} appended to a JSONL file and flushed per line
    (the format of rpo.train's metrics.jsonl), and the metrics as TensorBoard scalars tagged
    "<split>/<name>" in `logdir` (default: the JSONL file's directory). Process 0 only: elsewhere
    the metrics are checked and dropped."""

    def __init__(self, path: str, logdir: str | None = None):
        self.path = path
        self._file = open(path, "a") if distributed.is_main() else None
        self.events = EventWriter(os.path.dirname(os.path.abspath(path)) if logdir is None else logdir)

    def log(self, step: int, metrics: Mapping[str, float], *, split: str = "train") -> None:
        values = {}
        for name, value in metrics.items():
            try:
                values[name] = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"{self.path}: metric {name!r} at step {step} is not a number: {value!r}") from None
        if self._file is None:
            return
        row = {"step": int(step), "split": split, "time": time.time(), **values}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.events.scalars({f"{split}/{name}": value for name, value in values.items()}, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self.events.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------
# Results: one row per iteration
# ---------------------------------------------------------------------------------------


def write_results(path: str, rows: Sequence[Mapping]) -> None:
    """rows (JSON-able dicts, one per iteration) -> a JSON list at `path`, atomically."""
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"{path}: results row {i} is a {type(row).__name__}, not a dict")
    files.write_json(path, [dict(row) for row in rows])


def _columns(rows: Sequence[Mapping]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def format_table(rows: Sequence[Mapping], digits: int = 4) -> str:
    """A Markdown table of the rows (columns in order of first appearance; blank where missing)."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.{digits}g}"
        return "" if value is None else str(value)

    columns = _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_results(rows: Sequence[Mapping], png_path: str, *, title: str = "") -> list[str]:
    """Every column ending in "_accuracy" against row["iteration"], one line each (a missing or
    non-finite value leaves a gap). Returns the plotted columns."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for i, row in enumerate(rows):
        if "iteration" not in row:
            raise ValueError(f"{png_path}: results row {i} has no 'iteration' field")
    keys = [key for key in _columns(rows) if key.endswith("_accuracy")]
    if not keys:
        raise ValueError(f"{png_path}: no '*_accuracy' column in the results rows")
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = [row["iteration"] for row in rows]
    for key in keys:
        y = [float(row[key]) if row.get(key) is not None else math.nan for row in rows]
        ax.plot(x, y, marker="o", label=key.removesuffix("_accuracy"))
    ax.set_xlabel("iteration")
    ax.set_ylabel("accuracy")
    ax.set_xticks(sorted(set(x)))
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with files.atomic_write(png_path, "wb") as f:
        fig.savefig(f, format="png")
    return keys


def plot_curves(rows: Sequence[Mapping], png_path: str, columns: Sequence[tuple[str, str | None]], *,
                title: str = "") -> list[str]:
    """One panel per (column, spread column or None) against row["step"]: the column's values as a line, and with
    a spread column a band of value +- spread. Columns no row has are left out; a missing or non-finite value
    leaves a gap. Returns the plotted columns."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for i, row in enumerate(rows):
        if "step" not in row:
            raise ValueError(f"{png_path}: row {i} has no 'step' field")
    present = set(_columns(rows))
    panels = [(c, s) for c, s in columns if c in present]
    if not panels:
        raise ValueError(f"{png_path}: none of the columns {[c for c, _ in columns]} is in the rows")
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig = Figure(figsize=(4 * cols, 3 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    x = [row["step"] for row in rows]
    value = lambda row, key: float(row[key]) if row.get(key) is not None else math.nan  # noqa: E731
    for k, (column, spread) in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, k + 1)
        y = [value(row, column) for row in rows]
        ax.plot(x, y, lw=1.2)
        if spread and spread in present:
            s = [value(row, spread) for row in rows]
            ax.fill_between(x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)], alpha=0.25,
                            label=f"+- {spread}")
            ax.legend(fontsize=7)
        ax.set_title(column, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with files.atomic_write(png_path, "wb") as f:
        fig.savefig(f, format="png")
    return [c for c, _ in panels]
