"""The decoder family against HF transformers (PyTorch), checkpoints in and out, bad inputs."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_models import FAMILIES, VOCAB, make_model, reference_logits, save

import rpo.models as M
from rpo.models import decoder

TOKENS = np.random.RandomState(0).randint(3, VOCAB, (2, 48)).astype(np.int32)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, HF model, saved directory) for each family."""
    model = make_model(request.param)
    path = save(model, tmp_path_factory.mktemp(request.param))
    return request.param, model, path


def test_float32_logits_match_hf(family):
    name, model, path = family
    config, params = M.load_pretrained(path)
    ours = np.asarray(M.forward(config, params, TOKENS))
    ref = reference_logits(model, TOKENS)
    assert ours.shape == (2, 48, VOCAB)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_config_reads_each_family_feature(family):
    name, model, path = family
    config = M.load_config(path)
    assert config.model_type == model.config.model_type
    assert config.tie_word_embeddings == (name == "llama3_tied")
    assert config.rope_llama3 == ((8.0, 1.0, 4.0, 32) if name == "llama3_tied" else None)
    assert config.qkv_bias == (name == "qwen2") and not config.o_bias
    assert config.qk_norm == (name == "qwen3")
    assert config.head_dim == (24 if name == "qwen3" else 16)
    assert config.num_kv_heads == model.config.num_key_value_heads


def test_bfloat16_logits_within_hf_bfloat16_error(family):
    """bf16 has an 8-bit mantissa, so no fixed atol is meaningful across models: our bf16
    error against the float32 reference must be no worse than twice HF's own bf16 error
    against that same reference (same arithmetic, different rounding order), and under 5%
    of the logit range. Measured: ours 0.028 to 0.044, HF 0.029 to 0.044, logits ~2.5."""
    name, model, path = family
    config, params = M.load_pretrained(path, dtype="bfloat16")
    assert params["embed"].dtype == jnp.bfloat16 and config.dtype == "bfloat16"
    ours = np.asarray(M.forward(config, params, TOKENS))
    ref = reference_logits(model, TOKENS)
    hf_bf16 = reference_logits(model, TOKENS, torch.bfloat16)
    ours_err = np.abs(ours - ref).max()
    hf_err = np.abs(hf_bf16 - ref).max()
    assert ours_err <= 2 * hf_err, (ours_err, hf_err)
    assert ours_err <= 0.05 * np.abs(ref).max()
    # and bf16 really is in use: the error is not float32-small
    assert ours_err > 1e-3


def test_decode_steps_equal_the_full_forward(family):
    """Prefill left-padded prompts of different lengths once (hidden_states' keys and values), then N = 2 samples
    of each, with different tokens, one decode_step at a time over the prefix-shared cache: every logit equals
    the full forward over that sample's own (unpadded) tokens."""
    name, model, path = family
    config, params = M.load_pretrained(path)
    rng = np.random.RandomState(1)
    lengths, n, steps = [5, 11, 8], 2, 6
    prompt_len, r = max(lengths), len(lengths)
    rows = [[np.concatenate([p, rng.randint(3, VOCAB, steps)]).astype(np.int32) for _ in range(n)]
            for p in (rng.randint(3, VOCAB, k) for k in lengths)]  # rows[i][j]: sample j of prompt i

    tokens = np.zeros((r, prompt_len), np.int32)
    mask = np.zeros((r, prompt_len), bool)
    positions = np.zeros((r, prompt_len), np.int32)
    for i, k in enumerate(lengths):
        tokens[i, prompt_len - k:] = rows[i][0][:k]
        mask[i, prompt_len - k:] = True
        positions[i, prompt_len - k:] = np.arange(k)
    h, kv = decoder.hidden_states(config, params, jnp.asarray(tokens), positions_BT=jnp.asarray(positions),
                                  mask_BT=jnp.asarray(mask), return_kv=True)
    cache = decoder.step_cache(config, kv, jnp.asarray(mask), n, steps)
    layers, w_DV = decoder.step_params(config, params)
    rope_PE = decoder.rope_table(config, prompt_len + steps)
    step = jax.jit(decoder.decode_step, static_argnums=0)
    got = np.zeros((r, n, steps, config.vocab_size), np.float32)
    for t in range(steps):
        tok_B = np.array([rows[i][j][lengths[i] + t] for i in range(r) for j in range(n)], np.int32)
        pos_B = np.array([lengths[i] + t for i in range(r) for _ in range(n)], np.int32)
        logits_BV, cache = step(config, params, layers, w_DV, tok_B, pos_B, cache, rope_PE)
        got[:, :, t] = np.asarray(logits_BV).reshape(r, n, -1)
    assert (np.asarray(cache["index"]) == steps).all()

    for i, k in enumerate(lengths):
        for j in range(n):
            full = np.asarray(M.forward(config, params, rows[i][j][None]))[0]
            np.testing.assert_allclose(got[i, j], full[k:], atol=1e-4, rtol=0)


