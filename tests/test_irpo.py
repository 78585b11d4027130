"""The Iterative RPO loop end to end on the quick variant of the embedded default: artifacts,
results, export, baselines, bad input, and kill-and-resume (killed at several moments, the
rerun finishes with exactly the results of an uninterrupted run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

# Its end-to-end fixture is costly: all of its tests go to one xdist worker (launch.sh: --dist loadgroup), and the
# fixture is session-scoped, so that worker builds it once even when other modules' tests run between these.
pytestmark = pytest.mark.xdist_group("irpo")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "arith_tiny.py")


def _config(arg="quick"):
    from ml_collections import config_flags

    return config_flags.config_flags._LoadConfigModule("arith_tiny", CONFIG).get_config(arg)


def _cmd(workdir, variant="quick", *overrides):
    return [sys.executable, "-m", "rpo.main", f"--config={CONFIG}:{variant}", f"--workdir={workdir}", *overrides]


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """An uninterrupted quick run through the README's entry point."""
    workdir = tmp_path_factory.mktemp("irpo") / "run"
    res = subprocess.run(_cmd(workdir), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    return workdir, res.stderr


def test_run_writes_every_artifact_and_a_readable_result(finished):
    workdir, stderr = finished
    rows = json.loads((workdir / "results.json").read_text())
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for r in rows:
        for key in ("greedy_accuracy", "maj_accuracy", "pass_at_4", "sample_accuracy"):
            assert 0.0 <= r[key] <= 1.0
        assert r["test_prompts"] == 16
    for r in rows[1:]:  # every one of the 32 training prompts (40 less 8 held out) made pairs or was dropped
        assert r["pairs"] > 0 and r["prompts_paired"] + r["prompts_dropped"] == 32
    # train_steps counts the steps behind M_t: the warm start's 60, then each iteration's selected step.
    assert [r["train_steps"] for r in rows] == [60, 60 + rows[1]["selected_step"],
                                                60 + rows[1]["selected_step"] + rows[2]["selected_step"]]
    assert rows[2]["greedy_accuracy"] > 0 and rows[1]["train_sample_accuracy"] > 0  # the model learned something
    assert "| iteration | greedy_accuracy |" in stderr  # the table printed at the end
    # The plot is a real PNG.
    png = (workdir / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # Metrics as JSONL and as TensorBoard events, readable by TensorBoard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(workdir))
    acc.Reload()
    greedy = acc.Scalars("iteration/greedy_accuracy")
    assert [e.step for e in greedy] == [0, 1, 2]
    np.testing.assert_allclose([e.value for e in greedy], [r["greedy_accuracy"] for r in rows], rtol=1e-6)
    phase = EventAccumulator(str(workdir / "iter1" / "train"))  # each training phase logs its own steps
    phase.Reload()
    assert [e.step for e in phase.Scalars("train/loss")] == [2, 4]
    logged = [json.loads(line) for line in open(workdir / "iter1" / "train" / "metrics.jsonl")]
    np.testing.assert_allclose([e.value for e in phase.Scalars("train/loss")], [r["loss"] for r in logged], rtol=1e-6)
    # Samples: N per prompt, scored; pairs carry reference log-probs; eval has one greedy row per prompt.
    samples = [json.loads(line) for p in sorted((workdir / "iter1" / "samples").glob("part-*.jsonl"))
               for line in open(p)]
    assert len(samples) == 32 * 4 and {"text", "answer", "correct", "completion_ids"} <= set(samples[0])
    pairs = [json.loads(line) for line in open(workdir / "iter1" / "pairs.jsonl")]
    assert len(pairs) == rows[1]["pairs"]
    assert all(np.isfinite(p["ref_chosen_logp"]) and np.isfinite(p["ref_rejected_logp"]) for p in pairs)
    # The gold solution is pair 0's winner for every paired prompt (irpo.add_gold).
    train = [json.loads(line) for line in open(workdir / "data" / "train.jsonl")]
    gold = {r["uid"]: r["target_ids"] for r in train}
    assert all(p["chosen_ids"] == gold[p["uid"]] for p in pairs if p["pair_index"] == 0)


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_each_iteration_keeps_the_export_best_on_held_out_training_problems(finished):
    """select.every=2 over 4 steps: the exports of steps 2 and 4 are scored (greedy) on the 8 held-out training
    problems, which no stage trains on; M_t is the best of them (the earliest of a tie), and M_{t+1} starts from it."""
    workdir, _ = finished
    rows = json.loads((workdir / "results.json").read_text())
    train = {r["uid"] for r in _jsonl(workdir / "data" / "train.jsonl")}
    heldout = _jsonl(workdir / "data" / "heldout.jsonl")
    assert len(heldout) == 8 and len(train) == 32 and not train & {r["uid"] for r in heldout}
    for t in (1, 2):
        it = workdir / f"iter{t}"
        choice = json.loads((it / "select.json").read_text())
        scored = {}
        for step in (2, 4):
            greedy = [g for p in sorted((it / "select" / f"step-{step:06d}").glob("part-*.jsonl")) for g in _jsonl(p)]
            assert [g["uid"] for g in greedy] == [r["uid"] for r in heldout]
            scored[str(step)] = float(np.mean([g["correct"] for g in greedy]))
        assert choice["heldout_accuracy"] == pytest.approx(scored)
        best = max(scored.values())
        assert choice["chosen_step"] == min(int(k) for k, v in scored.items() if v == best)
        assert choice["path"] == str(it / "train" / "exports" / f"step-{choice['chosen_step']:06d}")
        assert rows[t]["selected_step"] == choice["chosen_step"] and rows[t]["heldout_accuracy"] == pytest.approx(best)
        trained_on = {p["uid"] for p in _jsonl(it / "pairs.jsonl")}
        assert trained_on and trained_on <= train
    # Iteration 2 sampled from iteration 1's choice and took its reference log-probs from it.
    import jax

    import rpo.models as M

    chosen = json.loads((workdir / "iter1" / "select.json").read_text())["path"]
    config, params = M.load_pretrained(chosen, dtype="float32")
    pair = _jsonl(workdir / "iter2" / "pairs.jsonl")[0]
    ids = np.asarray([pair["prompt_ids"] + pair["chosen_ids"]], np.int32)
    logp = jax.nn.log_softmax(M.forward(config, params, ids)[0, :-1])
    n = len(pair["prompt_ids"])
    ref = float(sum(logp[i - 1, ids[0, i]] for i in range(n, ids.shape[1])))
    assert ref == pytest.approx(pair["ref_chosen_logp"], rel=1e-4, abs=1e-4)


def test_winner_precision_is_the_share_of_winners_whose_every_step_is_right(finished):
    workdir, _ = finished
    rows = json.loads((workdir / "results.json").read_text())
    for t in (1, 2):
        samples = [s for p in sorted((workdir / f"iter{t}" / "samples").glob("part-*.jsonl")) for s in _jsonl(p)]
        winners = [s for s in samples if s["correct"] and s["finish_reason"] != "length"]
        from rpo.data.synthetic import check_steps

        train = {r["uid"]: r for r in _jsonl(workdir / "data" / "train.jsonl")}
        assert all(s["steps_correct"] == check_steps(s["text"], train[s["uid"]]["question"]) for s in samples)
        if winners:
            assert rows[t]["winner_precision"] == pytest.approx(np.mean([s["steps_correct"] for s in winners]))


def test_every_iteration_exports_to_transformers(finished):
    """M_t is an HF directory with its tokenizer: transformers loads it and agrees with our logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rpo.models as M

    workdir, _ = finished
    path = str(workdir / "iter2" / "train" / "final")
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.encode("Q: Mia has 3 pens. Mia gets 4. How many pens?\nA: ", add_special_tokens=False)
    assert tok.decode(ids).startswith("Q: Mia has 3 pens.")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    config, params = M.load_pretrained(path, dtype="float32")
    np.testing.assert_allclose(np.asarray(M.forward(config, params, np.asarray([ids], np.int32))), ref, atol=1e-4)


STAGE_OUTPUTS = ("train.jsonl", "heldout.jsonl", "test.jsonl", "sft.jsonl", "pairs.jsonl", "eval.json", "done.json",
                 "select.json")


def _wait_for(proc, predicate, timeout=900):  # a guard against a hang, not a speed check
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, "the run ended before the moment to kill it"
        assert time.time() - t0 < timeout, "timed out waiting for the moment to kill the run"
        time.sleep(0.05)


def test_killed_at_any_stage_resumes_and_loses_nothing(finished, tmp_path):
    """SIGKILL mid-sampling (one chunk written), then mid-training (a checkpoint written): each
    rerun of the same command goes on from there, finished stages are not redone, and the
    final results equal the uninterrupted run's exactly."""
    reference, _ = finished
    workdir = tmp_path / "run"
    moments = [
        lambda: (workdir / "iter1" / "samples" / "part-00000.jsonl").exists(),
        lambda: (workdir / "iter1" / "train" / "checkpoints" / "2").exists(),
        lambda: (workdir / "iter1" / "select" / "step-000002" / "part-00000.jsonl").exists(),
    ]
    kept = {}
    for moment in moments:
        proc = subprocess.Popen(_cmd(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
        try:
            _wait_for(proc, moment)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        for p in workdir.rglob("*"):  # the outputs of stages finished before a kill are never rewritten
            if p.is_file() and (p.name.startswith("part-") or p.name in STAGE_OUTPUTS):
                kept.setdefault(p, p.stat().st_mtime_ns)
    res = subprocess.run(_cmd(workdir), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    # The last kill came during iteration 1's selection: its sampling and training are not redone.
    assert "iter1 sample" not in res.stderr and "iter1 train" not in res.stderr
    for p, mtime in kept.items():
        assert p.stat().st_mtime_ns == mtime, f"{p} was rewritten after the kill"
    ours = json.loads((workdir / "results.json").read_text())
    theirs = json.loads((reference / "results.json").read_text())
    assert ours == theirs


def test_refuses_to_resume_a_workdir_with_another_config(finished):
    workdir, _ = finished
    res = subprocess.run(_cmd(workdir, "quick", "--config.irpo.pairs_per_prompt=3"), capture_output=True,
                         text=True, timeout=900, cwd=ROOT)
    assert res.returncode != 0 and "field irpo.pairs_per_prompt differs" in res.stderr


@pytest.mark.parametrize("baseline", ["sft_gold", "star"])
def test_sft_baselines_train_on_gold_or_own_correct_samples(tmp_path, baseline):
    from rpo import irpo

    cfg = _config(f"quick,baseline={baseline}")
    cfg.irpo.iterations = 1
    rows = irpo.run(cfg, str(tmp_path))
    assert [r["iteration"] for r in rows] == [0, 1]
    sft = [json.loads(line) for line in open(tmp_path / "iter1" / "sft.jsonl")]
    train = {r["uid"]: r for r in (json.loads(line) for line in open(tmp_path / "data" / "train.jsonl"))}
    if baseline == "sft_gold":
        assert not (tmp_path / "iter1" / "samples").exists()
        assert [r["response_ids"] for r in sft] == [r["target_ids"] for r in train.values()]
    else:
        samples = {(s["uid"], tuple(s["completion_ids"])): s for p in (tmp_path / "iter1" / "samples").glob("*.jsonl")
                   for s in map(json.loads, open(p))}
        won = [samples[(r["uid"], tuple(r["response_ids"]))] for r in sft]
        assert won and all(s["correct"] and s["finish_reason"] != "length" for s in won)
        assert rows[1]["star_rows"] == len(sft)


def test_bad_config_and_input_are_named(tmp_path):
    from rpo import irpo

    cfg = _config()
    cfg.irpo.method = "ppo"
    with pytest.raises(ValueError, match="irpo.method"):
        irpo.run(cfg, str(tmp_path / "a"))
    cfg = _config()
    cfg.irpo.temperatures = (1.0,)
    with pytest.raises(ValueError, match="irpo.temperatures"):
        irpo.run(cfg, str(tmp_path / "b"))
    cfg = _config()
    del cfg.irpo["samples_per_prompt"]  # a config missing a field
    with pytest.raises(AttributeError, match="samples_per_prompt"):
        irpo.run(cfg, str(tmp_path / "missing"))
    cfg = _config()
    cfg.model.random.vocab_size = 50
    with pytest.raises(ValueError, match="model.random.vocab_size"):
        irpo.run(cfg, str(tmp_path / "c"))
    # A prompt too long for the context: an error naming the row, or a counted skip.
    cfg = _config()
    cfg.seq_len = 300
    with pytest.raises(ValueError, match=r"seq_len=300: longer than the model's context \(256, model.random"):
        irpo.run(cfg, str(tmp_path / "d"))
    cfg.seq_len = 30  # quick prompts are 11 tokens, plus 32 new tokens
    with pytest.raises(ValueError, match=r"arith/train/\d+: the prompt has 11 tokens; with 32 new tokens"):
        irpo.run(cfg, str(tmp_path / "d"))
    cfg.data.long_prompts = "skip"
    cfg.eval.max_new_tokens = cfg.irpo.max_new_tokens = 4  # every prompt fits; no 38-token gold row does
    with pytest.raises(ValueError, match="seq_len=30: no train prompt has a gold response that fits"):
        irpo.run(cfg, str(tmp_path / "d"))  # the workdir was not claimed by the failed runs above
    # Values up to 20 in the model's own style: prompts of 11-13 tokens, gold responses of 23-27. In 37 tokens the
    # 13-token prompts leave no room for 25 new tokens (skipped, counted); most gold rows fit with their prompt
    # but are longer than 20 sampled tokens (a warning, counted).
    cfg.task.update(max_value=20, style="equations")
    cfg.seq_len, cfg.irpo.iterations, cfg.eval.max_new_tokens, cfg.irpo.max_new_tokens = 37, 0, 25, 20
    irpo.run(cfg, str(tmp_path / "f"))
    stats = json.loads((tmp_path / "f" / "data" / "train_stats.json").read_text())
    kept = sum(1 for _ in open(tmp_path / "f" / "data" / "train.jsonl"))
    assert stats["gold_longer_than_max_new_tokens"] > 0 and stats["gold_too_long_for_seq_len"] > 0
    assert stats["skipped_long_prompts"] > 0 and stats["heldout_rows"] == 8
    assert stats["rows"] == kept == 40 - 8 - stats["skipped_long_prompts"]


def test_runs_on_gsm8k_files_from_an_hf_checkpoint(tmp_path):
    """The real-task config (configs/irpo.py, runlocal) on the GSM8K fixture files, from a tiny
    random HF checkpoint carrying a tokenizer: the TFDS dataset is built from the files, the
    prompts are the paper's, gold solutions (calculator notes removed) are the winners."""
    import jax

    import rpo.models as M
    from ml_collections import config_flags
    from rpo import irpo
    from rpo.data.synthetic import char_tokenizer
    from rpo.models.config import ModelConfig
    from rpo.models.decoder import init_params

    model_dir = str(tmp_path / "m0")
    config = ModelConfig(model_type="llama", vocab_size=104, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=1024, eos_token_ids=(1,),
                         pad_token_id=0)
    M.save_pretrained(config, init_params(config, jax.random.PRNGKey(0)), model_dir)
    char_tokenizer().save_pretrained(model_dir)
    data = os.path.join(ROOT, "tests", "fixtures", "data", "gsm8k")
    module = config_flags.config_flags._LoadConfigModule("irpo_cfg", os.path.join(ROOT, "configs", "irpo.py"))
    cfg = module.get_config(f"task=gsm8k,runlocal,model={model_dir},data={data}")
    cfg.task.tfds_dir = str(tmp_path / "tfds")
    rows = irpo.run(cfg, str(tmp_path / "run"))
    assert [r["iteration"] for r in rows] == [0, 1] and rows[1]["pairs"] > 0
    train = [json.loads(line) for line in open(tmp_path / "run" / "data" / "train.jsonl")]
    assert len(train) == 3 and all(r["prompt"].endswith("Solution:\n") for r in train)
    assert all("<<" not in r["target"] and r["target"].endswith(f"Final answer: {r['answer']}") for r in train)
    pairs = [json.loads(line) for line in open(tmp_path / "run" / "iter1" / "pairs.jsonl")]
    by_uid = {r["uid"]: r for r in train}
    # A random model is always wrong: every pair is (gold, a sample of its own), readable as text.
    assert all(p["chosen_text"] == by_uid[p["uid"]]["target"] for p in pairs)
    assert all(p["rejected_ids"] != p["chosen_ids"] and "rejected_text" in p for p in pairs)
