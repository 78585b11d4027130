"""GGUF checkpoints (llama.cpp's single-file format) in: an ordinary HF model directory out.

  convert_gguf(gguf_path, out_dir, *, dtype="float32", tokenizer=True) -> out_dir
  python -m rpo.models.convert --gguf FILE --out DIR [--dtype bfloat16] [--no-tokenizer]

The directory holds config.json, model.safetensors (float32 or bfloat16, sharded past 5 GB),
the tokenizer with its chat template, and gguf_source.json (where it came from: file name,
sha256, general.name, the tensor types it held). Both rpo.models.load_pretrained and
transformers' AutoModelForCausalLM / AutoTokenizer load it.

The file is read with the `gguf` package (llama.cpp's own Python reader, GGUFReader), each
tensor is dequantized by its quants module one at a time while it is written, and the
tokenizer is rebuilt by transformers' GGUF tokenizer conversion. What is ours is only the
mapping from GGUF's names and metadata to HF's, and the checks below.

Supported
  architectures (general.architecture): llama (also what llama.cpp writes for Mistral and
    SmolLM), qwen2 (q/k/v biases), qwen3 (q/k RMSNorm, explicit head_dim); full attention,
    default rope, SiLU MLP, untied or tied embeddings (no output.weight = tied).
  tensor types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the k-quants Q2_K, Q3_K,
    Q4_K, Q5_K, Q6_K (dequantized by gguf.quants; the k-quants are not exercised by rpo's
    tests, as gguf cannot write them).
Refused, with an error naming the field or tensor: other architectures and tensor types,
rope scaling ({arch}.rope.scaling.type other than none, or a rope_freqs tensor, as Llama 3.1
files carry), mixture-of-experts, sliding windows, partial rotary embeddings, split files,
any {arch}.* metadata field this module does not read, and any tensor it does not map.

Rope layout: llama.cpp's converter reorders the rows of q and k of the llama architecture
within each head, interleaving the two rotated halves ((0, d/2), (1, d/2+1), ...) so that its
rope rotates adjacent pairs; HF and rpo rotate halves, so those rows are put back. Qwen2/3
are stored unpermuted (llama.cpp applies the half-rotation "neox" rope to them).
"""

from __future__ import annotations

import collections
import json
import os
import shutil

import ml_dtypes
import numpy as np

from rpo.files import sha256, write_json
from rpo.models import config as config_lib
from rpo.models.safetensors_io import CheckpointError

ARCHITECTURES = ("llama", "qwen2", "qwen3")
TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SOURCE_FILE = "gguf_source.json"
CONVERTER_VERSION = 1  # bumped when the output of the same GGUF file would change

# {arch}.<key> metadata this module reads; any other {arch}.* field is refused.
_READ = {
    "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "attention.key_length",
    "attention.value_length", "rope.freq_base", "rope.dimension_count", "vocab_size", "rope.scaling.type",
    "expert_count", "expert_used_count",
}

# GGUF tensor name (blk.{i}. prefix for per-layer ones) -> HF tensor name.
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_WHY = {  # tensors we know and refuse
    "rope_freqs.weight": "llama3-style rope frequency factors (rope scaling) are not supported",
}


class GGUFError(CheckpointError):
    """A GGUF file asks for something this importer does not support, or is malformed; the
    message names the file and the field or tensor."""


