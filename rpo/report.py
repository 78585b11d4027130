"""What a researcher reads: progress bars, metrics (JSONL + TensorBoard), the results table and plot.

  progress(...)     a tqdm bar on stderr, redrawn at most every 0.5 s on a terminal and every
                    30 s otherwise, so a log file gets a line per 30 s, not one per step.
  MetricsLog        one JSON object per line in a JSONL file (flushed per line), the same
                    scalars as TensorBoard events beside it (tensorboardX's SummaryWriter: no
                    TensorFlow needed; a file per writer, flushed per logged row).
  write_results     results.json: a JSON list of rows, one per iteration, written atomically.
  format_table      the same rows as a Markdown table.
  plot_results      a PNG of every *_accuracy column against the iteration (matplotlib Agg,
                    imported on first use).
  plot_curves       a PNG of per-step training metrics (e.g. GRPO's reward, zero-advantage fraction,
                    response length, clip fraction, KL, entropy), one panel each, a spread as a band.
  log_to_stderr     rpo's log messages (absl logging) on stderr, one line each: "[rpo.irpo 12:34:56] ...".
On several processes (rpo.distributed) only process 0 shows progress bars and writes logs and
event files; elsewhere they are silent no-ops, so callers need not branch. results.json and the
plot go through rpo.files (written by process 0, called by every process).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
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


class MetricsLog:
    """Rows {"step", "split", "time", **metrics} appended to a JSONL file and flushed per line
    (the format of rpo.train's metrics.jsonl), and the metrics as TensorBoard scalars tagged
    "<split>/<name>" in `logdir` (default: the JSONL file's directory). Process 0 only: elsewhere
    the metrics are checked and dropped."""

    _writers = itertools.count()  # one event file per writer, even two in the same second and process

    def __init__(self, path: str, logdir: str | None = None):
        self.path = path
        self._file = open(path, "a") if distributed.is_main() else None
        self.events = None
        if self._file is not None:
            from tensorboardX import SummaryWriter  # imported on first use: protobuf is slow to import

            self.events = SummaryWriter(os.path.dirname(os.path.abspath(path)) if logdir is None else logdir,
                                        filename_suffix=f".{os.getpid()}.{next(self._writers)}")

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
        for name, value in values.items():
            self.events.add_scalar(f"{split}/{name}", value, int(step), walltime=row["time"])
        self.events.flush()

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


# ---------------------------------------------------------------------------------------
# Log messages
# ---------------------------------------------------------------------------------------

_RPO_DIR = os.path.dirname(os.path.abspath(__file__))


def _rpo_module(record: logging.LogRecord) -> str | None:
    """The dotted name of the rpo module that logged the record (absl logs every message under one logger, "absl",
    with the caller's file as its pathname), or None for another library's."""
    path = os.path.abspath(record.pathname)
    if not path.startswith(_RPO_DIR + os.sep):
        return None
    return "rpo." + os.path.splitext(os.path.relpath(path, _RPO_DIR))[0].replace(os.sep, ".")


class _LineFormatter(logging.Formatter):
    """"[rpo.irpo 12:34:56] message" ("[<module> 12:34:56 WARNING] ..." above INFO, or from another library)."""

    def format(self, record: logging.LogRecord) -> str:
        where = _rpo_module(record) or (record.module if record.name == "absl" else record.name)
        level = "" if record.levelno == logging.INFO else f" {record.levelname}"
        text = f"[{where} {time.strftime('%H:%M:%S', time.localtime(record.created))}{level}] {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment (pytest's capsys swaps it), not the one of its creation."""

    def __init__(self):
        super().__init__()
        self.setFormatter(_LineFormatter())
        self.addFilter(lambda r: r.levelno >= logging.WARNING or _rpo_module(r) is not None)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def log_to_stderr() -> None:
    """Shows absl logging, which rpo logs with, on stderr: rpo's messages from INFO up, other libraries' (orbax, jax)
    from WARNING up (their INFO is chatter), one line each (_LineFormatter). It takes the place of absl's own
    handler, which absl.app.run puts on the root logger: that one writes to the stderr of its creation once flags
    are parsed, and warns "Logging before flag parsing" first when they are not (a test, a script without app.run);
    and of a plain stderr handler (logging.basicConfig's), which would print every line twice. rpo.main's jobs call
    it; idempotent."""
    from absl import logging as absl_logging

    root = logging.getLogger()
    for h in list(root.handlers):  # absl's, and logging.basicConfig's (absl.logging.info adds it when there is none)
        if h is absl_logging.get_absl_handler() or (type(h) is logging.StreamHandler
                                                      and h.stream in (sys.stderr, sys.__stderr__)):
            root.removeHandler(h)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        root.addHandler(_StderrHandler())
    absl_logging.set_verbosity(absl_logging.INFO)
