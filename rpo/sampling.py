"""Sampling: one prefill per prompt, then a jitted `lax.while_loop` decode over a static KV cache,
with finished rows refilled (continuous batching).

Shape letters as in rpo.models.decoder (B batch rows, T tokens, S cache slots, V vocab, ...),
plus P prompt length (bucketed), M max new tokens, R prompt slots (B = R * s, s rows per slot),
C top-p candidates, Q stop sequences, W longest stop sequence.

How a call is run:

1. Prompts are **left-padded** to one bucketed length P for the call (a power of two, at least 16,
   covering the longest prompt) and prefilled in chunks of `batch_size` prompts, bucketed to a
   power of two (and a multiple of the mesh's batch axes). RoPE positions are per row
   (`max(0, slot - pad)`), so padding does not shift them. A long run with varied prompt lengths
   therefore compiles a handful of times (one per bucket), not once per call.
2. **Prefill once per prompt**: a chunk's prompts run once through the decoder
   (`decoder.hidden_states`, keeping each layer's keys and values; only the last position is
   unembedded). The prompt is never run N times, and its keys/values are not copied N times
   either: the decode cache keeps the prompt part once per **prompt slot** ([R, K, E, P] per
   layer) and only the generated part per row ([B, K, E, M] per layer); row b belongs to slot
   b // s, and attention takes one softmax over both parts. Each step thus reads a prompt's cache
   once for its s rows instead of s times.
3. **Decode** in one jitted `lax.while_loop` whose state (cache, token buffers, ...) is donated
   and updated in place. The step is the model's `decoder.decode_step` over that cache; every row
   is at its own step (its own write slot, position and random step), so rows can start at
   different times. Per-layer param slices and the unembedding are hoisted out of the loop
   (`decoder.step_params`).
4. **Refill** (continuous batching over the static cache, as MaxText's and JetStream's servers
   do): a slot holds one prompt; its s rows take that prompt's samples j = 0..N-1 in order, a row
   starting the next one as soon as its last finished (EOS, a stop sequence, or M tokens); when
   all N are done the slot takes the next waiting prompt (its cache copied in from the prefilled
   chunk). The loop hands back to the host only when enough rows can be refilled (a sixteenth of
   the rows); the host collects the finished samples and starts the new ones (their first token is
   drawn from the prompt's prefill logits). Once no prompt waits, an empty slot takes a copy of the
   prompt with the most samples still to start, so the call's last samples spread over the free
   rows. With s = N a slot's samples run side by side and whole prompts are refilled; with s < N a
   prompt's samples queue for its s rows, which leaves fewer rows idle but makes a step dearer (a
   prompt's cache is read once per s rows). The default, s = N / 2 for even N >= 4, is what measured
   cheapest per generated token (experiments/results/bench_sampling.md, --waste).

Randomness: the key of sample j of prompt i (its index in `prompts`) is
`fold_in(fold_in(key(seed), i), j)`; step t draws one uniform from `fold_in(that key, t)` and
picks the token by inverse CDF (two levels: blocks of 128 tokens, then within the block, so no
full-vocabulary cumsum or per-token random numbers are needed). Samples therefore depend only
on (seed, i, j, model), not on which row or slot runs them, nor on when: a seed gives the same
samples every time on the same machine. For a fixed number of decode rows they are bitwise
the same whatever rows_per_prompt is (XLA:CPU computes a matmul row without regard to its
neighbours; tests/test_sampling.py checks it; the top-p fallback below is chosen per row); across
different row or prompt buckets the logprobs may differ in the last bits.

Log-probs (`GenerateOutput.logprobs`) are those of the sampled token **under the distribution
it was actually drawn from**: log_softmax of logits / temperature after the top-k and top-p
masks (float32). For greedy decoding (temperature == 0) they are log_softmax of the raw logits.

Top-k then top-p, after temperature (the order transformers uses). Top-p (nucleus) keeps the
smallest set of most probable tokens whose probability mass reaches top_p; tokens tied with the
last kept one are kept too. It avoids a full-vocabulary sort: `lax.top_k` gives C =
`top_p_candidates` candidates and a full logsumexp gives their exact mass; when every row's
nucleus fits in them the token is drawn among the C candidates. Otherwise the step falls back
(`lax.cond`) to an exact threshold found by bisection over the float32 values (32 masked sums
over the vocabulary, still no sort) for the rows whose nucleus the candidates miss.

Stop strings: with a `tokenizer`, each stop string is also encoded to token ids and checked
inside the loop on the trailing generated tokens, so rows stop early in the common case. The
exact rule is applied on the host after the loop: the completion is decoded and, if it contains
a stop string, cut to the shortest token prefix whose text contains it (the tokens that complete
the stop string are kept, as EOS is). A stop string produced by a different tokenization than
its encoding is still cut exactly on the host; that row merely ran on until EOS or M. With only
`decode=` (no encoder) the check is host-side only.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from rpo import distributed
from rpo import sharding as sharding_lib
from rpo.models import decoder
from rpo.models.config import ModelConfig

NEG_INF = decoder.NEG_INF  # the decoder's finite "minus infinity" for masked scores


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerateOutput:
    """Completions of `generate`: index [i][j] is sample j of prompt i.

    tokens: completion token ids (no prompt, no padding; the EOS token included when generated).
    logprobs: float log-prob of each of those tokens (see the module docstring for which
      distribution).
    finish_reasons: "eos", "stop" (a stop string) or "length" (max_new_tokens reached).
    """

    tokens: list[list[list[int]]]
    logprobs: list[list[list[float]]]
    finish_reasons: list[list[str]]


def default_rows_per_prompt(n: int) -> int:
    """generate's rows per prompt slot: n / 2 for an even n >= 4, else n. Measured on SmolLM2-135M at N = 8
    (experiments/results/bench_sampling.md, --waste): halving the rows per prompt cut the decode cost per
    generated token by 15-25% (fewer rows idle, a step no dearer), quartering it gained no more (the step
    got dearer)."""
    return n // 2 if n >= 4 and n % 2 == 0 else n


def bucket(n: int, minimum: int = 1) -> int:
    """The bucket of a size: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def generate(
    config: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    n: int = 1,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_ids: Sequence[int] | None = None,
    stop: Sequence[str] | None = None,
    tokenizer: Any = None,
    decode: Callable[[list[int]], str] | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    rows_per_prompt: int | None = None,
    mesh: Mesh | None = None,
    rules=sharding_lib.DEFAULT_RULES,
    top_p_candidates: int = 256,
    min_prompt_bucket: int = 16,
    progress: bool | None = None,
    stats: dict | None = None,
) -> GenerateOutput:
    """Samples `n` completions of each prompt (a list of token-id lists).

    temperature 0 is greedy (top_p / top_k ignored). top_k 0 and top_p 1 switch those off.
    eos_ids: a row stops after emitting one of them (default `config.eos_token_ids`; pass ()
      to never stop on EOS).
    stop: stop strings; need `tokenizer` (an HF tokenizer: encodes them for the in-loop check
      and decodes completions) or `decode` (ids -> str; host-side check only).
    batch_size: prompts per prefill chunk (default: as many as give about 256 rows, i.e. 256 // n, at least 1),
      bucketed to a power of two R; the decode loop runs R * n rows.
    rows_per_prompt: decode rows per prompt slot, s (default: default_rows_per_prompt(n); must divide R * n):
      the rows hold R * n / s prompts at a time, and each prompt's n samples pass through its s rows, a row starting the next sample
      as soon as its last one finished (continuous batching; see the module docstring). Samples do not
      depend on it, only the decode work does.
    mesh: run under this mesh; rows are sharded over the batch axes of `rules`, params by the
      same rules as training (rpo.sharding.param_shardings; a no-op for params already
      placed that way). The row bucket is then also a multiple of the batch axes' size. The mesh
      may span processes (rpo.distributed; then it is required): every process calls generate
      with the same arguments, packs only the prompt rows its devices hold, and gets every
      completion back.
    progress: print progress to stderr every 30 s (default: when there is more than one prefill chunk).
    stats: a dict that receives (summed over calls) prefill_s (prefill and refills) and decode_s (wall seconds;
      each phase is then waited for, for the timing), decode_steps (loop iterations), slot_steps (rows x loop
      iterations, the decode work done), live_slot_steps (the part of it spent on rows still generating),
      decode_segments (times the loop handed back to the host to refill rows), prompt_tokens.
    """
    if n < 1:
        raise ValueError(f"n={n}: need at least one sample per prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: need at least 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is negative")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} is negative")
    prompts = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if min(p) < 0 or max(p) >= config.vocab_size:
            raise ValueError(f"prompt {i} holds a token id outside [0, {config.vocab_size})")
    stop = list(stop or [])
    if stop and tokenizer is None and decode is None:
        raise ValueError("stop strings need tokenizer= (an HF tokenizer) or decode= (ids -> str)")
    if decode is None and tokenizer is not None:
        decode = lambda ids: tokenizer.decode(ids)  # noqa: E731
    eos = tuple(config.eos_token_ids if eos_ids is None else eos_ids)
    if mesh is None and distributed.process_count() > 1:
        raise ValueError(f"generate on {distributed.process_count()} processes needs mesh= (a mesh over their devices)")
    if not prompts:
        return GenerateOutput([], [], [])

    greedy = temperature == 0.0
    top_k = 0 if greedy or top_k >= config.vocab_size else int(top_k)
    use_top_p = (not greedy) and top_p < 1.0
    candidates = min(top_k or int(top_p_candidates), config.vocab_size)
    stop_seqs = _encode_stops(stop, tokenizer) if stop and tokenizer is not None else np.zeros((0, 0), np.int32)

    # Place params once: cast to the compute dtype (hoisted out of the loop) and shard.
    dtype = jnp.dtype(config.dtype)
    if mesh is not None:
        shardings = sharding_lib.param_shardings(config, mesh, rules)
        params = jax.tree.map(lambda w, s: jax.device_put(w.astype(dtype), s), params, shardings)
        row_multiple = int(np.prod([mesh.shape[a] for a in sharding_lib.batch_axes(mesh, rules)]))
    else:
        params = jax.tree.map(lambda w: jnp.asarray(w, dtype), params)
        row_multiple = 1

    if batch_size is None:
        batch_size = max(1, 256 // n)
    chunk_rows = bucket(min(batch_size, len(prompts)), row_multiple)
    chunk_rows = -(-chunk_rows // row_multiple) * row_multiple
    rows = chunk_rows * n
    per_slot = default_rows_per_prompt(n) if rows_per_prompt is None else int(rows_per_prompt)
    if not 1 <= per_slot <= n or rows % per_slot:
        raise ValueError(f"rows_per_prompt={rows_per_prompt}: must be in [1, n={n}] and divide the {rows} decode rows")
    if (rows // per_slot) % row_multiple:
        raise ValueError(f"rows_per_prompt={rows_per_prompt}: {rows // per_slot} prompt slots are not a multiple of "
                         f"the mesh's {row_multiple} batch shards")
    spec = _Spec(greedy=greedy, top_k=top_k, use_top_p=use_top_p, candidates=candidates, per_slot=per_slot,
                 max_new=int(max_new_tokens), num_eos=len(eos), stop_shape=stop_seqs.shape)
    plen = bucket(max(len(p) for p in prompts), min_prompt_bucket)
    consts = dict(
        eos=jnp.asarray(np.asarray(eos, np.int32).reshape(-1)),
        stop_seqs=jnp.asarray(stop_seqs),
        temperature=jnp.float32(temperature if not greedy else 1.0),
        top_p=jnp.float32(top_p),
        seed=jnp.uint32(int(seed) % (1 << 32)),
    )
    run = _Run(config, spec, mesh, rules, params, consts, prompts, n, chunk_rows, rows, plen, stats)
    if progress is None:
        progress = len(prompts) > chunk_rows
    results = run.loop(progress and distributed.is_main())

    out = GenerateOutput([], [], [])
    for per_prompt in results:
        ts, ls, rs = [], [], []
        for t, lp, reason in per_prompt:
            if stop:
                t, lp, reason = _cut_at_stop(t, lp, reason, stop, decode)
            ts.append(t)
            ls.append(lp)
            rs.append(reason)
        out.tokens.append(ts)
        out.logprobs.append(ls)
        out.finish_reasons.append(rs)
    return out


class _Run:
    """The host side of one generate call: feeds prompts into the decode rows as rows free up.

    The decode batch has `rows` rows in `slots` prompt slots of spec.per_slot rows each (row b is in slot
    b // per_slot). A slot holds one prompt's cache at a time; its rows take that prompt's samples j = 0..n-1 in
    order, each row starting its next sample as soon as its previous one finished; when all n samples of the
    slot's prompt are finished, the slot takes the next waiting prompt or, once none waits, a copy of the prompt
    with the most samples still to start. Prompts are prefilled `chunk_rows` at a
    time (the chunk's caches wait on the device until slots take them). The decode loop leaves the device only
    when enough rows can be refilled (`_refill_min`), or when every row is done."""

    def __init__(self, config, spec, mesh, rules, params, consts, prompts, n, chunk_rows, rows, plen, stats):
        self.static = (config, spec, mesh, rules)
        self.params, self.consts, self.prompts, self.n = params, consts, prompts, n
        self.chunk_rows, self.rows, self.plen, self.stats = chunk_rows, rows, plen, stats
        self.per_slot = spec.per_slot
        self.slots = rows // spec.per_slot
        self.slot_prompt = [-1] * self.slots  # the prompt a slot holds (-1: none); a prompt may be in several
        self.next_sample: dict[int, int] = {}  # prompt -> its next sample to start
        self.row_job: list[tuple[int, int] | None] = [None] * rows  # (prompt, sample) a row is generating
        self.next_prompt = 0  # prompts before this one have been prefilled
        self.chunk: tuple[dict, list[int]] | None = None  # a prefilled chunk: (device arrays, its prompts)
        self.chunk_pos = 0  # the next of the chunk's prompts to place in a slot
        self.results: list[list[Any]] = [[None] * n for _ in prompts]

    def loop(self, progress: bool):
        config, spec, mesh, rules = self.static
        t0, finished, reported = time.time(), 0, 0
        timing = self.stats is not None
        prefill_s = decode_s = 0.0
        live_slot_steps = steps = segments = 0  # steps: the decode loop's iteration count (state["i"])
        state = _init_state(config, spec, mesh, rules, self.rows, self.plen, self.consts)
        while True:
            t = time.perf_counter()
            state = self._refill(state)
            if timing:
                jax.block_until_ready(state)
                prefill_s += time.perf_counter() - t
            if all(job is None for job in self.row_job):
                break
            t = time.perf_counter()
            left = np.array([self._left(r) for r in range(self.slots)], np.int32)
            sched = dict(left=jnp.asarray(left), waiting=jnp.bool_(self._waiting() or left.any()),
                         at_least=jnp.int32(_refill_min(self.rows)))
            state = _decode(config, spec, mesh, rules, self.params, state, self.consts, sched)
            toks, lps, lens, reasons, done, i1 = distributed.fetch(
                (state["tokens"], state["logprobs"], state["length"], state["reason"], state["done"], state["i"]))
            decode_s += time.perf_counter() - t
            steps = int(i1)
            segments += 1
            for b, job in enumerate(self.row_job):
                if job is not None and done[b]:
                    k = int(lens[b])
                    self.results[job[0]][job[1]] = (toks[b, :k].tolist(), lps[b, :k].tolist(), _REASONS[int(reasons[b])])
                    live_slot_steps += max(k - 1, 0)
                    self.row_job[b] = None
                    finished += 1
            if progress and (finished == len(self.prompts) * self.n or time.time() - t0 > reported + 30):
                reported = time.time() - t0
                print(f"[rpo.sampling] {finished}/{len(self.prompts) * self.n} samples ({len(self.prompts)} prompts x "
                      f"{self.n}), {self.rows} rows in {self.slots} prompt slots, prompt_len={self.plen}, "
                      f"{reported:.1f}s", file=sys.stderr, flush=True)
        if self.stats is not None:
            add = dict(prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps, slot_steps=steps * self.rows,
                       live_slot_steps=live_slot_steps, decode_segments=segments,
                       prompt_tokens=sum(len(p) for p in self.prompts))
            for k, v in add.items():
                self.stats[k] = self.stats.get(k, 0) + v
        return self.results

    def _refill(self, state):
        """Gives every free row its next sample, every finished slot the next waiting prompt and, once no
        prompt waits, every empty slot a copy of the prompt with the most samples still to start (so that the
        call's last samples spread over the free rows); returns the state with those rows started (their first
        token drawn from the prompt's prefill logits)."""
        config, spec, mesh, rules = self.static
        start = np.zeros(self.rows, bool)
        ids = np.zeros(self.rows, np.int32)
        sample = np.zeros(self.rows, np.int32)

        def assign(r):
            for b in range(r * self.per_slot, (r + 1) * self.per_slot):
                if self.row_job[b] is None and self._left(r):
                    i = self.slot_prompt[r]
                    self.row_job[b] = (i, self.next_sample[i])
                    start[b], ids[b], sample[b] = True, i, self.next_sample[i]
                    self.next_sample[i] += 1

        dst = None  # slots the current chunk's prompts go to (index: the prompt's row in the chunk)
        for r in range(self.slots):
            mine = range(r * self.per_slot, (r + 1) * self.per_slot)
            if not self._left(r) and all(self.row_job[b] is None for b in mine):
                self.slot_prompt[r] = -1
                if not self._chunk_left():
                    if dst is not None:
                        state, dst = _load(config, spec, mesh, rules, state, self.chunk[0], jnp.asarray(dst)), None
                    self._prefill_next_chunk()
                if self._chunk_left():
                    if dst is None:
                        dst = np.full(self.chunk_rows, self.slots, np.int32)  # out of range: not copied
                    dst[self.chunk_pos] = r
                    self.slot_prompt[r] = self.chunk[1][self.chunk_pos]
                    self.next_sample[self.slot_prompt[r]] = 0
                    self.chunk_pos += 1
            assign(r)
        if dst is not None:
            state = _load(config, spec, mesh, rules, state, self.chunk[0], jnp.asarray(dst))
        src = np.full(self.slots, self.slots, np.int32)  # slot r copies slot src[r] (out of range: no copy)
        for r in range(self.slots):
            if self.slot_prompt[r] < 0:
                q = max(range(self.slots), key=self._left)
                if self._left(q):
                    src[r], self.slot_prompt[r] = q, self.slot_prompt[q]
                    assign(r)
        if (src < self.slots).any():
            state = _copy_slots(config, spec, mesh, rules, state, jnp.asarray(src))
        if start.any():
            state = _start(config, spec, mesh, rules, state, jnp.asarray(start), jnp.asarray(ids), jnp.asarray(sample),
                           self.consts)
        return state

    def _left(self, r: int) -> int:
        """Samples of slot r's prompt not started yet."""
        i = self.slot_prompt[r]
        return 0 if i < 0 else self.n - self.next_sample[i]

    def _chunk_left(self) -> bool:
        return self.chunk is not None and self.chunk_pos < len(self.chunk[1])

    def _waiting(self) -> bool:
        """Whether a prompt is still waiting for its first slot."""
        return self._chunk_left() or self.next_prompt < len(self.prompts)

    def _prefill_next_chunk(self):
        """Prefills the next chunk_rows waiting prompts (self.chunk: None when none is left)."""
        config, spec, mesh, rules = self.static
        self.chunk, self.chunk_pos = None, 0
        if self.next_prompt < len(self.prompts):
            idx = list(range(self.next_prompt, min(self.next_prompt + self.chunk_rows, len(self.prompts))))
            self.next_prompt = idx[-1] + 1
            self.chunk = (_prefill(config, spec, mesh, rules, self.params, self._pack(idx)), idx)

    def _pack(self, idx: list[int]):
        config, _, mesh, rules = self.static
        pad = config.pad_token_id
        if mesh is None:
            return _pack(self.prompts, idx, self.chunk_rows, self.plen, pad)
        # each process packs the rows its devices hold (real rows first, as in the whole batch)
        mine = distributed.process_rows(sharding_lib.batch_sharding(mesh, 1, rules), (self.chunk_rows,))
        local = _pack(self.prompts, [idx[r] for r in mine if r < len(idx)], len(mine), self.plen, pad)
        return jax.make_array_from_process_local_data(
            {k: sharding_lib.batch_sharding(mesh, v.ndim, rules) for k, v in local.items()}, local,
            {k: (self.chunk_rows,) + v.shape[1:] for k, v in local.items()},
        )


def _refill_min(rows: int) -> int:
    """Rows that must be refillable before the decode loop hands back to the host: a sixteenth of the rows (at
    least 1), so a refill round trip comes once per ~rows/16 finished samples while at most that many rows wait."""
    return max(1, rows // 16)


# ---------------------------------------------------------------------------------------
# Host-side helpers
# ---------------------------------------------------------------------------------------


_REASONS = ("length", "eos", "stop")


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about a sampling call (part of the compile key)."""

    greedy: bool
    top_k: int
    use_top_p: bool
    candidates: int
    per_slot: int  # rows per prompt slot
    max_new: int
    num_eos: int
    stop_shape: tuple[int, int]


def _pack(prompts, idx, rows: int, plen: int, pad_id) -> dict[str, np.ndarray]:
    """Prompts idx (then padding rows) as a batch of `rows`: left-padded [R, P] tokens, positions, mask."""
    pad = 0 if pad_id is None else int(pad_id)
    tokens = np.full((rows, plen), pad, np.int32)
    positions = np.zeros((rows, plen), np.int32)
    mask = np.zeros((rows, plen), bool)
    for r, i in enumerate(idx):
        p = prompts[i]
        tokens[r, plen - len(p) :] = p
        positions[r, plen - len(p) :] = np.arange(len(p))
        mask[r, plen - len(p) :] = True
    # Bucket padding rows (never placed in a slot) get one real token so that their softmax rows are finite.
    mask[len(idx) :, -1] = True
    return dict(tokens=tokens, positions=positions, mask=mask)


def _encode_stops(stop: list[str], tokenizer) -> np.ndarray:
    """[Q, W] token-id sequences, right-aligned, -1 padded on the left."""
    seqs = [list(tokenizer.encode(s, add_special_tokens=False)) for s in stop]
    seqs = [s for s in seqs if s]
    if not seqs:
        return np.zeros((0, 0), np.int32)
    w = max(len(s) for s in seqs)
    out = np.full((len(seqs), w), -1, np.int32)
    for q, s in enumerate(seqs):
        out[q, w - len(s) :] = s
    return out


def _cut_at_stop(tokens, logprobs, reason, stop, decode):
    """Cuts a completion to the shortest prefix whose text contains a stop string."""
    if not any(s in decode(tokens) for s in stop):
        return tokens, logprobs, reason
    lo, hi = 1, len(tokens)  # the shortest k with a stop string in decode(tokens[:k]) is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in decode(tokens[:mid]) for s in stop):
            hi = mid
        else:
            lo = mid + 1
    return tokens[:lo], logprobs[:lo], "stop"


# ---------------------------------------------------------------------------------------
# Token choice (inside jit)
# ---------------------------------------------------------------------------------------

_BLOCK = 128  # block width of the two-level inverse-CDF draw


def _argmax_first(x_BV):
    """argmax (first index among ties) as two plain reductions: much faster than the
    variadic (value, index) reduce of jnp.argmax on CPU."""
    m_B = jnp.max(x_BV, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, 1)
    return jnp.min(jnp.where(x_BV == m_B, iota, x_BV.shape[-1]), axis=-1).astype(jnp.int32)


def _last_positive(p_BX):
    """Index of the last entry > 0 in each row."""
    iota = jax.lax.broadcasted_iota(jnp.int32, p_BX.shape, 1)
    return jnp.max(jnp.where(p_BX > 0, iota, 0), axis=-1)


def _draw(scores_BV, u_B):
    """One categorical draw per row from unnormalised log-probs, by inverse CDF with one
    uniform u in [0, 1) per row. Two levels (blocks of _BLOCK, then within the block) so
    that no full-width cumsum is needed: the cost is one exp pass and one block reduction.

    Returns (token [B] int32, logsumexp [B]). Entries at NEG_INF have probability 0 and are
    never drawn.
    """
    b, v = scores_BV.shape
    blk = min(_BLOCK, v)
    nb = -(-v // blk)
    if nb * blk != v:
        scores_BV = jnp.pad(scores_BV, ((0, 0), (0, nb * blk - v)), constant_values=NEG_INF)
    m_B = jnp.max(scores_BV, axis=-1)
    x_BNK = scores_BV.reshape(b, nb, blk)
    p_BNK = jnp.exp(x_BNK - m_B[:, None, None])
    bs_BN = jnp.sum(p_BNK, axis=-1)
    cb_BN = jnp.cumsum(bs_BN, axis=-1)
    total_B = cb_BN[:, -1]
    target_B = u_B * total_B
    bi_B = jnp.sum(cb_BN <= target_B[:, None], axis=-1)
    bi_B = jnp.where(bi_B >= nb, _last_positive(bs_BN), bi_B)
    before_B = jnp.take_along_axis(cb_BN - bs_BN, bi_B[:, None], axis=-1)[:, 0]
    xb_BK = jnp.take_along_axis(x_BNK, bi_B[:, None, None], axis=1)[:, 0]
    pb_BK = jnp.exp(xb_BK - m_B[:, None])
    cw_BK = jnp.cumsum(pb_BK, axis=-1)
    wi_B = jnp.sum(cw_BK <= (target_B - before_B)[:, None], axis=-1)
    wi_B = jnp.where(wi_B >= blk, _last_positive(pb_BK), wi_B)
    # Rounding can land on a zero-probability entry of the block; step back to a positive one.
    wi_B = jnp.where(jnp.take_along_axis(pb_BK, wi_B[:, None], axis=-1)[:, 0] > 0, wi_B, _last_positive(pb_BK))
    tok_B = (bi_B * blk + wi_B).astype(jnp.int32)
    return tok_B, m_B + jnp.log(total_B)


def _gather(x_BV, tok_B):
    return jnp.take_along_axis(x_BV, tok_B[:, None], axis=-1)[:, 0]


def _nucleus_threshold(sorted_BC, lse_B, top_p):
    """The smallest kept value of the nucleus, from scores sorted in descending order.

    Token c is kept iff the mass strictly before it is < top_p (the smallest top set whose
    mass reaches top_p). Returns (threshold [B], covered [B]: the nucleus lies inside these C).
    """
    p = jnp.exp(sorted_BC - lse_B[:, None])
    before = jnp.cumsum(p, axis=-1) - p
    keep = (before < top_p).at[:, 0].set(True)
    count = jnp.sum(keep, axis=-1)
    thresh = jnp.take_along_axis(sorted_BC, (count - 1)[:, None], axis=-1)[:, 0]
    covered = jnp.sum(p, axis=-1) >= top_p
    return thresh, covered


def _float_key(x):
    """A monotone map of float32 to int32 (x < y iff key(x) < key(y) for non-NaN)."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(i >= 0, i, i ^ jnp.int32(0x7FFFFFFF))


def _nucleus_threshold_bisect(scores_BV, lse_B, top_p):
    """Exact nucleus threshold without a sort: bisection over the 2^32 float32 values on
    the largest t with mass(scores >= t) >= top_p (32 masked sums over the vocabulary).
    Returns the threshold as a float key (compare with _float_key(scores))."""
    keys_BV = _float_key(scores_BV)
    p_BV = jnp.exp(scores_BV - lse_B[:, None])
    lo = jnp.min(keys_BV, axis=-1)  # mass(>= lo) = 1 >= top_p: valid
    hi = jnp.max(keys_BV, axis=-1) + 1  # mass(>= hi) = 0 < top_p: invalid

    def body(_, lohi):
        lo, hi = lohi
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
        ok = jnp.sum(jnp.where(keys_BV >= mid[:, None], p_BV, 0.0), axis=-1) >= top_p
        ok = ok & (mid > lo)
        return jnp.where(ok, mid, lo), jnp.where(ok | (mid <= lo), hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return lo


def choose(spec: _Spec, logits_BV, u_B, temperature, top_p, live_B=None):
    """Chooses one token per row. Returns (tokens [B] int32, logprobs [B] float32).

    u_B: one uniform in [0, 1) per row (ignored when greedy). The logprob is that of the
    token under the distribution it was drawn from (see the module docstring).
    live_B: rows whose token matters (finished and padding rows must not force the top-p
    fallback); default all.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    if spec.greedy:
        tok = _argmax_first(logits_BV)
        return tok, _gather(logits_BV, tok) - jax.nn.logsumexp(logits_BV, axis=-1)
    scaled_BV = logits_BV / temperature
    if spec.top_k or spec.use_top_p:
        # Candidates: the top-k itself (exact), or top-C for top-p with an exact fallback.
        vals_BC, idx_BC = jax.lax.top_k(scaled_BV, spec.candidates)
        lse_B = jax.nn.logsumexp(vals_BC if spec.top_k else scaled_BV, axis=-1)
        covered = jnp.ones((), bool)
        if spec.use_top_p:
            thresh, cov_B = _nucleus_threshold(vals_BC, lse_B, top_p)
            vals_BC = jnp.where(vals_BC >= thresh[:, None], vals_BC, NEG_INF)
            covered = jnp.all(cov_B if live_B is None else cov_B | ~live_B)

        def among_candidates(_):
            c, lse = _draw(vals_BC, u_B)
            return _gather(idx_BC, c).astype(jnp.int32), _gather(vals_BC, c) - lse

        if spec.top_k:
            return among_candidates(None)

        def full_vocab(_):  # rows whose nucleus the candidates cover keep their candidate draw (row independence)
            t_key = _nucleus_threshold_bisect(scaled_BV, lse_B, top_p)
            masked = jnp.where(_float_key(scaled_BV) >= t_key[:, None], scaled_BV, NEG_INF)
            tok, lse = _draw(masked, u_B)
            c_tok, c_lp = among_candidates(None)
            return jnp.where(cov_B, c_tok, tok), jnp.where(cov_B, c_lp, _gather(masked, tok) - lse)

        return jax.lax.cond(covered, among_candidates, full_vocab, None)
    tok, lse = _draw(scaled_BV, u_B)
    return tok, _gather(scaled_BV, tok) - lse


# ---------------------------------------------------------------------------------------
# Prefill and decode (jitted)
# ---------------------------------------------------------------------------------------

# Times each jitted function has been traced (i.e. compiled for a new bucket); for tests.
trace_counts: dict[str, int] = {"init": 0, "prefill": 0, "load": 0, "copy": 0, "start": 0, "decode": 0}


def _constrain(x, mesh, rules, names):
    if mesh is None:
        return x
    spec = sharding_lib.logical_to_spec(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _uniforms(key_data_B, step_B):
    """One uniform per row for its step: fold_in(row key, step). Row keys are kept as raw key data
    (jax.random.key_data) so that refilled rows can swap theirs with jnp.where."""
    keys = jax.random.wrap_key_data(key_data_B)
    return jax.vmap(lambda k, t: jax.random.uniform(jax.random.fold_in(k, t), (), jnp.float32))(keys, step_B)


def _record(spec: _Spec, state, tok_B, lp_B, live_B, consts):
    """Writes the live rows' next tokens (at each row's own length) and updates the finished flags."""
    length_B = state["length"]
    m = spec.max_new
    rows_B = jnp.arange(length_B.shape[0])
    at_B = jnp.where(live_B, length_B, m)  # out of range for rows not recording: dropped
    state["tokens"] = state["tokens"].at[rows_B, at_B].set(tok_B, mode="drop")
    state["logprobs"] = state["logprobs"].at[rows_B, at_B].set(lp_B, mode="drop")
    length_B = length_B + live_B.astype(jnp.int32)
    state["length"] = length_B
    is_eos = jnp.zeros_like(live_B)
    if spec.num_eos:
        is_eos = jnp.any(tok_B[:, None] == consts["eos"][None, :], axis=-1)
    is_stop = jnp.zeros_like(live_B)
    if spec.stop_shape[0]:
        window = jnp.concatenate([state["window"][:, 1:], tok_B[:, None]], axis=1)
        seqs = consts["stop_seqs"]  # [Q, W], right-aligned, -1 padded
        match = (window[:, None, :] == seqs[None]) | (seqs[None] < 0)
        is_stop = jnp.any(jnp.all(match, axis=-1), axis=-1)
        state["window"] = jnp.where(live_B[:, None], window, state["window"])
    reason = jnp.where(is_eos, 1, jnp.where(is_stop, 2, 0))
    state["reason"] = jnp.where(live_B, reason, state["reason"]).astype(jnp.int32)
    state["done"] = state["done"] | (live_B & (is_eos | is_stop | (length_B >= m)))
    state["last"] = jnp.where(live_B, tok_B, state["last"])
    return state


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _init_state(config: ModelConfig, spec: _Spec, mesh, rules, rows: int, plen: int, consts):
    """The decode state with every row free: `rows` rows in rows / per_slot empty prompt slots of plen
    prompt tokens, M = spec.max_new generated slots per row."""
    trace_counts["init"] += 1
    slots, m = rows // spec.per_slot, spec.max_new
    dtype = jnp.dtype(config.dtype)
    c = lambda x, names: _constrain(x, mesh, rules, names)  # noqa: E731
    empty_kv = jnp.zeros((config.num_layers, slots, plen, config.num_kv_heads, config.head_dim), dtype)
    cache = decoder.step_cache(config, {"k": empty_kv, "v": empty_kv}, c(jnp.zeros((slots, plen), bool), ("batch", None)),
                               spec.per_slot, m, c)
    key_data = jax.random.key_data(jax.random.key(consts["seed"]))
    state = {
        "cache": cache,
        "prompt_logits": c(jnp.zeros((slots, config.vocab_size), jnp.float32), ("batch", None)),
        "prompt_end": c(jnp.zeros((slots,), jnp.int32), ("batch",)),  # position after the slot's prompt
        "tokens": c(jnp.full((rows, m), -1, jnp.int32), ("batch", None)),
        "logprobs": c(jnp.zeros((rows, m), jnp.float32), ("batch", None)),
        "length": c(jnp.zeros((rows,), jnp.int32), ("batch",)),
        "reason": c(jnp.zeros((rows,), jnp.int32), ("batch",)),
        "done": c(jnp.ones((rows,), bool), ("batch",)),
        "last": c(jnp.zeros((rows,), jnp.int32), ("batch",)),
        "keys": c(jnp.zeros((rows,) + key_data.shape, key_data.dtype), ("batch", None)),
        "i": jnp.zeros((), jnp.int32),
    }
    if spec.stop_shape[0]:
        state["window"] = c(jnp.full((rows, spec.stop_shape[1]), -1, jnp.int32), ("batch", None))
    return state


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _prefill(config: ModelConfig, spec: _Spec, mesh, rules, params, batch):
    """Runs a chunk of prompts once: each layer's keys and values laid out as the decode cache's prompt
    part, the prompt mask, the position after the prompt and the last position's logits."""
    trace_counts["prefill"] += 1
    tokens_RP, positions_RP, mask_RP = batch["tokens"], batch["positions"], batch["mask"]
    h_RPD, kv = decoder.hidden_states(config, params, tokens_RP, positions_BT=positions_RP, mask_BT=mask_RP,
                                      return_kv=True)
    # Only the last position's logits are needed: skip the [R, P, V] unembedding.
    logits_RV = decoder.logits_from_hidden(config, params, h_RPD[:, -1:, :])[:, 0]
    chunk = decoder.prompt_cache(config, kv, lambda x, names: _constrain(x, mesh, rules, names))
    return dict(chunk, prompt_mask=mask_RP, prompt_logits=logits_RV.astype(jnp.float32),
                prompt_end=positions_RP[:, -1] + 1)


def _put_slots(state, prompts, dst_C):
    """Prompt c of `prompts` (a prefilled chunk's arrays, or slots' own) into prompt slot dst_C[c] (out of
    range: not copied)."""
    put = lambda slots, x: slots.at[dst_C].set(x.astype(slots.dtype), mode="drop")  # noqa: E731
    cache = state["cache"]
    cache = dict(cache, prompt_k=[put(a, x) for a, x in zip(cache["prompt_k"], prompts["prompt_k"])],
                 prompt_v=[put(a, x) for a, x in zip(cache["prompt_v"], prompts["prompt_v"])],
                 prompt_mask=put(cache["prompt_mask"], prompts["prompt_mask"]))
    return dict(state, cache=cache, prompt_logits=put(state["prompt_logits"], prompts["prompt_logits"]),
                prompt_end=put(state["prompt_end"], prompts["prompt_end"]))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4,))
def _load(config: ModelConfig, spec: _Spec, mesh, rules, state, chunk, dst_C):
    """Copies prompt c of a prefilled chunk into prompt slot dst_C[c] (out of range: not copied)."""
    trace_counts["load"] += 1
    return _put_slots(state, chunk, dst_C)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4,))
