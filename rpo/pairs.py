"""Preference pairs from scored samples: the pair rule of Iterative RPO (Pang et al. 2024).

Input: one `PromptSamples` per training prompt (its token ids, uid, the sampled responses
with their correctness, and optionally the gold solution). Output: pair rows in the format
`rpo.train` reads, {"prompt_ids", "chosen_ids", "rejected_ids"} (responses only), plus
"prompt_index" (the prompt's position in the input), "uid" (the prompt's uid), "pair_index"
(k below), "chosen_index" / "rejected_index" (the sample's position among the prompt's
samples; GOLD (-1) for the gold solution), and "chosen_text" / "rejected_text" on request.

The rule. A prompt's correct set C and incorrect set I keep the sampling order. A sample
without an extractable answer (valid=False) is incorrect, so it can be a loser: the model
should also stop writing answers nobody can read. Pair k is (C[k % |C|], I[k % |I|]) for
k < K: both sets are walked together, each restarting from its start when it runs out.
  - Repeats. As the paper writes the rule, K pairs are made whatever |C| and |I| are, so a
    prompt with |C| = |I| = 1 yields K copies of one pair (`repeat=True`, the default, for
    reproduction). The walk visits only lcm(|C|, |I|) distinct pairs before it repeats;
    with `repeat=False` the walk instead shifts the incorrect index by one after each full
    cycle of lcm(|C|, |I|) pairs, which reaches all |C| * |I| pairs with none twice, and
    stops at min(K, |C| * |I|) pairs. Its first lcm pairs are the paper's.
  - Gold. With `add_gold`, a prompt's gold solution (when it has one) is put FIRST in C, so
    pair 0 always uses it whatever K is; a prompt with no correct sample then still makes
    pairs, with the gold solution as the only winner.
  - Drops. A prompt with no incorrect sample (all correct), or with no winner (all wrong,
    or no sample with an answer at all), makes no pair; each is counted. A pair whose
    prompt + longer response exceeds `max_len` tokens is dropped and counted, and so is a
    pair with an empty response (rpo.train refuses those rows).
  - Cap. With `max_pairs`, that many pairs are drawn without replacement from the rest,
    uniformly with numpy's default_rng(seed), and kept in their original order.
Everything is deterministic: the only randomness is the cap, seeded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

GOLD = -1


@dataclasses.dataclass(frozen=True)
class Sample:
    ids: Sequence[int]  # the response token ids (CoT + answer, eos included if wanted)
    correct: bool  # the reward: the final answer equals the gold one
    valid: bool = True  # an answer could be extracted (Task.score gave one)
    text: str = ""  # the decoded response, kept in the rows only with `with_text`


@dataclasses.dataclass(frozen=True)
class PromptSamples:
    prompt_ids: Sequence[int]
    samples: Sequence[Sample]
    uid: str = ""
    gold: Sample | None = None  # the gold solution as a response; its flags are not read


STAT_KEYS = (
    "prompts",  # prompts in the input
    "prompts_paired",  # prompts that made pairs (before the length filter and the cap)
    "prompts_all_correct",  # dropped: no incorrect sample
    "prompts_all_wrong",  # some sample has an answer, none is correct
    "prompts_no_valid",  # no sample has an answer (or no samples at all)
    "prompts_dropped",  # prompts that made no pair (all-wrong/no-valid ones rescued by gold are not)
    "prompts_gold_added",  # prompts whose gold solution joined the correct set
    "prompts_gold_missing",  # add_gold was asked but the prompt has no gold solution
    "pairs_built",  # pairs made by the rule
    "pairs_repeated",  # of those, pairs equal to an earlier pair of the same prompt
    "pairs_gold",  # of those, pairs whose winner is the gold solution
    "pairs_too_long",  # dropped: prompt + longer response > max_len
    "pairs_empty",  # dropped: an empty response
    "pairs_capped",  # dropped by max_pairs
    "pairs",  # pairs written
)


def pair_indices(num_correct: int, num_incorrect: int, k: int, *, repeat: bool = True) -> list[tuple[int, int]]:
    """The (correct index, incorrect index) of each pair of one prompt (see the module docstring)."""
    if num_correct <= 0 or num_incorrect <= 0:
        return []
    if repeat:
        return [(j % num_correct, j % num_incorrect) for j in range(k)]
    cycle = math.lcm(num_correct, num_incorrect)
    return [(j % num_correct, (j + j // cycle) % num_incorrect) for j in range(min(k, num_correct * num_incorrect))]


def _ids(value, where: str) -> list[int]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in value
    ):
        raise TypeError(f"{where}: token ids must be a list of ints")
    return [int(x) for x in value]


def build_pairs(
    prompts: Sequence[PromptSamples],
    *,
    pairs_per_prompt: int,
    repeat: bool = True,
    add_gold: bool = False,
    max_len: int | None = None,
    max_pairs: int | None = None,
    seed: int = 0,
    with_text: bool = False,
) -> tuple[list[dict], dict[str, int]]:
    """Pair rows and a stats dict with every key of STAT_KEYS (see the module docstring)."""
    if pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt={pairs_per_prompt}: must be >= 1")
    if max_len is not None and max_len < 2:
        raise ValueError(f"max_len={max_len}: must be >= 2 (a prompt token and a response token)")
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"max_pairs={max_pairs}: must be >= 0")
    stats = dict.fromkeys(STAT_KEYS, 0)
    stats["prompts"] = len(prompts)
    rows = []
    for p, prompt in enumerate(prompts):
        where = f"prompt {p} (uid {prompt.uid!r})"
        prompt_ids = _ids(prompt.prompt_ids, f"{where}: prompt_ids")
        if not prompt_ids:
            raise ValueError(f"{where}: prompt_ids is empty")
        correct, incorrect = [], []
        for i, s in enumerate(prompt.samples):
            if s.correct and not s.valid:
                raise ValueError(f"{where}, sample {i}: marked correct but has no valid answer")
            (correct if s.correct else incorrect).append((i, _ids(s.ids, f"{where}, sample {i}: ids")))
        if not any(s.valid for s in prompt.samples):
            stats["prompts_no_valid"] += 1
        elif not incorrect:
            stats["prompts_all_correct"] += 1
        elif not correct:
            stats["prompts_all_wrong"] += 1
        texts = [s.text for s in prompt.samples]
        if add_gold and incorrect:
            if prompt.gold is None:
                stats["prompts_gold_missing"] += 1
            else:
                correct.insert(0, (GOLD, _ids(prompt.gold.ids, f"{where}: gold ids")))
                stats["prompts_gold_added"] += 1
        picks = pair_indices(len(correct), len(incorrect), pairs_per_prompt, repeat=repeat)
        if not picks:
            stats["prompts_dropped"] += 1
            continue
        stats["prompts_paired"] += 1
        stats["pairs_built"] += len(picks)
        stats["pairs_repeated"] += len(picks) - len(set(picks))
        for k, (a, b) in enumerate(picks):
            (ci, chosen), (ri, rejected) = correct[a], incorrect[b]
            stats["pairs_gold"] += ci == GOLD
            if not chosen or not rejected:
                stats["pairs_empty"] += 1
                continue
            if max_len is not None and len(prompt_ids) + max(len(chosen), len(rejected)) > max_len:
                stats["pairs_too_long"] += 1
                continue
            row = {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected, "prompt_index": p,
                   "uid": prompt.uid, "pair_index": k, "chosen_index": ci, "rejected_index": ri}
            if with_text:
                row["chosen_text"] = prompt.gold.text if ci == GOLD else texts[ci]
                row["rejected_text"] = texts[ri]
            rows.append(row)
    if max_pairs is not None and len(rows) > max_pairs:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), max_pairs, replace=False))
        stats["pairs_capped"] = len(rows) - max_pairs
        rows = [rows[i] for i in keep]
    stats["pairs"] = len(rows)
    return rows, stats