def gguf_to_hf_name(name: str) -> str | None:
    """The HF tensor name of a GGUF tensor name, or None when it has none here."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER:
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}"
    return None


def hf_to_gguf_name(name: str) -> str:
    """The GGUF name of an HF tensor name this module maps (the inverse of gguf_to_hf_name)."""
    for g, h in _GLOBAL.items():
        if h == name:
            return g
    _, _, i, rest = name.split(".", 3)  # model.layers.<i>.<rest>
    return f"blk.{i}." + next(g for g, h in _LAYER.items() if h == rest)


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row order ([heads * E, ...], rows of a head interleaved as pairs
    (0, E/2), (1, E/2+1), ...) back to HF's halves (0..E/2-1, then E/2..E-1)."""
    e = w.shape[0] // heads
    return w.reshape(heads, e // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _fields(reader, where: str) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the header (version, counts), not metadata
            continue
        try:
            out[key] = field.contents()
        except Exception as e:  # noqa: BLE001  (a field gguf itself cannot decode)
            raise GGUFError(f"{where}: field {key} cannot be read ({e})") from None
    return out


def hf_config_dict(fields: dict, tensor_names: set[str], where: str) -> dict:
    """The HF config.json of a GGUF file's metadata (raises GGUFError naming the field)."""
    if any(k.startswith("split.") for k in fields):
        raise GGUFError(f"{where}: field split.count: split GGUF files are not supported (merge them first)")
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{where}: field general.architecture={arch!r} is not supported "
                        f"(supported: {', '.join(ARCHITECTURES)})")
    for key in fields:
        if key.startswith(arch + ".") and key[len(arch) + 1:] not in _READ:
            raise GGUFError(f"{where}: field {key} is not supported (this importer does not know what it changes)")

    def get(key, default=None):
        full = f"{arch}.{key}"
        if full not in fields:
            if default is None:
                raise GGUFError(f"{where}: required field {full} is missing")
            return default
        value = fields[full]
        if isinstance(value, list):
            raise GGUFError(f"{where}: field {full} holds one value per layer, which is not supported")
        return value

    scaling = get("rope.scaling.type", "none")
    if scaling != "none":
        raise GGUFError(f"{where}: field {arch}.rope.scaling.type={scaling!r}: rope scaling is not supported")
    if get("expert_count", 0):
        raise GGUFError(f"{where}: field {arch}.expert_count={get('expert_count')}: mixture-of-experts is not supported")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{where}: field {arch}.attention.value_length != key_length is not supported")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise GGUFError(f"{where}: field {arch}.rope.dimension_count={get('rope.dimension_count')} != head dim "
                        f"{head_dim}: partial rotary embeddings are not supported")
    vocab = get("vocab_size", 0) or len(fields.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        vocab = None  # taken from token_embd.weight by the caller
    eos = [fields[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                "tokenizer.ggml.eom_token_id") if k in fields]
    return {
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": sorted(set(eos)) if len(set(eos)) > 1 else (eos[0] if eos else None),
        "pad_token_id": fields.get("tokenizer.ggml.padding_token_id"),
    }


def _f32(x) -> float:
    """A float32 metadata value as the shortest decimal that is the same float32 (1e-05, not
    9.999999747378752e-06), as the original config.json would have it."""
    return float(str(np.float32(x)))


def convert_gguf(gguf_path: str, out_dir: str, *, dtype: str = "float32", tokenizer: bool = True,
                 overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> str:
    """Writes the HF model directory of a GGUF file into out_dir and returns out_dir.

    dtype: of the written weights, "float32" (exact: every supported type dequantizes to
      values float32 holds) or "bfloat16" (rounded).
    tokenizer: also write the tokenizer (transformers' conversion of the tokenizer.ggml.*
      fields, with tokenizer.chat_template); a file without one is an error unless False.
    overwrite: replace an out_dir that an earlier conversion wrote (one holding gguf_source.json);
      any other non-empty out_dir is refused.
    The directory is written beside out_dir and renamed into place, so it never exists half written.
    """
    import gguf  # the maintained GGUF reader and dequantizer (llama.cpp's gguf-py)

    from rpo.models.hf import _mapping, write_weights

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}: use 'float32' or 'bfloat16'")
    if not os.path.isfile(gguf_path):
        raise GGUFError(f"{gguf_path}: no such file")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not (overwrite and os.path.isfile(os.path.join(out_dir, SOURCE_FILE))):
            raise GGUFError(f"{out_dir}: exists and is not empty" + ("" if overwrite else " (pass overwrite=True / "
                            "--overwrite to replace an earlier conversion)") + (
                            f"; it holds no {SOURCE_FILE}, so it is not an earlier conversion" if overwrite else ""))
    try:
        reader = gguf.GGUFReader(gguf_path)
    except (ValueError, OSError) as e:
        raise GGUFError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    fields = _fields(reader, gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    hf = hf_config_dict(fields, set(tensors), gguf_path)
    if hf["vocab_size"] is None:
        if "token_embd.weight" not in tensors:
            raise GGUFError(f"{gguf_path}: tensor token_embd.weight is missing")
        hf["vocab_size"] = int(tensors["token_embd.weight"].shape[-1])
    if hf["model_type"] == "qwen2":
        hf["attention_bias"] = True  # from_hf_dict reads qwen2's q/k/v biases from the model type
    config = config_lib.from_hf_dict(hf, where=f"{gguf_path} (as an HF config)")

    # Every tensor the HF model needs, and no other, with its shape and type checked before any is read.
    expected = {}
    for t in _mapping(config):
        for i in range(config.num_layers) if t.layered else [None]:
            expected[t.hf_name.format(i=i)] = t.hf_shape
    by_hf = {}
    for name, t in tensors.items():
        hf_name = gguf_to_hf_name(name)
        if hf_name is None or hf_name not in expected:
            why = _WHY.get(name, f"not part of a {config.model_type} model as this importer maps it")
            raise GGUFError(f"{gguf_path}: tensor {name} ({t.tensor_type.name}): {why}")
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions fastest-first
        if shape != tuple(expected[hf_name]):
            raise GGUFError(f"{gguf_path}: tensor {name} has shape {list(shape)}, the metadata implies "
                            f"{list(expected[hf_name])}")
        if t.tensor_type.name not in TENSOR_TYPES:
            raise GGUFError(f"{gguf_path}: tensor {name} has type {t.tensor_type.name}, which is not supported "
                            f"(supported: {', '.join(TENSOR_TYPES)})")
        by_hf[hf_name] = t
    missing = [n for n in expected if n not in by_hf]
    if missing:
        raise GGUFError(f"{gguf_path}: tensor {hf_to_gguf_name(missing[0])} is missing ({len(missing)} missing in all)")

    np_dtype = np.dtype(np.float32) if dtype == "float32" else np.dtype(ml_dtypes.bfloat16)
    permute = config.model_type == "llama"

    def make(hf_name, t):
        def read():
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(expected[hf_name])
            if permute and hf_name.endswith("q_proj.weight"):
                w = unpermute_rope_rows(w, config.num_heads)
            elif permute and hf_name.endswith("k_proj.weight"):
                w = unpermute_rope_rows(w, config.num_kv_heads)
            return w.astype(np_dtype)
        return read

    entries = [(n, tuple(expected[n]), np_dtype, make(n, by_hf[n])) for n in expected]
    tmp = f"{out_dir.rstrip(os.sep)}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write_weights(tmp, entries, max_shard_bytes=max_shard_bytes)
        write_json(os.path.join(tmp, "config.json"), config_lib.to_hf_dict(config, dtype))
        if tokenizer:
            _write_tokenizer(gguf_path, fields, tmp)
        write_json(os.path.join(tmp, SOURCE_FILE), {
            "gguf_file": os.path.basename(gguf_path), "sha256": sha256(gguf_path),
            "general.name": fields.get("general.name"), "architecture": config.model_type,
            "tensor_types": dict(collections.Counter(t.tensor_type.name for t in tensors.values())),
            "dtype": dtype, "tokenizer": bool(tokenizer), "converter_version": CONVERTER_VERSION,
        })
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_tokenizer(gguf_path: str, fields: dict, out_dir: str) -> None:
    from transformers import AutoTokenizer

    kind = fields.get("tokenizer.ggml.model")
    if kind is None:
        raise GGUFError(f"{gguf_path}: field tokenizer.ggml.model is missing: the file has no tokenizer "
                        "(convert with tokenizer=False / --no-tokenizer for the weights alone)")
    try:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_path)),
                                            gguf_file=os.path.basename(gguf_path))
    except Exception as e:  # noqa: BLE001  (transformers raises many kinds here)
        raise GGUFError(f"{gguf_path}: field tokenizer.ggml.model={kind!r}: transformers could not build the "
                        f"tokenizer ({type(e).__name__}: {e})") from None
    template = fields.get("tokenizer.chat_template")
    if template and getattr(tok, "chat_template", None) != template:
        tok.chat_template = template
    tok.save_pretrained(out_dir)


def read_source(path: str) -> dict | None:
    """gguf_source.json of a converted directory, or None."""
    file = os.path.join(path, SOURCE_FILE)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)