def _copy_slots(config: ModelConfig, spec: _Spec, mesh, rules, state, src_R):
    """Slot r takes a copy of slot src_R[r]'s prompt (out of range: unchanged)."""
    trace_counts["copy"] += 1
    slots = src_R.shape[0]
    take = jnp.minimum(src_R, slots - 1)
    dst_R = jnp.where(src_R < slots, jnp.arange(slots), slots)
    cache = state["cache"]
    copies = {k: [a[take] for a in cache[k]] for k in ("prompt_k", "prompt_v")}
    copies.update(prompt_mask=cache["prompt_mask"][take], prompt_logits=state["prompt_logits"][take],
                  prompt_end=state["prompt_end"][take])
    return _put_slots(state, copies, dst_R)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(4,))
def _start(config: ModelConfig, spec: _Spec, mesh, rules, state, start_B, ids_B, sample_B, consts):
    """Starts sample sample_B[b] of prompt ids_B[b] (the prompt in row b's slot) in the rows where start_B:
    its key, an empty completion, and its first token drawn from the prompt's prefill logits (step 0)."""
    trace_counts["start"] += 1
    base = jax.random.key(consts["seed"])
    new_keys = jax.vmap(lambda i, j: jax.random.key_data(jax.random.fold_in(jax.random.fold_in(base, i), j)))(
        ids_B, sample_B)
    state = dict(state)
    col = start_B[:, None]
    state["keys"] = jnp.where(col, new_keys, state["keys"])
    state["tokens"] = jnp.where(col, -1, state["tokens"])
    state["logprobs"] = jnp.where(col, 0.0, state["logprobs"])
    state["length"] = jnp.where(start_B, 0, state["length"])
    state["done"] = state["done"] & ~start_B
    if spec.stop_shape[0]:
        state["window"] = jnp.where(col, -1, state["window"])
    logits_BV = jnp.repeat(state["prompt_logits"], spec.per_slot, axis=0)
    tok, lp = choose(spec, logits_BV, _uniforms(state["keys"], jnp.zeros_like(ids_B)), consts["temperature"],
                     consts["top_p"], start_B)
    return _record(spec, state, tok, lp, start_B, consts)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
