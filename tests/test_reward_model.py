"""Reward models (HF *ForSequenceClassification) through rpo.models.reward against transformers."""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest
import torch
import transformers
from hf_models import VOCAB, make_model, save

import rpo.models as M
from rpo.models import reward as R
from rpo.sharding import make_mesh

# (family in hf_models.FAMILIES, num_labels). Mistral's decoder is Llama's (checked against
# transformers in test_models.py); its classifier is only loaded here, to save a compile.
CASES = [("llama_mqa", 1), ("qwen2", 1), ("llama3_tied", 2), ("qwen3", 3)]
PAD = 0  # pad_token_id of every hf_models config; real tokens below are drawn from 3..VOCAB-1
LENGTHS = np.array([5, 17, 11, 24, 1], np.int32)


def _batch(seed: int = 0, t: int = 32) -> np.ndarray:
    """Right-padded rows of LENGTHS real tokens (never PAD), padded with PAD."""
    rng = np.random.RandomState(seed)
    tokens = np.full((len(LENGTHS), t), PAD, np.int32)
    for i, n in enumerate(LENGTHS):
        tokens[i, :n] = rng.randint(3, VOCAB, n)
    return tokens


def _hf_scores(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        ids = torch.as_tensor(tokens, dtype=torch.long)
        attn = None if mask is None else torch.as_tensor(mask, dtype=torch.long)
        return model(input_ids=ids, attention_mask=attn).logits.float().numpy()


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{k}labels" for n, k in CASES])
def classifier(request, tmp_path_factory):
    """(HF sequence classifier, saved directory, num_labels)."""
    name, num_labels = request.param
    model = make_model(name, num_labels=num_labels)
    return model, save(model, tmp_path_factory.mktemp(name)), num_labels


def test_scores_match_transformers(classifier):
    model, path, num_labels = classifier
    config, params, n = R.load_reward_model(path)
    assert n == num_labels and "lm_head" not in params
    assert params["score"].shape == (config.hidden_size, num_labels)
    tokens = _batch()
    ours = np.asarray(R.reward_scores(config, params, tokens, LENGTHS))
    ref = _hf_scores(model, tokens, tokens != PAD)
    assert ours.shape == (len(LENGTHS), num_labels) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # Rows differ by far more than the tolerance, so reading a wrong position would show.
    assert np.ptp(ref[:, 0]) > 0.1, ref


def test_mistral_classifier_loads(tmp_path):
    model = make_model("mistral", num_labels=2)
    config, params, n = R.load_reward_model(save(model, tmp_path / "rm"))
    assert (config.model_type, n) == ("mistral", 2) and "lm_head" not in params
    np.testing.assert_array_equal(np.asarray(params["score"]), model.score.weight.detach().numpy().T)
    np.testing.assert_array_equal(np.asarray(params["embed"]), model.model.embed_tokens.weight.detach().numpy())


def test_pad_ids_do_not_matter(tmp_path):
    """Pads filled with real token ids (and with copies of the last real token) change nothing."""
    model = make_model("qwen2", num_labels=1)
    config, params, _ = R.load_reward_model(save(model, tmp_path / "rm"))
    tokens = _batch()
    clean = np.asarray(R.reward_scores(config, params, tokens, LENGTHS))
    noisy = tokens.copy()
    pad = np.arange(tokens.shape[1])[None, :] >= LENGTHS[:, None]
    noisy[pad] = np.random.RandomState(5).randint(3, VOCAB, pad.sum())
    repeated = np.where(pad, tokens[np.arange(len(LENGTHS)), LENGTHS - 1][:, None], tokens)
    for other in (noisy, repeated):
        got = np.asarray(R.reward_scores(config, params, other, LENGTHS))
        np.testing.assert_allclose(got, clean, atol=1e-6, rtol=0)


def test_row_ending_in_pad_id_is_read_at_its_end(tmp_path):
    """Where a row's last real token equals pad_token_id, transformers' rule skips back to an
    earlier token; ours reads the row's end, as transformers does with no pad id at batch 1."""
    model = make_model("llama_mqa", num_labels=1)
    config, params, _ = R.load_reward_model(save(model, tmp_path / "rm"))
    tokens = _batch()
    tokens[1, LENGTHS[1] - 1] = PAD  # row 1 now ends in the pad id (as a text ending in eos = pad would)
    ours = np.asarray(R.reward_scores(config, params, tokens, LENGTHS))[:, 0]
    hf_batch = _hf_scores(model, tokens)[:, 0]
    model.config.pad_token_id = None
    hf_row = _hf_scores(model, tokens[1:2, : LENGTHS[1]])[0, 0]
    assert abs(ours[1] - hf_row) < 1e-4
    assert abs(ours[1] - hf_batch[1]) > 1e-2  # the two rules really differ on this row
    np.testing.assert_allclose(np.delete(ours, 1), np.delete(hf_batch, 1), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------
# score_texts: tokenisation, bucketing and order, against transformers end to end.
# ------------------------------------------------------------------------------------------

WORDS = ["<pad>", "<s>", "</s>", "user", "assistant", ":", "what", "is", "two", "plus", "four", "so", "it", "five"]


def _tokenizer(path: str):
    """A word-level tokenizer whose post-processor adds BOS, with a chat template ending turns in eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
    )
    fast.save_pretrained(path)
    return M.load_tokenizer(path)


PROMPTS = ["what is two plus two", "what is two", "what is two plus two plus two", "what", "what is five"]
RESPONSES = [" so it is four", " two", " it is " + "two plus " * 8 + "two", " five", " it is five so five"]


@pytest.mark.parametrize("chat", [False, True])
def test_score_texts_matches_transformers_per_row(chat, tmp_path):
    model = make_model("qwen2", num_labels=2, seed=3)
    config, params, _ = R.load_reward_model(save(model, tmp_path / "rm"))
    tok = _tokenizer(str(tmp_path / "tok"))
    got = R.score_texts(config, params, tok, PROMPTS, RESPONSES, batch_size=2, max_len=40, chat_template=chat)
    want = []
    for p, r in zip(PROMPTS, RESPONSES):
        if chat:
            msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
            assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1  # one BOS, from the template
        else:
            ids = tok(p + r)["input_ids"]
            assert ids[0] == 1 and 0 not in ids  # BOS from the post-processor; no unknown words
        want.append(_hf_scores(model, np.array([ids]))[0, 0])
    lengths = [len(tok(p + r)["input_ids"]) for p, r in zip(PROMPTS, RESPONSES)]
    assert max(lengths) > 16 > min(lengths)  # two length buckets (16 and 32), so rows are reordered
    assert got.shape == (len(PROMPTS),) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_score_texts_row_too_long_names_its_index(tmp_path):
    model = make_model("qwen2", num_labels=1)
    config, params, _ = R.load_reward_model(save(model, tmp_path / "rm"))
    tok = _tokenizer(str(tmp_path / "tok"))
    with pytest.raises(ValueError, match=r"score_texts row 2: 27 tokens, outside 1\.\.max_len=20"):
        R.score_texts(config, params, tok, PROMPTS, RESPONSES, batch_size=4, max_len=20)
    with pytest.raises(ValueError, match="5 prompts but 4 responses"):
        R.score_texts(config, params, tok, PROMPTS, RESPONSES[:4], batch_size=4, max_len=64)


def test_sharded_load_equals_plain_load(tmp_path):
    path = save(make_model("qwen3", num_labels=3), tmp_path / "rm")
    config, num_labels = R.read_reward_config(path)
    shardings = R.reward_param_shardings(config, num_labels, make_mesh(1, 1, 1))
    _, sharded, _ = R.load_reward_model(path, shardings=shardings)
    _, plain, _ = R.load_reward_model(path)
    assert sharded["score"].sharding == shardings["score"]
    jax.tree.map(np.testing.assert_array_equal, sharded, plain)


# ------------------------------------------------------------------------------------------
# Bad inputs: each error names the file and the field or tensor.
# ------------------------------------------------------------------------------------------


def _edit_config(path: str, **changes) -> str:
    file = os.path.join(path, "config.json")
    with open(file) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(file, "w") as f:
        json.dump(cfg, f)
    return file


def _rewrite_weights(path: str, edit) -> None:
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "LlamaForTokenClassification"])
def test_causal_lm_is_not_a_reward_model(tmp_path, arch):
    path = save(make_model("llama_mqa"), tmp_path / "lm")
    file = _edit_config(path, architectures=[arch])
    want = f"{file}: field architectures=['{arch}'] is not a sequence classifier"
    with pytest.raises(M.UnsupportedConfigError, match=re.escape(want)):
        R.load_reward_model(path)


def test_causal_lm_without_architectures_field_lacks_score(tmp_path):
    path = save(make_model("llama_mqa"), tmp_path / "lm")
    file = os.path.join(path, "config.json")
    with open(file) as f:
        cfg = json.load(f)
    del cfg["architectures"]
    with open(file, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(M.CheckpointError, match=re.escape(f"{path}: tensor score.weight is missing")):
        R.load_reward_model(path)


def test_missing_score_tensor(tmp_path):
    path = save(make_model("qwen2", num_labels=1), tmp_path / "rm")
    _rewrite_weights(path, lambda t: t.pop("score.weight"))
    with pytest.raises(M.CheckpointError, match=re.escape(f"{path}: tensor score.weight is missing")):
        R.load_reward_model(path)


def test_score_shape_disagrees_with_labels(tmp_path):
    path = save(make_model("qwen2", num_labels=1), tmp_path / "rm")
    _edit_config(path, id2label={"0": "a", "1": "b", "2": "c"})
    want = "model.safetensors: tensor score.weight has shape [1, 64], config.json implies [3, 64]"
    with pytest.raises(M.CheckpointError, match=re.escape(want)):
        R.load_reward_model(path)


def test_classifier_is_not_a_causal_lm(tmp_path):
    """The causal-LM loader still wants lm_head.weight (untied), so the two paths do not mix."""
    path = save(make_model("llama_mqa", num_labels=1), tmp_path / "rm")
    with pytest.raises(M.CheckpointError, match=re.escape(f"{path}: tensor lm_head.weight is missing")):
        M.load_pretrained(path)
