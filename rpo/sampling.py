"""Sampling: one prefill per prompt, then a jitted `lax.while_loop` decode over a static KV cache.

Shape letters as in rpo.models.decoder (B batch rows, T tokens, S cache slots, V vocab, ...),
plus P prompt length (bucketed), M max new tokens, R prompt rows (before the N-fold repeat;
B = R * N), C top-p candidates, Q stop sequences, W longest stop sequence.

How a batch is run:

1. Prompts are **left-padded** to a bucketed length P (a power of two, at least 16) and the
   batch of prompts to a bucketed row count R (a power of two, and a multiple of the mesh's
   batch axes); padded rows are inactive from the start. RoPE positions are per row
   (`max(0, slot - pad)`), so padding does not shift them. A long run with varied prompt
   lengths therefore compiles a handful of times (one per (R, P) bucket), not once per batch.
2. **Prefill once per prompt**: the R prompts run once through the decoder
   (`decoder.hidden_states`, keeping each layer's keys and values; only the last position is
   unembedded), and
   the first token of each of the N samples (row r * N + j is sample j of prompt r) is drawn
   from the prompt's prefill logits. The prompt is never run N times, and its keys/values are
   not copied N times either: the decode cache keeps the prompt part once per prompt
   ([R, K, P, E] per layer) and only the generated part per sample ([B, K, M, E] per layer);
   attention takes one softmax over both. Each step thus reads the prompt's cache once for
   its N samples instead of N times (for 256-token prompts, N = 8 and 128 new tokens, 2.4x
   less cache traffic per step than repeating the cache rows).
3. **Decode** in one jitted `lax.while_loop` whose state (cache, token buffer, ...) is donated
   and updated in place; it stops as soon as every row has finished (EOS, an in-loop stop
   sequence, or M tokens). The step is the model's `decoder.decode_step` over that cache
   (`decoder.step_cache`): heads before slots (attention is batched matmuls), one buffer per
   layer (each written in place). Per-layer param slices and the unembedding are hoisted out
   of the loop (`decoder.step_params`).

Randomness: the key of sample j of prompt i (its index in `prompts`) is
`fold_in(fold_in(key(seed), i), j)`; step t draws one uniform from `fold_in(that key, t)` and
picks the token by inverse CDF (two levels: blocks of 128 tokens, then within the block, so no
full-vocabulary cumsum or per-token random numbers are needed). Samples therefore depend only
on (seed, i, j, model), not on batching, bucketing or the mesh: a seed gives the same samples
every time on the same machine.

Log-probs (`GenerateOutput.logprobs`) are those of the sampled token **under the distribution
it was actually drawn from**: log_softmax of logits / temperature after the top-k and top-p
masks (float32). For greedy decoding (temperature == 0) they are log_softmax of the raw logits.

Top-k then top-p, after temperature (the order transformers uses). Top-p (nucleus) keeps the
smallest set of most probable tokens whose probability mass reaches top_p; tokens tied with the
last kept one are kept too. It avoids a full-vocabulary sort: `lax.top_k` gives C =
`top_p_candidates` candidates and a full logsumexp gives their exact mass; when every row's
nucleus fits in them the token is drawn among the C candidates. Otherwise the step falls back
(`lax.cond`) to an exact threshold found by bisection over the float32 values (32 masked sums
over the vocabulary, still no sort).

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
    batch_size: prompts per batch (default: as many as give about 256 rows, i.e. 256 // n,
      at least 1); each batch's prompt count is bucketed to a power of two.
    mesh: run under this mesh; rows are sharded over the batch axes of `rules`, params by the
      same rules as training (rpo.sharding.param_shardings; a no-op for params already
      placed that way). The row bucket is then also a multiple of the batch axes' size. The mesh
      may span processes (rpo.distributed; then it is required): every process calls generate
      with the same arguments, packs only the prompt rows its devices hold, and gets every
      completion back.
    progress: print a line per batch to stderr (default: when there is more than one batch).
    stats: a dict that receives, summed over batches, prefill_s and decode_s (wall seconds; each phase is then
      waited for, for the timing), decode_steps (loop iterations), slot_steps (rows x loop iterations, the
      decode work done) and live_slot_steps (the part of it spent on rows still generating), prompt_tokens.
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

    greedy = temperature == 0.0
    top_k = 0 if greedy or top_k >= config.vocab_size else int(top_k)
    use_top_p = (not greedy) and top_p < 1.0
    candidates = min(top_k or int(top_p_candidates), config.vocab_size)
    stop_seqs = _encode_stops(stop, tokenizer) if stop and tokenizer is not None else np.zeros((0, 0), np.int32)
    spec = _Spec(
        greedy=greedy,
        top_k=top_k,
        use_top_p=use_top_p,
        candidates=candidates,
        n=int(n),
        max_new=int(max_new_tokens),
        num_eos=len(eos),
        stop_shape=stop_seqs.shape,
    )

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
    batches = [range(s, min(s + batch_size, len(prompts))) for s in range(0, len(prompts), batch_size)]
    if progress is None:
        progress = len(batches) > 1
    consts = dict(
        eos=jnp.asarray(np.asarray(eos, np.int32).reshape(-1)),
        stop_seqs=jnp.asarray(stop_seqs),
        temperature=jnp.float32(temperature if not greedy else 1.0),
        top_p=jnp.float32(top_p),
        seed=jnp.uint32(int(seed) % (1 << 32)),
    )

    out_tokens: list[list[list[int]]] = []
    out_logprobs: list[list[list[float]]] = []
    out_reasons: list[list[str]] = []
    t0 = time.time()
    done_rows = 0
    for bi, idx in enumerate(batches):
        rows = bucket(len(idx), row_multiple)
        rows = -(-rows // row_multiple) * row_multiple
        plen = bucket(max(len(prompts[i]) for i in idx), min_prompt_bucket)
        if mesh is None:
            batch = _pack(prompts, list(idx), rows, plen, config.pad_token_id)
        else:  # each process packs the rows its devices hold (real rows first, as in the whole batch)
            mine = distributed.process_rows(sharding_lib.batch_sharding(mesh, 1, rules), (rows,))
            local = _pack(prompts, [idx[r] for r in mine if r < len(idx)], len(mine), plen, config.pad_token_id)
            batch = jax.make_array_from_process_local_data(
                {k: sharding_lib.batch_sharding(mesh, v.ndim, rules) for k, v in local.items()}, local,
                {k: (rows,) + v.shape[1:] for k, v in local.items()},
            )
        t_phase = time.perf_counter()
        state = _prefill(config, spec, mesh, rules, params, batch, consts)
        if stats is not None:
            jax.block_until_ready(state)
            t_decode = time.perf_counter()
        state = _decode(config, spec, mesh, rules, params, state, consts)
        toks_BM, lps_BM, lens_B, reason_B, steps = distributed.fetch(
            (state["tokens"], state["logprobs"], state["length"], state["reason"], state["i"])
        )
        if stats is not None:
            _add_stats(stats, t_phase, t_decode, int(steps) - 1, rows * n, lens_B,
                       sum(len(prompts[i]) for i in idx))
        for r, i in enumerate(idx):
            ts, ls, rs = [], [], []
            for j in range(n):
                b = r * n + j
                k = int(lens_B[b])
                t, lp = toks_BM[b, :k].tolist(), lps_BM[b, :k].tolist()
                reason = _REASONS[int(reason_B[b])]
                if stop:
                    t, lp, reason = _cut_at_stop(t, lp, reason, stop, decode)
                ts.append(t)
                ls.append(lp)
                rs.append(reason)
            out_tokens.append(ts)
            out_logprobs.append(ls)
            out_reasons.append(rs)
        done_rows += len(idx)
        if progress and distributed.is_main():
            dt = time.time() - t0
            print(
                f"[rpo.sampling] batch {bi + 1}/{len(batches)}: {done_rows}/{len(prompts)} prompts "
                f"x {n} samples, bucket rows={rows} prompt_len={plen}, {dt:.1f}s",
                file=sys.stderr,
                flush=True,
            )
    return GenerateOutput(out_tokens, out_logprobs, out_reasons)


# ---------------------------------------------------------------------------------------
# Host-side helpers
# ---------------------------------------------------------------------------------------


def _add_stats(stats: dict, t_prefill: float, t_decode: float, steps: int, rows: int, lens_B, prompt_tokens: int):
    """Sums one batch's timings and decode work into `stats` (see generate). The first token of every row comes
    from the prefill; loop iteration s (1-based) works on every row and is live for rows with length > s."""
    now = time.perf_counter()
    add = dict(prefill_s=t_decode - t_prefill, decode_s=now - t_decode, decode_steps=steps,
               slot_steps=steps * rows, live_slot_steps=int(np.maximum(np.asarray(lens_B) - 1, 0).sum()),
               prompt_tokens=prompt_tokens)
    for k, v in add.items():
        stats[k] = stats.get(k, 0) + v

_REASONS = ("length", "eos", "stop")


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about a sampling call (part of the compile key)."""

    greedy: bool
    top_k: int
    use_top_p: bool
    candidates: int
    n: int
    max_new: int
    num_eos: int
    stop_shape: tuple[int, int]


