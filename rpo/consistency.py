"""Majority vote over sampled answers, vote shares, maj@k and pass@k (jitted).

Shapes: P prompts, N samples per prompt; arrays are named `x_PN`, `x_P`.
Answers are strings on the host (the final answers of `Task.score`, None when a completion has
none). `answer_ids` maps them to int32 ids and a validity mask; every device-side function takes
(ids, valid) and ignores the ids where valid is False. Which answers share an id is decided here
and only here: by default the same string (within one call, or across calls that share a `vocab`
dict); with `same`, an equivalence of the task's (MATH: rewards.math_equiv_batch, so "0.5" and
"\\frac12" are one answer), each answer joining the earliest equal answer of its own row.

Majority vote. A sample's vote count is the number of valid samples of its prompt with the
same id: one pairwise-equality matrix per prompt, O(P N^2) time and memory, fine for
N <= 64 and simpler than a sort-based count. The winner is the answer with the most votes;
a tie goes to the answer whose FIRST occurrence comes earliest among the tied answers (the
vote counts are equal on every occurrence of an answer, so argmax, which picks the first
maximum, lands on that first occurrence). A prompt with no valid answer has winner
NO_ANSWER (-1) and 0 votes; ids from `answer_ids` are never negative, so -1 is unambiguous
(with ids of your own, test `votes == 0`).

Metrics. maj@k: the majority over the FIRST k samples of each prompt is scored by the
`correct` flag of its first occurrence; a prompt without a valid answer counts as wrong.
pass@k: the unbiased estimator of Chen et al. 2021 over all N samples of a prompt, c of them
correct: 1 - C(N-c, k) / C(N, k), computed as 1 - prod_{i=N-c+1}^{N} (1 - k/i), which has no
overflow. Both return the mean over prompts.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NO_ANSWER = -1


def answer_ids(
    answers: Sequence[Sequence[str | None]], vocab: dict[str, int] | None = None, *,
    same: Callable[[Sequence[tuple[str, str]]], Sequence[bool]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Host-side: answer strings [P][N] -> (ids_PN int32, valid_PN bool).

    Ids are assigned in order of first appearance (row-major). Pass the same `vocab` dict to
    several calls to share one id space (it is updated in place), e.g. to compare generated
    answers with the majority. Rows may differ in length: shorter rows are padded with
    invalid entries up to the longest row. None marks a sample without an answer.

    same: an equivalence on answer strings, called once with every (later, earlier) pair of
    distinct answers within a row, returning a verdict per pair. An answer then takes the id of
    the first earlier answer of its row that it equals and that took its own id (the class's
    first spelling, which is what `vocab` holds); without `same`, only equal strings share an id.
    """
    vocab = {} if vocab is None else vocab
    n = max((len(row) for row in answers), default=0)
    ids = np.full((len(answers), n), NO_ANSWER, np.int32)
    valid = np.zeros((len(answers), n), bool)
    distinct: list[list[str]] = []
    for p, row in enumerate(answers):
        for i, answer in enumerate(row):
            if answer is not None and not isinstance(answer, str):
                raise TypeError(f"answers[{p}][{i}]: expected str or None, got {type(answer).__name__}")
        distinct.append(list(dict.fromkeys(a for a in row if a is not None)))
    pairs = [(d[j], d[i]) for d in distinct for j in range(len(d)) for i in range(j)] if same else []
    verdicts = list(same(pairs)) if pairs else []
    if len(verdicts) != len(pairs):
        raise ValueError(f"same: {len(verdicts)} verdicts for {len(pairs)} pairs")
    k = 0  # the next verdict: pairs run row by row, then j, then i < j
    for p, row in enumerate(answers):
        spelling: dict[str, str] = {}  # answer -> the first spelling of its class in this row
        for j, answer in enumerate(distinct[p]):
            equal = verdicts[k:k + j] if same else []
            k += len(equal)
            spelling[answer] = next((d for d, eq in zip(distinct[p], equal) if eq and spelling[d] == d), answer)
        for i, answer in enumerate(row):
            if answer is not None:
                ids[p, i] = vocab.setdefault(spelling[answer], len(vocab))
                valid[p, i] = True
    return ids, valid


