"""rpo.report: event files read back by TensorBoard's own loader and accumulator (a test-only
dependency), crc32c against its published check value and TensorBoard's implementation, the
JSONL log, results.json, the Markdown table, the PNG plot and the progress bar."""

from __future__ import annotations

import io
import json
import math
import os
import re

import matplotlib.image
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as tb_crc

from rpo import report


def _scalars(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_crc32c_matches_the_check_value_and_tensorboard():
    assert report.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720 family)
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 64, 1000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert report.crc32c(data) == tb_crc.crc32c(data)
        assert report.masked_crc32c(data) == tb_crc.masked_crc32c(data)


def test_event_file_reads_back_in_tensorboard(tmp_path):
    values = {"loss": [(0, 2.5), (10, 0.1), (20, -3.75e-8)], "big": [(2**40, 1e30), (-3, 1e40)]}
    with report.EventWriter(str(tmp_path)) as writer:
        for step, value in values["loss"]:
            writer.scalar("loss", value, step)
        writer.scalars({"big": values["big"][0][1], "acc/greedy": 0.5}, values["big"][0][0])
        writer.scalar("big", values["big"][1][1], values["big"][1][0])  # out of order: kept under brain.Event:2
    name = os.path.basename(writer.path)
    assert re.fullmatch(rf"events\.out\.tfevents\.\d{{10}}\.[^.]+.*\.{os.getpid()}", name), name
    got = _scalars(tmp_path)
    assert set(got) == {"loss", "big", "acc/greedy"}
    for tag in ("loss", "big"):
        assert [s for s, _ in got[tag]] == [s for s, _ in values[tag]]
        with np.errstate(over="ignore"):  # 1e40 is past float32's range: inf
            assert [v for _, v in got[tag]] == [float(np.float32(v)) for _, v in values[tag]]
    assert got["acc/greedy"] == [(2**40, 0.5)] and math.isinf(got["big"][1][1])

    events = [event_pb2.Event.FromString(r) for r in RawEventFileLoader(writer.path).Load()]
    assert events[0].file_version == "brain.Event:2" and not events[0].HasField("summary")
    assert len(events) == 1 + 3 + 1 + 1 and [len(e.summary.value) for e in events[1:]] == [1, 1, 1, 2, 1]
    assert all(abs(e.wall_time - events[0].wall_time) < 60 for e in events)


def test_two_writers_never_share_a_file(tmp_path):
    a, b = report.EventWriter(str(tmp_path)), report.EventWriter(str(tmp_path))
    a.scalar("x", 1.0, 1)
    b.scalar("x", 2.0, 2)
    a.close()
    b.close()
    assert a.path != b.path and len(os.listdir(tmp_path)) == 2
    assert sorted(_scalars(tmp_path)["x"]) == [(1, 1.0), (2, 2.0)]


def test_metrics_log_writes_jsonl_and_events(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with report.MetricsLog(str(path)) as log:
        log.log(1, {"loss": 0.75, "pairs": np.int64(12)})
        log.log(2, {"loss": np.float32(0.5)}, split="eval")
        assert len(path.read_text().splitlines()) == 2  # flushed per line
        with pytest.raises(TypeError, match="metric 'note' at step 3"):
            log.log(3, {"note": "hi"})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "eval")]
    assert rows[0]["loss"] == 0.75 and rows[0]["pairs"] == 12.0 and rows[1]["loss"] == 0.5 and "time" in rows[0]
    assert _scalars(tmp_path) == {"train/loss": [(1, 0.75)], "train/pairs": [(1, 12.0)], "eval/loss": [(2, 0.5)]}


ROWS = [
    {"iteration": 0, "greedy_accuracy": 0.556, "maj_accuracy": 0.70, "pairs": 0},
    {"iteration": 1, "greedy_accuracy": 0.731, "maj_accuracy": 0.80, "pairs": 51234},
    {"iteration": 2, "greedy_accuracy": 0.780, "pairs": 48000},
]


def test_results_json_and_table(tmp_path):
    path = str(tmp_path / "results.json")
    report.write_results(path, ROWS)
    with open(path) as f:
        assert json.load(f) == ROWS
    assert os.listdir(tmp_path) == ["results.json"]
    with pytest.raises(TypeError, match="results row 1"):
        report.write_results(path, [ROWS[0], 3])
    lines = report.format_table(ROWS).splitlines()
    assert lines[0] == "| iteration | greedy_accuracy | maj_accuracy | pairs |"
    assert lines[1] == "|---|---|---|---|" and lines[3] == "| 1 | 0.731 | 0.8 | 51234 |"
    assert lines[4] == "| 2 | 0.78 |  | 48000 |"


def test_plot_results_writes_a_png(tmp_path):
    path = str(tmp_path / "accuracy.png")
    assert report.plot_results(ROWS, path, title="gsm8k") == ["greedy_accuracy", "maj_accuracy"]
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (400, 600) and image.shape[2] in (3, 4)
    assert image[..., :3].std() > 0.05  # lines and text, not a blank canvas
    with pytest.raises(ValueError, match="row 1 has no 'iteration'"):
        report.plot_results([ROWS[0], {"greedy_accuracy": 0.5}], path)
    with pytest.raises(ValueError, match="no '\\*_accuracy' column"):
        report.plot_results([{"iteration": 0, "loss": 1.0}], path)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_writes_desc_and_counts():
    out = io.StringIO()
    with report.progress(desc="sampling", total=10, unit="prompt", file=out) as bar:
        for _ in range(10):
            bar.update(1)
    assert bar.mininterval == 30.0
    assert "sampling" in out.getvalue() and "10/10" in out.getvalue() and "prompt" in out.getvalue()
    assert list(report.progress(range(3), desc="x", file=io.StringIO())) == [0, 1, 2]
    tty = report.progress(desc="y", total=2, file=_Terminal())
    assert tty.mininterval == 0.5
    tty.close()
