"""rpo.report: metrics read back by TensorBoard's own accumulator (a test-only dependency), the JSONL log,
results.json, the Markdown table, the PNG plot and the progress bar."""

from __future__ import annotations

import io
import json
import math
import os

import matplotlib.image
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rpo import report


def _scalars(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_event_values_read_back_in_tensorboard(tmp_path):
    values = {"loss": [(0, 2.5), (10, 0.1), (20, -3.75e-8)], "big": [(2**40, 1e30), (-3, 1e40)]}
    with report.MetricsLog(str(tmp_path / "m.jsonl")) as log:
        for step, value in values["loss"]:
            log.log(step, {"loss": value})
        log.log(values["big"][0][0], {"big": values["big"][0][1], "greedy": 0.5}, split="eval")
        log.log(values["big"][1][0], {"big": values["big"][1][1]}, split="eval")  # out of order: kept
    got = _scalars(tmp_path)
    assert set(got) == {"train/loss", "eval/big", "eval/greedy"}
    for tag, key in (("train/loss", "loss"), ("eval/big", "big")):
        assert [s for s, _ in got[tag]] == [s for s, _ in values[key]]
        with np.errstate(over="ignore"):  # 1e40 is past float32's range: inf
            assert [v for _, v in got[tag]] == [float(np.float32(v)) for _, v in values[key]]
    assert got["eval/greedy"] == [(2**40, 0.5)] and math.isinf(got["eval/big"][1][1])


def test_two_logs_in_one_directory_never_share_an_event_file(tmp_path):
    a, b = report.MetricsLog(str(tmp_path / "a.jsonl")), report.MetricsLog(str(tmp_path / "b.jsonl"))
    a.log(1, {"x": 1.0})
    b.log(2, {"x": 2.0})
    a.close()
    b.close()
    events = [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents.")]
    assert len(events) == 2
    assert sorted(_scalars(tmp_path)["train/x"]) == [(1, 1.0), (2, 2.0)]


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