def _check(ids_PN, mask_PN, mask_name: str = "valid") -> None:
    if np.ndim(ids_PN) != 2 or np.shape(ids_PN)[1] == 0:
        raise ValueError(f"answer_ids: expected shape [prompts, samples >= 1], got {np.shape(ids_PN)}")
    if np.shape(mask_PN) != np.shape(ids_PN):
        raise ValueError(f"{mask_name}: shape {np.shape(mask_PN)} differs from answer_ids shape {np.shape(ids_PN)}")


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k={k}: must be in [1, {n}] (the number of samples per prompt)")


@jax.jit
def _vote(ids_PN: jax.Array, valid_PN: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(winner index, winner id, votes), each [P]."""
    same_PNN = (ids_PN[:, :, None] == ids_PN[:, None, :]) & valid_PN[:, :, None] & valid_PN[:, None, :]
    counts_PN = same_PNN.sum(-1, dtype=jnp.int32)
    index_P = jnp.argmax(counts_PN, axis=-1)
    votes_P = jnp.take_along_axis(counts_PN, index_P[:, None], axis=-1)[:, 0]
    winner_P = jnp.where(votes_P > 0, jnp.take_along_axis(ids_PN, index_P[:, None], axis=-1)[:, 0], NO_ANSWER)
    return index_P, winner_P, votes_P


def majority_vote(answer_ids: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ids_PN int32, valid_PN bool -> (winner_ids_P int32, votes_P int32).

    winner_ids is NO_ANSWER (-1) and votes 0 for a prompt with no valid answer; ties go to
    the answer that appears first.
    """
    _check(answer_ids, valid)
    _, winner_P, votes_P = _vote(jnp.asarray(answer_ids, jnp.int32), jnp.asarray(valid, bool))
    return winner_P, votes_P


def vote_share(answer_ids: jax.Array, valid: jax.Array, *, of_valid: bool = False) -> jax.Array:
    """float32 [P]: the winner's votes over the number of samples N (default: samples without
    an answer count against agreement), or over the valid samples when `of_valid` (0 when
    there are none)."""
    _check(answer_ids, valid)
    valid = jnp.asarray(valid, bool)
    _, _, votes_P = _vote(jnp.asarray(answer_ids, jnp.int32), valid)
    total_P = valid.sum(-1) if of_valid else jnp.full(votes_P.shape, valid.shape[1])
    return jnp.where(total_P > 0, votes_P / jnp.maximum(total_P, 1), 0.0).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="k")
def _maj_at_k(ids_PN, valid_PN, correct_PN, k: int):
    index_P, _, votes_P = _vote(ids_PN[:, :k], valid_PN[:, :k])
    right_P = jnp.take_along_axis(correct_PN[:, :k], index_P[:, None], axis=-1)[:, 0] & (votes_P > 0)
    return right_P.mean(dtype=jnp.float32)


def maj_at_k(answer_ids: jax.Array, valid: jax.Array, correct: jax.Array, k: int) -> jax.Array:
    """float32 scalar: the accuracy of the majority answer over the first k samples."""
    _check(answer_ids, valid)
    _check(answer_ids, correct, "correct")
    _check_k(k, np.shape(answer_ids)[1])
    return _maj_at_k(jnp.asarray(answer_ids, jnp.int32), jnp.asarray(valid, bool), jnp.asarray(correct, bool), k)


@functools.partial(jax.jit, static_argnames="k")
def _pass_at_k(correct_PN, k: int):
    n = correct_PN.shape[1]
    c_P = correct_PN.sum(-1, dtype=jnp.int32)
    i_N = jnp.arange(1, n + 1, dtype=jnp.float32)
    terms_PN = jnp.where(i_N > n - c_P[:, None], 1.0 - k / i_N, 1.0)
    return (1.0 - jnp.prod(terms_PN, axis=-1)).mean()


def pass_at_k(correct: jax.Array, k: int) -> jax.Array:
    """float32 scalar: mean over prompts of the unbiased pass@k estimate from all N samples
    (correct_PN bool; a sample without an answer is incorrect)."""
    if np.ndim(correct) != 2:
        raise ValueError(f"correct: expected shape [prompts, samples], got {np.shape(correct)}")
    _check_k(k, np.shape(correct)[1])
    return _pass_at_k(jnp.asarray(correct, bool), k)
