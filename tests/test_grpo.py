"""GRPO as a method beside IRPO (rpo.grpo): the quick variant of configs/grpo_tiny.py end to end through
`python -m rpo.main` (artifacts, per-step metrics in metrics.jsonl and TensorBoard, the plots, and every logged
reward, advantage and length recomputed from the rollouts on disk), then, on a small random model with a reward of
our own, kill-and-resume and bad input (a group of one, a reward function that raises, all-zero advantages).
The loss and gradient themselves are checked against TRL in test_grpo_reference.py."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from rpo import grpo

# Its end-to-end fixture is costly: all of its tests go to one xdist worker (launch.sh: --dist loadgroup), and the
# fixture is session-scoped, so that worker builds it once even when other modules' tests run between these.
pytestmark = pytest.mark.xdist_group("grpo")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "grpo_tiny.py")
STEP_METRICS = ("reward_mean", "reward_std", "zero_adv_fraction", "response_length", "clip_fraction", "kl", "entropy",
                "loss", "grad_norm", "lr", "skipped")


def _config(arg="quick"):
    from ml_collections import config_flags

    return config_flags.config_flags._LoadConfigModule("grpo_tiny", CONFIG).get_config(arg)


def _jsonl(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def test_quick_run_end_to_end(tmp_path, capsys):
    """2 GRPO iterations of 4 steps (8 prompts x G = 4, mu = 2) from a warm-started M_0, run by rpo.main's grpo job:
    results rows with IRPO's evaluation and equal sampling budget, the step metrics in metrics.jsonl and TensorBoard,
    the plots, and the logged rewards, advantages, zero-advantage fractions and lengths as recomputed from the
    rollouts. (In-process, so that the tests below reuse its compilations: their model has the quick model's shape.)"""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rpo import main
    from rpo.data import get_task
    from rpo.data.synthetic import char_tokenizer

    workdir = tmp_path / "run"
    cfg = _config("quick,beta=0.04")  # DeepSeekMath's KL coefficient: the reference model's pass runs too
    cfg.grpo.mu = 2
    main.JOBS[cfg.mode](cfg, str(workdir))
    assert "| iteration | greedy_accuracy |" in capsys.readouterr().err
    rows = json.loads((workdir / "results.json").read_text())
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    # Equal sampling budget: an IRPO iteration of the quick default samples 4 completions of each of 32 prompts.
    assert [r["samples"] for r in rows] == [0, 128, 256]
    for r in rows:
        for key in ("greedy_accuracy", "maj_accuracy", "pass_at_4"):
            assert 0.0 <= r[key] <= 1.0
        assert r["test_prompts"] == 16
    for t in (1, 2):
        choice = json.loads((workdir / f"iter{t}" / "select.json").read_text())
        assert rows[t]["selected_step"] == choice["chosen_step"] in (2, 4)
    assert rows[2]["grpo_steps"] == rows[1]["selected_step"] + rows[2]["selected_step"]
    for name in ("accuracy.png", "grpo_curves.png"):
        png = (workdir / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    task = get_task(cfg.task)
    train = {r["uid"]: r for r in _jsonl(workdir / "data" / "train.jsonl")}
    tok = char_tokenizer()
    updated = 0
    for t in (1, 2):
        phase = workdir / f"iter{t}" / "train"
        logged = {r["step"]: r for r in _jsonl(phase / "metrics.jsonl")}
        assert sorted(logged) == [1, 2, 3, 4]
        for m in logged.values():
            for key in ("reward_mean", "reward_std", "zero_adv_fraction", "response_length", "skipped", "lr"):
                assert np.isfinite(m[key]), (t, key)
            if not m["skipped"]:
                updated += 1
                for key in STEP_METRICS:
                    assert np.isfinite(m[key]), (t, key)
                assert m["kl"] >= 0 and m["entropy"] > 0 and 0 <= m["clip_fraction"] <= 1
        acc = EventAccumulator(str(phase))
        acc.Reload()
        for key in ("reward_mean", "zero_adv_fraction", "response_length", "entropy"):
            events = acc.Scalars(f"train/{key}")
            assert [e.step for e in events] == sorted(logged)
            np.testing.assert_allclose([e.value for e in events], [logged[s][key] for s in sorted(logged)], rtol=1e-6)
        for step in (2, 4):  # rollouts_every = 2: recompute the step's numbers from its samples
            samples = _jsonl(phase / "rollouts" / f"step-{step:06d}.jsonl")
            assert len(samples) == 8 * 4
            texts = [s["text"] for s in samples]
            assert texts == tok.batch_decode([s["completion_ids"] for s in samples], skip_special_tokens=True)
            from rpo.data import Example

            examples = [Example(s["uid"], train[s["uid"]]["question"], train[s["uid"]]["answer"]) for s in samples]
            _, correct = task.score(texts, examples)
            rewards = [float(c and s["finish_reason"] != "length") for c, s in zip(correct, samples)]
            assert [s["reward"] for s in samples] == rewards
            r = np.asarray(rewards).reshape(8, 4)
            adv = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
            np.testing.assert_allclose([s["advantage"] for s in samples], adv.reshape(-1), rtol=1e-12)
            m = logged[step]
            assert m["reward_mean"] == pytest.approx(r.mean())
            assert m["zero_adv_fraction"] == pytest.approx(np.mean(r.min(1) == r.max(1)))
            assert m["response_length"] == pytest.approx(np.mean([len(s["completion_ids"]) for s in samples]))
            assert m["skipped"] == 0.0  # beta > 0: the KL term has a gradient even when every advantage is 0
    assert updated > 0  # some step had a group with different rewards and trained
    summary = rows[1]
    assert summary["train_reward_mean"] == pytest.approx(np.mean(
        [m["reward_mean"] for m in _jsonl(workdir / "iter1" / "train" / "metrics.jsonl")]))


# ---------------------------------------------------------------------------------------
# A small random model with a reward of our own: resume and bad input
# ---------------------------------------------------------------------------------------


def _has_seven(texts, rows, reasons):
    """A reward a random model earns now and then: the completion contains the character 7."""
    return [float("7" in t) for t in texts]


@pytest.fixture(scope="session")
def random_model(tmp_path_factory):
    """A random model of the quick config's shape (so that it shares the quick run's compilations)."""
    import jax

    import rpo.models as M
    from rpo.data.synthetic import char_tokenizer
    from rpo.models.config import ModelConfig
    from rpo.models.decoder import init_params

    path = str(tmp_path_factory.mktemp("grpo_model") / "m0")
    config = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in _config().model.random.items()})
    M.save_pretrained(config, init_params(config, jax.random.PRNGKey(3)), path)
    char_tokenizer().save_pretrained(path)
    return path


