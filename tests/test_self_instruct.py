"""CoT-Self-Instruct as a stage (rpo.self_instruct): seed pairing, config checks, and a tiny end-to-end run through
`python -m rpo.main` (a small model warm-started on the synthetic task, 16 seeds, 64 generations) that writes a
filtered dataset with counts, then runs IRPO on it; every kept row is re-checked against the solutions on disk."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from rpo import filters, stages
from rpo import self_instruct as si

# Its end-to-end fixture is costly: all of its tests go to one xdist worker (launch.sh: --dist loadgroup), and the
# fixture is session-scoped, so that worker builds it once even when other modules' tests run between these.
pytestmark = pytest.mark.xdist_group("self_instruct")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "self_instruct_tiny.py")


def _config(arg="quick"):
    from ml_collections import config_flags

    return config_flags.config_flags._LoadConfigModule("self_instruct_tiny", CONFIG).get_config(arg)


def _cmd(workdir, *overrides):
    return [sys.executable, "-m", "rpo.main", f"--config={CONFIG}:quick,irpo", f"--workdir={workdir}", *overrides]


def _jsonl(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def test_seed_pairs_are_two_distinct_seeds_of_one_category():
    seeds = [{"category": c} for c in "aaabcc"]  # b has one seed: never drawn
    pairs = si.seed_pairs(seeds, 500, np.random.default_rng(0))
    assert all(a != b and seeds[a]["category"] == seeds[b]["category"] for a, b in pairs)
    used = collections.Counter(i for pair in pairs for i in pair)
    assert 3 not in used and set(used) == {0, 1, 2, 4, 5}
    assert si.seed_pairs(seeds, 50, np.random.default_rng(1)) == si.seed_pairs(seeds, 50, np.random.default_rng(1))
    with pytest.raises(ValueError, match="no category has two seeds"):
        si.seed_pairs([{"category": "x"}, {"category": "y"}], 1, np.random.default_rng(0))


def test_demonstrations_parse_back():
    """The warm start's demonstrations are in the format rpo.filters parses (question and answer recovered)."""
    text = si.demo_response("verifiable", "cot", "Mia has 3 pens. Mia gets 4. How many pens?",
                            "3+4=7. Final answer: 7", "7")
    assert filters.parse_verifiable(text) == filters.Parsed("Mia has 3 pens. Mia gets 4. How many pens?", "7")
    assert text.endswith(si.END_MARKER[("verifiable", "cot")])
    text = si.demo_response("verifiable", "self_instruct", "Zoe has 2 eggs. How many eggs?", "", "2")
    assert filters.parse_verifiable(text, with_answer=False) == filters.Parsed("Zoe has 2 eggs. How many eggs?", None)
    assert text.endswith(si.END_MARKER[("verifiable", "self_instruct")])


def test_a_thinking_block_is_not_parsed():
    """Draft markers inside <think>...</think> (Qwen3's thinking mode) neither count twice nor stand in for the
    answer written after the block."""
    final = si.demo_response("verifiable", "cot", "Ben has 5 eggs. How many eggs?", "", "5")
    draft = "<think>" + si.demo_response("verifiable", "cot", "draft?", "", "1") + "</think>\n"
    parsed = si.parse_generation(draft + final, "verifiable", "cot")
    assert parsed == filters.Parsed("Ben has 5 eggs. How many eggs?", "5")
    assert filters.parse_verifiable(draft + final).reason == filters.MULTIPLE_QUESTIONS  # what the block would cause
    assert si.parse_generation("[New Prompt Begin]Write a poem.[New Prompt End]", "instruction", "cot").question \
        == "Write a poem."


@pytest.mark.parametrize("field, value, message", [
    ("kind", "essay", "synth.kind"),
    ("filter", "vibes", "synth.filter"),
    ("num_solutions", 0, "synth.num_solutions"),
    ("min_vote_share", 1.5, "synth.min_vote_share"),
    ("rip_percentile", 101.0, "synth.rip_percentile"),
])
def test_bad_fields_are_named(field, value, message):
    cfg = _config()
    cfg.synth[field] = value
    with pytest.raises(ValueError, match=message):
        si.check_config(cfg)


def test_filter_and_template_combinations_that_cannot_work_are_refused():
    cfg = _config()
    cfg.synth.update(kind="instruction", filter="answer_consistency")
    with pytest.raises(ValueError, match="synth.filter: 'answer_consistency' needs answers"):
        si.check_config(cfg)
    cfg.synth.update(kind="verifiable", method="self_instruct")
    with pytest.raises(ValueError, match="needs a generated answer"):
        si.check_config(cfg)
    cfg.synth.filter = "none"
    with pytest.raises(ValueError, match="without answers"):
        si.check_config(cfg)