def _decode(config: ModelConfig, spec: _Spec, mesh, rules, params, state, consts, sched):
    """The decode loop: one token per live row per iteration, until every row is done or at least
    sched["at_least"] rows could be refilled (a row whose slot still has sched["left"] samples to start, or
    every row of a slot whose samples are all done while sched["waiting"] prompts wait). The state (cache
    included) is donated and updated in place."""
    trace_counts["decode"] += 1
    layers, w_DV = decoder.step_params(config, params)
    m, s = spec.max_new, spec.per_slot
    rope_PE = decoder.rope_table(config, state["cache"]["prompt_mask"].shape[1] + m)  # positions < prompt bucket + m
    left_R = sched["left"]

    def cond(state):
        done_RS = state["done"].reshape(-1, s)
        free_R = jnp.sum(done_RS, axis=-1, dtype=jnp.int32)
        whole_slot = jnp.where(sched["waiting"] & jnp.all(done_RS, axis=-1), s, 0)
        refillable = jnp.sum(jnp.where(left_R > 0, jnp.minimum(free_R, left_R), whole_slot))
        return ~jnp.all(state["done"]) & (refillable < sched["at_least"])

    def body(state):
        live_B, length_B = ~state["done"], state["length"]
        # Row b feeds its last token (sampled at its step length - 1) at position prompt_end + length - 1 and
        # writes its key and value at generated slot length - 1.
        cache = dict(state["cache"], index=jnp.clip(length_B - 1, 0, m - 1))
        pos_B = jnp.repeat(state["prompt_end"], s) + length_B - 1
        logits_BV, cache = decoder.decode_step(config, params, layers, w_DV, state["last"], pos_B, cache, rope_PE)
        state = dict(state, cache=cache, i=state["i"] + 1)
        tok, lp = choose(spec, logits_BV, _uniforms(state["keys"], length_B), consts["temperature"], consts["top_p"],
                         live_B)
        return _record(spec, state, tok, lp, live_B, consts)

    return jax.lax.while_loop(cond, body, state)
