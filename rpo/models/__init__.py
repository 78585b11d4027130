"""The decoder family (Llama, Mistral, Qwen2, Qwen3) and HF checkpoints in and out.

Public API:
  load_pretrained(path, *, dtype="float32", shardings=None) -> (config, params)
  save_pretrained(config, params, path)
  forward(config, params, tokens) -> logits
  load_tokenizer(path)
  convert_gguf(gguf_path, out_dir)   a GGUF checkpoint (llama.cpp) -> an HF directory (gguf_import;
                                     `python -m rpo.models.convert`); rpo.models.smollm2 prepares a real one
The building blocks used by sampling and training (hidden_states, the one-token decode_step over
the sampling cache) live in rpo.models.decoder.
"""

from rpo.models.config import ModelConfig, UnsupportedConfigError, from_hf_dict, load_config
from rpo.models.decoder import (
    forward,
    hidden_states,
    init_params,
    logits_from_hidden,
    param_axes,
    param_shapes,
    unembed_matrix,
)
from rpo.models.gguf_import import GGUFError, convert_gguf
from rpo.models.hf import load_pretrained, load_tokenizer, save_pretrained
from rpo.models.safetensors_io import CheckpointError

__all__ = [
    "CheckpointError",
    "GGUFError",
    "ModelConfig",
    "UnsupportedConfigError",
    "convert_gguf",
    "forward",
    "from_hf_dict",
    "hidden_states",
    "init_params",
    "load_config",
    "load_pretrained",
    "load_tokenizer",
    "logits_from_hidden",
    "param_axes",
    "param_shapes",
    "save_pretrained",
    "unembed_matrix",
]
