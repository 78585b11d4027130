"""Reward models: HF sequence-classification checkpoints run through our decoder.

A `LlamaForSequenceClassification` (or Mistral / Qwen2 / Qwen3) checkpoint is the decoder
without an LM head plus a linear `score` head without bias, read at the last real token of
each row. Params are the decoder's (rpo.models.decoder) without `lm_head`, plus

  score [D, N]    N = num_labels (HF stores score.weight as [N, D])

Rows are right-padded; `lengths_B` gives each row's real length, so the pad id never matters.
Shape letters as in rpo.models.decoder, plus N labels.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rpo.models.config import ModelConfig, UnsupportedConfigError, load_config
from rpo.models.decoder import Params, hidden_states, param_axes, param_shapes
from rpo.models.hf import load_pretrained
from rpo.sharding import DEFAULT_RULES, tree_shardings

_HEAD_SUFFIX = "ForSequenceClassification"
MIN_LEN_BUCKET = 16


def read_reward_config(path: str) -> tuple[ModelConfig, int]:
    """(decoder config, num_labels) of an HF sequence-classification directory.

    num_labels is len(id2label) when config.json has it, else its num_labels field, else
    transformers' default of 2 (transformers omits id2label from config.json when there are
    2 labels). A config.json whose `architectures` names anything but a *ForSequenceClassification
    class (e.g. a causal LM) is an error; without that field, loading checks for score.weight.
    """
    config = load_config(path)
    file = os.path.join(path, "config.json")
    with open(file) as f:
        hf = json.load(f)
    arch = hf.get("architectures")
    if arch is not None and (not isinstance(arch, list) or len(arch) != 1 or not str(arch[0]).endswith(_HEAD_SUFFIX)):
        raise UnsupportedConfigError(
            f"{file}: field architectures={arch!r} is not a sequence classifier; a reward model needs "
            f"one *{_HEAD_SUFFIX} class (a score head), not a causal LM"
        )
    if hf.get("id2label"):
        num_labels = len(hf["id2label"])
    else:
        num_labels = int(hf.get("num_labels") or 2)
    return config, num_labels


def _reward_tree(tree: Params, score) -> Params:
    """A decoder param tree (axes or shapes) with the score head in place of lm_head."""
    tree.pop("lm_head", None)
    tree["score"] = score
    return tree


def reward_param_shardings(config: ModelConfig, num_labels: int, mesh, rules=DEFAULT_RULES) -> Params:
    """Shardings of the reward params, for load_reward_model; the label axis is never split."""
    axes = _reward_tree(param_axes(config), ("embed", None))
    shapes = _reward_tree(param_shapes(config), (config.hidden_size, num_labels))
    return tree_shardings(axes, shapes, mesh, rules)


def load_reward_model(path: str, *, dtype: str = "float32", shardings: Any = None) -> tuple[ModelConfig, Params, int]:
    """(config, params, num_labels) from an HF sequence-classification directory.

    dtype and shardings as in rpo.models.load_pretrained (shardings from reward_param_shardings).
    Errors name the file and the field or tensor: a causal LM's config.json, a missing
    score.weight, or one whose shape disagrees with config.json's labels.
    """
    config, num_labels = read_reward_config(path)
    config, params = load_pretrained(path, dtype=dtype, shardings=shardings, num_labels=num_labels)
    return config, params, num_labels


@functools.partial(jax.jit, static_argnums=0)
def reward_scores(config: ModelConfig, params: Params, tokens_BT: jax.Array, lengths_B: jax.Array) -> jax.Array:
    """float32 scores [B, N]: the score head at each row's last real token, position lengths_B - 1.

    Rows are right-padded and lengths_B must lie in 1..T. transformers instead reads the
    rightmost token that differs from config.pad_token_id (the last token when pad_token_id is
    unset, which it allows at batch size 1 only). The two agree when each row is right-padded
    with pad_token_id and its last real token is not pad_token_id; they differ when a row ends
    in that id (e.g. pad = eos and the text ends with eos), where transformers skips back to an
    earlier token and this function does not. Scores are computed in config.dtype and
    accumulated in float32.
    """
    t = tokens_BT.shape[1]
    lengths_B = jnp.asarray(lengths_B, jnp.int32)
    mask_BT = jnp.arange(t)[None, :] < lengths_B[:, None]
    h_BTD, _ = hidden_states(config, params, jnp.asarray(tokens_BT, jnp.int32), mask_BT=mask_BT)
    last_BD = jnp.take_along_axis(h_BTD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    w_DN = params["score"].astype(last_BD.dtype)
    return jnp.einsum("bd,dn->bn", last_BD, w_DN, preferred_element_type=jnp.float32)


def encode_pair(tokenizer, prompt: str, response: str, chat_template: bool) -> list[int]:
    """Token ids of one (prompt, response) as transformers' reward-model usage builds them.

    chat_template=False: tokenizer(prompt + response), the plain string concatenation (the
      caller supplies any separator), with the tokenizer's own special tokens (e.g. BOS).
    chat_template=True: the tokenizer's chat template over [user: prompt, assistant: response]
      without a generation prompt, encoded without adding special tokens (the template writes
      them), i.e. what apply_chat_template(..., tokenize=True) gives.
    """
    if not chat_template:
        return list(tokenizer(prompt + response)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template=True: the tokenizer has no chat template")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def score_texts(
    config: ModelConfig,
    params: Params,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    batch_size: int,
    max_len: int,
    chat_template: bool = False,
) -> np.ndarray:
    """The first label's score [N] (float32) of each (prompt, response), tokenised by encode_pair.

    A row of more than max_len tokens (or of none) is an error naming its index: truncating
    would score a different text. Rows are sorted by length and run in batches of exactly
    batch_size rows (the last one filled with dummy rows), each right-padded to a power of two
    of at least 16 tokens capped at max_len, so the jitted forward compiles once per length
    bucket. The pad id is 0: lengths, not pad ids, mark the real tokens.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"score_texts: {len(prompts)} prompts but {len(responses)} responses")
    if batch_size < 1:
        raise ValueError(f"score_texts: batch_size={batch_size}, needs at least 1")
    rows = [encode_pair(tokenizer, p, r, chat_template) for p, r in zip(prompts, responses)]
    for i, row in enumerate(rows):
        if not 0 < len(row) <= max_len:
            raise ValueError(f"score_texts row {i}: {len(row)} tokens, outside 1..max_len={max_len}")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = np.zeros(len(rows), np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        longest = len(rows[idx[-1]])
        t = min(max_len, max(MIN_LEN_BUCKET, 1 << (longest - 1).bit_length()))
        tokens = np.zeros((batch_size, t), np.int32)
        lengths = np.ones(batch_size, np.int32)
        for j, i in enumerate(idx):
            tokens[j, : len(rows[i])] = rows[i]
            lengths[j] = len(rows[i])
        scores = np.asarray(reward_scores(config, params, tokens, lengths))
        out[idx] = scores[: len(idx), 0]
    return out
