"""Tiny random HF (PyTorch) models of each supported family, for reference checks.

Nothing is downloaded: each model is built from a config with random weights and saved with
transformers' own save_pretrained.
"""

from __future__ import annotations

import copy

import torch
import transformers

ROPE_LLAMA3 = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=32,
)

# name -> (config class, model class, config overrides)
FAMILIES = {
    # llama3 rope scaling, tied embeddings, GQA with 2 kv heads
    "llama3_tied": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=ROPE_LLAMA3, tie_word_embeddings=True, num_key_value_heads=2)),
    # plain llama, untied, GQA with 1 kv head (multi-query)
    "llama_mqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, num_key_value_heads=2)),
    # q/k/v biases
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    # q/k RMSNorm; head_dim 24 != hidden_size / num_heads = 16; 1 kv head
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, num_key_value_heads=1)),
}

VOCAB = 97


def make_model(name: str, seed: int = 0, *, num_layers: int = 2, std: float = 0.08, num_labels: int | None = None):
    """A random-weight HF model in eval mode. Weights are normal(0, std) (norm weights
    around 1) so that logits are spread out rather than near-uniform. With num_labels, the
    family's *ForSequenceClassification model (a reward model) instead of its causal LM."""
    cfg_cls, model_cls, overrides = FAMILIES[name]
    if num_labels is not None:
        model_cls = model_cls.replace("ForCausalLM", "ForSequenceClassification")
        overrides = dict(overrides, num_labels=num_labels)
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **overrides,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model


def save(model, path) -> str:
    model.save_pretrained(str(path))
    return str(path)


def reference_logits(model, tokens, dtype=torch.float32):
    """HF logits [B, T, V] as float32 numpy, computed in `dtype`."""
    m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)  # never round `model` itself
    with torch.no_grad():
        return m(torch.as_tensor(tokens)).logits.float().numpy()