def _pack(prompts, idx, rows: int, plen: int, pad_id) -> dict[str, np.ndarray]:
    """Prompts idx (then inactive padding rows) as a batch of `rows`: left-padded [R, P] tokens,
    positions, mask; prompt ids [R]; active [R]."""
    pad = 0 if pad_id is None else int(pad_id)
    tokens = np.full((rows, plen), pad, np.int32)
    positions = np.zeros((rows, plen), np.int32)
    mask = np.zeros((rows, plen), bool)
    ids = np.zeros((rows,), np.int32)
    active = np.zeros((rows,), bool)
    for r, i in enumerate(idx):
        p = prompts[i]
        tokens[r, plen - len(p) :] = p
        positions[r, plen - len(p) :] = np.arange(len(p))
        mask[r, plen - len(p) :] = True
        ids[r] = i
        active[r] = True
    # Inactive (bucket padding) rows get one real token so that their softmax rows are finite.
    mask[~active, -1] = True
    return dict(tokens=tokens, positions=positions, mask=mask, ids=ids, active=active)


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

        def full_vocab(_):
            t_key = _nucleus_threshold_bisect(scaled_BV, lse_B, top_p)
            masked = jnp.where(_float_key(scaled_BV) >= t_key[:, None], scaled_BV, NEG_INF)
            tok, lse = _draw(masked, u_B)
            return tok, _gather(masked, tok) - lse

        return jax.lax.cond(covered, among_candidates, full_vocab, None)
    tok, lse = _draw(scaled_BV, u_B)
    return tok, _gather(scaled_BV, tok) - lse