def test_seeds_file_rows_and_errors(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text('{"question": "What is 1+1?", "answer": "2", "category": "add"}\n\n{"question": "2+2?"}\n')
    cfg = ml_collections.ConfigDict({"synth": {"seeds_file": str(path), "max_seeds": 0}})
    seeds = si.load_seeds(cfg, task=None)
    assert [(s["question"], s["answer"], s["category"]) for s in seeds] == [("What is 1+1?", "2", "add"),
                                                                           ("2+2?", "", "")]
    path.write_text('{"question": "What is 1+1?"}\n{"answer": "3"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: no 'question'"):
        si.load_seeds(cfg, task=None)
    cfg.synth.seeds_file = str(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="synth.seeds_file: .*missing.jsonl does not exist"):
        si.load_seeds(cfg, task=None)


def test_irpo_train_file_rows_and_errors(tmp_path):
    """An IRPO config names a dataset (e.g. a synthesized dataset.jsonl) as its training prompts."""
    path = tmp_path / "dataset.jsonl"
    path.write_text('{"uid": "synth/3", "question": "Ben has 2 pens. How many pens?", "answer": "2"}\n')
    (ex,) = stages.load_prompts_file(str(path))
    assert (ex.uid, ex.question, ex.answer, ex.solution) == ("synth/3", "Ben has 2 pens. How many pens?", "2", "")
    path.write_text('{"question": "Q?", "answer": "1"}\n{"question": "Q?", "answer": null}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: no 'answer' string"):
        stages.load_prompts_file(str(path))


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("self_instruct") / "run"
    res = subprocess.run(_cmd(workdir), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    return workdir, res.stderr


def test_end_to_end_writes_a_filtered_dataset_with_counts(run):
    workdir, stderr = run
    counts = json.loads((workdir / "counts.json").read_text())
    dataset, rejected = _jsonl(workdir / "dataset.jsonl"), _jsonl(workdir / "rejected.jsonl")
    seeds = {s["uid"]: s for s in _jsonl(workdir / "seeds.jsonl")}
    assert counts["generations"] == 64 and len(seeds) == counts["seeds"] == 16
    assert counts["kept"] == len(dataset) >= 1 and counts["rejected"] == len(rejected) == 64 - len(dataset)
    assert counts["reasons"] == dict(collections.Counter(r["reason"] for r in rejected))
    assert sorted(r["uid"] for r in dataset + rejected) == sorted(f"synth/{g}" for g in range(64))
    assert "| kept |" in stderr  # the counts table printed at the end
    # Each rejection carries a known reason; a parse rejection is what parsing its generation gives.
    F = filters
    known = {"cut_off", "prompt_too_long", "question_too_long", "answer_not_for_task", "duplicate_of_seed",
             "duplicate_of", F.MAJORITY_DIFFERS, F.TIE, F.NO_VALID_SOLUTION, F.LOW_VOTE_SHARE, F.MISSING_QUESTION,
             F.MULTIPLE_QUESTIONS, F.EMPTY_QUESTION, F.MISSING_ANSWER, F.MULTIPLE_ANSWERS, F.NO_BOXED_ANSWER,
             F.NOT_CHECKABLE}
    assert {r["reason"] for r in rejected} <= known
    for r in rejected:
        if "generation" in r and "question" not in r and r["reason"] != "cut_off":
            assert filters.parse_verifiable(r["generation"]).reason == r["reason"]
    # Answer-consistency, re-derived from the K = 4 solutions on disk: the generated answer has the most votes
    # (the quick config keeps a tie that includes it: ties='any'), and the row's numbers say so.
    solutions = collections.defaultdict(list)
    for p in sorted((workdir / "solve").glob("part-*.jsonl")):
        for s in _jsonl(p):
            solutions[s["uid"]].append(s["answer"])
    for row in dataset:
        assert set(row) >= {"uid", "question", "answer", "seeds", "votes", "vote_share"}
        votes = collections.Counter(a for a in solutions[row["uid"]] if a is not None).most_common()
        assert len(solutions[row["uid"]]) == 4
        assert dict(votes)[row["answer"]] == votes[0][1] == row["votes"] and row["majority"] == row["answer"]
        assert row["vote_share"] == row["votes"] / 4 and row["tied"] == (len(votes) > 1 and votes[1][1] == votes[0][1])
        assert all(uid in seeds for uid in row["seeds"]) and len(set(row["seeds"])) == 2
        assert max(filters.rouge_l(row["question"], s["question"]) for s in seeds.values()) < 0.7
    for r in rejected:
        if r["reason"] == F.MAJORITY_DIFFERS:  # under 'any' a tie only rejects when the answer is not among it
            votes = collections.Counter(a for a in solutions[r["uid"]] if a is not None)
            assert votes.get(r["answer"], 0) < max(votes.values())
    # The chain: IRPO trained on exactly the kept questions, and evaluated on the task's test split.
    train = _jsonl(workdir / "irpo" / "data" / "train.jsonl")
    assert [(t["question"], t["answer"]) for t in train] == [(d["question"], d["answer"]) for d in dataset]
    results = json.loads((workdir / "irpo" / "results.json").read_text())
    assert [r["iteration"] for r in results] == [0, 1] and results[0]["test_prompts"] == 16


def test_rerun_resumes_without_redoing_and_a_changed_config_is_refused(run):
    workdir, _ = run
    stamps = {p: p.stat().st_mtime_ns for p in workdir.rglob("*.jsonl")}
    before = (workdir / "dataset.jsonl").read_text()
    res = subprocess.run(_cmd(workdir), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (workdir / "dataset.jsonl").read_text() == before
    for p, t in stamps.items():  # sampling, training and data stages were all skipped
        if p.parent.name in ("samples", "solve", "generate") or p.name in ("prompts.jsonl", "sft.jsonl"):
            assert p.stat().st_mtime_ns == t, p
    res = subprocess.run(_cmd(workdir, "--config.synth.dedup_threshold=0.5"), capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert res.returncode != 0 and "field synth.dedup_threshold differs" in res.stderr


def test_rip_filter_scores_responses_with_a_reward_model_and_the_policy_as_judge(tmp_path):
    """RIP inside the pipeline: K responses per prompt from the policy, each scored by an HF sequence-classification
    reward model (checked here against transformers running that checkpoint), a prompt kept when its lowest score
    reaches the batch's median of lowest scores; without a reward model the policy judges (no "Score: N" -> 0)."""
    import jax
    import torch
    import transformers

    import rpo.models as M
    from rpo.data.synthetic import char_tokenizer
    from rpo.models.config import ModelConfig
    from rpo.models.decoder import init_params

    tokenizer = char_tokenizer()
    policy = str(tmp_path / "policy")
    config = ModelConfig(model_type="llama", vocab_size=104, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=512, eos_token_ids=(1,),
                         pad_token_id=0)
    M.save_pretrained(config, init_params(config, jax.random.PRNGKey(0)), policy)
    tokenizer.save_pretrained(policy)
    rm_dir = str(tmp_path / "rm")
    torch.manual_seed(0)
    rm = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=104, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, num_labels=1)).eval()
    with torch.no_grad():
        for p in rm.parameters():
            p.normal_(0.0, 0.3)
    rm.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)

    cfg = _config()
    cfg.model.path = policy
    cfg.init.num_steps = 0
    cfg.synth.update(kind="instruction", filter="rip", num_solutions=3, solve_max_new_tokens=6, rip_percentile=50.0,
                     reward_model=rm_dir, judge_max_new_tokens=4)
    si.check_config(cfg)
    candidates = [{"uid": f"synth/{i}", "question": f"Write about {w}."}
                  for i, w in enumerate(["rain", "a cat", "maps", "tea", "snow", "time"])]
    models = stages.Models(cfg)
    kept, rejected = si._rip_filter(cfg, tokenizer, models, policy, candidates, str(tmp_path / "rm_run"), 512)
    assert len(kept) + len(rejected) == 6 and kept and all(r["reason"] == filters.LOW_MIN_REWARD for r in rejected)
    responses = collections.defaultdict(list)
    for p in sorted((tmp_path / "rm_run" / "respond").glob("part-*.jsonl")):
        for s in _jsonl(p):
            responses[s["uid"]].append(s["text"])
    mins = {}
    with torch.no_grad():
        for c in candidates:
            assert len(responses[c["uid"]]) == 3
            scores = [float(rm(torch.tensor([tokenizer(c["question"] + t)["input_ids"]])).logits[0, 0])
                      for t in responses[c["uid"]]]
            mins[c["uid"]] = min(scores)
    cutoff = np.percentile(list(mins.values()), 50.0)
    assert sorted(r["uid"] for r in kept) == sorted(u for u, m in mins.items() if m >= cutoff)
    for r in kept + rejected:
        assert abs(r["min_score"] - mins[r["uid"]]) < 1e-4

    cfg.synth.reward_model = ""  # the policy as judge: a random policy writes no "Score: N", so every score is 0
    kept, rejected = si._rip_filter(cfg, tokenizer, models, policy, candidates, str(tmp_path / "judge_run"), 512)
    judged = [s for p in sorted((tmp_path / "judge_run" / "judge").glob("part-*.jsonl")) for s in _jsonl(p)]
    assert len(judged) == 18 and all(s["score"] is None for s in judged)
    assert len(kept) == 6 and all(r["min_score"] == 0.0 for r in kept)
