"""The decoder (Llama / Mistral / Qwen2 / Qwen3) as pure functions over a param pytree.

Shape letters used in names and einsums throughout rpo:
  B batch, T query tokens, S key/cache slots, D hidden, H query heads, K kv heads,
  G = H // K query heads per kv head, E head dim, F mlp hidden, V vocab, L layers.

Params are a plain nested dict of arrays, per-layer weights stacked on a leading L axis so
the layers run under one `lax.scan`:

  embed [V, D]                       final_norm [D]            lm_head [D, V] (untied only)
  layers/attn_norm [L, D]            layers/mlp_norm [L, D]
  layers/q [L, D, H, E]  k, v [L, D, K, E]  o [L, H, E, D]
  layers/q_bias [L, H, E]  k_bias, v_bias [L, K, E]  o_bias [L, D]   (when the family has them)
  layers/q_norm, k_norm [L, E]                                        (qwen3)
  layers/gate, up [L, D, F]  down [L, F, D]

`param_axes(config)` gives the same tree with a tuple of logical axis names per array;
rpo.sharding maps those names to mesh axes.

Two ways through the same weights:
  hidden_states / forward   the whole sequence at once (training, scoring, and the sampler's prefill,
                            which also takes each layer's keys and values: return_kv=True);
  decode_step               one new token per row over the sampling cache (step_cache), laid out for a
                            memory-bound step: a prompt's keys/values once per prompt slot, shared by the
                            slot's rows ([R, K, E, P] per layer), the generated ones per row ([B, K, E, M]
                            per layer, written in place at each row's own slot), heads before slots so that
                            attention is batched matmuls. (A stacked [L, B, S, K, E] cache made XLA on CPU
                            copy the whole cache every step, ~7x slower.) Row b is in prompt slot b // (B / R).
RoPE positions are per row and per token, independent of slots, so left padding does not shift them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rpo.models.config import ModelConfig

Params = dict[str, Any]
Cache = dict[str, jax.Array]

NEG_INF = -1e30  # finite "minus infinity": a fully masked row gives a uniform softmax, not NaN


# ---------------------------------------------------------------------------------------
# Parameter layout
# ---------------------------------------------------------------------------------------


def param_axes(config: ModelConfig) -> Params:
    """Logical axis names of every param, as a tree shaped like the params."""
    layers = {
        "attn_norm": ("layers", "embed"),
        "q": ("layers", "embed", "heads", "head_dim"),
        "k": ("layers", "embed", "kv_heads", "head_dim"),
        "v": ("layers", "embed", "kv_heads", "head_dim"),
        "o": ("layers", "heads", "head_dim", "embed"),
        "mlp_norm": ("layers", "embed"),
        "gate": ("layers", "embed", "mlp"),
        "up": ("layers", "embed", "mlp"),
        "down": ("layers", "mlp", "embed"),
    }
    if config.qkv_bias:
        layers["q_bias"] = ("layers", "heads", "head_dim")
        layers["k_bias"] = ("layers", "kv_heads", "head_dim")
        layers["v_bias"] = ("layers", "kv_heads", "head_dim")
    if config.o_bias:
        layers["o_bias"] = ("layers", "embed")
    if config.qk_norm:
        layers["q_norm"] = ("layers", "head_dim")
        layers["k_norm"] = ("layers", "head_dim")
    axes: Params = {"embed": ("vocab", "embed"), "layers": layers, "final_norm": ("embed",)}
    if not config.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(config: ModelConfig) -> Params:
    """Shape of every param, as a tree shaped like the params."""
    size = {
        "layers": config.num_layers,
        "embed": config.hidden_size,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "mlp": config.intermediate_size,
        "vocab": config.vocab_size,
    }
    return jax.tree.map(lambda names: tuple(size[n] for n in names), param_axes(config), is_leaf=_is_axes)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, str) for n in x)


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random params (normal(0, std) weights, unit norms, zero biases): for tests and benchmarks."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        if "norm" in path:
            out.append(jnp.ones(shape, dtype))
        elif "bias" in path:
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [E/2] in float32, with llama3 scaling when configured."""
    e = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, e, 2, dtype=np.float64) / e))
    if config.rope_llama3 is not None:
        factor, lo, hi, orig = config.rope_llama3
        wavelen = 2 * math.pi / inv
        low_freq_wavelen = orig / lo
        high_freq_wavelen = orig / hi
        scaled = np.where(wavelen > low_freq_wavelen, inv / factor, inv)
        smooth = (orig / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(positions_BT: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, T, 1, E] in `dtype` for these positions: what rope multiplies by."""
    angles_BTe = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    angles_BTE = jnp.concatenate([angles_BTe, angles_BTe], axis=-1)
    return jnp.cos(angles_BTE)[:, :, None, :].astype(dtype), jnp.sin(angles_BTE)[:, :, None, :].astype(dtype)


def rope_table(config: ModelConfig, length: int) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [length, E] in the compute dtype for positions 0 .. length - 1: decode_step's rope, made once per
    decode loop. Inside the step XLA:CPU recomputed cos and sin in every fusion that applies them, per element
    (each query head's copy included): a 64-row SmolLM2 step takes 0.94x the time with the table
    (experiments/results/bench_sampling.md, --step-ab)."""
    cos, sin = rope_tables(jnp.arange(length)[None], rope_inv_freq(config), jnp.dtype(config.dtype))
    return cos[0, :, 0], sin[0, :, 0]


def apply_rope(x_BTNE: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding in the rotate-half layout HF uses (no weight permutation needed), given rope_tables'
    (cos, sin) for x's positions."""
    half = x_BTNE.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNE[..., half:], x_BTNE[..., :half]], axis=-1)
    return x_BTNE * cos + rotated * sin


