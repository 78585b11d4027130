"""Losses as pure functions: sequence log-probs over response tokens, DPO (+ variants), NLL, and per-token
log-probs under the sampling distribution with the GRPO objective (its own section below).

Shape letters are those of rpo.models.decoder (B batch, T tokens, D hidden, V vocab), plus
C for a chunk of the sequence.

Sequence log-probs. A row is right-padded (see rpo.train for the batch layout):
`tokens_BT`, `positions_BT`, `mask_BT` (True on real tokens) and `loss_mask_BT` (True where
token t is a response token whose log-prob counts; prompt and padding are False). Token t is
predicted by the hidden state at t - 1, so `loss_mask_BT[:, 0]` is never used.
`sequence_logps` returns the per-row sum of log p(token) over the masked tokens and the
number of such tokens (the response length |y|). It never materialises float32 logits
[B, T, V]: the sequence is cut into chunks of C tokens and a `lax.scan` computes, per chunk,
the [B, C, V] logits, their logsumexp and the target logit. A hand-written VJP keeps only
the logsumexps and recomputes each chunk's logits in the backward pass (memory O(B * C * V)
rather than O(B * T * V); the gradient (onehot - softmax) is formed in one elementwise pass,
no scatter). Chunks holding no response token (all prompt, all padding) are skipped.

Preference losses take float arrays [B] (one entry per pair) and return (loss, metrics),
the loss being the mean over pairs. The `*_per_pair` forms return per-pair losses and
metrics [B]; rpo.train weights those to mask padding pairs and to accumulate micro-batches
exactly. Metrics (the signals of IRPO's Figures 2-4):
  rewards/chosen   beta * (logp_w - ref_w)        rewards/rejected  beta * (logp_l - ref_l)
  rewards/margin   chosen - rejected              rewards/accuracy  1[chosen > rejected]
  logps/chosen     logp_w                         logps/rejected    logp_l
  loss/dpo         the preference term            loss/nll          -logp_w / |y_w|
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rpo.models.config import ModelConfig
from rpo.models.decoder import Params, hidden_states, unembed_matrix

Metrics = dict[str, jax.Array]

PREFERENCE_KINDS = ("dpo_nll", "dpo", "ipo")
LOSS_KINDS = PREFERENCE_KINDS + ("sft",)


# ---------------------------------------------------------------------------------------
# Sequence log-probs
# ---------------------------------------------------------------------------------------


def _chunk_logits(h_BCD, w_DV):
    return jnp.einsum("bcd,dv->bcv", h_BCD, w_DV, preferred_element_type=jnp.float32)


def _is_target(y_BC, v):
    return jax.lax.broadcasted_iota(jnp.int32, (1, 1, v), 2) == y_BC[..., None]


def _chunked_fwd(h_NBCD, w_DV, y_NBC, m_NBC):
    """Scan over chunks: per-row summed log-probs [B] and the logsumexps [N, B, C] (residual)."""
    v = w_DV.shape[1]
    b, c = y_NBC.shape[1:]

    def chunk(h_BCD, y_BC, m_BC):
        logits_BCV = _chunk_logits(h_BCD, w_DV)
        lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
        target_BC = jnp.sum(jnp.where(_is_target(y_BC, v), logits_BCV, 0.0), axis=-1)
        return jnp.sum(jnp.where(m_BC, target_BC - lse_BC, 0.0), axis=-1), lse_BC

    def body(acc_B, xs):
        h_BCD, y_BC, m_BC = xs
        # Chunks without a loss token (all prompt or all padding) skip the vocabulary projection.
        logp_B, lse_BC = jax.lax.cond(
            jnp.any(m_BC), chunk, lambda *_: (jnp.zeros((b,), jnp.float32), jnp.zeros((b, c), jnp.float32)),
            h_BCD, y_BC, m_BC,
        )
        return acc_B + logp_B, lse_BC

    return jax.lax.scan(body, jnp.zeros((b,), jnp.float32), (h_NBCD, y_NBC, m_NBC))


@jax.custom_vjp
def _chunked_logps(h_NBCD, w_DV, y_NBC, m_NBC):
    return _chunked_fwd(h_NBCD, w_DV, y_NBC, m_NBC)[0]


def _chunked_logps_fwd(h_NBCD, w_DV, y_NBC, m_NBC):
    logp_B, lse_NBC = _chunked_fwd(h_NBCD, w_DV, y_NBC, m_NBC)
    return logp_B, (h_NBCD, w_DV, y_NBC, m_NBC, lse_NBC)


def _chunked_logps_bwd(res, g_B):
    """d logp_b / d logits[b, t] = m[b, t] * (onehot(y[b, t]) - softmax(logits[b, t])): the
    logits of a chunk are recomputed (one matmul), never stored across chunks."""
    h_NBCD, w_DV, y_NBC, m_NBC, lse_NBC = res
    v = w_DV.shape[1]

    def chunk(dw_DV, h_BCD, y_BC, m_BC, lse_BC):
        logits_BCV = _chunk_logits(h_BCD, w_DV)
        p_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
        scale_BC = jnp.where(m_BC, g_B[:, None], 0.0)
        d_BCV = ((_is_target(y_BC, v).astype(jnp.float32) - p_BCV) * scale_BC[..., None]).astype(h_BCD.dtype)
        dh_BCD = jnp.einsum("bcv,dv->bcd", d_BCV, w_DV, preferred_element_type=jnp.float32).astype(h_BCD.dtype)
        dw_DV = dw_DV + jnp.einsum("bcd,bcv->dv", h_BCD, d_BCV, preferred_element_type=jnp.float32)
        return dw_DV, dh_BCD

    def body(dw_DV, xs):
        h_BCD, y_BC, m_BC, lse_BC = xs
        return jax.lax.cond(
            jnp.any(m_BC), chunk, lambda dw, h, *_: (dw, jnp.zeros_like(h)), dw_DV, h_BCD, y_BC, m_BC, lse_BC
        )

    dw_DV, dh_NBCD = jax.lax.scan(body, jnp.zeros(w_DV.shape, jnp.float32), (h_NBCD, y_NBC, m_NBC, lse_NBC))
    return dh_NBCD, dw_DV.astype(w_DV.dtype), None, None


_chunked_logps.defvjp(_chunked_logps_fwd, _chunked_logps_bwd)


def _chunks(hidden_BTD, targets_BT, mask_BT, chunk_size: int):
    """(hidden [N, B, C, D], targets [N, B, C] int32, mask [N, B, C] bool): the sequence cut into N chunks of
    C = min(chunk_size, T) tokens for a scan, T padded up to N x C with masked-out positions."""
    b, t, d = hidden_BTD.shape
    c = max(1, min(int(chunk_size), t))
    n = -(-t // c)
    pad = ((0, 0), (0, n * c - t))
    hidden_BTD = jnp.pad(hidden_BTD, pad + ((0, 0),))
    targets_BT, mask_BT = jnp.pad(targets_BT.astype(jnp.int32), pad), jnp.pad(mask_BT.astype(bool), pad)
    return (hidden_BTD.reshape(b, n, c, d).transpose(1, 0, 2, 3),
            targets_BT.reshape(b, n, c).transpose(1, 0, 2), mask_BT.reshape(b, n, c).transpose(1, 0, 2))


def logps_from_hidden(
    hidden_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array, *, chunk_size: int
) -> jax.Array:
    """sum_t weights[b, t] * log softmax(hidden[b, t] @ w)[targets[b, t]] -> [B] float32.

    `weights_BT` is a bool mask. The sequence is processed `chunk_size` tokens at a time
    (T is padded up to a multiple of it) by a scan with a hand-written VJP: the forward keeps
    only the logsumexps [B, T]; the backward recomputes each chunk's logits. The sequence is
    first rotated to start at the first masked position of the batch, and chunks with no
    masked token (prompt-only or padding-only) skip the vocabulary projection entirely.
    """
    # Rotate the sequence so that the first position holding a loss token in any row comes
    # first: leading prompt-only chunks then fall at the end, padding-only, and are skipped.
    weights_BT = weights_BT.astype(bool)
    first = jnp.argmax(jnp.any(weights_BT, axis=0))
    hidden_BTD, targets_BT, weights_BT = (jnp.roll(x, -first, axis=1) for x in (hidden_BTD, targets_BT, weights_BT))
    h_NBCD, y_NBC, m_NBC = _chunks(hidden_BTD, targets_BT, weights_BT, chunk_size)
    return _chunked_logps(h_NBCD, w_DV, y_NBC, m_NBC)


def sequence_logps(
    config: ModelConfig,
    params: Params,
    tokens_BT: jax.Array,
    positions_BT: jax.Array,
    mask_BT: jax.Array,
    loss_mask_BT: jax.Array,
    *,
    chunk_size: int,
    remat: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Per-row summed log-probs of the loss-masked tokens and their count: ([B], [B]) float32.

    Computed in the config's compute dtype (hidden states, unembedding matmul inputs) with
    float32 accumulation of logits, logsumexp and sums.
    """
    hidden_BTD, _ = hidden_states(
        config, params, tokens_BT, positions_BT=positions_BT, mask_BT=mask_BT, remat=remat
    )
    w_DV = unembed_matrix(config, params).astype(hidden_BTD.dtype)
    weights_BT = loss_mask_BT[:, 1:]
    logp_B = logps_from_hidden(hidden_BTD[:, :-1], w_DV, tokens_BT[:, 1:], weights_BT, chunk_size=chunk_size)
    return logp_B, jnp.sum(weights_BT, axis=-1).astype(jnp.float32)


