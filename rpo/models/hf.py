"""HF checkpoints in and out: config.json + (sharded) safetensors <-> (ModelConfig, params).

Loading streams tensor by tensor from memory-mapped files. With `shardings` given, each
param is built by `jax.make_array_from_callback`, so each device reads only its own slice
and the host never holds more than one layer's tensor beyond what the devices hold.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rpo.files import write_json
from rpo.models import config as config_lib
from rpo.models.config import ModelConfig
from rpo.models.decoder import Params, param_shapes
from rpo.models.safetensors_io import CheckpointError, SafetensorsFile, write

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class _Tensor:
    """How one of our params maps to HF tensors. `layered` params gather one HF tensor per
    layer (name has `{i}`) along our leading L axis."""

    path: tuple[str, ...]
    hf_name: str
    to_ours: Callable[[np.ndarray], np.ndarray]  # one HF tensor -> our (per-layer) array
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: tuple[int, ...]

    @property
    def layered(self) -> bool:
        return "{i}" in self.hf_name


def _mapping(c: ModelConfig, num_labels: int | None = None) -> list[_Tensor]:
    """The tensors of a causal LM, or with `num_labels` of a sequence classifier (the `score`
    head [num_labels, D] in place of lm_head)."""
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    h, k, e = c.num_heads, c.num_kv_heads, c.head_dim
    ident = lambda w: w  # noqa: E731
    T = lambda w: w.T  # noqa: E731
    pre = "model.layers.{i}."

    def proj_in(n):  # HF [n*E, D] <-> ours [D, n, E]
        return (lambda w: w.reshape(n, e, d).transpose(2, 0, 1), lambda w: w.transpose(1, 2, 0).reshape(n * e, d))

    def bias(n):  # HF [n*E] <-> ours [n, E]
        return (lambda w: w.reshape(n, e), lambda w: w.reshape(n * e))

    out = [
        _Tensor(("embed",), "model.embed_tokens.weight", ident, ident, (v, d)),
        _Tensor(("final_norm",), "model.norm.weight", ident, ident, (d,)),
        _Tensor(("layers", "attn_norm"), pre + "input_layernorm.weight", ident, ident, (d,)),
        _Tensor(("layers", "mlp_norm"), pre + "post_attention_layernorm.weight", ident, ident, (d,)),
        _Tensor(("layers", "q"), pre + "self_attn.q_proj.weight", *proj_in(h), (h * e, d)),
        _Tensor(("layers", "k"), pre + "self_attn.k_proj.weight", *proj_in(k), (k * e, d)),
        _Tensor(("layers", "v"), pre + "self_attn.v_proj.weight", *proj_in(k), (k * e, d)),
        _Tensor(
            ("layers", "o"),
            pre + "self_attn.o_proj.weight",
            lambda w: w.reshape(d, h, e).transpose(1, 2, 0),
            lambda w: w.transpose(2, 0, 1).reshape(d, h * e),
            (d, h * e),
        ),
        _Tensor(("layers", "gate"), pre + "mlp.gate_proj.weight", T, T, (f, d)),
        _Tensor(("layers", "up"), pre + "mlp.up_proj.weight", T, T, (f, d)),
        _Tensor(("layers", "down"), pre + "mlp.down_proj.weight", T, T, (d, f)),
    ]
    if c.qkv_bias:
        out += [
            _Tensor(("layers", "q_bias"), pre + "self_attn.q_proj.bias", *bias(h), (h * e,)),
            _Tensor(("layers", "k_bias"), pre + "self_attn.k_proj.bias", *bias(k), (k * e,)),
            _Tensor(("layers", "v_bias"), pre + "self_attn.v_proj.bias", *bias(k), (k * e,)),
        ]
    if c.o_bias:
        out.append(_Tensor(("layers", "o_bias"), pre + "self_attn.o_proj.bias", ident, ident, (d,)))
    if c.qk_norm:
        out += [
            _Tensor(("layers", "q_norm"), pre + "self_attn.q_norm.weight", ident, ident, (e,)),
            _Tensor(("layers", "k_norm"), pre + "self_attn.k_norm.weight", ident, ident, (e,)),
        ]
    if num_labels is not None:
        out.append(_Tensor(("score",), "score.weight", T, T, (num_labels, d)))
    elif not c.tie_word_embeddings:
        out.append(_Tensor(("lm_head",), "lm_head.weight", T, T, (v, d)))
    return out


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _open_checkpoint(path: str) -> dict[str, SafetensorsFile]:
    """Maps every tensor name to the open file that holds it."""
    index_file = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(index_file):
        try:
            with open(index_file) as fh:
                weight_map = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_file}: malformed index, needs a 'weight_map' object ({e!r})") from None
        files = {name: SafetensorsFile(os.path.join(path, name)) for name in sorted(set(weight_map.values()))}
        for f in files.values():  # the index must tell the truth about where a tensor lives
            for name in f.keys():
                if weight_map.get(name) not in (None, os.path.basename(f.path)):
                    raise CheckpointError(f"{index_file}: tensor {name} is listed in {weight_map[name]} but found in {f.path}")
        return {name: files[fname] for name, fname in weight_map.items()}
    if os.path.isfile(single):
        f = SafetensorsFile(single)
        return {name: f for name in f.keys()}
    raise CheckpointError(f"{path}: no {SINGLE_FILE} and no {INDEX_FILE} (an HF model directory needs one)")


def load_pretrained(
    path: str, *, dtype: str = "float32", shardings: Any = None, num_labels: int | None = None
) -> tuple[ModelConfig, Params]:
    """Loads an HF model directory (config.json and model.safetensors, or a sharded
    model.safetensors.index.json) into (config, params).

    dtype: the params' dtype, and the config's compute dtype ("float32" or "bfloat16");
      `config.replace(dtype=...)` changes the compute dtype alone.
    shardings: optional tree of jax.sharding.Sharding shaped like the params (see
      rpo.sharding.param_shardings); each device then reads only its own slice.
    num_labels: read a sequence-classification checkpoint instead (rpo.models.reward): no
      lm_head, and params["score"] [D, num_labels] from the tensor score.weight.
    """
    config = config_lib.load_config(path).replace(dtype=dtype)
    np_dtype = np.dtype(jnp.dtype(dtype))
    where = _open_checkpoint(path)
    mapping = _mapping(config, num_labels)
    shapes = param_shapes(config)
    if num_labels is not None:
        shapes.pop("lm_head", None)
        shapes["score"] = (config.hidden_size, num_labels)

    # Check every tensor before reading any: a bad checkpoint fails fast and names the tensor.
    for t in mapping:
        names = [t.hf_name.format(i=i) for i in range(config.num_layers)] if t.layered else [t.hf_name]
        for name in names:
            if name not in where:
                raise CheckpointError(f"{path}: tensor {name} is missing from the checkpoint")
            got = where[name].shape(name)
            if got != t.hf_shape:
                raise CheckpointError(
                    f"{where[name].path}: tensor {name} has shape {list(got)}, config.json implies {list(t.hf_shape)}"
                )

    params: Params = {}
    for t in mapping:
        shape = _get(shapes, t.path)

        def read(index=None, t=t, shape=shape):
            index = index or tuple(slice(None) for _ in shape)
            if not t.layered:
                return t.to_ours(where[t.hf_name].get(t.hf_name))[index].astype(np_dtype)
            layers = range(config.num_layers)[index[0]]
            rest = index[1:]
            out = np.empty((len(layers),) + tuple(len(range(n)[r]) for n, r in zip(shape[1:], rest)), np_dtype)
            for j, i in enumerate(layers):
                name = t.hf_name.format(i=i)
                out[j] = t.to_ours(where[name].get(name))[rest]
            return out

        sharding = None if shardings is None else _get(shardings, t.path)
        if sharding is None:
            value = jnp.asarray(read())
        else:
            value = jax.make_array_from_callback(shape, sharding, read)
        _set(params, t.path, value)
    for f in {id(f): f for f in where.values()}.values():
        f.close()
    return config, params


def write_weights(path: str, entries: list, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes HF-named tensors into `path` as model.safetensors, or as shards with an index past
    `max_shard_bytes`; each entry is (name, shape, dtype, make) as rpo.models.safetensors_io.write
    takes, so one tensor at a time is on the host. Weights of an earlier save into `path` are removed."""
    os.makedirs(path, exist_ok=True)
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = int(np.prod(entry[1])) * np.dtype(entry[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        write(os.path.join(path, SINGLE_FILE), shards[0], meta)
        written = {SINGLE_FILE}
    else:
        weight_map = {}
        for n, shard in enumerate(shards):
            fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            write(os.path.join(path, fname), shard, meta)
            weight_map.update({e[0]: fname for e in shard})
        total = sum(int(np.prod(e[1])) * np.dtype(e[2]).itemsize for e in entries)
        write_json(os.path.join(path, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})
        written = set(weight_map.values()) | {INDEX_FILE}
    # Weights of an earlier save into the same directory would shadow or mix with these.
    for name in os.listdir(path):
        if name.startswith("model") and (name.endswith(".safetensors") or name == INDEX_FILE) and name not in written:
            os.remove(os.path.join(path, name))


def save_pretrained(
    config: ModelConfig, params: Params, path: str, *, max_shard_bytes: int = 5 * 2**30
) -> None:
    """Writes config.json and safetensors (sharded with an index past `max_shard_bytes`) that
    transformers' AutoModelForCausalLM.from_pretrained loads. Tensors keep the params' dtype."""
    os.makedirs(path, exist_ok=True)
    entries = []
    for t in _mapping(config):
        value = _get(params, t.path)
        dtype = np.dtype(value.dtype)
        layers = range(config.num_layers) if t.layered else [None]
        for i in layers:
            make = (lambda v=value, i=i, t=t: t.to_hf(np.asarray(v if i is None else v[i])))
            entries.append((t.hf_name.format(i=i), t.hf_shape, dtype, make))
    torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[
        str(np.dtype(_get(params, ("embed",)).dtype))
    ]
    write_weights(path, entries, max_shard_bytes=max_shard_bytes)
    write_json(os.path.join(path, "config.json"), config_lib.to_hf_dict(config, torch_dtype))


def load_tokenizer(path: str):
    """The HF tokenizer (with its chat template) stored in an HF model directory."""
    from transformers import AutoTokenizer  # heavy; only when asked for

    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory (an HF model directory; nothing is downloaded from the Hub)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: could not load a tokenizer ({e})") from None


def load_model(model_cfg, *, param_dtype: str = "float32", shardings_for: Callable | None = None):
    """(ModelConfig, params) for an experiment config's `model` section:
      model.path    an HF model directory, or '' for a random model shaped by model.random
                    (ModelConfig fields) and drawn with model.seed;
      model.dtype   the compute dtype.
    Params are `param_dtype`. shardings_for(config) -> tree of shardings, when given, places
    each param straight into its sharding (streamed, for an HF directory)."""
    from rpo.models.decoder import init_params

    if model_cfg.path:
        config = config_lib.load_config(model_cfg.path)
        shardings = None if shardings_for is None else shardings_for(config)
        config, params = load_pretrained(model_cfg.path, dtype=param_dtype, shardings=shardings)
    else:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(model_cfg.random).items()}
        try:
            config = ModelConfig(**fields)
        except TypeError as e:
            raise config_lib.UnsupportedConfigError(f"config field model.random: {e}") from None
        params = init_params(config, jax.random.PRNGKey(model_cfg.seed), dtype=jnp.dtype(param_dtype))
        if shardings_for is not None:
            params = jax.device_put(params, shardings_for(config))
    return config.replace(dtype=model_cfg.dtype), params
