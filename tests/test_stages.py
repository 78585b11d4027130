"""rpo.stages: artifact(), the one resume mechanism of every stage, and check_same_run, which guards resumes."""

from __future__ import annotations

import json
import os

import pytest

from rpo import stages


def test_an_artifact_is_made_once_then_read_back(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return [{"a": 1, "ids": [1, 2]}, {"a": 2, "ids": []}]

    path = str(tmp_path / "iter1" / "rows.jsonl")  # its directory is made too
    made = stages.artifact(path, make)
    again = stages.artifact(path, make)
    assert calls == [1] and made == again == [{"a": 1, "ids": [1, 2]}, {"a": 2, "ids": []}]
    assert [json.loads(line) for line in open(path)] == made  # JSON lines, as rpo.files writes them

    stats = str(tmp_path / "stats.json")
    assert stages.artifact(stats, lambda: {"pairs": 3, "k": {"1": 0.5}}) == {"pairs": 3, "k": {"1": 0.5}}
    assert stages.artifact(stats, lambda: pytest.fail("made twice")) == json.load(open(stats))
    # read=False: a file the caller passes on by its path is not read back.
    assert stages.artifact(path, lambda: pytest.fail("made twice"), read=False) is None


def test_a_make_that_raises_leaves_nothing_and_the_next_call_makes_it(tmp_path):
    path = tmp_path / "pairs.jsonl"

    def rows():  # a generator consumed by the write would leave half a file if it were not atomic
        yield {"n": 0}
        raise RuntimeError("killed mid-stage")

    with pytest.raises(RuntimeError, match="killed mid-stage"):
        stages.artifact(str(path), lambda: rows())
    with pytest.raises(ValueError, match="no pairs"):
        stages.artifact(str(path), lambda: (_ for _ in ()).throw(ValueError("no pairs")))
    assert os.listdir(tmp_path) == []  # neither the file nor a temporary beside it
    assert stages.artifact(str(path), lambda: [{"n": 0}]) == [{"n": 0}]


def test_an_artifact_is_json_or_jsonl(tmp_path):
    with pytest.raises(ValueError, match="a .json or .jsonl file"):
        stages.artifact(str(tmp_path / "model.safetensors"), dict)


def test_a_run_recorded_before_a_field_was_declared_still_resumes(tmp_path):
    """check_same_run: a field the recorded config lacks equals one declared empty (off); any other value, or any
    other changed field, refuses the resume."""
    import ml_collections

    def cfg(**task):
        return ml_collections.ConfigDict(dict(task=dict(name="arith", **task), irpo=dict(temperatures=[1.0],
                                                                                         iterations=1)))

    stages.check_same_run(cfg(), str(tmp_path), record=True)  # recorded without task.train_file
    stages.check_same_run(cfg(train_file=""), str(tmp_path), record=False)
    with pytest.raises(ValueError, match="task.train_file"):
        stages.check_same_run(cfg(train_file="kept.jsonl"), str(tmp_path), record=False)
    with pytest.raises(ValueError, match="task.name"):
        stages.check_same_run(ml_collections.ConfigDict(dict(task=dict(name="gsm8k", train_file=""), irpo=dict(
            temperatures=[1.0], iterations=1))), str(tmp_path), record=False)


def test_sampling_streams_never_share_a_seed_and_an_unknown_stream_is_named():
    seeds = [stages.sampling_seed(s, "eval") for s in range(3)]  # ("rollout", 0) at seed 0 meets "eval": see its doc
    seeds += [stages.sampling_seed(s, "respond") for s in range(3)]
    seeds += [stages.sampling_seed(s, stream, t) for s in range(3) for stream in ("iteration", "rollout")
              for t in range(1, 50)]
    assert len(set(seeds)) == len(seeds)
    with pytest.raises(ValueError, match="'evaluation'.*eval"):
        stages.sampling_seed(0, "evaluation")


def test_an_evaluation_says_whether_it_was_computed_now(tmp_path):
    first = stages.evaluation(str(tmp_path), lambda: {"greedy_accuracy": 0.5})
    again = stages.evaluation(str(tmp_path), lambda: {"greedy_accuracy": 0.0})
    assert first == ({"greedy_accuracy": 0.5}, True) and again == ({"greedy_accuracy": 0.5}, False)