# ---------------------------------------------------------------------------------------
# Preference losses
# ---------------------------------------------------------------------------------------


def _pair_metrics(chosen_ratio_B, rejected_ratio_B, policy_chosen_B, policy_rejected_B, beta) -> Metrics:
    chosen_B = beta * chosen_ratio_B
    rejected_B = beta * rejected_ratio_B
    return {
        "rewards/chosen": chosen_B,
        "rewards/rejected": rejected_B,
        "rewards/margin": chosen_B - rejected_B,
        "rewards/accuracy": (chosen_B > rejected_B).astype(jnp.float32),
        "logps/chosen": policy_chosen_B,
        "logps/rejected": policy_rejected_B,
    }


def dpo_nll_per_pair(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_lengths,
    *,
    beta: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """Per-pair IRPO Eq. 1 (with optional conservative-DPO label smoothing eps):
    -(1-eps) log s(beta h) - eps log s(-beta h) - alpha * logp_w / |y_w|,
    h = (logp_w - ref_w) - (logp_l - ref_l). alpha = 0 is plain (smoothed) DPO."""
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    z = beta * (chosen_ratio - rejected_ratio)
    dpo_B = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
    nll_B = -policy_chosen_logps / jnp.maximum(chosen_lengths, 1.0)
    metrics = _pair_metrics(chosen_ratio, rejected_ratio, policy_chosen_logps, policy_rejected_logps, beta)
    metrics["loss/dpo"] = dpo_B
    metrics["loss/nll"] = nll_B
    return dpo_B + alpha * nll_B, metrics


def ipo_per_pair(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, *, beta: float
) -> tuple[jax.Array, Metrics]:
    """Per-pair IPO (Azar et al. 2023, Eq. 17): (h - 1/(2 beta))^2 with h the difference of
    log-ratios of summed sequence log-probs (TRL instead averages log-probs per token)."""
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    loss_B = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    metrics = _pair_metrics(chosen_ratio, rejected_ratio, policy_chosen_logps, policy_rejected_logps, beta)
    metrics["loss/dpo"] = loss_B
    metrics["loss/nll"] = -policy_chosen_logps / jnp.maximum(chosen_lengths, 1.0)
    return loss_B, metrics


def preference_per_pair(
    kind: str,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    chosen_lengths,
    *,
    beta: float,
    alpha: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """Dispatch on `kind` in PREFERENCE_KINDS ('dpo' ignores alpha: it is 'dpo_nll' with alpha 0)."""
    args = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths)
    if kind == "dpo_nll":
        return dpo_nll_per_pair(*args, beta=beta, alpha=alpha, label_smoothing=label_smoothing)
    if kind == "dpo":
        return dpo_nll_per_pair(*args, beta=beta, alpha=0.0, label_smoothing=label_smoothing)
    if kind == "ipo":
        return ipo_per_pair(*args, beta=beta)
    raise ValueError(f"loss kind {kind!r} is not a preference loss (one of {PREFERENCE_KINDS})")


# ---------------------------------------------------------------------------------------
# Per-token log-probs under the sampling distribution, and the GRPO objective
# ---------------------------------------------------------------------------------------
#
# GRPO (Shao et al. 2024, "DeepSeekMath", Eq. 3) per token t of sample i of a group of G samples of one prompt:
#   l_it = -min(r_it * A_i, clip(r_it, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_it
#   r_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)      (pi_old: the policy the samples were drawn from)
#   KL_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1           (the "k3" estimator, Schulman 2020; >= 0)
#   A_i = (R_i - mean_g R) [/ (std_g R + eps)]                      (group-normalised outcome advantage)
# eps_high > eps_low is DAPO's "clip-higher" (Yu et al. 2025). How the l_it of a batch are averaged
# (NORMALIZATIONS) is a config choice:
#   sequence  mean over samples of the per-sample token mean: GRPO's 1/G sum_i 1/|o_i| sum_t (DeepSeekMath Eq. 3;
#             TRL loss_type="grpo")
#   token     sum over every token of the batch / the batch's token count: DAPO's 1/sum_i |o_i| sum_i sum_t
#             (Yu et al. 2025, Eq. 8; TRL "dapo" / "bnpo" on one batch)
#   constant  sum over every token / (samples x max_new_tokens): Dr. GRPO's constant normaliser (Liu et al. 2025,
#             "Understanding R1-Zero-Like Training", Sec. 3.1; TRL "dr_grpo")
# Temperature, top-k and top-p enter the ratio on both sides: pi_old is what rpo.sampling drew from and reports
# (log_softmax(logits / T) after its top-k and top-p masks, renormalised over the kept tokens), and pi_theta is the
# same transform of the current logits (`sampling_scores`), so at theta = theta_old the ratio is 1. The reference's
# log-probs (the KL term) use the same transform of the reference's logits, as TRL uses the temperature there.

NORMALIZATIONS = ("sequence", "token", "constant")


def sampling_scores(logits_XV: jax.Array, targets_X: jax.Array, *, temperature: float, top_k: int = 0,
                    top_p: float = 1.0) -> jax.Array:
    """The unnormalised log-probs of the distribution rpo.sampling draws from, for scoring a given token.

    logits / temperature; with top_k > 0 only the k highest stay; with top_p < 1 only the nucleus of what is left
    (the smallest set of most probable tokens whose mass reaches top_p, tokens tied with its last one included: the
    sampler's rule). Dropped tokens get decoder.NEG_INF, except the target, which always stays in the set (so a
    token the sampler drew keeps a finite log-prob when the parameters move its rank; at the sampling parameters it
    is in the set anyway). The kept set is chosen without gradient; the gradient flows through the kept logits.
    float32 [..., V]; temperature must be > 0. Ties at the k-th value are all kept (the sampler keeps exactly k).
    """
    from rpo.models.decoder import NEG_INF

    scaled = logits_XV.astype(jnp.float32) / temperature
    v = scaled.shape[-1]
    keep = jnp.ones(scaled.shape, bool)
    s = jax.lax.stop_gradient(scaled)
    if top_k and top_k < v:
        kth = jax.lax.top_k(s, int(top_k))[0][..., -1:]
        keep = s >= kth
    if top_p < 1.0:
        masked = jnp.where(keep, s, NEG_INF)
        lse = jax.nn.logsumexp(masked, axis=-1, keepdims=True)
        desc = -jnp.sort(-masked, axis=-1)
        p = jnp.exp(desc - lse)
        before = jnp.cumsum(p, axis=-1) - p
        count = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
        thresh = jnp.take_along_axis(desc, count - 1, axis=-1)
        keep = keep & (masked >= thresh)
    keep = keep | (jax.lax.broadcasted_iota(jnp.int32, scaled.shape, scaled.ndim - 1) == targets_X[..., None])
    return jnp.where(keep, scaled, NEG_INF)


def token_logps_from_hidden(hidden_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array, *,
                            chunk_size: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
                            ) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probs of targets_BT under sampling_scores(hidden @ w) and the entropy of that distribution
    (no gradient): ([B, T], [B, T]) float32, 0 where mask_BT is False.

    The sequence is cut into chunks of C tokens scanned with jax.checkpoint around each chunk, so only one chunk's
    [B, C, V] logits live at a time, forward and backward (the backward recomputes them); chunks without a masked
    token skip the projection. (sequence_logps' hand-written VJP gives only a row sum; GRPO needs each token.)
    """
    b, t, _ = hidden_BTD.shape
    h_NBCD, y_NBC, m_NBC = _chunks(hidden_BTD, targets_BT, mask_BT, chunk_size)
    n, c = h_NBCD.shape[0], h_NBCD.shape[2]

    @jax.checkpoint
    def chunk(h_BCD, y_BC):
        s_BCV = sampling_scores(_chunk_logits(h_BCD, w_DV), y_BC, temperature=temperature, top_k=top_k, top_p=top_p)
        lse_BC = jax.nn.logsumexp(s_BCV, axis=-1)
        logp_BC = jnp.take_along_axis(s_BCV, y_BC[..., None], axis=-1)[..., 0] - lse_BC
        logq_BCV = jax.lax.stop_gradient(s_BCV - lse_BC[..., None])
        ent_BC = -jnp.sum(jnp.exp(logq_BCV) * logq_BCV, axis=-1)  # dropped tokens: exp(-1e30) * -1e30 = 0
        return logp_BC, ent_BC

    def body(_, xs):
        h_BCD, y_BC, m_BC = xs
        zeros = lambda *_: (jnp.zeros((b, c), jnp.float32), jnp.zeros((b, c), jnp.float32))  # noqa: E731
        logp_BC, ent_BC = jax.lax.cond(jnp.any(m_BC), chunk, zeros, h_BCD, y_BC)
        return None, (jnp.where(m_BC, logp_BC, 0.0), jnp.where(m_BC, ent_BC, 0.0))

    _, (logp_NBC, ent_NBC) = jax.lax.scan(body, None, (h_NBCD, y_NBC, m_NBC))
    back = lambda x: x.transpose(1, 0, 2).reshape(b, n * c)[:, :t]  # noqa: E731
    return back(logp_NBC), back(ent_NBC)


def token_logps(config: ModelConfig, params: Params, tokens_BT: jax.Array, positions_BT: jax.Array,
                mask_BT: jax.Array, loss_mask_BT: jax.Array, *, chunk_size: int, remat: bool = False,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probs and entropies ([B, T] each, float32) aligned with the tokens: entry t is token t's
    log-prob given tokens < t under the sampling transform (see sampling_scores), 0 where loss_mask_BT is False
    (entry 0 is always 0: nothing predicts the first token). Rows as in sequence_logps."""
    hidden_BTD, _ = hidden_states(config, params, tokens_BT, positions_BT=positions_BT, mask_BT=mask_BT, remat=remat)
    w_DV = unembed_matrix(config, params).astype(hidden_BTD.dtype)
    logp, ent = token_logps_from_hidden(hidden_BTD[:, :-1], w_DV, tokens_BT[:, 1:], loss_mask_BT[:, 1:],
                                        chunk_size=chunk_size, temperature=temperature, top_k=top_k, top_p=top_p)
    zero = jnp.zeros((tokens_BT.shape[0], 1), jnp.float32)
    return jnp.concatenate([zero, logp], axis=1), jnp.concatenate([zero, ent], axis=1)


def grpo_token_loss(logp_BT, old_logp_BT, ref_logp_BT, adv_B, mask_BT, *, clip_low: float, clip_high: float,
                    beta: float, kl_ratio: bool = False) -> tuple[jax.Array, Metrics]:
    """The per-token GRPO loss l_it (see above), 0 off the mask: ([B, T], per-token indicators [B, T]).

    kl_ratio: weight the KL term by the (differentiable) ratio r_it, which makes its gradient that of the reverse KL
    for samples drawn from pi_old (DeepSeek-V3.2, 2025, Sec. 3.1 "unbiased KL estimate"; TRL's
    use_bias_correction_kl); False is DeepSeekMath's GRPO.

    Indicators (float, 0 off the mask): 'clip/low' (ratio < 1 - eps_low with A < 0: the clip removes the gradient),
    'clip/high' (ratio > 1 + eps_high with A > 0), 'clip/region' (either), 'kl' (the k3 value, also when beta = 0),
    'ratio'. With beta = 0, ref_logp_BT is not read (pass anything of the right shape)."""
    m = mask_BT.astype(bool)
    log_ratio = jnp.where(m, logp_BT - old_logp_BT, 0.0)
    ratio = jnp.exp(log_ratio)
    a = adv_B[:, None].astype(jnp.float32)
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = -jnp.minimum(ratio * a, clipped * a)
    d = jnp.where(m, ref_logp_BT - logp_BT, 0.0)
    kl = jnp.exp(d) - d - 1.0
    if beta:
        loss = loss + beta * (kl * ratio if kl_ratio else kl)
    low = (ratio < 1.0 - clip_low) & (a < 0)
    high = (ratio > 1.0 + clip_high) & (a > 0)
    f = lambda x: jnp.where(m, x.astype(jnp.float32), 0.0)  # noqa: E731
    return f(loss), {"clip/low": f(low), "clip/high": f(high), "clip/region": f(low | high),
                     "kl": f(jax.lax.stop_gradient(kl)), "ratio": f(jax.lax.stop_gradient(ratio))}


def grpo_numerator(token_loss_BT, mask_BT, row_mask_B, *, normalization: str) -> jax.Array:
    """The batch's share of the loss before the normaliser: sum over real rows of the per-row token mean
    (sequence) or sum over every real token (token, constant). Sums add across micro-batches."""
    w_B = row_mask_B.astype(jnp.float32)
    per_row = jnp.sum(token_loss_BT * mask_BT, axis=-1)
    if normalization == "sequence":
        per_row = per_row / jnp.maximum(jnp.sum(mask_BT, axis=-1).astype(jnp.float32), 1.0)
    elif normalization not in ("token", "constant"):
        raise ValueError(f"GRPO normalization {normalization!r}: use one of {NORMALIZATIONS}")
    return jnp.sum(per_row * w_B)


def grpo_denominator(mask_BT, row_mask_B, *, normalization: str, max_new_tokens: int) -> jax.Array:
    """The normaliser of a whole batch (all micro-batches): real rows (sequence), real completion tokens (token),
    or real rows x max_new_tokens (constant); at least 1."""
    rows = jnp.sum(row_mask_B.astype(jnp.float32))
    if normalization == "sequence":
        den = rows
    elif normalization == "token":
        den = jnp.sum(mask_BT.astype(jnp.float32) * row_mask_B.astype(jnp.float32)[..., None])
    elif normalization == "constant":
        den = rows * float(max_new_tokens)
    else:
        raise ValueError(f"GRPO normalization {normalization!r}: use one of {NORMALIZATIONS}")
    return jnp.maximum(den, 1.0)