def rope(x_BTNE: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """apply_rope with the tables computed here, for these positions."""
    return apply_rope(x_BTNE, *rope_tables(positions_BT, inv_freq, x_BTNE.dtype))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF RMSNorm: normalise in float32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def _attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS):
    b, t, h, e = q_BTHE.shape
    kv = k_BSKE.shape[2]
    q_BTKGE = q_BTHE.reshape(b, t, kv, h // kv, e)
    scores = jnp.einsum("btkge,bske->bkgts", q_BTKGE, k_BSKE, preferred_element_type=jnp.float32)
    scores = scores * (e**-0.5)
    scores = jnp.where(mask_BTS[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKE.dtype)
    out_BTKGE = jnp.einsum("bkgts,bske->btkge", probs, v_BSKE)
    return out_BTKGE.reshape(b, t, h, e)


def _layer(config: ModelConfig, inv_freq, h_BTD, p, positions_BT, mask_BTS):
    """One decoder block over T tokens. Returns (h, k, v): k, v [B, T, K, E] this block's keys (after RoPE) and
    values, for the sampler's prefill."""
    eps = config.rms_norm_eps
    x = rms_norm(h_BTD, p["attn_norm"], eps)
    q = jnp.einsum("btd,dhe->bthe", x, p["q"])
    k = jnp.einsum("btd,dke->btke", x, p["k"])
    v = jnp.einsum("btd,dke->btke", x, p["v"])
    if config.qkv_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    if config.qk_norm:
        q = rms_norm(q, p["q_norm"], eps)
        k = rms_norm(k, p["k_norm"], eps)
    q = rope(q, positions_BT, inv_freq)
    k = rope(k, positions_BT, inv_freq)
    attn = _attention(q, k, v, mask_BTS)
    out = jnp.einsum("bthe,hed->btd", attn, p["o"])
    if config.o_bias:
        out = out + p["o_bias"]
    h_BTD = h_BTD + out
    x = rms_norm(h_BTD, p["mlp_norm"], eps)
    gated = jax.nn.silu(jnp.einsum("btd,df->btf", x, p["gate"])) * jnp.einsum("btd,df->btf", x, p["up"])
    h_BTD = h_BTD + jnp.einsum("btf,fd->btd", gated, p["down"])
    return h_BTD, k, v


# ---------------------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------------------


def hidden_states(
    config: ModelConfig,
    params: Params,
    tokens_BT: jax.Array,
    *,
    positions_BT: jax.Array | None = None,
    mask_BT: jax.Array | None = None,
    remat: bool = False,
    return_kv: bool = False,
) -> tuple[jax.Array, Cache | None]:
    """Runs the decoder up to the final norm (causal). Returns (hidden [B, T, D], kv).

    positions_BT: RoPE positions (default 0..T-1 in every row).
    mask_BT: True for real tokens (default all True). Keys at False positions are never
      attended to; outputs at those positions are finite but meaningless.
    remat: recompute each layer's activations in the backward pass.
    return_kv: kv = {"k", "v": [L, B, T, K, E]} every layer's keys (after RoPE) and values in the
      compute dtype (the sampler's prefill: step_cache); else None.
    """
    b, t = tokens_BT.shape
    dtype = jnp.dtype(config.dtype)
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if mask_BT is None:
        mask_BT = jnp.ones((b, t), bool)
    params = jax.tree.map(lambda w: w.astype(dtype), params)
    inv_freq = rope_inv_freq(config)
    h = params["embed"][tokens_BT]
    attn_mask = jnp.tril(jnp.ones((t, t), bool))[None] & mask_BT[:, None, :]

    def body(h, p):
        h, k, v = _layer(config, inv_freq, h, p, positions_BT, attn_mask)
        return h, ((k, v) if return_kv else None)

    if remat:
        body = jax.checkpoint(body, prevent_cse=False)
    h, kv = jax.lax.scan(body, h, params["layers"])
    kv = {"k": kv[0], "v": kv[1]} if return_kv else None
    return rms_norm(h, params["final_norm"], config.rms_norm_eps), kv


def unembed_matrix(config: ModelConfig, params: Params) -> jax.Array:
    """The [D, V] output projection (the transposed embedding when tied)."""
    return params["embed"].T if config.tie_word_embeddings else params["lm_head"]


def logits_from_hidden(config: ModelConfig, params: Params, hidden_BTD: jax.Array) -> jax.Array:
    """float32 logits [B, T, V]."""
    w_DV = unembed_matrix(config, params).astype(hidden_BTD.dtype)
    return jnp.einsum("btd,dv->btv", hidden_BTD, w_DV, preferred_element_type=jnp.float32)


def forward(config: ModelConfig, params: Params, tokens_BT: jax.Array) -> jax.Array:
    """float32 logits [B, T, V] for int32 tokens at positions 0..T-1; causal, no cache."""
    h, _ = hidden_states(config, params, jnp.asarray(tokens_BT, jnp.int32))
    return logits_from_hidden(config, params, h)


# ---------------------------------------------------------------------------------------
# One token at a time (sampling)
# ---------------------------------------------------------------------------------------


K_AXES, V_AXES = ("batch", "kv_heads", "head_dim", None), ("batch", "kv_heads", None, "head_dim")  # cache layouts


def prompt_cache(config: ModelConfig, kv: Cache, constrain=lambda x, names: x) -> Cache:
    """The prompt part of the sampling cache from a prefill (hidden_states(..., return_kv=True)): every layer's
    keys as [R, K, E, P] (head_dim before slots) and values as [R, K, P, E], so that both attention products
    are plain (untransposed) batched matmuls. constrain(x, logical axis names): a sharding constraint."""
    layers = range(config.num_layers)
    return {
        "prompt_k": [constrain(jnp.transpose(kv["k"][l], (0, 2, 3, 1)), K_AXES) for l in layers],
        "prompt_v": [constrain(jnp.swapaxes(kv["v"][l], 1, 2), V_AXES) for l in layers],
    }


def step_cache(config: ModelConfig, kv: Cache, prompt_mask_RP: jax.Array, n: int, max_new: int,
               constrain=lambda x, names: x) -> Cache:
    """The sampling cache for R prompts x n rows each from their prefill (hidden_states(..., return_kv=True)):
    the prompt part once per prompt (prompt_cache), an empty max_new-slot generated part per row, and each
    row's write slot `index` [B] (0: see decode_step)."""
    r = prompt_mask_RP.shape[0]
    b, kh, e, layers = r * n, config.num_kv_heads, config.head_dim, range(config.num_layers)
    return dict(
        prompt_cache(config, kv, constrain),
        prompt_mask=prompt_mask_RP,
        k=[constrain(jnp.zeros((b, kh, e, max_new), kv["k"].dtype), K_AXES) for _ in layers],
        v=[constrain(jnp.zeros((b, kh, max_new, e), kv["v"].dtype), V_AXES) for _ in layers],
        index=jnp.zeros((b,), jnp.int32),
    )


def step_params(config: ModelConfig, params: Params):
    """What decode_step needs besides the params, prepared once outside the sampling loop: the
    per-layer params (sliced off the stacked L axis, q/k/v fused into one [D, (H + 2K) * E]
    matrix and gate/up into one [D, 2F]) and the [D, V] unembedding (transposed once when tied)."""
    d = config.hidden_size
    layers = []
    for l in range(config.num_layers):
        p = jax.tree.map(lambda w: w[l], params["layers"])
        fused = {
            "qkv": jnp.concatenate([p["q"].reshape(d, -1), p["k"].reshape(d, -1), p["v"].reshape(d, -1)], axis=1),
            "gate_up": jnp.concatenate([p["gate"], p["up"]], axis=1),
        }
        if config.qkv_bias:
            fused["qkv_bias"] = jnp.concatenate([p["q_bias"].reshape(-1), p["k_bias"].reshape(-1), p["v_bias"].reshape(-1)])
        layers.append(dict({k: w for k, w in p.items() if k not in ("q", "k", "v", "q_bias", "k_bias", "v_bias", "gate", "up")}, **fused))
    return layers, unembed_matrix(config, params)


def _batched_products(x_BKGI: jax.Array, y_BKIZ: jax.Array, unroll: int) -> jax.Array:
    """sum_i x[b, k, g, i] * y[b, k, i, z] in float32, the products in the inputs' dtype and summed in order of i:
    attention's B x K tiny products over the generated slots (scores: i = head_dim, z = slots; outputs: i = slots,
    z = head_dim). Written as a broadcast multiply-reduce, which beats batched matmuls here on CPU (SmolLM2, G = 3:
    a 256-row step 1.12 -> 0.94 s); on CPU run as a loop over i (`unroll` entries per iteration) adding each
    slice's products to a [B, K, G, Z] accumulator. The sums are bit for bit the reduce's (XLA:CPU adds a reduce's
    terms in order), but XLA:CPU runs the reduce over the non-minor axis i slowly, and fuses the output side's into
    the o-projection's matmul, slower still: a SmolLM2 step at 64 rows and 512 slots took 0.78x the time with the
    loops (experiments/results/bench_sampling.md). Elsewhere the reduce itself: a loop adds a kernel launch per
    iteration on a GPU."""
    if jax.default_backend() != "cpu":
        return jnp.sum(x_BKGI[..., None] * y_BKIZ[:, :, None], axis=3, dtype=jnp.float32)

    def add_products(i, acc_BKGZ):  # x read in place at i (a moveaxis first cost a transpose kernel per call)
        x_BKG = jax.lax.dynamic_index_in_dim(x_BKGI, i, 3, keepdims=False)
        y_BKZ = jax.lax.dynamic_index_in_dim(y_BKIZ, i, 2, keepdims=False)
        return acc_BKGZ + (x_BKG[..., None] * y_BKZ[:, :, None]).astype(jnp.float32)

    b, k, g, i = x_BKGI.shape
    zeros_BKGZ = jnp.zeros((b, k, g, y_BKIZ.shape[-1]), jnp.float32)
    return jax.lax.fori_loop(0, i, add_products, zeros_BKGZ, unroll=unroll)


def decode_step(config: ModelConfig, params: Params, layers, w_DV, tok_B, pos_B, cache: Cache, rope_PE):
    """One token per row through the decoder over the sampling cache (step_cache): the math of
    hidden_states for one more token (tested against forward and against HF).
      cache["prompt_k"], ["prompt_v"]: lists of L arrays [R, K, E, P] and [R, K, P, E], the
        prompt's keys and values, stored once per prompt slot and shared by its B / R rows (never
        written here); cache["prompt_mask"] [R, P] (real prompt tokens).
      cache["k"], ["v"]: lists of L arrays [B, K, E, M] and [B, K, M, E], the generated tokens'
        keys and values, one buffer per layer; row b writes this token's key and value in place at slot
        cache["index"][b], and its slots <= index[b] are live (rows may be at different steps: the sampler
        refills finished rows; a slot above index[b] may hold a finished sample's values, masked out).
      Heads come before slots, and keys are stored transposed, so that scores and values are
      plain batched matmuls.
    layers, w_DV: from step_params; rope_PE: rope_table for positions up to max(pos_B) (both prepared once,
    outside the loop). Params must already be in the compute dtype.
    Returns (float32 logits [B, V], cache).
    """
    dtype = jnp.dtype(config.dtype)
    eps = config.rms_norm_eps
    index_B = cache["index"]
    r, kv, e, _ = cache["prompt_k"][0].shape
    b, _, m, _ = cache["v"][0].shape
    n, g = b // r, config.num_heads // kv
    live_B11M = (jnp.arange(m)[None, :] <= index_B[:, None])[:, None, None, :]  # slots written, this step's included
    rows_B = jnp.arange(b)
    prompt_RP = cache["prompt_mask"]

    def to_r(x):  # [B, K, G, ...] -> [R, K, N * G, ...]
        x = x.reshape(r, n, kv, g, *x.shape[3:])
        return jnp.swapaxes(x, 1, 2).reshape(r, kv, n * g, *x.shape[4:])

    def to_b(x):  # [R, K, N * G, ...] -> [B, K, G, ...]
        x = x.reshape(r, kv, n, g, *x.shape[3:])
        return jnp.swapaxes(x, 1, 2).reshape(b, kv, g, *x.shape[4:])

    h_BD = params["embed"][tok_B].astype(dtype)
    cos_B11E, sin_B11E = (t_PE[pos_B][:, None, None, :] for t_PE in rope_PE)
    ks, vs = [], []
    for l, p in enumerate(layers):
        x_BD = rms_norm(h_BD, p["attn_norm"], eps)
        qkv = x_BD @ p["qkv"]  # one matmul for q, k, v (weights fused outside the loop)
        if config.qkv_bias:
            qkv = qkv + p["qkv_bias"]
        q_BHE = qkv[:, : kv * g * e].reshape(b, kv * g, e)
        k_BKE = qkv[:, kv * g * e : (kv * g + kv) * e].reshape(b, kv, e)
        v_BKE = qkv[:, (kv * g + kv) * e :].reshape(b, kv, e)
        if config.qk_norm:
            q_BHE = rms_norm(q_BHE, p["q_norm"], eps)
            k_BKE = rms_norm(k_BKE, p["k_norm"], eps)
        q_BHE = apply_rope(q_BHE[:, None], cos_B11E, sin_B11E)[:, 0]
        k_BKE = apply_rope(k_BKE[:, None], cos_B11E, sin_B11E)[:, 0]
        # Write first, then read the updated buffer: the old buffer's only use is the write,
        # so XLA updates it in place (reading the old buffer after the update would force a
        # copy of the whole buffer every step).
        gk, gv = cache["k"][l], cache["v"][l]
        k_BKEM = gk.at[rows_B, :, :, index_B].set(k_BKE.astype(gk.dtype), unique_indices=True)
        v_BKME = gv.at[rows_B, :, index_B, :].set(v_BKE.astype(gv.dtype), unique_indices=True)
        ks.append(k_BKEM)
        vs.append(v_BKME)
        pk_RKEP, pv_RKPE = cache["prompt_k"][l], cache["prompt_v"][l]
        q_BKGE = q_BHE.reshape(b, kv, g, e)
        # Scores over the shared prompt part (read once per prompt) and the generated part,
        # then one softmax over both.
        s_RKXP = jnp.einsum("rkxe,rkep->rkxp", to_r(q_BKGE), pk_RKEP, preferred_element_type=jnp.float32) * (e**-0.5)
        s_RKXP = jnp.where(prompt_RP[:, None, None, :], s_RKXP, NEG_INF)
        # The generated part is B x K tiny products (G query heads x M slots) streamed from memory: with G > 1
        # _batched_products (measured on CPU); with G = 1 the batched matmul (the multiply-reduce was 3x slower).
        if g > 1:
            s_BKGM = _batched_products(q_BKGE, k_BKEM, unroll=8) * (e**-0.5)
        else:
            s_BKGM = jnp.einsum("bkge,bkem->bkgm", q_BKGE, k_BKEM, preferred_element_type=jnp.float32) * (e**-0.5)
        s_BKGM = jnp.where(live_B11M, s_BKGM, NEG_INF)
        mx_BKG = jnp.maximum(to_b(jnp.max(s_RKXP, axis=-1)), jnp.max(s_BKGM, axis=-1))
        e_RKXP = jnp.exp(s_RKXP - to_r(mx_BKG)[..., None])
        e_BKGM = jnp.exp(s_BKGM - mx_BKG[..., None])
        den_BKG = to_b(jnp.sum(e_RKXP, axis=-1)) + jnp.sum(e_BKGM, axis=-1)
        o_RKXE = jnp.einsum("rkxp,rkpe->rkxe", e_RKXP.astype(pv_RKPE.dtype), pv_RKPE, preferred_element_type=jnp.float32)
        if g > 1:
            o_BKGE = _batched_products(e_BKGM.astype(v_BKME.dtype), v_BKME, unroll=32)
        else:
            o_BKGE = jnp.einsum("bkgm,bkme->bkge", e_BKGM.astype(v_BKME.dtype), v_BKME,
                                preferred_element_type=jnp.float32)
        o_BKGE = (to_b(o_RKXE) + o_BKGE) / den_BKG[..., None]
        # One matmul over the flattened heads: as the einsum "bhe,hed->bd", XLA:CPU transposed the [H, E, D]
        # weight to [E, H, D] every step when the weights are arguments (as in the sampler's loop).
        out_BD = o_BKGE.reshape(b, kv * g * e).astype(dtype) @ p["o"].reshape(kv * g * e, -1)
        if config.o_bias:
            out_BD = out_BD + p["o_bias"]
        h_BD = h_BD + out_BD
        x_BD = rms_norm(h_BD, p["mlp_norm"], eps)
        gate_up = x_BD @ p["gate_up"]
        f = gate_up.shape[-1] // 2
        gated_BF = jax.nn.silu(gate_up[:, :f]) * gate_up[:, f:]
        h_BD = h_BD + gated_BF @ p["down"]
    h_BD = rms_norm(h_BD, params["final_norm"], eps)
    logits_BV = jnp.einsum("bd,dv->bv", h_BD, w_DV, preferred_element_type=jnp.float32)
    return logits_BV, dict(cache, k=ks, v=vs, index=index_B + 1)
