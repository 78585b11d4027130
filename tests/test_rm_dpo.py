"""Reward-model DPO (rpo.rm_dpo, CoT-Self-Instruct's protocol for non-verifiable prompts) on a tiny random policy
and a tiny random transformers reward model: every score, every best-vs-worst choice, the held-out reward and win
rate are recomputed with transformers running the reward-model checkpoint; the pairs train through rpo.train's DPO
step from reference log-probs of M_0 (the first step's loss is log 2)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import transformers

from rpo import rm_dpo
from rpo.files import load_module

# Its module-scoped fixtures are costly: all of its tests go to one xdist worker (launch.sh: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("rm_dpo")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["Write about rain.", "Name a cat.", "Say hi.", "Draw a map.", "Brew tea.", "Count to 3."]


def _jsonl(path):
    return [json.loads(line) for line in open(path) if line.strip()]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(policy dir, reward model dir, prompts file): a random Llama of the quick config's shape and a random
    LlamaForSequenceClassification, both with the synthetic task's character tokenizer."""
    import jax

    import rpo.models as M
    from rpo.data.synthetic import char_tokenizer
    from rpo.models.config import ModelConfig
    from rpo.models.decoder import init_params

    d = tmp_path_factory.mktemp("rm_dpo")
    tok = char_tokenizer()
    arith = load_module(os.path.join(ROOT, "configs", "arith_tiny.py")).get_config("quick")
    config = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in arith.model.random.items()})
    M.save_pretrained(config, init_params(config, jax.random.PRNGKey(5)), str(d / "policy"))
    tok.save_pretrained(str(d / "policy"))
    torch.manual_seed(0)
    rm = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=104, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, num_labels=1)).eval()
    with torch.no_grad():
        for p in rm.parameters():
            p.normal_(0.0, 0.3)
    rm.save_pretrained(str(d / "rm"))
    tok.save_pretrained(str(d / "rm"))
    with open(d / "prompts.jsonl", "w") as f:
        for i, q in enumerate(QUESTIONS):
            f.write(json.dumps({"uid": f"synth/{i}", "question": q, "answer": None}) + "\n")
    return str(d / "policy"), str(d / "rm"), str(d / "prompts.jsonl"), rm, tok


def _config(models):
    policy, rm_dir, prompts, _, _ = models
    return load_module(os.path.join(ROOT, "configs", "rm_dpo_tiny.py")).get_config(
        f"quick,model={policy},rm={rm_dir},prompts={prompts}")


def _hf_score(rm, tok, question, text):
    with torch.no_grad():
        return float(rm(torch.tensor([tok(question + text)["input_ids"]])).logits[0, 0])


