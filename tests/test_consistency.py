"""rpo.consistency against plain-Python references: collections.Counter for the vote (its
most_common breaks ties by first insertion, the rule documented in rpo.consistency), math.comb
and brute force over subsets for pass@k, and a Counter over exact values (fractions.Fraction) for
votes grouped by an equivalence (answer_ids' `same`; the MATH grader's in tests/test_rewards.py)."""

from __future__ import annotations

import collections
import fractions
import itertools
import math

import jax
import numpy as np
import pytest

from rpo import consistency as C


def _ref_vote(ids, valid):
    """(winner, votes, index of the winner's first occurrence) by collections.Counter."""
    seen = [int(a) for a, v in zip(ids, valid) if v]
    if not seen:
        return C.NO_ANSWER, 0, 0
    winner, votes = collections.Counter(seen).most_common(1)[0]
    first = next(i for i, (a, v) in enumerate(zip(ids, valid)) if v and a == winner)
    return winner, votes, first


def _has_tie(answers):
    top = collections.Counter(answers.tolist()).most_common(2)
    return len(top) == 2 and top[0][1] == top[1][1]


def _random_votes(seed, p=48, n=12, distinct=3):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, distinct, (p, n)).astype(np.int32)
    valid = rng.random((p, n)) < 0.7
    valid[:4] = False  # all-invalid rows
    valid[4] = True
    ids[5] = np.arange(n) % 2  # an exact two-way tie, 0 first
    ids[6] = 1 - np.arange(n) % 2  # the same tie, 1 first
    valid[5:7] = True
    return ids, valid


@pytest.mark.parametrize("seed,distinct", [(0, 2), (1, 3), (2, 7)])
def test_majority_vote_matches_counter_with_ties_and_empty_rows(seed, distinct):
    ids, valid = _random_votes(seed, distinct=distinct)
    winner, votes = C.majority_vote(ids, valid)
    ref = [_ref_vote(a, v) for a, v in zip(ids, valid)]
    np.testing.assert_array_equal(winner, [r[0] for r in ref])
    np.testing.assert_array_equal(votes, [r[1] for r in ref])
    assert winner.dtype == np.int32 and votes.dtype == np.int32
    assert (np.asarray(winner)[:4] == C.NO_ANSWER).all() and (np.asarray(votes)[:4] == 0).all()
    assert int(winner[5]) == 0 and int(winner[6]) == 1  # ties go to the earliest first occurrence
    assert sum(_has_tie(a[v]) for a, v in zip(ids, valid)) >= 5, "the random cases should exercise ties"


