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

KV cache (a dict, passed in and returned): k, v [L, B, S, K, E] in the compute dtype;
mask [B, S] bool (slot holds a real token); index int32 scalar (next slot to write; the
same for every row, since prompts are left-padded). Query slot index+t attends to key slot s
when mask[b, s] and s <= index + t. RoPE positions are per row and per token, independent of
slots, so left padding does not shift them.
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


def rope(x_BTNE: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding in the rotate-half layout HF uses (no weight permutation needed)."""
    angles_BTe = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    angles_BTE = jnp.concatenate([angles_BTe, angles_BTe], axis=-1)
    cos = jnp.cos(angles_BTE)[:, :, None, :].astype(x_BTNE.dtype)
    sin = jnp.sin(angles_BTE)[:, :, None, :].astype(x_BTNE.dtype)
    half = x_BTNE.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNE[..., half:], x_BTNE[..., :half]], axis=-1)
    return x_BTNE * cos + rotated * sin


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


def _layer(config: ModelConfig, inv_freq, h_BTD, p, positions_BT, mask_BTS, k_cache, v_cache, index):
    """One decoder block. With a cache (k_cache not None) new keys/values are written at
    slots index..index+T-1 and attention runs over the whole cache."""
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
    if k_cache is not None:
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
        k, v = k_cache, v_cache
    attn = _attention(q, k, v, mask_BTS)
    out = jnp.einsum("bthe,hed->btd", attn, p["o"])
    if config.o_bias:
        out = out + p["o_bias"]
    h_BTD = h_BTD + out
    x = rms_norm(h_BTD, p["mlp_norm"], eps)
    gated = jax.nn.silu(jnp.einsum("btd,df->btf", x, p["gate"])) * jnp.einsum("btd,df->btf", x, p["up"])
    h_BTD = h_BTD + jnp.einsum("btf,fd->btd", gated, p["down"])
    return h_BTD, k_cache, v_cache


# ---------------------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------------------


def init_cache(config: ModelConfig, batch: int, max_len: int) -> Cache:
    """An empty cache of `max_len` slots per row."""
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(config.dtype)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "mask": jnp.zeros((batch, max_len), bool),
        "index": jnp.zeros((), jnp.int32),
    }


def hidden_states(
    config: ModelConfig,
    params: Params,
    tokens_BT: jax.Array,
    *,
    positions_BT: jax.Array | None = None,
    mask_BT: jax.Array | None = None,
    cache: Cache | None = None,
    remat: bool = False,
) -> tuple[jax.Array, Cache | None]:
    """Runs the decoder up to the final norm. Returns (hidden [B, T, D], updated cache).

    positions_BT: RoPE positions (default 0..T-1 in every row).
    mask_BT: True for real tokens (default all True). Keys at False positions are never
      attended to; outputs at those positions are finite but meaningless.
    cache: None for a plain causal pass over `tokens_BT`; else new tokens are written at
      cache["index"] and attend to everything already in the cache.
    remat: recompute each layer's activations in the backward pass.
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

    if cache is None:
        index = 0
        causal_TT = jnp.tril(jnp.ones((t, t), bool))
        attn_mask = causal_TT[None] & mask_BT[:, None, :]
    else:
        index = cache["index"]
        s = cache["k"].shape[2]
        kv_mask_BS = jax.lax.dynamic_update_slice(cache["mask"], mask_BT, (0, index))
        q_slot_T = index + jnp.arange(t)
        causal_TS = jnp.arange(s)[None, :] <= q_slot_T[:, None]
        attn_mask = causal_TS[None] & kv_mask_BS[:, None, :]

    def body(h, xs):
        p, k_c, v_c = xs
        h, k_c, v_c = _layer(config, inv_freq, h, p, positions_BT, attn_mask, k_c, v_c, index)
        return h, (k_c, v_c)

    if remat:
        body = jax.checkpoint(body, prevent_cse=False)
    if cache is None:
        h, _ = jax.lax.scan(lambda h, p: (body(h, (p, None, None))[0], None), h, params["layers"])
        new_cache = None
    else:
        h, (k_all, v_all) = jax.lax.scan(body, h, (params["layers"], cache["k"], cache["v"]))
        new_cache = {"k": k_all, "v": v_all, "mask": kv_mask_BS, "index": index + t}
    return rms_norm(h, params["final_norm"], config.rms_norm_eps), new_cache


def unembed_matrix(config: ModelConfig, params: Params) -> jax.Array:
    """The [D, V] output projection (the transposed embedding when tied)."""
    return params["embed"].T if config.tie_word_embeddings else params["lm_head"]


def logits_from_hidden(config: ModelConfig, params: Params, hidden_BTD: jax.Array) -> jax.Array:
    """float32 logits [B, T, V]."""
    w_DV = unembed_matrix(config, params).astype(hidden_BTD.dtype)
    return jnp.einsum("btd,dv->btv", hidden_BTD, w_DV, preferred_element_type=jnp.float32)


def forward_cached(
    config: ModelConfig,
    params: Params,
    tokens_BT: jax.Array,
    positions_BT: jax.Array,
    mask_BT: jax.Array,
    cache: Cache,
) -> tuple[jax.Array, Cache]:
    """Prefill or decode step: float32 logits [B, T, V] and the updated cache."""
    h, cache = hidden_states(config, params, tokens_BT, positions_BT=positions_BT, mask_BT=mask_BT, cache=cache)
    return logits_from_hidden(config, params, h), cache


def forward(config: ModelConfig, params: Params, tokens_BT: jax.Array) -> jax.Array:
    """float32 logits [B, T, V] for int32 tokens at positions 0..T-1; causal, no cache."""
    h, _ = hidden_states(config, params, jnp.asarray(tokens_BT, jnp.int32))
    return logits_from_hidden(config, params, h)
