"""The README's main job, end to end, as a user runs it (in a subprocess)."""

import json
import subprocess
import sys


def test_main_sample_config_writes_samples(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "rpo.main", "--config=configs/sample_tiny.py", f"--workdir={tmp_path}",
         "--config.sample.max_new_tokens=8",
         "--config.sample.temperature=0.7"],
        capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert len(rows) == 3 * 2  # 3 prompts x n=2
    for row in rows:
        assert 1 <= len(row["completion_ids"]) <= 8
        assert len(row["logprobs"]) == len(row["completion_ids"])
        assert all(lp <= 0 for lp in row["logprobs"])
    assert json.loads((tmp_path / "config.json").read_text())["sample"]["temperature"] == 0.7


def test_main_rejects_unknown_mode(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "rpo.main", "--config=configs/sample_tiny.py", f"--workdir={tmp_path}",
         "--config.mode=nope"],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode != 0 and "field mode='nope'" in res.stderr


def test_main_runs_a_training_phase(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "rpo.main", f"--config=configs/train_tiny.py:make_data,steps=3,workdir={tmp_path}",
         "--config.eval_every=3", "--config.checkpoint_every=3"],
        capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in steps if r.get("split", "train") == "train"][-1] == 3
    assert (tmp_path / "final" / "config.json").exists()


def test_a_misspelled_override_is_one_line_naming_the_field_and_its_likely_spelling(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "rpo.main", "--config=configs/arith_tiny.py:quick", "--config.irpo.prompts_per_iteraton=3",
         f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=600,  # a hang guard only
    )
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "rpo.main: --config.irpo.prompts_per_iteraton: configs/arith_tiny.py:quick declares no field "
        "irpo.prompts_per_iteraton; did you mean irpo.prompts_per_iteration?"]
    assert not (tmp_path / "config.json").exists()  # nothing ran


def test_a_misplaced_override_points_to_where_the_field_lives():
    from rpo.main import check_overrides

    error = check_overrides(["rpo.main", "--config=configs/arith_tiny.py", "--config.irpo.bta=0.1"])
    assert error.endswith("declares no field irpo.bta; did you mean init.loss.beta or pretrain.phase.loss.beta or "
                          "train.loss.beta?")
    assert check_overrides(["rpo.main", "--config", "configs/arith_tiny.py", "--config.train.loss.beta=0.2"]) is None


def test_a_missing_model_directory_is_named_as_such(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "rpo.main", "--config=configs/irpo.py:model=/nonexistent", f"--workdir={tmp_path}"],
        capture_output=True, text=True, timeout=600,  # a hang guard only
    )
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "rpo.main: ConfigError: config field model.path: /nonexistent: no such directory (an HF model directory; "
        "nothing is downloaded from the Hub) (RPO_TRACEBACK=1 shows the traceback)"]
