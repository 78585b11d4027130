"""rpo.pairs against the IRPO paper's pair rule on constructed prompts: which pairs, the drops,
the gold solution, the length filter and the seeded cap; and the rows load in rpo.train."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rpo import files, train
from rpo.pairs import GOLD, STAT_KEYS, PromptSamples, Sample, build_pairs, pair_indices


def _sample(i, correct, valid=True, length=3):
    """Sample number i: its ids encode i so a row shows which sample it holds."""
    return Sample(ids=[100 + i] * length, correct=correct, valid=valid, text=f"s{i}")


def _prompt(flags, uid="u", gold=None, prompt_len=2):
    samples = [_sample(i, c) if c is not None else _sample(i, False, valid=False) for i, c in enumerate(flags)]
    return PromptSamples(prompt_ids=list(range(1, prompt_len + 1)), samples=samples, uid=uid, gold=gold)


def test_two_correct_three_incorrect_four_pairs_follow_the_paper():
    # Samples in order: c0 i0 c1 i1 i2 -> C = [0, 2], I = [1, 3, 4]. Walking both sets together, each
    # restarting when it runs out: (C0, I0), (C1, I1), (C0, I2), (C1, I0).
    rows, stats = build_pairs([_prompt([True, False, True, False, False])], pairs_per_prompt=4)
    assert [(r["chosen_index"], r["rejected_index"]) for r in rows] == [(0, 1), (2, 3), (0, 4), (2, 1)]
    firsts = [(r["chosen_ids"][0], r["rejected_ids"][0]) for r in rows]
    assert firsts == [(100, 101), (102, 103), (100, 104), (102, 101)]
    assert [r["pair_index"] for r in rows] == [0, 1, 2, 3]
    assert all(r["prompt_ids"] == [1, 2] and r["uid"] == "u" and r["prompt_index"] == 0 for r in rows)
    assert set(stats) == set(STAT_KEYS)
    assert stats["pairs"] == stats["pairs_built"] == 4 and stats["pairs_repeated"] == 0
    assert stats["prompts_paired"] == 1 and stats["prompts_dropped"] == 0


def test_paper_walk_repeats_and_distinct_walk_covers_every_pair_once():
    assert pair_indices(1, 1, 3) == [(0, 0)] * 3
    rows, stats = build_pairs([_prompt([True, False])], pairs_per_prompt=3)
    assert len(rows) == 3 and stats["pairs_repeated"] == 2
    rows, stats = build_pairs([_prompt([True, False])], pairs_per_prompt=3, repeat=False)
    assert len(rows) == 1 and stats["pairs_repeated"] == 0
    for nc, ni, k in itertools.product(range(1, 6), range(1, 6), (1, 4, 10, 30)):
        paper = pair_indices(nc, ni, k)
        assert paper == [(j % nc, j % ni) for j in range(k)]
        distinct = pair_indices(nc, ni, k, repeat=False)
        assert len(distinct) == min(k, nc * ni) and len(set(distinct)) == len(distinct)
        assert set(distinct) <= set(itertools.product(range(nc), range(ni)))
        prefix = min(k, math.lcm(nc, ni))
        assert distinct[:prefix] == paper[:prefix], (nc, ni, k)
    assert pair_indices(2, 2, 4, repeat=False) == [(0, 0), (1, 1), (0, 1), (1, 0)]
    assert pair_indices(0, 3, 4) == [] and pair_indices(3, 0, 4) == []


def test_prompts_without_both_sets_are_dropped_and_counted():
    prompts = [
        _prompt([True, True], uid="all-correct"),
        _prompt([False, None], uid="all-wrong"),
        _prompt([None, None], uid="no-valid"),
        _prompt([], uid="no-samples"),
        _prompt([None, True], uid="ok"),  # a sample without an answer is a loser
    ]
    rows, stats = build_pairs(prompts, pairs_per_prompt=2)
    assert {r["uid"] for r in rows} == {"ok"} and {r["prompt_index"] for r in rows} == {4}
    assert [(r["chosen_index"], r["rejected_index"]) for r in rows] == [(1, 0), (1, 0)]
    expect = dict(prompts=5, prompts_paired=1, prompts_all_correct=1, prompts_all_wrong=1, prompts_no_valid=2,
                  prompts_dropped=4, pairs_built=2, pairs_repeated=1, pairs=2)
    assert {k: stats[k] for k in expect} == expect


def test_gold_solution_goes_first_and_rescues_all_wrong_prompts():
    gold = Sample(ids=[7, 7], correct=True, text="gold")
    prompts = [_prompt([False, True, False], uid="mixed", gold=gold), _prompt([False, False], uid="wrong", gold=gold),
               _prompt([False, True], uid="no-gold"), _prompt([True], uid="all-correct", gold=gold)]
    rows, stats = build_pairs(prompts, pairs_per_prompt=3, add_gold=True, with_text=True)
    mixed = [r for r in rows if r["uid"] == "mixed"]  # C = [gold, 1], I = [0, 2]
    assert [(r["chosen_index"], r["rejected_index"]) for r in mixed] == [(GOLD, 0), (1, 2), (GOLD, 0)]
    assert mixed[0]["chosen_ids"] == [7, 7] and mixed[0]["chosen_text"] == "gold" and mixed[1]["chosen_text"] == "s1"
    assert mixed[1]["rejected_text"] == "s2"
    wrong = [r for r in rows if r["uid"] == "wrong"]
    assert [(r["chosen_index"], r["rejected_index"]) for r in wrong] == [(GOLD, 0), (GOLD, 1), (GOLD, 0)]
    assert [r["chosen_index"] for r in rows if r["uid"] == "no-gold"] == [1, 1, 1]
    assert stats["prompts_gold_added"] == 2 and stats["prompts_gold_missing"] == 1 and stats["pairs_gold"] == 5
    assert stats["prompts_all_wrong"] == 1 and stats["prompts_all_correct"] == 1 and stats["prompts_dropped"] == 1
    without, _ = build_pairs(prompts, pairs_per_prompt=3)
    assert all(r["chosen_index"] != GOLD and "chosen_text" not in r for r in without)


def test_length_limit_and_empty_responses_drop_pairs():
    long_wrong = Sample(ids=[9] * 6, correct=False)
    empty_wrong = Sample(ids=[], correct=False)
    prompt = PromptSamples(prompt_ids=[1, 2], samples=[_sample(0, True, length=4), long_wrong, empty_wrong])
    rows, stats = build_pairs([prompt], pairs_per_prompt=4, max_len=7)  # 2 + 4 fits 7, 2 + 6 does not
    assert rows == [] and stats["pairs_too_long"] == 2 and stats["pairs_empty"] == 2 and stats["pairs_built"] == 4
    rows, stats = build_pairs([prompt], pairs_per_prompt=4, max_len=8)  # 2 + 6 == 8 is kept
    assert [r["rejected_index"] for r in rows] == [1, 1] and stats["pairs_too_long"] == 0 and stats["pairs"] == 2


def test_cap_is_a_seeded_sample_without_replacement_in_order():
    rng = np.random.default_rng(0)
    prompts = [_prompt(list(rng.random(6) < 0.5) + [True, False], uid=f"p{p}") for p in range(30)]
    full, _ = build_pairs(prompts, pairs_per_prompt=4)
    assert len(full) == 120
    keys = [(r["prompt_index"], r["pair_index"]) for r in full]
    a, stats = build_pairs(prompts, pairs_per_prompt=4, max_pairs=50, seed=3)
    b, _ = build_pairs(prompts, pairs_per_prompt=4, max_pairs=50, seed=3)
    c, _ = build_pairs(prompts, pairs_per_prompt=4, max_pairs=50, seed=4)
    picked = [(r["prompt_index"], r["pair_index"]) for r in a]
    assert a == b and a != c and len(a) == 50 == stats["pairs"] and stats["pairs_capped"] == 70
    assert len(set(picked)) == 50 and set(picked) <= set(keys) and picked == sorted(picked, key=keys.index)
    assert build_pairs(prompts, pairs_per_prompt=4, max_pairs=500)[0] == full


def test_bad_input_names_the_prompt_and_sample():
    bad = PromptSamples(prompt_ids=[1], samples=[Sample(ids=[1], correct=True, valid=False)], uid="gsm8k/train/3")
    with pytest.raises(ValueError, match=r"prompt 0 \(uid 'gsm8k/train/3'\), sample 0: marked correct"):
        build_pairs([bad], pairs_per_prompt=1)
    bad = PromptSamples(prompt_ids=[1], samples=[_sample(0, True), Sample(ids=[1.5], correct=False)], uid="x")
    with pytest.raises(TypeError, match=r"prompt 0 \(uid 'x'\), sample 1: ids"):
        build_pairs([bad], pairs_per_prompt=1)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        build_pairs([PromptSamples(prompt_ids=[], samples=[])], pairs_per_prompt=1)
    with pytest.raises(ValueError, match="pairs_per_prompt=0"):
        build_pairs([], pairs_per_prompt=0)


def test_rows_are_a_pairs_file_rpo_train_reads(tmp_path):
    samples = [Sample(ids=np.array([5, 6, 2]), correct=True), Sample(ids=[np.int64(7), 2], correct=False)]
    rows, _ = build_pairs([PromptSamples(prompt_ids=[1, 3], samples=samples, uid="a")], pairs_per_prompt=2)
    path = str(tmp_path / "pairs.jsonl")
    files.write_jsonl(path, rows)
    back = train.read_rows(path, "pairs", vocab_size=8)
    assert [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in back] == [([1, 3], [5, 6, 2], [7, 2])] * 2
