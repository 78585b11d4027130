"""rpo.losses against plain numpy formulas, finite differences, and direct log-softmax gathers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpo import losses
from rpo.models import ModelConfig, forward, init_params, load_pretrained


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _np_dpo_nll(pc, pr, rc, rr, n, beta, alpha, eps=0.0):
    z = beta * ((pc - rc) - (pr - rr))
    return np.mean(-(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z) - alpha * pc / n)


def _inputs(seed, b=7):
    rng = np.random.default_rng(seed)
    pc = -rng.uniform(5, 60, b)
    pr = -rng.uniform(5, 60, b)
    rc = pc + rng.normal(0, 3, b)
    rr = pr + rng.normal(0, 3, b)
    n = rng.integers(3, 40, b).astype(np.float64)
    return pc, pr, rc, rr, n


@pytest.mark.parametrize("beta,alpha", [(0.1, 1.0), (0.5, 0.0), (1.0, 2.5)])
def test_dpo_nll_matches_numpy_eq1(beta, alpha):
    pc, pr, rc, rr, n = _inputs(0)
    loss_B, metrics = losses.preference_per_pair(
        "dpo_nll", *(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr, n)), beta=beta, alpha=alpha)
    metrics = {k: jnp.mean(v) for k, v in metrics.items()}
    np.testing.assert_allclose(jnp.mean(loss_B), _np_dpo_nll(pc, pr, rc, rr, n, beta, alpha), rtol=1e-5)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    np.testing.assert_allclose(metrics["rewards/chosen"], chosen.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["rewards/rejected"], rejected.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["rewards/margin"], (chosen - rejected).mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["rewards/accuracy"], (chosen > rejected).mean())
    np.testing.assert_allclose(metrics["logps/chosen"], pc.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["logps/rejected"], pr.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/nll"], (-pc / n).mean(), rtol=1e-5)


def test_dpo_nll_gradient_matches_finite_differences():
    pc, pr, rc, rr, n = _inputs(1)
    beta, alpha = 0.3, 1.0
    with jax.enable_x64(True):
        f = lambda *a: jnp.mean(losses.preference_per_pair("dpo_nll", *a, jnp.asarray(n), beta=beta,  # noqa: E731
                                                           alpha=alpha)[0])
        grads = jax.grad(f, argnums=(0, 1, 2, 3))(*(jnp.asarray(x, jnp.float64) for x in (pc, pr, rc, rr)))
    base = [pc, pr, rc, rr]
    h = 1e-5
    for which, g in enumerate(grads):
        assert g.dtype == jnp.float64
        fd = np.zeros_like(base[which])
        for i in range(len(fd)):
            up = [x.copy() for x in base]
            dn = [x.copy() for x in base]
            up[which][i] += h
            dn[which][i] -= h
            fd[i] = (_np_dpo_nll(*up, n, beta, alpha) - _np_dpo_nll(*dn, n, beta, alpha)) / (2 * h)
        np.testing.assert_allclose(np.asarray(g), fd, rtol=1e-6, atol=1e-9)


def test_label_smoothed_dpo_matches_formula():
    pc, pr, rc, rr, _ = _inputs(2)
    beta, eps = 0.2, 0.15
    args = [jnp.asarray(x) for x in (pc, pr, rc, rr, np.ones_like(pc))]
    # "dpo" is "dpo_nll" without the NLL term, whatever alpha says.
    loss_B, _ = losses.preference_per_pair("dpo", *args, beta=beta, alpha=3.0, label_smoothing=eps)
    # cDPO (Mitchell 2023): -(1-eps) log s(beta h) - eps log s(-beta h)
    np.testing.assert_allclose(jnp.mean(loss_B), _np_dpo_nll(pc, pr, rc, rr, 1.0, beta, 0.0, eps), rtol=1e-5)
    plain_B, _ = losses.preference_per_pair("dpo", *args, beta=beta)
    np.testing.assert_allclose(jnp.mean(plain_B), _np_dpo_nll(pc, pr, rc, rr, 1.0, beta, 0.0), rtol=1e-5)


def test_ipo_matches_paper_formula():
    pc, pr, rc, rr, _ = _inputs(3)
    beta = 0.5
    loss_B, metrics = losses.preference_per_pair("ipo", *(jnp.asarray(x) for x in (pc, pr, rc, rr, np.ones_like(pc))),
                                                 beta=beta)
    h = (pc - rc) - (pr - rr)  # log [pi(yw) pi_ref(yl) / (pi(yl) pi_ref(yw))]
    np.testing.assert_allclose(jnp.mean(loss_B), np.mean((h - 1 / (2 * beta)) ** 2), rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/margin"], beta * h, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Sequence log-probs
# ---------------------------------------------------------------------------------------

_TINY = ModelConfig(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8)


def _right_padded(rng, b, t, vocab, prompt_lens, total_lens):
    tokens = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), bool)
    loss_mask = np.zeros((b, t), bool)
    positions = np.zeros((b, t), np.int32)
    for i, (p, n) in enumerate(zip(prompt_lens, total_lens)):
        tokens[i, :n] = rng.integers(1, vocab, n)
        mask[i, :n] = True
        loss_mask[i, p:n] = True
        positions[i, :n] = np.arange(n)
    return tokens, positions, mask, loss_mask


def _direct_logps(logits_BTV, tokens, loss_mask):
    """Sum of log_softmax(logits)[t-1, token t] over loss-masked t: the obvious formula."""
    lsm = np.asarray(jax.nn.log_softmax(jnp.asarray(logits_BTV, jnp.float32), axis=-1), np.float64)
    gathered = np.take_along_axis(lsm[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    return (gathered * loss_mask[:, 1:]).sum(-1), loss_mask[:, 1:].sum(-1)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_sequence_logps_matches_log_softmax_gather(chunk):
    rng = np.random.default_rng(0)
    params = init_params(_TINY, jax.random.PRNGKey(0), std=0.2)
    tokens, positions, mask, loss_mask = _right_padded(rng, 3, 16, _TINY.vocab_size, [3, 6, 5], [16, 9, 12])
    logp, length = jax.jit(
        lambda p: losses.sequence_logps(_TINY, p, tokens, positions, mask, loss_mask, chunk_size=chunk)
    )(params)
    # Right padding does not change a causal model's logits at real positions.
    want, want_len = _direct_logps(forward(_TINY, params, tokens), tokens, loss_mask)
    np.testing.assert_allclose(logp, want, rtol=2e-5)
    np.testing.assert_array_equal(length, want_len)


def test_sequence_logps_gradient_matches_unchunked():
    rng = np.random.default_rng(1)
    params = init_params(_TINY, jax.random.PRNGKey(1), std=0.2)
    tokens, positions, mask, loss_mask = _right_padded(rng, 2, 12, _TINY.vocab_size, [2, 4], [12, 10])

    def chunked(p):
        return jnp.sum(losses.sequence_logps(_TINY, p, tokens, positions, mask, loss_mask, chunk_size=5, remat=True)[0])

    def direct(p):
        lsm = jax.nn.log_softmax(forward(_TINY, p, tokens), axis=-1)
        g = jnp.take_along_axis(lsm[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(g * loss_mask[:, 1:])

    g1, g2 = jax.grad(chunked)(params), jax.grad(direct)(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_sequence_logps_bfloat16_close_to_float32():
    rng = np.random.default_rng(2)
    params = init_params(_TINY, jax.random.PRNGKey(2), std=0.2)
    tokens, positions, mask, loss_mask = _right_padded(rng, 2, 12, _TINY.vocab_size, [2, 4], [12, 10])
    f32, _ = losses.sequence_logps(_TINY, params, tokens, positions, mask, loss_mask, chunk_size=4)
    bf16, _ = losses.sequence_logps(_TINY.replace(dtype="bfloat16"), params, tokens, positions, mask, loss_mask, chunk_size=4)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, f32, rtol=2e-2)


def test_sequence_logps_matches_hf_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from tests import hf_models

    model = hf_models.make_model("qwen2", seed=3)
    path = hf_models.save(model, tmp_path / "qwen2")
    config, params = load_pretrained(path)
    rng = np.random.default_rng(3)
    tokens, positions, mask, loss_mask = _right_padded(rng, 2, 14, hf_models.VOCAB, [4, 2], [14, 11])
    logp, _ = losses.sequence_logps(config, params, tokens, positions, mask, loss_mask, chunk_size=4)
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens, dtype=torch.long), attention_mask=torch.as_tensor(mask)).logits
    want, _ = _direct_logps(logits.float().numpy(), tokens, loss_mask)
    np.testing.assert_allclose(logp, want, rtol=1e-4)