def test_best_vs_worst_pairs_train_by_dpo_and_are_scored_as_transformers_scores(models, tmp_path):
    _, _, _, rm, tok = models
    cfg = _config(models)
    workdir = tmp_path / "run"
    rows = rm_dpo.run(cfg, str(workdir))
    assert [r["iteration"] for r in rows] == [0, 1]
    train = _jsonl(workdir / "prompts.jsonl")
    held = _jsonl(workdir / "eval_prompts.jsonl")
    assert [r["question"] for r in train + held] == QUESTIONS and len(held) == 2

    k = cfg.rm_dpo.responses_per_prompt
    it = workdir / "iter1"
    responses = [x for p in sorted((it / "responses").glob("part-*.jsonl")) for x in _jsonl(p)]
    scores = _jsonl(it / "scores.jsonl")
    assert len(responses) == len(scores) == len(train) * k
    hf = {}
    for x, s in zip(responses, scores):
        q = train[x["prompt_index"]]["question"]
        hf[(x["uid"], x["sample"])] = _hf_score(rm, tok, q, x["text"])
        assert s["score"] == pytest.approx(hf[(x["uid"], x["sample"])], abs=1e-4)
    pairs = {p["uid"]: p for p in _jsonl(it / "pairs.jsonl")}
    stats = json.loads((it / "pairs_stats.json").read_text())
    assert stats["pairs"] + stats["ties"] + stats["same_tokens"] + stats["too_long"] == len(train)
    assert stats["pairs"] == len(pairs) > 0
    for p in train:
        mine = [x for x in responses if x["uid"] == p["uid"]]
        s = np.asarray([hf[(x["uid"], x["sample"])] for x in mine])
        if p["uid"] in pairs:
            pair = pairs[p["uid"]]
            assert pair["chosen_ids"] == mine[int(np.argmax(s))]["completion_ids"]
            assert pair["rejected_ids"] == mine[int(np.argmin(s))]["completion_ids"]
            assert pair["chosen_score"] > pair["rejected_score"]
            assert math.isfinite(pair["ref_chosen_logp"]) and math.isfinite(pair["ref_rejected_logp"])

    # DPO from M_0 with M_0 as the reference: the first step's loss is log 2 and its margin 0; training lowers it.
    logged = _jsonl(it / "train" / "metrics.jsonl")
    assert logged[0]["step"] == 1 and logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert logged[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert logged[-1]["step"] == cfg.train.num_steps and logged[-1]["loss"] < math.log(2)

    # Held-out evaluation: greedy responses of M_0 and M_1, scored by transformers; win rate recomputed.
    per_iter = {}
    for t in (0, 1):
        greedy = [x for p in sorted((workdir / f"iter{t}" / "eval_greedy").glob("part-*.jsonl")) for x in _jsonl(p)]
        per_iter[t] = np.asarray([_hf_score(rm, tok, held[x["prompt_index"]]["question"], x["text"]) for x in greedy])
        assert rows[t]["eval_reward_mean"] == pytest.approx(per_iter[t].mean(), abs=1e-4)
    wins = np.mean((per_iter[1] > per_iter[0] + 1e-6) + 0.5 * (np.abs(per_iter[1] - per_iter[0]) <= 1e-6))
    assert rows[1]["win_rate_vs_m0"] == pytest.approx(wins)
    assert (workdir / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rm_dpo.run(cfg, str(workdir)) == rows  # a rerun resumes: every stage is on disk


def test_bad_config_and_input_are_named(models, tmp_path):
    cfg = _config(models)
    cfg.rm_dpo.responses_per_prompt = 1
    with pytest.raises(ValueError, match="rm_dpo.responses_per_prompt.*at least 2"):
        rm_dpo.check_config(cfg)
    cfg = _config(models)
    cfg.rm_dpo.reward_model = str(tmp_path / "nothing")
    with pytest.raises(ValueError, match="rm_dpo.reward_model.*not a directory"):
        rm_dpo.check_config(cfg)
    cfg = _config(models)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "ok"}) + "\n" + json.dumps({"prompt": "no question"}) + "\n")
    cfg.rm_dpo.prompts_file = str(bad)
    with pytest.raises(ValueError, match=rf"{bad}:2: no 'question'"):
        rm_dpo.run(cfg, str(tmp_path / "bad_run"))
    cfg = _config(models)
    cfg.rm_dpo.reward_max_len = 4  # every (prompt + response) is longer: the reward model cannot score it whole
    with pytest.raises(ValueError, match="rm_dpo.reward_max_len=4.*row 0"):
        rm_dpo.run(cfg, str(tmp_path / "long_run"))


def test_ties_and_identical_responses_make_no_pair():
    prompts = [{"uid": f"p{i}", "prompt_ids": [5, 6]} for i in range(4)]
    r = lambda ids, s: {"completion_ids": ids, "score": s, "text": ""}  # noqa: E731
    responses = [[r([1], 0.5), r([2], 0.5)], [r([3], 1.0), r([3], 0.0)], [r([4], 0.1), r([5] * 20, 0.9)],
                 [r([7], 0.2), r([8], 0.9), r([9], -1.0)]]
    pairs, stats = rm_dpo.best_vs_worst(prompts, responses, max_len=10)
    assert stats == {"prompts": 4, "pairs": 1, "ties": 1, "same_tokens": 1, "too_long": 1}
    assert pairs[0]["uid"] == "p3" and pairs[0]["chosen_ids"] == [8] and pairs[0]["rejected_ids"] == [9]
