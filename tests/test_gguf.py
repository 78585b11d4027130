"""GGUF import (rpo.models.gguf_import) on tiny files written here with the gguf package's own writer.

Each file is a random transformers model (llama with GQA and tied embeddings, qwen2 with biases,
qwen3 with q/k norms and a head_dim of its own) written the way llama.cpp's converter writes it
(q/k rows of llama reordered for its rope, weights quantized by gguf.quants). The references are
transformers' own GGUF reader (load_gguf_checkpoint: its dequantization, rope-row order and name
mapping) and the original PyTorch model; the real SmolLM2 file is in tests/test_smollm2.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

import rpo.models as M
from rpo.models import gguf_import
from rpo.models.gguf_import import GGUFError, convert_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 96
TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 24)).astype(np.int32)
Q = gguf.GGMLQuantizationType

FAMILIES = {  # name -> (config class, model class, GGUF architecture, overrides)
    "llama": ("LlamaConfig", "LlamaForCausalLM", "llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen3",
              dict(num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)),
}


def make_model(name: str, seed: int = 0):
    cfg_cls, model_cls, _, overrides = FAMILIES[name]
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, **overrides,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model


def llama_cpp_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order for the llama architecture: within each head, rows
    i and i + E/2 become neighbours (2i, 2i+1)."""
    e = w.shape[0] // heads
    return w.reshape(heads, 2, e // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    name = gguf_import.hf_to_gguf_name(hf_name)
    assert gguf_import.gguf_to_hf_name(name) == hf_name
    return name


def write_gguf(model, path, qtype=Q.Q8_0, *, extra_fields=None, skip=(), extra_tensors=None, arch=None,
               types=None) -> str:
    """The model as llama.cpp writes it: metadata, 1-D tensors in F32, 2-D ones in `qtype` (or
    types[hf_name])."""
    c = model.config
    name = next(k for k, v in FAMILIES.items() if v[1] == type(model).__name__)
    arch = arch or FAMILIES[name][2]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{name}")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    if name == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in (extra_fields or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if hf_name in skip:
            continue
        x = t.float().numpy()
        if name == "llama" and hf_name.endswith("q_proj.weight"):
            x = llama_cpp_rope_rows(x, c.num_attention_heads)
        elif name == "llama" and hf_name.endswith("k_proj.weight"):
            x = llama_cpp_rope_rows(x, c.num_key_value_heads)
        qt = (types or {}).get(hf_name, qtype)
        if x.ndim == 2 and qt not in (Q.F32, Q.F16):
            w.add_tensor(gguf_name(hf_name), gguf.quants.quantize(x, qt), raw_dtype=qt)
        elif x.ndim == 2 and qt == Q.F16:
            w.add_tensor(gguf_name(hf_name), x.astype(np.float16))
        else:
            w.add_tensor(gguf_name(hf_name), x)
    for tname, x in (extra_tensors or {}).items():
        w.add_tensor(tname, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def transformers_gguf_model(model, path):
    """transformers' own reading of the GGUF file (dequantization, rope-row order, names), loaded
    into a model of the original's config."""
    ref = type(model)(model.config).eval()
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=ref)["tensors"]
    missing = ref.load_state_dict(tensors, strict=False).missing_keys
    assert set(missing) <= {"lm_head.weight"}, missing
    ref.tie_weights()
    return ref, tensors


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


@pytest.mark.parametrize("name,qtype", [("llama", Q.Q4_1), ("llama", Q.F16), ("qwen2", Q.Q8_0), ("qwen3", Q.Q5_0)])
def test_converted_directory_equals_transformers_reading_of_the_file(tmp_path, name, qtype):
    """Every written tensor equals transformers' dequantized, reordered one; rpo and transformers
    load the directory to the same logits as transformers' GGUF model (and, for F16, the original)."""
    model = make_model(name)
    path = write_gguf(model, tmp_path / f"{name}.gguf", qtype)
    out = convert_gguf(path, str(tmp_path / "hf"), tokenizer=False)
    ref, tensors = transformers_gguf_model(model, path)
    ours = load_file(os.path.join(out, "model.safetensors"))
    assert set(ours) == set(tensors)
    for k in ours:
        np.testing.assert_array_equal(ours[k], tensors[k].numpy(), err_msg=k)

    ref_logits = logits(ref)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf) is type(model)
    np.testing.assert_allclose(logits(hf), ref_logits, atol=1e-5, rtol=0)
    config, params = M.load_pretrained(out)
    np.testing.assert_allclose(np.asarray(M.forward(config, params, TOKENS)), ref_logits, atol=1e-4, rtol=0)
    if qtype == Q.F16:  # half-precision weights: close to the original model's logits
        np.testing.assert_allclose(ref_logits, logits(model), atol=2e-3, rtol=0)
    # and quantization really happened: the logits are not the original's
    if qtype == Q.Q4_1:
        assert np.abs(ref_logits - logits(model)).max() > 1e-3

    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == name and cfg["tie_word_embeddings"] == model.config.tie_word_embeddings
    assert cfg["num_key_value_heads"] == model.config.num_key_value_heads and cfg["rms_norm_eps"] == 1e-6
    src = gguf_import.read_source(out)
    assert src["architecture"] == name and qtype.name in src["tensor_types"] and src["tokenizer"] is False