def test_export_loads_in_transformers(family, tmp_path):
    name, model, path = family
    config, params = M.load_pretrained(path)
    out = tmp_path / "export"
    M.save_pretrained(config, params, str(out))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(reloaded) is type(model)
    np.testing.assert_allclose(reference_logits(reloaded, TOKENS), reference_logits(model, TOKENS), atol=1e-5, rtol=0)
    # and the round trip through our loader is exact
    config2, params2 = M.load_pretrained(str(out))
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sharded_checkpoint_round_trip(tmp_path):
    """A checkpoint split over several files with an index, written by us, read by HF and us."""
    model = make_model("qwen2")
    config, params = M.load_pretrained(save(model, tmp_path / "src"))
    out = tmp_path / "sharded"
    M.save_pretrained(config, params, str(out), max_shard_bytes=60_000)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 2 and (out / "model.safetensors.index.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    np.testing.assert_allclose(reference_logits(hf, TOKENS), reference_logits(model, TOKENS), atol=1e-5, rtol=0)
    _, params2 = M.load_pretrained(str(out))
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    # Saving again into the same directory, unsharded, leaves only the new weights.
    M.save_pretrained(config, params, str(out))
    assert sorted(f for f in os.listdir(out) if f.startswith("model")) == ["model.safetensors"]


def test_load_into_a_sharding_on_8_devices(tmp_path):
    """Streaming load into a data x fsdp x tensor = 2x2x2 sharding; params land sharded and
    the sharded forward equals HF. Runs in a subprocess so it can fake 8 CPU devices."""
    model = make_model("qwen3")
    path = save(model, tmp_path / "m")
    ref_file = tmp_path / "ref.npy"
    np.save(ref_file, reference_logits(model, TOKENS))
    script = textwrap.dedent(
        f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, numpy as np
        import rpo.models as M, rpo.sharding as S
        mesh = S.make_mesh(2, 2, 2)
        shardings = S.param_shardings(M.load_config({path!r}), mesh)
        config, params = M.load_pretrained({path!r}, shardings=shardings)
        q = params["layers"]["q"]
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None), q.sharding
        assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 32, 2, 24)
        logits = jax.jit(M.forward, static_argnums=0)(config, params, np.load({str(tmp_path / "tokens.npy")!r}))
        np.testing.assert_allclose(np.asarray(logits), np.load({str(ref_file)!r}), atol=1e-4, rtol=0)
        print("OK")
        """
    )
    np.save(tmp_path / "tokens.npy", TOKENS)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=os.getcwd(), timeout=900)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_tokenizer_with_chat_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "user", "assistant", ":", "what", "is", "2+2", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    fast.save_pretrained(str(tmp_path))
    loaded = M.load_tokenizer(str(tmp_path))
    text = loaded.apply_chat_template([{"role": "user", "content": "what is 2+2 ?"}], tokenize=False)
    assert text.strip() == "user : what is 2+2 ?"
    assert loaded.eos_token_id == 2
    with pytest.raises(M.CheckpointError, match=str(tmp_path / "nowhere")):
        M.load_tokenizer(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------
# Bad inputs: one clear error naming the file and the field or tensor.
# ------------------------------------------------------------------------------------------


@pytest.fixture()
def llama_dir(tmp_path):
    return save(make_model("llama_mqa"), tmp_path / "llama")


def _edit_config(path, **changes):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(file, "w") as f:
        json.dump(cfg, f)
    return file


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        M.load_pretrained(str(tmp_path))


def test_missing_weights_file(llama_dir):
    os.remove(os.path.join(llama_dir, "model.safetensors"))
    with pytest.raises(M.CheckpointError, match=r"no model\.safetensors and no model\.safetensors\.index\.json"):
        M.load_pretrained(llama_dir)


def test_index_names_a_missing_shard(llama_dir):
    os.rename(os.path.join(llama_dir, "model.safetensors"), os.path.join(llama_dir, "part-1.safetensors"))
    with open(os.path.join(llama_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"model.embed_tokens.weight": "part-2.safetensors"}}, f)
    with pytest.raises(M.CheckpointError, match=r"part-2\.safetensors: no such file"):
        M.load_pretrained(llama_dir)


def test_unsupported_model_type(llama_dir):
    file = _edit_config(llama_dir, model_type="gpt2")
    with pytest.raises(M.UnsupportedConfigError, match=rf"{file}: field model_type='gpt2'"):
        M.load_pretrained(llama_dir)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(model_type="mistral", sliding_window=16), "sliding_window=16"),
        (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window=true"),
        (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)), "rope_parameters.rope_type='yarn'"),
        (dict(rope_parameters=None, rope_scaling=dict(type="linear", factor=2.0)), "rope_scaling.rope_type='linear'"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(mlp_bias=True), "mlp_bias=true"),
    ],
)
def test_unsupported_config_features(llama_dir, changes, field):
    file = _edit_config(llama_dir, **changes)
    with pytest.raises(M.UnsupportedConfigError, match=f"{file}: field {__import__('re').escape(field)}"):
        M.load_pretrained(llama_dir)


def test_mistral_without_sliding_window_key_is_refused(llama_dir):
    """transformers reads an absent sliding_window as its 4096-token default, not as full attention."""
    file = os.path.join(llama_dir, "config.json")
    with open(file) as f:
        cfg = json.load(f)
    cfg["model_type"] = "mistral"
    cfg.pop("sliding_window", None)
    with open(file, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(M.UnsupportedConfigError, match=r"field sliding_window=4096 \(absent"):
        M.load_pretrained(llama_dir)


def test_missing_field(llama_dir):
    with open(os.path.join(llama_dir, "config.json")) as f:
        cfg = json.load(f)
    del cfg["hidden_size"]
    with open(os.path.join(llama_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(M.UnsupportedConfigError, match="required field 'hidden_size' is missing"):
        M.load_pretrained(llama_dir)


def _rewrite_weights(path, edit):
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor(llama_dir):
    _rewrite_weights(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(M.CheckpointError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        M.load_pretrained(llama_dir)


def test_tensor_of_wrong_shape(llama_dir):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 64)

    _rewrite_weights(llama_dir, edit)
    with pytest.raises(
        M.CheckpointError,
        match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.k_proj\.weight has shape \[32, 64\], config\.json implies \[16, 64\]",
    ):
        M.load_pretrained(llama_dir)


def test_not_a_safetensors_file(llama_dir):
    with open(os.path.join(llama_dir, "model.safetensors"), "wb") as f:
        f.write(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(M.CheckpointError, match=r"model\.safetensors: not a safetensors file"):
        M.load_pretrained(llama_dir)


def test_gqa_groups_must_divide():
    with pytest.raises(M.UnsupportedConfigError, match="num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        M.ModelConfig("llama", 10, 8, 8, 1, 4, 3, 2)


def test_causality_and_param_axes_cover_params():
    """Changing a later token never changes earlier logits; every param has logical axes
    of matching rank."""
    config = M.ModelConfig("qwen3", 50, 32, 48, 2, 4, 2, 12, qk_norm=True, qkv_bias=True, o_bias=True)
    params = M.init_params(config, jax.random.PRNGKey(0))
    axes = M.param_axes(config)
    jax.tree.map(lambda p, a: (len(a) == p.ndim) or pytest.fail(f"{a} vs {p.shape}"), params, axes,
                 is_leaf=lambda x: isinstance(x, tuple))
    a = np.arange(10, dtype=np.int32)[None] + 3
    b = a.copy()
    b[0, 6] = 40
    la, lb = M.forward(config, params, a), M.forward(config, params, b)
    np.testing.assert_array_equal(np.asarray(la[0, :6]), np.asarray(lb[0, :6]))
    assert np.abs(np.asarray(la[0, 6:] - lb[0, 6:])).max() > 1e-4


def test_attention_loop_over_slots_is_the_multiply_reduce_bit_for_bit():
    """decode_step's products over the generated slots (_batched_products: on CPU a loop over the summed axis,
    `unroll` entries per iteration) give bit for bit the broadcast multiply-reduce it replaces, with the summed
    axis a multiple of `unroll` or not, in float32 and bfloat16, and the float64 products to rounding."""
    rng = np.random.default_rng(0)
    reduce = jax.jit(lambda x, y: jnp.sum(x[..., None] * y[:, :, None], axis=3, dtype=jnp.float32))
    for i, z, unroll, dtype in ((64, 40, 8, jnp.float32), (37, 64, 8, jnp.float32), (48, 16, 32, jnp.bfloat16)):
        x = jnp.asarray(rng.standard_normal((4, 2, 3, i)), dtype)
        y = jnp.asarray(rng.standard_normal((4, 2, i, z)), dtype)
        got = jax.jit(decoder._batched_products, static_argnums=2)(x, y, unroll)
        assert got.dtype == jnp.float32 and got.shape == (4, 2, 3, z)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(reduce(x, y)))
        exact = np.einsum("bkgi,bkiz->bkgz", np.asarray(x, np.float64), np.asarray(y, np.float64))
        np.testing.assert_allclose(np.asarray(got), exact, atol=1e-4 if dtype == jnp.float32 else 0.15)
