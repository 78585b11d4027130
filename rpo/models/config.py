"""ModelConfig: the decoder's static description, read from and written to HF config.json.

One frozen (hashable) dataclass covers Llama, Mistral, Qwen2 and Qwen3; it is passed to
jitted functions as a static argument. Anything in a config.json that would change the
computation and that we do not implement raises `UnsupportedConfigError` naming the file
and the field, rather than being silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3")

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class UnsupportedConfigError(ValueError):
    """A config.json asks for something this decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # llama3 rope scaling: (factor, low_freq_factor, high_freq_factor, original_max_pos) or None.
    rope_llama3: tuple[float, float, float, int] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Compute dtype of activations and matmuls ("float32" or "bfloat16"). Params keep their own
    # dtype; they are cast to this one inside the forward.
    dtype: str = "float32"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise UnsupportedConfigError(f"dtype={self.dtype!r}: use 'float32' or 'bfloat16'")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @property
    def num_params(self) -> int:
        d, f, e = self.hidden_size, self.intermediate_size, self.head_dim
        h, k = self.num_heads, self.num_kv_heads
        per_layer = d * e * (h + 2 * k) + h * e * d + 3 * d * f + 2 * d
        per_layer += (h + 2 * k) * e if self.qkv_bias else 0
        per_layer += d if self.o_bias else 0
        per_layer += 2 * e if self.qk_norm else 0
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + d


def _rope_settings(hf: dict[str, Any], where: str) -> tuple[float, tuple | None]:
    """Returns (theta, llama3 params or None) from either config format.

    transformers >= 5 writes `rope_parameters: {rope_type, rope_theta, ...}`; older files
    write `rope_theta` and `rope_scaling: {type|rope_type, ...}`.
    """
    params = hf.get("rope_parameters")
    field = "rope_parameters"
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        field = "rope_scaling"
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if not isinstance(params, dict):
        raise UnsupportedConfigError(f"{where}: field {field} must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"{where}: field {field}.rope_type={rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedConfigError(f"{where}: field {field}.partial_rotary_factor != 1 is not supported")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, None
    try:
        llama3 = (
            float(params["factor"]),
            float(params["low_freq_factor"]),
            float(params["high_freq_factor"]),
            int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise UnsupportedConfigError(f"{where}: field {field} (llama3) lacks {e.args[0]!r}") from None
    return theta, llama3


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def from_hf_dict(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Builds a ModelConfig from a parsed HF config.json; `where` names the file in errors."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedConfigError(
            f"{where}: field model_type={model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )

    def need(name):
        if name not in hf:
            raise UnsupportedConfigError(f"{where}: required field {name!r} is missing")
        return hf[name]

    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedConfigError(f"{where}: field hidden_act={act!r} is not supported (only 'silu')")
    if hf.get("mlp_bias", False):
        raise UnsupportedConfigError(f"{where}: field mlp_bias=true is not supported")
    # Sliding-window attention: Mistral switches it on by a non-null sliding_window, Qwen2/3
    # by use_sliding_window. We implement full attention only.
    if model_type == "mistral":
        # An absent key means transformers' MistralConfig default, a 4096-token window.
        window = hf.get("sliding_window", 4096)
        if window is not None:
            shown = window if "sliding_window" in hf else "4096 (absent: the transformers default)"
            raise UnsupportedConfigError(
                f"{where}: field sliding_window={shown} asks for sliding-window "
                "attention, which is not supported (set it to null for full attention)"
            )
    elif hf.get("use_sliding_window", False):
        raise UnsupportedConfigError(
            f"{where}: field use_sliding_window=true asks for sliding-window attention, which is not supported"
        )
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise UnsupportedConfigError(f"{where}: field layer_types holds non-full attention layers: {sorted(set(layer_types))}")

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    theta, llama3 = _rope_settings(hf, where)
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_llama3=llama3,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        qk_norm=model_type == "qwen3",
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )


def to_hf_dict(config: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    """The config.json that transformers reads back into the same model."""
    if config.model_type == "qwen2" and (not config.qkv_bias or config.o_bias):
        raise UnsupportedConfigError("qwen2 always has q/k/v biases and no o bias")
    if config.model_type in ("llama", "qwen3") and config.qkv_bias != config.o_bias:
        raise UnsupportedConfigError(f"{config.model_type}: attention_bias covers q, k, v and o together")
    if config.model_type == "mistral" and (config.qkv_bias or config.o_bias):
        raise UnsupportedConfigError("mistral has no attention biases")
    if config.qk_norm != (config.model_type == "qwen3"):
        raise UnsupportedConfigError("q/k RMSNorm exists in qwen3 only")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_llama3 is not None:
        f, lo, hi, orig = config.rope_llama3
        rope = {
            "rope_type": "llama3",
            "rope_theta": config.rope_theta,
            "factor": f,
            "low_freq_factor": lo,
            "high_freq_factor": hi,
            "original_max_position_embeddings": orig,
        }
    eos = list(config.eos_token_ids)
    out: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        # Both spellings: transformers >= 5 reads rope_parameters, older versions the pair below.
        "rope_parameters": rope,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_llama3 is None else rope,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": config.pad_token_id,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }
    if config.model_type in ("llama", "qwen3"):
        out["attention_bias"] = config.o_bias
    if config.model_type == "mistral":
        out["sliding_window"] = None
    if config.model_type in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
    return out


def load_config(path: str) -> ModelConfig:
    """Reads `<path>/config.json` (or `path` itself when it is a file)."""
    file = path if path.endswith(".json") else os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: no such file (an HF model directory needs config.json)")
    try:
        with open(file) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise UnsupportedConfigError(f"{file}: not valid JSON ({e})") from None
    return from_hf_dict(hf, where=file)