# ---------------------------------------------------------------------------------------
# Prefill and decode (jitted)
# ---------------------------------------------------------------------------------------

# Times each jitted function has been traced (i.e. compiled for a new bucket); for tests.
trace_counts: dict[str, int] = {"prefill": 0, "decode": 0}


def _constrain(x, mesh, rules, names):
    if mesh is None:
        return x
    spec = sharding_lib.logical_to_spec(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _uniforms(row_keys_B, step):
    """One uniform per row for this step: fold_in(row key, step)."""
    return jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, step), (), jnp.float32))(row_keys_B)


def _record(spec: _Spec, state, tok_B, lp_B, consts):
    """Writes step i's tokens into the state and updates the finished flags."""
    i = state["i"]
    live = ~state["done"]
    tok_B = jnp.where(live, tok_B, -1)
    lp_B = jnp.where(live, lp_B, 0.0)
    state["tokens"] = jax.lax.dynamic_update_slice(state["tokens"], tok_B[:, None], (0, i))
    state["logprobs"] = jax.lax.dynamic_update_slice(state["logprobs"], lp_B[:, None], (0, i))
    state["length"] = state["length"] + live.astype(jnp.int32)
    is_eos = jnp.zeros_like(live)
    if spec.num_eos:
        is_eos = jnp.any(tok_B[:, None] == consts["eos"][None, :], axis=-1)
    is_stop = jnp.zeros_like(live)
    if spec.stop_shape[0]:
        window = jnp.concatenate([state["window"][:, 1:], tok_B[:, None]], axis=1)
        seqs = consts["stop_seqs"]  # [Q, W], right-aligned, -1 padded
        match = (window[:, None, :] == seqs[None]) | (seqs[None] < 0)
        is_stop = jnp.any(jnp.all(match, axis=-1), axis=-1)
        state["window"] = window
    reason = jnp.where(is_eos, 1, jnp.where(is_stop, 2, 0))
    state["reason"] = jnp.where(live, reason, state["reason"]).astype(jnp.int32)
    state["done"] = state["done"] | (live & (is_eos | is_stop))
    state["last"] = jnp.where(live, tok_B, state["last"])
    state["i"] = i + 1
    return state


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _prefill(config: ModelConfig, spec: _Spec, mesh, rules, params, batch, consts):
    """Runs the R prompts once, lays the cache out for decoding (the prompt part kept once
    per prompt, an empty M-slot generated part per sample) and samples the first token."""
    trace_counts["prefill"] += 1
    tokens_RP, positions_RP, mask_RP = batch["tokens"], batch["positions"], batch["mask"]
    r = tokens_RP.shape[0]
    n, m = spec.n, spec.max_new
    b = r * n
    h_RPD, kv = decoder.hidden_states(config, params, tokens_RP, positions_BT=positions_RP, mask_BT=mask_RP,
                                      return_kv=True)
    # Only the last position's logits are needed: skip the [R, P, V] unembedding.
    logits_RV = decoder.logits_from_hidden(config, params, h_RPD[:, -1:, :])[:, 0]
    rep = lambda x: jnp.repeat(x, n, axis=0) if n > 1 else x  # noqa: E731
    cache = decoder.step_cache(config, kv, mask_RP, n, m, lambda x, names: _constrain(x, mesh, rules, names))
    base = jax.random.key(consts["seed"])
    row_keys_B = jax.vmap(
        lambda i: jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(base, i), j))(jnp.arange(n))
    )(batch["ids"]).reshape(b)
    state = {
        "cache": cache,
        "tokens": jnp.full((b, m), -1, jnp.int32),
        "logprobs": jnp.zeros((b, m), jnp.float32),
        "length": jnp.zeros((b,), jnp.int32),
        "reason": jnp.zeros((b,), jnp.int32),
        "done": ~rep(batch["active"]),
        "last": jnp.zeros((b,), jnp.int32),
        "position": rep(positions_RP[:, -1] + 1),
        "keys": row_keys_B,
        "i": jnp.zeros((), jnp.int32),
    }
    if spec.stop_shape[0]:
        state["window"] = jnp.full((b, spec.stop_shape[1]), -1, jnp.int32)
    tok, lp = choose(
        spec, rep(logits_RV), _uniforms(row_keys_B, 0), consts["temperature"], consts["top_p"], ~state["done"]
    )
    return _record(spec, state, tok, lp, consts)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
def _decode(config: ModelConfig, spec: _Spec, mesh, rules, params, state, consts):
    """The decode loop: one token per row per iteration until every row is done or M tokens.
    The state (cache included) is donated and updated in place."""
    trace_counts["decode"] += 1
    layers, w_DV = decoder.step_params(config, params)

    def cond(state):
        return (state["i"] < spec.max_new) & ~jnp.all(state["done"])

    def body(state):
        i = state["i"]
        pos_B = state["position"] + i - 1  # position of the token fed in (sampled at step i-1)
        logits_BV, cache = decoder.decode_step(config, params, layers, w_DV, state["last"], pos_B, state["cache"])
        state = dict(state, cache=cache)
        tok, lp = choose(spec, logits_BV, _uniforms(state["keys"], i), consts["temperature"], consts["top_p"], ~state["done"])
        return _record(spec, state, tok, lp, consts)

    return jax.lax.while_loop(cond, body, state)
