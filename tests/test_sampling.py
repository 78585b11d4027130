"""rpo.sampling: greedy equals transformers, the sampled distribution is right (with tests that
can fail), top-k / top-p supports, shared prefill, no recompiles within a bucket, seeds, EOS,
stop strings, max_new_tokens, and a sharded run equal to the unsharded one."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import make_model, save
from scipy import stats

import rpo.models as M
from rpo import sampling

# ---------------------------------------------------------------------------------------
# Greedy against transformers
# ---------------------------------------------------------------------------------------

PROMPT_LENS = (3, 11, 20, 7)
NEW = 40


def _prompts(lens, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lens]


@pytest.mark.parametrize("family", ["llama_mqa", "llama3_tied", "mistral", "qwen2", "qwen3"])
def test_greedy_matches_hf_generate(family, tmp_path):
    """Token for token against HF generate(do_sample=False), prompts of mixed lengths batched
    (left-padded) on our side and run one by one, unpadded, on HF's; and the greedy logprobs
    equal log_softmax of HF's logits at those tokens."""
    model = make_model(family)
    model.generation_config.eos_token_id = None  # run the full NEW tokens on both sides
    config, params = M.load_pretrained(save(model, tmp_path / "m"))
    prompts = _prompts(PROMPT_LENS, config.vocab_size)
    out = sampling.generate(config, params, prompts, max_new_tokens=NEW, eos_ids=())
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                max_new_tokens=NEW, eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
            )
        ref_tokens = ref.sequences[0, len(p):].tolist()
        logits = torch.stack(ref.logits, 1)[0].float().numpy()  # [NEW, V]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        assert np.all(top2[:, 1] - top2[:, 0] > 1e-4), "near-tie in the reference: pick another seed"
        assert len(ref_tokens) == NEW
        assert out.tokens[i][0] == ref_tokens, f"prompt {i}"
        ref_lp = torch.log_softmax(torch.tensor(logits), -1).numpy()[np.arange(NEW), ref_tokens]
        np.testing.assert_allclose(out.logprobs[i][0], ref_lp, atol=1e-4, rtol=0)
        assert out.finish_reasons[i] == ["length"]


# ---------------------------------------------------------------------------------------
# Distributions, on a small-vocabulary model
# ---------------------------------------------------------------------------------------

SMALL = M.ModelConfig(
    model_type="llama", vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, eos_token_ids=(), pad_token_id=0,
)


@pytest.fixture(scope="module")
def small_params():
    params = M.init_params(SMALL, jax.random.key(0), std=0.3)
    # Spread the logits out (std ~1.5) so that temperature and truncation matter.
    params["final_norm"] = params["final_norm"] * 3.0
    return params


PROMPT = [5, 9, 3, 12, 7]


_forward = jax.jit(M.forward, static_argnums=0)


def _ref_logits(params, prompt):
    return np.asarray(_forward(SMALL, params, jnp.asarray([prompt]))[0, -1], np.float64)


def _softmax(x):
    x = x - x.max()
    return np.exp(x) / np.exp(x).sum()


def _chi2_pvalue(samples, probs):
    """Goodness of fit of integer samples to probs; cells with expected count < 5 pooled."""
    counts = np.bincount(samples, minlength=len(probs)).astype(float)
    expected = probs * len(samples)
    if np.any(counts[expected == 0]):
        return 0.0  # a token of probability zero was drawn
    counts, expected = counts[expected > 0], expected[expected > 0]
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return stats.chisquare(counts, expected).pvalue


def _first_tokens(params, n, **kw):
    out = sampling.generate(SMALL, params, [PROMPT], n=n, max_new_tokens=1, **kw)
    return np.array([t[0] for t in out.tokens[0]])


def test_first_token_frequencies_match_softmax(small_params):
    logits = _ref_logits(small_params, PROMPT)
    assert logits.std() > 1.0
    samples = _first_tokens(small_params, 4000, temperature=1.0, seed=1)
    assert _chi2_pvalue(samples, _softmax(logits)) > 1e-3
    # At temperature 0.7 the frequencies follow softmax(logits / 0.7).
    samples07 = _first_tokens(small_params, 4000, temperature=0.7, seed=2)
    assert _chi2_pvalue(samples07, _softmax(logits / 0.7)) > 1e-3