def test_rope_rows_left_in_llama_cpp_order_would_be_caught(tmp_path):
    """The check above can fail: without undoing llama.cpp's q/k order, logits move far."""
    model = make_model("llama")
    out = convert_gguf(write_gguf(model, tmp_path / "m.gguf", Q.F32), str(tmp_path / "hf"), tokenizer=False)
    config, params = M.load_pretrained(out)
    good = np.asarray(M.forward(config, params, TOKENS))
    np.testing.assert_allclose(good, logits(model), atol=1e-4, rtol=0)
    q = np.asarray(params["layers"]["q"])  # [L, D, H, E]: reorder each head's E like llama.cpp does
    e = q.shape[-1]
    params["layers"]["q"] = q.reshape(*q.shape[:-1], 2, e // 2).swapaxes(-1, -2).reshape(q.shape)
    assert np.abs(np.asarray(M.forward(config, params, TOKENS)) - good).max() > 1e-2


def test_bfloat16_output_and_overwrite(tmp_path):
    model = make_model("qwen2")
    path = write_gguf(model, tmp_path / "m.gguf", Q.F32)
    out = str(tmp_path / "hf")
    convert_gguf(path, out, dtype="bfloat16", tokenizer=False)
    config, params = M.load_pretrained(out, dtype="bfloat16")
    np.testing.assert_allclose(np.asarray(M.forward(config, params, TOKENS)), logits(model), atol=0.1, rtol=0)
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    with pytest.raises(GGUFError, match="exists and is not empty"):
        convert_gguf(path, out, tokenizer=False)
    convert_gguf(path, out, tokenizer=False, overwrite=True)  # an earlier conversion may be replaced
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "float32"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(GGUFError, match="not an earlier conversion"):
        convert_gguf(path, str(other), tokenizer=False, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"


def test_command_line(tmp_path):
    path = write_gguf(make_model("llama"), tmp_path / "m.gguf", Q.Q8_0)
    run = subprocess.run([sys.executable, "-m", "rpo.models.convert", "--gguf", path, "--out", str(tmp_path / "hf"),
                          "--no-tokenizer"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(tmp_path / "hf")
    assert "llama" in run.stderr and "Q8_0" in run.stderr
    assert M.load_config(str(tmp_path / "hf")).num_kv_heads == 2
    run = subprocess.run([sys.executable, "-m", "rpo.models.convert", "--gguf", path, "--out", str(tmp_path / "hf2")],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1 and "tokenizer.ggml.model is missing" in run.stderr
    assert not (tmp_path / "hf2").exists()


@pytest.mark.parametrize("kind,needle", [
    ("arch", "general.architecture='gemma2' is not supported"),
    ("field", "field llama.attention.sliding_window is not supported"),
    ("scaling", "field llama.rope.scaling.type='yarn'"),
    ("experts", "field llama.expert_count=8"),
    ("type", "tensor blk.0.ffn_up.weight has type MXFP4, which is not supported"),
    ("unknown_tensor", "tensor blk.0.attn_gate.weight (F32): not part of a llama model"),
    ("rope_freqs", "tensor rope_freqs.weight (F32): llama3-style rope frequency factors"),
    ("missing", "tensor blk.1.ffn_down.weight is missing"),
    ("shape", "tensor blk.0.attn_norm.weight has shape [32], the metadata implies [64]"),
])
def test_unsupported_files_are_refused_naming_the_field_or_tensor(tmp_path, kind, needle):
    model = make_model("llama")
    kw = {}
    if kind == "arch":
        kw["arch"] = "gemma2"
    elif kind == "field":
        kw["extra_fields"] = {"llama.attention.sliding_window": 4096}
    elif kind == "scaling":
        kw["extra_fields"] = {"llama.rope.scaling.type": "yarn"}
    elif kind == "experts":
        kw["extra_fields"] = {"llama.expert_count": 8}
    elif kind == "unknown_tensor":
        kw["extra_tensors"] = {"blk.0.attn_gate.weight": np.zeros(64, np.float32)}
    elif kind == "rope_freqs":
        kw["extra_tensors"] = {"rope_freqs.weight": np.ones(8, np.float32)}
    elif kind == "missing":
        kw["skip"] = ("model.layers.1.mlp.down_proj.weight",)
    elif kind == "shape":
        kw["skip"] = ("model.layers.0.input_layernorm.weight",)
        kw["extra_tensors"] = {"blk.0.attn_norm.weight": np.ones(32, np.float32)}
    elif kind == "type":  # a type gguf writes and reads but the importer refuses
        kw["types"] = {"model.layers.0.mlp.up_proj.weight": Q.MXFP4}
    path = write_gguf(model, tmp_path / "m.gguf", Q.F32, **kw)
    with pytest.raises(GGUFError) as e:
        convert_gguf(path, str(tmp_path / "hf"), tokenizer=False)
    assert needle in str(e.value) and path in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        convert_gguf(str(bad), str(tmp_path / "hf"), tokenizer=False)
    with pytest.raises(GGUFError, match="no such file"):
        convert_gguf(str(tmp_path / "absent.gguf"), str(tmp_path / "hf"), tokenizer=False)