def _small(model_path, **grpo_fields):
    cfg = _config("quick,beta=0.04")  # the quick run's loss fields: its compilations serve
    cfg.model.path = model_path
    cfg.init.num_steps = 0
    cfg.grpo.update(iterations=1, rollouts_every=0, mu=2, **grpo_fields)  # mu as the quick run's: one compile
    cfg.select.every = 0  # the last step is M_1: no exports to score
    cfg.grpo.train.row_buckets = 1  # one batch size: one compilation
    return cfg


def _final_params(workdir):
    from safetensors.numpy import load_file

    return load_file(str(workdir / "iter1" / "train" / "final" / "model.safetensors"))


def test_killed_phase_resumes_from_its_checkpoint_to_the_same_result(random_model, tmp_path):
    """A crash after step 3 (checkpoint at 2) and a rerun: the result equals an uninterrupted run's exactly (the
    rollouts of the redone step are a pure function of the restored state, the seed and the step)."""
    cfg = _small(random_model)
    whole = grpo.run(cfg, str(tmp_path / "whole"), reward_fn=_has_seven)
    assert whole[1]["skipped_steps"] < 4 and whole[1]["train_reward_mean"] > 0  # real updates happened

    class Crash(RuntimeError):
        pass

    def crash(t, step, metrics):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        grpo.run(cfg, str(tmp_path / "killed"), reward_fn=_has_seven, on_step=crash)
    assert (tmp_path / "killed" / "iter1" / "train" / "checkpoints" / "2").is_dir()
    assert not (tmp_path / "killed" / "iter1" / "train" / "done.json").exists()
    resumed = grpo.run(cfg, str(tmp_path / "killed"), reward_fn=_has_seven)
    assert resumed == whole
    a, b = _final_params(tmp_path / "whole"), _final_params(tmp_path / "killed")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    before = {k: v for k, v in _final_params(tmp_path / "whole").items()}
    from safetensors.numpy import load_file

    m0 = load_file(os.path.join(random_model, "model.safetensors"))
    assert any(not np.array_equal(m0[k], before[k]) for k in m0)  # training moved the weights