def test_distribution_check_fails_on_the_wrong_distribution(small_params):
    """Negative control: the same test rejects samples drawn at temperature 2 as softmax at 1."""
    logits = _ref_logits(small_params, PROMPT)
    samples = _first_tokens(small_params, 4000, temperature=2.0, seed=1)
    assert _chi2_pvalue(samples, _softmax(logits)) < 1e-6
    assert _chi2_pvalue(samples, _softmax(logits / 2.0)) > 1e-3


def _allowed(logits, temperature, top_k, top_p):
    """Reference truncated distribution (log-probs, -inf outside the allowed set)."""
    x = logits / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(len(x), bool)
    if top_k:
        keep[order[:top_k]] = True
    else:
        keep[:] = True
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        before = np.cumsum(p[order]) - p[order]
        kept = order[before < top_p]
        thresh = x[kept].min()
        keep &= x >= thresh
    lp = np.where(keep, x, -np.inf)
    return lp - np.log(np.sum(np.exp(lp[keep] - lp[keep].max()))) - lp[keep].max()


@pytest.mark.parametrize(
    "temperature,top_k,top_p,candidates",
    [(1.0, 3, 1.0, 256), (0.8, 0, 0.6, 256), (1.3, 5, 0.7, 256), (1.0, 0, 0.8, 2)],
    ids=["top_k", "top_p", "top_k+top_p", "top_p-fallback"],
)
def test_top_k_top_p_stay_in_their_set(small_params, temperature, top_k, top_p, candidates):
    """Every sampled token, at every step, lies in the set allowed by the reference logits,
    and its logprob is that of the truncated, renormalised distribution. candidates=2 forces
    the exact fallback of top-p (the nucleus does not fit in 2 candidates)."""
    prompts = _prompts((5, 9), SMALL.vocab_size, seed=3)
    out = sampling.generate(
        SMALL, small_params, prompts, n=16, max_new_tokens=8, temperature=temperature, top_k=top_k,
        top_p=top_p, seed=4, top_p_candidates=candidates,
    )
    seqs, starts, got = [], [], []
    for p, samples in zip(prompts, out.tokens):
        for j, toks in enumerate(samples):
            seqs.append(p + toks)
            starts.append(len(p))
    # One causal forward (right-padded batch) gives the reference logits before every token.
    width = max(map(len, seqs))
    batch = np.array([q + [0] * (width - len(q)) for q in seqs])
    all_logits = np.asarray(_forward(SMALL, small_params, jnp.asarray(batch)), np.float64)
    for s, (seq, start) in enumerate(zip(seqs, starts)):
        lps = out.logprobs[s // 16][s % 16]
        for t in range(start, len(seq)):
            ref = _allowed(all_logits[s, t - 1], temperature, top_k, top_p)
            tok = seq[t]
            assert np.isfinite(ref[tok]), (s, t, tok)
            got.append((lps[t - start], ref[tok]))
    got = np.array(got)
    np.testing.assert_allclose(got[:, 0], got[:, 1], atol=1e-4)


def test_top_p_frequencies_match_truncated_softmax(small_params):
    logits = _ref_logits(small_params, PROMPT)
    mass = np.cumsum(np.sort(_softmax(logits))[::-1])
    nucleus = int(np.searchsorted(mass, 0.8)) + 1  # tokens top_p=0.8 keeps
    assert nucleus >= 2
    # With fewer candidates than the nucleus the fast path cannot hold it: the exact fallback runs.
    fallback = nucleus - 1
    assert mass[fallback - 1] < 0.8
    for candidates in (256, fallback):  # fast path and the exact fallback
        samples = _first_tokens(small_params, 3000, temperature=1.0, top_p=0.8, seed=5, top_p_candidates=candidates)
        ref = np.exp(_allowed(logits, 1.0, 0, 0.8))
        assert set(samples.tolist()) <= set(np.flatnonzero(ref > 0).tolist())
        assert _chi2_pvalue(samples, ref) > 1e-3


def test_shared_prefill_matches_repeated_prompts(small_params):
    """N samples sharing one prefill follow the same distribution (first and second token)
    as N copies of the prompt, each with its own prefill: two-sample chi-square tests."""
    n = 2000
    shared = sampling.generate(SMALL, small_params, [PROMPT], n=n, max_new_tokens=2, temperature=1.0, seed=6)
    copies = sampling.generate(
        SMALL, small_params, [PROMPT] * n, n=1, max_new_tokens=2, temperature=1.0, seed=7, batch_size=n
    )
    a = np.array(shared.tokens[0])
    b = np.array([t[0] for t in copies.tokens])
    assert a.shape == b.shape == (n, 2)
    for step in range(2):
        table = np.stack([np.bincount(a[:, step], minlength=16), np.bincount(b[:, step], minlength=16)])
        table = table[:, table.sum(0) > 0]
        assert stats.chi2_contingency(table).pvalue > 1e-3, step


# ---------------------------------------------------------------------------------------
# Buckets, seeds, EOS, stop strings, lengths
# ---------------------------------------------------------------------------------------


def test_same_bucket_does_not_recompile(small_params):
    kw = dict(n=2, max_new_tokens=6, temperature=1.0)
    sampling.generate(SMALL, small_params, _prompts((3, 9, 14), 16, seed=1), **kw)
    before = dict(sampling.trace_counts)
    # 4 prompts (bucket 4 rows, like 3) of lengths <= 16 (prompt bucket 16): no new trace.
    sampling.generate(SMALL, small_params, _prompts((2, 16, 5, 8), 16, seed=2), seed=3, **kw)
    assert sampling.trace_counts == before
    assert sampling._decode._cache_size() >= 1
    # A longer prompt is a new bucket: traced once more (the counter does count).
    sampling.generate(SMALL, small_params, _prompts((17,), 16, seed=2), **kw)
    assert sampling.trace_counts["decode"] == before["decode"] + 1


def test_same_seed_same_samples_independent_of_batching(small_params):
    prompts = _prompts((4, 7, 12), 16, seed=8)
    kw = dict(n=3, max_new_tokens=10, temperature=1.0)
    a = sampling.generate(SMALL, small_params, prompts, seed=11, **kw)
    b = sampling.generate(SMALL, small_params, prompts, seed=11, **kw)
    c = sampling.generate(SMALL, small_params, prompts, seed=11, batch_size=1, **kw)
    d = sampling.generate(SMALL, small_params, prompts, seed=12, **kw)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens == c.tokens
    np.testing.assert_allclose(np.array(a.logprobs), np.array(c.logprobs), atol=1e-5)
    assert a.tokens != d.tokens
    # Samples of one prompt differ from each other.
    assert len({tuple(t) for t in a.tokens[0]}) > 1


def _bench_sampling():
    """experiments/bench_sampling.py as a module (its heavy imports are inside its functions)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "bench_sampling.py")
    spec = importlib.util.spec_from_file_location("bench_sampling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refilled_rows_give_the_same_samples_with_less_work():
    """Continuous batching: with fewer decode rows per prompt (rows_per_prompt), finished rows start the next
    sample or take the next prompt. Same decode rows, so the samples are bitwise the ones the loop without refill
    gives (the rows of a matmul do not depend on their neighbours), while the loop runs fewer row-steps.
    head_dim 64 as in real models: with head_dim 8, XLA:CPU's attention products over 2 or 4 query rows per
    prompt round the last bit differently from 8 (tokens stayed equal, logprobs moved by ~1e-6)."""
    config = SMALL.replace(head_dim=64, num_heads=2, num_kv_heads=1)
    small_params = M.init_params(config, jax.random.key(0), std=0.3)
    small_params["final_norm"] = small_params["final_norm"] * 3.0
    prompts = _prompts((3, 9, 14, 5, 11, 7, 16, 2, 8, 12), 16, seed=21)
    kw = dict(n=4, max_new_tokens=12, temperature=1.0, eos_ids=(3,), seed=5, batch_size=2)
    runs = {}
    for s in (4, 2, 1):
        st = {}
        runs[s] = (sampling.generate(config, small_params, prompts, rows_per_prompt=s, stats=st, **kw), st)
    lengths = [len(t) for ts in runs[4][0].tokens for t in ts]
    assert min(lengths) < 6 and max(lengths) == 12  # EOS makes lengths vary, so refilling has work to save
    for s in (2, 1):
        out, st = runs[s]
        assert out.tokens == runs[4][0].tokens and out.logprobs == runs[4][0].logprobs
        assert out.finish_reasons == runs[4][0].finish_reasons
        assert st["live_slot_steps"] == runs[4][1]["live_slot_steps"] == sum(max(k - 1, 0) for k in lengths)
        assert st["decode_segments"] > 1
    # The benchmark's model-free replay of this schedule (experiments/bench_sampling.py, used there to cost other
    # settings) gives the loop's own step and live row-step counts.
    bench = _bench_sampling()
    per_prompt = [[len(t) for t in ts] for ts in runs[4][0].tokens]
    for s, (_, st) in runs.items():
        replay = bench.schedule(per_prompt, 8, s, sampling._refill_min(8))
        assert replay == (st["decode_steps"], st["live_slot_steps"]), (s, replay, st)
    # Within-prompt refill (s = 2 < n) wastes less than whole-prompt refill (s = n). (s = 1 runs each prompt's
    # samples one after another, so the call's last prompts leave a long tail: more waste here, with 10 prompts.)
    waste = {s: 1 - st["live_slot_steps"] / st["slot_steps"] for s, (_, st) in runs.items()}
    assert waste[2] < waste[4], waste
    # A call of 2 prompts with a row per sample has nothing to refill: the loop as it ran before refilling. Its
    # samples are the same prompts' samples above (keys follow a prompt's index in the call, so the first two).
    one = sampling.generate(config, small_params, prompts[:2], rows_per_prompt=4, **kw)
    assert one.tokens == runs[4][0].tokens[:2] and one.logprobs == runs[4][0].logprobs[:2]
    # Top-p with 2 candidates: most steps take the exact fallback for some rows, and each row's draw still
    # does not depend on its neighbours.
    kw.update(top_p=0.9, top_p_candidates=2)
    a, b = (sampling.generate(config, small_params, prompts, rows_per_prompt=s, **kw) for s in (4, 1))
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    with pytest.raises(ValueError, match="rows_per_prompt=3"):
        sampling.generate(config, small_params, prompts, rows_per_prompt=3, **kw)


def test_eos_stops_a_row_and_is_included(small_params):
    prompts = _prompts((6, 10), 16, seed=9)
    free = sampling.generate(SMALL, small_params, prompts, max_new_tokens=12, eos_ids=())
    assert [len(t[0]) for t in free.tokens] == [12, 12]
    assert free.finish_reasons == [["length"], ["length"]]
    eos = free.tokens[0][0][4]
    first = free.tokens[0][0].index(eos)
    out = sampling.generate(SMALL, small_params, prompts, max_new_tokens=12, eos_ids=(eos,))
    assert out.tokens[0][0] == free.tokens[0][0][: first + 1]
    assert out.tokens[0][0][-1] == eos and out.finish_reasons[0] == ["eos"]
    assert out.logprobs[0][0] == pytest.approx(free.logprobs[0][0][: first + 1], abs=1e-6)
    # The other row stops at its own first EOS, or runs to max_new_tokens.
    other = free.tokens[1][0]
    expect = other[: other.index(eos) + 1] if eos in other else other
    assert out.tokens[1][0] == expect
    # The config's EOS ids are the default.
    cfg = SMALL.replace(eos_token_ids=(eos,))
    assert sampling.generate(cfg, small_params, prompts, max_new_tokens=12).tokens == out.tokens


def test_max_new_tokens_respected(small_params):
    out = sampling.generate(SMALL, small_params, _prompts((3, 8), 16), n=4, max_new_tokens=5, temperature=1.0, eos_ids=())
    assert all(len(t) == 5 for ts in out.tokens for t in ts)
    assert all(len(lp) == 5 for ls in out.logprobs for lp in ls)
    out = sampling.generate(SMALL, small_params, _prompts((3,), 16), max_new_tokens=1)
    assert len(out.tokens[0][0]) == 1


class _CharTokenizer:
    """Token i <-> one character; enough of the HF tokenizer interface for stop strings."""

    chars = "abcdefghijklmnop"

    def encode(self, text, add_special_tokens=False):
        return [self.chars.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def test_stop_strings(small_params):
    tok = _CharTokenizer()
    prompts = _prompts((6, 10), 16, seed=10)
    free = sampling.generate(SMALL, small_params, prompts, max_new_tokens=16, eos_ids=())
    stops = [tok.decode(free.tokens[0][0])[5:8], "pppp"]

    def expected(tokens):  # the shortest prefix whose text holds a stop string
        text = tok.decode(tokens)
        ends = [text.index(s) + len(s) for s in stops if s in text]
        return (tokens[: min(ends)], "stop") if ends else (tokens, "length")

    for kw in (dict(tokenizer=tok), dict(decode=tok.decode)):  # in-loop + host, host only
        out = sampling.generate(SMALL, small_params, prompts, max_new_tokens=16, eos_ids=(), stop=stops, **kw)
        for i in range(2):
            toks, reason = expected(free.tokens[i][0])
            assert out.tokens[i][0] == toks and out.finish_reasons[i] == [reason]
            assert out.logprobs[i][0] == pytest.approx(free.logprobs[i][0][: len(toks)], abs=1e-6)
        assert out.finish_reasons[0] == ["stop"] and len(out.tokens[0][0]) <= 8
    with pytest.raises(ValueError, match="tokenizer"):
        sampling.generate(SMALL, small_params, prompts, max_new_tokens=4, stop=["a"])


def test_bad_arguments_fail_loudly(small_params):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampling.generate(SMALL, small_params, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside"):
        sampling.generate(SMALL, small_params, [[1, 99]], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        sampling.generate(SMALL, small_params, [[1]], max_new_tokens=2, temperature=1.0, top_p=0.0)
    assert sampling.generate(SMALL, small_params, [], max_new_tokens=2).tokens == []  # nothing to do is not an error


# ---------------------------------------------------------------------------------------
# Under a mesh
# ---------------------------------------------------------------------------------------


def test_sharded_run_equals_unsharded(tmp_path):
    """data x fsdp x tensor = 2x2x2 on 8 fake CPU devices (in a subprocess, since this
    process's jax already has 1 device): same tokens, logprobs within 1e-4."""
    model = make_model("qwen2")
    path = save(model, tmp_path / "m")
    script = textwrap.dedent(
        f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, numpy as np
        import rpo.models as M, rpo.sharding as S
        from rpo import sampling
        assert len(jax.devices()) == 8
        config, params = M.load_pretrained({str(path)!r})
        prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20, 21]]
        for mesh in (S.make_mesh(2, 2, 2), S.make_mesh(8, 1, 1)):
            for kw in (dict(n=3, temperature=1.0, top_p=0.9), dict(n=1)):
                ref = sampling.generate(config, params, prompts, max_new_tokens=20, eos_ids=(), seed=5, **kw)
                got = sampling.generate(config, params, prompts, max_new_tokens=20, eos_ids=(), seed=5, mesh=mesh, **kw)
                assert got.tokens == ref.tokens, (mesh.shape, kw)
                np.testing.assert_allclose(np.array(got.logprobs), np.array(ref.logprobs), atol=1e-4)
        print("OK")
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=os.getcwd(), timeout=900)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