def test_answer_ids_hash_strings_consistently():
    answers = [["12", None, "7", "12"], ["7"], [None, None], ["x", "12"]]
    vocab: dict[str, int] = {}
    ids, valid = C.answer_ids(answers, vocab)
    assert ids.shape == valid.shape == (4, 4) and ids.dtype == np.int32
    np.testing.assert_array_equal(valid, [[1, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    assert ids[0, 0] == ids[0, 3] == ids[3, 1] and ids[0, 2] == ids[1, 0]
    assert len({int(ids[0, 0]), int(ids[0, 2]), int(ids[3, 0])}) == 3 and (ids[valid] >= 0).all()
    again, _ = C.answer_ids([["x", "7", "new"]], vocab)  # a shared vocab keeps the ids
    assert again[0, 0] == ids[3, 0] and again[0, 1] == ids[0, 2] and again[0, 2] not in ids
    with pytest.raises(TypeError, match=r"answers\[1\]\[0\]"):
        C.answer_ids([["1"], [3]])


def test_string_majority_equals_counter_most_common():
    rng = np.random.default_rng(3)
    pool = ["1", "2", "3", "1/2", None]
    answers = [[pool[j] for j in rng.integers(0, len(pool), 9)] for _ in range(40)]
    ids, valid = C.answer_ids(answers)
    winner, votes = C.majority_vote(ids, valid)
    names = {i: s for row_ids, row in zip(ids, answers) for i, s in zip(row_ids.tolist(), row)}
    for p, row in enumerate(answers):
        counts = collections.Counter(a for a in row if a is not None)
        expect = counts.most_common(1)[0] if counts else (None, 0)
        assert (names.get(int(winner[p])) if votes[p] else None, int(votes[p])) == expect, row


def _same_value(pairs):
    """An equivalence of our own for the tests: two spellings of one rational number ("0.5", "1/2", "2/4")."""
    return [fractions.Fraction(a) == fractions.Fraction(b) for a, b in pairs]


def test_votes_grouped_by_an_equivalence_match_a_counter_over_values():
    rng = np.random.default_rng(11)
    spellings = ["1/2", "0.5", "2/4", "1", "1.0", "3/3", "2", "0.25", "1/4", None]
    answers = [[spellings[j] for j in rng.integers(0, len(spellings), 9)] for _ in range(60)]
    asked = []
    ids, valid = C.answer_ids(answers, same=lambda pairs: asked.extend(pairs) or _same_value(pairs))
    winner, votes = C.majority_vote(ids, valid)
    for p, row in enumerate(answers):
        values = [fractions.Fraction(a) for a in row if a is not None]
        counts = collections.Counter(values)
        top = max(counts.values(), default=0)
        assert int(votes[p]) == top, row
        if top:  # the winner is the value whose first sample comes first among the tied values (Counter's rule)
            first = next(v for v in counts if counts[v] == top)
            i = next(i for i, a in enumerate(row) if a is not None and fractions.Fraction(a) == first)
            assert int(winner[p]) == int(ids[p, i]), row
        for i, a in enumerate(row):  # one id per value within a row, shared by all its spellings
            for j, b in enumerate(row):
                if a is not None and b is not None:
                    assert (ids[p, i] == ids[p, j]) == (fractions.Fraction(a) == fractions.Fraction(b))
    assert all(a != b for a, b in asked)  # each distinct pair once, never a string with itself
    string_ids, _ = C.answer_ids(answers)
    fewer = [len(set(ids[p][valid[p]])) < len(set(string_ids[p][valid[p]])) for p in range(len(answers))]
    assert sum(fewer) > 30  # the spellings do merge in most rows


def test_maj_at_k_counts_two_spellings_as_one_answer():
    answers = [["0.5", "1/2", "3", "3/1", "3", "2/4"], ["7", "7", "0.5", "1/2", "2/4", None]]
    correct = np.array([[True, True, False, False, False, True], [False, False, True, True, True, False]])
    by_string = C.answer_ids(answers)
    by_value = C.answer_ids(answers, same=_same_value)
    assert float(C.maj_at_k(*by_string, correct, 6)) == 0.0  # "3" and "7" have the most identical strings
    assert float(C.maj_at_k(*by_value, correct, 6)) == 1.0  # 1/2 has three spellings
    np.testing.assert_allclose(C.vote_share(*by_value), [0.5, 0.5])
    with pytest.raises(ValueError, match="same: 1 verdicts for 16 pairs"):
        C.answer_ids(answers, same=lambda pairs: [True])


def test_vote_share():
    ids, valid = _random_votes(4, p=20, n=10)
    _, votes = C.majority_vote(ids, valid)
    np.testing.assert_allclose(C.vote_share(ids, valid), np.asarray(votes) / 10)
    per_valid = np.where(valid.sum(1) > 0, np.asarray(votes) / np.maximum(valid.sum(1), 1), 0)
    np.testing.assert_allclose(C.vote_share(ids, valid, of_valid=True), per_valid, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 4, 12])
def test_maj_at_k_uses_the_first_k_samples(k):
    ids, valid = _random_votes(5, distinct=4)
    gold = np.random.default_rng(6).integers(0, 4, ids.shape[0])
    correct = valid & (ids == gold[:, None])
    right = []
    for a, v, g in zip(ids, valid, gold):
        winner, votes, _ = _ref_vote(a[:k], v[:k])
        right.append(votes > 0 and winner == g)
    got = C.maj_at_k(ids, valid, correct, k)
    assert got.dtype == np.float32 and 0 < float(got) < 1
    np.testing.assert_allclose(got, np.mean(right), rtol=1e-6)


def test_pass_at_k_closed_form_and_brute_force():
    rng = np.random.default_rng(7)
    for n in range(1, 7):
        for c in range(n + 1):
            row = np.zeros(n, bool)
            row[rng.choice(n, c, replace=False)] = True
            for k in range(1, n + 1):
                got = float(C.pass_at_k(row[None], k))
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                subsets = list(itertools.combinations(range(n), k))
                brute = sum(row[list(s)].any() for s in subsets) / len(subsets)
                assert got == pytest.approx(closed, abs=1e-6) and got == pytest.approx(brute, abs=1e-6), (n, c, k)
    big = np.zeros((2, 64), bool)
    big[0, :3] = True
    big[1, :40] = True
    expect = np.mean([1 - math.comb(64 - c, 32) / math.comb(64, 32) for c in (3, 40)])
    np.testing.assert_allclose(C.pass_at_k(big, 32), expect, rtol=1e-5)


def test_bad_arguments_are_named():
    ids, valid = _random_votes(8, n=4)
    with pytest.raises(ValueError, match="k=5"):
        C.maj_at_k(ids, valid, valid, 5)
    with pytest.raises(ValueError, match="k=0"):
        C.pass_at_k(valid, 0)
    with pytest.raises(ValueError, match="valid: shape"):
        C.majority_vote(ids, valid[:, :3])
    with pytest.raises(ValueError, match="correct: shape"):
        C.maj_at_k(ids, valid, valid[:2], 1)
    with pytest.raises(ValueError, match=r"samples >= 1"):
        C.majority_vote(*C.answer_ids([[], []]))


def test_majority_vote_composes_under_jit():
    ids, valid = _random_votes(9)
    winner, votes = jax.jit(C.majority_vote)(ids, valid)
    np.testing.assert_array_equal(winner, C.majority_vote(ids, valid)[0])
    np.testing.assert_array_equal(votes, C.majority_vote(ids, valid)[1])