def test_bad_input_is_an_error_or_a_counted_skip(random_model, tmp_path):
    """A group of one: a config error. A reward function raising: an error naming the step, prompt and sample, or
    (on_reward_error='skip') its groups left out and counted. Rewards all equal (every advantage 0, beta 0): every
    update is skipped and counted, and the model is M_0 exactly."""
    cfg = _small(random_model, group_size=1)
    with pytest.raises(ValueError, match="grpo.group_size.*group of one"):
        grpo.check_config(cfg)
    cfg = _small(random_model)
    cfg.grpo.normalization = "mean"
    with pytest.raises(ValueError, match="grpo.normalization"):
        grpo.check_config(cfg)

    def flaky(texts, rows, reasons):
        if any(r["uid"] == bad_uid for r in rows):
            raise ZeroDivisionError("no reward for this one")
        return _has_seven(texts, rows, reasons)

    train = _jsonl_rows(cfg, tmp_path)
    bad_uid = train[0]["uid"]
    with pytest.raises(grpo.RewardError, match=rf"iteration 1 step \d: .*sample \d of prompt {re.escape(bad_uid)}: "
                                               r"ZeroDivisionError"):
        grpo.run(_small(random_model, steps_per_iteration=4), str(tmp_path / "raise"), reward_fn=flaky)

    cfg = _small(random_model, on_reward_error="skip", beta=0.0)
    grpo.run(cfg, str(tmp_path / "skip"), reward_fn=flaky)
    logged = _jsonl(tmp_path / "skip" / "iter1" / "train" / "metrics.jsonl")
    hit = [m for m in logged if m["skipped_groups"]]
    assert hit and all(m["reward_errors"] == 4 * m["skipped_groups"] for m in hit)  # G = 4 samples per group
    assert sum(m["skipped_groups"] for m in logged) == sum(m["reward_errors"] for m in logged) / 4

    cfg = _small(random_model, beta=0.0)
    rows = grpo.run(cfg, str(tmp_path / "flat"), reward_fn=lambda texts, rows, reasons: [1.0] * len(texts))
    logged = _jsonl(tmp_path / "flat" / "iter1" / "train" / "metrics.jsonl")
    assert [m["skipped"] for m in logged] == [1.0] * 4 and all(m["zero_adv_fraction"] == 1.0 for m in logged)
    assert rows[1]["skipped_steps"] == 4
    from safetensors.numpy import load_file

    m0 = load_file(os.path.join(random_model, "model.safetensors"))
    final = _final_params(tmp_path / "flat")
    assert all(np.array_equal(m0[k], final[k]) for k in m0)


def _jsonl_rows(cfg, tmp_path):
    """The training prompts of the quick task, as prepare_data writes them (uids in order)."""
    from rpo import stages
    from rpo.data import get_task

    task = get_task(cfg.task)
    data = stages.prepare_data(grpo._data_config(cfg), task, stages.task_tokenizer(cfg, task), str(tmp_path / "prep"),
                               stages.context_length(cfg))
    return data["train"]


def test_score_step_names_the_sample_and_rejects_bad_returns():
    rows = [{"uid": f"p{i}"} for i in range(3)]

    def raises_on_b(texts, rows, reasons):
        if "b" in texts:
            raise KeyError("b")
        return [1.0] * len(texts)

    with pytest.raises(grpo.RewardError, match=r"step 7: .*sample 1 of prompt p1: KeyError"):
        grpo.score_step(raises_on_b, ["a", "b", "c"], rows, ["eos"] * 3, on_error="error", where="step 7",
                        group_size=3)
    out = grpo.score_step(raises_on_b, ["a", "b", "c"], rows, ["eos"] * 3, on_error="skip", where="step 7")
    assert out[0] == 1.0 and np.isnan(out[1]) and out[2] == 1.0
    with pytest.raises(grpo.RewardError, match="non-finite"):
        grpo.score_step(lambda t, r, s: [float("nan")] * len(t), ["a"], rows[:1], ["eos"], on_error="error",
                        where="step 1")
    with pytest.raises(grpo.RewardError, match="on the batch but not on any one sample"):
        grpo.score_step(lambda t, r, s: [1.0] * (len(t) > 1 and 3 or 1), ["a", "b"], rows[:2], ["eos"] * 2,
                        on_error="skip", where="step 1")


def test_curves_plot_draws_the_columns_present(tmp_path):
    from rpo import report

    rows = [{"step": s, "reward_mean": 0.1 * s, "reward_std": 0.05, "kl": None if s == 2 else 0.01 * s}
            for s in (1, 2, 3)]
    drawn = report.plot_curves(rows, str(tmp_path / "c.png"), grpo.CURVES)
    assert drawn == ["reward_mean", "kl"]  # entropy, clip_fraction, ... are absent from these rows
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="none of the columns"):
        report.plot_curves([{"step": 1, "loss": 1.0}], str(tmp_path / "d.png"), grpo.CURVES)
    with pytest.raises(ValueError, match="row 0 has no 'step'"):
        report.plot_curves([{"reward_mean": 1.0}], str(tmp_path / "e.png"), grpo.CURVES)
