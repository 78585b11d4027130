"""The GRPO step against references written outside this project: TRL's GRPOTrainer (its own _compute_loss, on a
tiny random transformers Llama) gives the loss and the gradient of each normalisation for one fixed batch of
rollouts; the sampler (rpo.sampling) gives the log-probs the ratio's denominator must equal at the sampling
parameters, with temperature, top-k and top-p; TRL's group advantages give ours.

TRL's loss types map to ours: grpo -> sequence (per-sample token mean, then mean over samples), dapo -> token (sum
over the batch's tokens / their count), dr_grpo -> constant (sum / (samples x max_completion_length)).

The sharded check (the GRPO step on a 2 x 2 x 2 data x fsdp x tensor mesh equals the one-device step) needs 8 fake
CPU devices, which XLA only gives a process that sets XLA_FLAGS before importing jax: it runs this file as a
script in a subprocess.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from fake_devices import sharded_check
import rpo.models as M
from rpo import losses, sampling, sharding, train
from rpo.data.synthetic import char_tokenizer

# Its module-scoped fixtures are costly: all of its tests go to one xdist worker (launch.sh: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("grpo_reference")

VOCAB = 104  # the char tokenizer's size
TEMPERATURE = 0.7
MAX_NEW = 12
G = 3
CLIP_LOW, CLIP_HIGH, BETA = 0.2, 0.28, 0.3
TRL_LOSS = {"sequence": "grpo", "token": "dapo", "constant": "dr_grpo"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random transformers Llama (untied, GQA) and the char tokenizer, saved."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=None, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("grpo_ref") / "model"
    model.save_pretrained(str(path))
    char_tokenizer().save_pretrained(str(path))
    return str(path)


def _rollouts(seed=0):
    """2 prompts x G samples: prompt and completion ids of varied lengths, rewards, advantages."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (5, 8)]
    rows = []
    for i, p in enumerate(prompts):
        for j in range(G):
            rows.append({"prompt_ids": p, "completion_ids": rng.integers(3, VOCAB, int(rng.integers(3, MAX_NEW + 1))).tolist()})
    rewards = np.asarray([[1.0, 0.0, 0.5], [0.0, 0.0, 1.0]])
    return rows, rewards


def _our_logps(config, params, rows, **kw):
    rows = [{"logprobs": [0.0] * len(r["completion_ids"]), "advantage": 0.0, **r} for r in rows]  # (not read)
    batch = train.make_rollout_batch(rows, len(rows), seq_len=24, pad_id=0)
    fn = jax.jit(lambda p, *arrays: losses.token_logps(config, p, *arrays, chunk_size=5, **kw))
    logp, ent = fn(params, batch["tokens_BT"], batch["positions_BT"], batch["mask_BT"], batch["loss_mask_BT"])
    return batch, np.asarray(logp), np.asarray(ent)


def test_group_advantages_equal_trl_formula():
    """TRL: (r - group mean) / (group std with Bessel's correction + 1e-4); scale_rewards='none' only centres."""
    from rpo import grpo
    from trl.trainer.utils import nanstd

    _, rewards = _rollouts()
    r = torch.tensor(rewards.reshape(-1), dtype=torch.float64)
    mean = r.view(-1, G).mean(1).repeat_interleave(G)
    std = nanstd(r.view(-1, G), dim=1).repeat_interleave(G)
    np.testing.assert_allclose(grpo.group_advantages(rewards, scale=True, eps=1e-4).reshape(-1),
                               ((r - mean) / (std + 1e-4)).numpy(), rtol=1e-12)
    np.testing.assert_allclose(grpo.group_advantages(rewards, scale=False, eps=1e-4).reshape(-1),
                               (r - mean).numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="group of one"):
        grpo.group_advantages(rewards[:, :1], scale=True, eps=1e-4)


CASES = [("sequence", False), ("token", False), ("constant", False), ("sequence", True)]  # (normalization, kl_ratio)


def test_loss_and_gradient_equal_trl_grpo_trainer(model_dir, tmp_path):
    """For each normalisation (and the ratio-weighted KL once): our loss and every parameter's gradient equal TRL's
    within 1e-4 relative; the jitted, sharded step (2 micro-batches) gives the same loss and TRL's clip and KL
    metrics."""
    from datasets import Dataset
    from safetensors.numpy import load_file
    from trl import GRPOConfig, GRPOTrainer

    from rpo import grpo

    config, params = M.load_pretrained(model_dir)
    rows, rewards = _rollouts()
    adv = grpo.group_advantages(rewards, scale=True, eps=1e-4).reshape(-1)
    _, now, _ = _our_logps(config, params, rows, temperature=TEMPERATURE)
    # Old and reference log-probs away from the current ones, so that ratios leave the clip range both ways.
    rng = np.random.default_rng(1)
    for i, (r, a) in enumerate(zip(rows, adv)):
        n, k = len(r["prompt_ids"]), len(r["completion_ids"])
        cur = now[i, n: n + k]
        r["logprobs"] = (cur + rng.normal(0, 0.3, k)).tolist()
        r["ref_logprobs"] = (cur + rng.normal(0, 0.2, k)).tolist()
        r["advantage"] = float(a)
    batch = jax.tree.map(jnp.asarray, train.make_rollout_batch(rows, len(rows), seq_len=24, pad_id=0))

    # TRL's inputs: prompts left-padded, completions right-padded, as its trainer lays them out.
    pl = max(len(r["prompt_ids"]) for r in rows)
    cl = max(len(r["completion_ids"]) for r in rows)
    t = lambda x, dt=torch.long: torch.tensor(np.asarray(x), dtype=dt)  # noqa: E731
    pad = lambda xs, n, left: [([0] * (n - len(x)) + list(x)) if left else (list(x) + [0] * (n - len(x))) for x in xs]  # noqa: E731
    cm = [[1] * len(r["completion_ids"]) + [0] * (cl - len(r["completion_ids"])) for r in rows]
    inputs = {
        "prompt_ids": t(pad([r["prompt_ids"] for r in rows], pl, True)),
        "prompt_mask": t(pad([[1] * len(r["prompt_ids"]) for r in rows], pl, True)),
        "completion_ids": t(pad([r["completion_ids"] for r in rows], cl, False)),
        "completion_mask": t(cm),
        "advantages": t(adv, torch.float32),
        "old_per_token_logps": t(pad([r["logprobs"] for r in rows], cl, False), torch.float32),
        "ref_per_token_logps": t(pad([r["ref_logprobs"] for r in rows], cl, False), torch.float32),
        "num_items_in_batch": t(float(np.sum(cm)), torch.float32),
    }
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, loss_type="grpo",
                      beta=BETA, epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH, temperature=TEMPERATURE,
                      max_completion_length=MAX_NEW, num_generations=G, per_device_train_batch_size=len(rows),
                      scale_rewards="group", bf16=False, logging_steps=1)
    trainer = GRPOTrainer(model=hf, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}), processing_class=char_tokenizer())
    trainer.model.eval()  # TRL's eval mode: no division by gradient-accumulation steps, nothing else changes

    for normalization, kl_ratio in CASES:
        g = ml_collections.ConfigDict(dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, beta=BETA, kl_ratio=kl_ratio,
                                           normalization=normalization, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                                           chunk_size=5, max_new_tokens=MAX_NEW))
        denom = losses.grpo_denominator(batch["loss_mask_BT"], batch["row_mask_B"], normalization=normalization,
                                        max_new_tokens=MAX_NEW)
        loss_fn = lambda p: train.grpo_sums(p, batch, denom, model_config=config, g=g, remat=False)["loss"]  # noqa: E731
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)

        trainer.loss_type = TRL_LOSS[normalization]
        trainer.args.use_bias_correction_kl = kl_ratio
        trainer.model.zero_grad(set_to_none=True)
        trainer._metrics["eval"].clear()
        ref_loss = trainer._compute_loss(trainer.model, inputs)
        ref_loss.backward()
        case = f"{normalization}, kl_ratio={kl_ratio}"
        np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-4, err_msg=case)
        # Gradients, tensor by tensor in transformers' layout (our grads written as a checkpoint).
        M.save_pretrained(config, jax.tree.map(np.asarray, grads), str(tmp_path / "grads"))
        ours = load_file(str(tmp_path / "grads" / "model.safetensors"))
        theirs = {n: p.grad.numpy() for n, p in trainer.model.named_parameters()}
        assert set(ours) == set(theirs)
        for name, g_ref in theirs.items():
            scale = np.abs(g_ref).max()
            assert scale > 0, name
            err = np.abs(ours[name] - g_ref).max() / scale
            assert err < 1e-4, f"{name}: max |ours - TRL| = {err:.2e} of max |TRL grad| ({case})"

    # The jitted step on a mesh, 2 micro-batches (token normalisation: the denominator spans both): the loss before
    # its update, and the clip, KL and entropy metrics TRL logged for that batch.
    normalization = "token"
    g = ml_collections.ConfigDict(dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, beta=BETA, kl_ratio=False,
                                       normalization=normalization, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                                       chunk_size=5, max_new_tokens=MAX_NEW))
    optimizer = train.make_optimizer(ml_collections.ConfigDict(dict(
        lr=1e-3, schedule="constant", warmup_steps=0, end_lr_fraction=1.0, weight_decay=0.0, b1=0.9, b2=0.99,
        eps=1e-8, clip_norm=0.0)), 1)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    rules = sharding.DEFAULT_RULES
    example = train.split_micro(train.make_rollout_batch([], len(rows), seq_len=24, pad_id=0), 2)
    step = train.make_grpo_step(config, g, optimizer, mesh, rules, example)
    state = jax.device_put(train.init_state(params, optimizer), train.state_shardings(config, optimizer, mesh, rules))
    _, metrics = step(state, train.device_rollouts(rows, len(rows), mesh=mesh, rules=rules, grad_accum=2, seq_len=24,
                                                   pad_id=0), np.float32(np.sum(cm)))
    trainer.loss_type, trainer.args.use_bias_correction_kl = TRL_LOSS[normalization], False
    trainer._metrics["eval"].clear()
    ref_loss = trainer._compute_loss(trainer.model, inputs)
    logged = trainer._metrics["eval"]
    np.testing.assert_allclose(float(metrics["loss"]), ref_loss.item(), rtol=1e-4)
    for ours_key, trl_key in (("clip/region", "clip_ratio/region_mean"), ("clip/low", "clip_ratio/low_mean"),
                              ("clip/high", "clip_ratio/high_mean"), ("kl", "kl"), ("entropy", "entropy")):
        np.testing.assert_allclose(float(metrics[ours_key]), logged[trl_key][-1], rtol=1e-4, atol=1e-7, err_msg=ours_key)
    assert 0.0 < float(metrics["clip/region"]) < 1.0  # the batch exercises the clip, on both sides
    assert float(metrics["clip/low"]) > 0.0 and float(metrics["clip/high"]) > 0.0


def test_zero_advantage_rows_left_out_give_the_same_gradient(model_dir):
    """What rpo.grpo does with beta = 0: the rows whose advantage is 0 are not run, the normaliser (over every row,
    grpo.step_denominator, equal to losses.grpo_denominator) still counts them; loss and gradient are unchanged."""
    from rpo import grpo

    config, params = M.load_pretrained(model_dir)
    rows, _ = _rollouts()
    rng = np.random.default_rng(4)
    for i, r in enumerate(rows):
        r["logprobs"] = (-rng.uniform(2, 5, len(r["completion_ids"]))).tolist()
        r["advantage"] = 0.0 if i in (1, 3, 4) else float(rng.normal())
    kept = [r for r in rows if r["advantage"] != 0.0]
    full = jax.tree.map(jnp.asarray, train.make_rollout_batch(rows, 8, seq_len=24, pad_id=0))
    for normalization in losses.NORMALIZATIONS:
        denom = losses.grpo_denominator(full["loss_mask_BT"], full["row_mask_B"], normalization=normalization,
                                        max_new_tokens=MAX_NEW)
        assert float(denom) == grpo.step_denominator(rows, normalization, MAX_NEW)
    for normalization in ("sequence",):  # (the numerator's per-row form; token and constant sum over tokens)
        g = ml_collections.ConfigDict(dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, beta=0.0, kl_ratio=False,
                                           normalization=normalization, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                                           chunk_size=5, max_new_tokens=MAX_NEW))
        denom = losses.grpo_denominator(full["loss_mask_BT"], full["row_mask_B"], normalization=normalization,
                                        max_new_tokens=MAX_NEW)
        part = jax.tree.map(jnp.asarray, train.make_rollout_batch(kept, 4, seq_len=24, pad_id=0))
        f = lambda p, b: train.grpo_sums(p, b, denom, model_config=config, g=g, remat=False)["loss"]  # noqa: E731
        (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(f))(params, b) for b in (full, part))
        np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))
    assert grpo.row_unit(256, 4, 8) == 64 and grpo.row_unit(6, 4, 4) == 4 and grpo.row_unit(24, 1, 1) == 24


def test_old_logprobs_are_the_samplers_and_the_ratio_starts_at_one(model_dir):
    """The train side scores a sampled completion under the distribution the sampler drew it from (temperature,
    top-k, top-p): at the sampling parameters it gives the sampler's own log-probs, so the ratio is 1 and the
    objective's gradient is the plain policy gradient. Without the truncation the numbers would differ."""
    config, params = M.load_pretrained(model_dir)
    prompts = [[5, 9, 11, 30], [40, 41, 7]]
    for top_k, top_p in ((0, 1.0), (0, 0.8), (6, 0.9)):
        out = sampling.generate(config, params, prompts, n=4, max_new_tokens=10, temperature=TEMPERATURE, top_p=top_p,
                                top_k=top_k, eos_ids=(), seed=3)
        rows = [{"prompt_ids": p, "completion_ids": out.tokens[i][j], "logprobs": out.logprobs[i][j], "advantage": 1.0}
                for i, p in enumerate(prompts) for j in range(4)]
        batch, logp, ent = _our_logps(config, params, rows, temperature=TEMPERATURE, top_k=top_k, top_p=top_p)
        m = batch["loss_mask_BT"]
        np.testing.assert_allclose(logp[m], batch["old_logps_BT"][m], atol=2e-5, err_msg=f"top_k={top_k} top_p={top_p}")
        assert np.all(ent[m] > 0)
        if top_k or top_p < 1.0:
            _, full, _ = _our_logps(config, params, rows, temperature=TEMPERATURE)
            assert np.abs(full[m] - batch["old_logps_BT"][m]).max() > 1e-2


def _sharded_check() -> dict:
    """One GRPO step (2 micro-batches, beta > 0, top-p in the ratio) of a random model on one device and on a
    2 x 2 x 2 mesh of 8 fake devices: losses, metrics and updated params, as JSON."""
    from rpo.models.config import ModelConfig
    from rpo.models.decoder import init_params

    config = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128, eos_token_ids=(1,),
                         pad_token_id=0)
    params = jax.tree.map(np.asarray, init_params(config, jax.random.PRNGKey(0)))  # host copies: the step donates
    rng = np.random.default_rng(2)
    rows = []
    for i in range(8):
        k = int(rng.integers(3, MAX_NEW + 1))
        rows.append({"prompt_ids": rng.integers(3, VOCAB, int(rng.integers(3, 9))).tolist(),
                     "completion_ids": rng.integers(3, VOCAB, k).tolist(),
                     "logprobs": (-rng.uniform(3.0, 6.0, k)).tolist(), "ref_logprobs": (-rng.uniform(3.0, 6.0, k)).tolist(),
                     "advantage": float(rng.normal())})
    g = ml_collections.ConfigDict(dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, beta=BETA, kl_ratio=False,
                                       normalization="token", temperature=TEMPERATURE, top_k=0, top_p=0.9,
                                       chunk_size=5, max_new_tokens=MAX_NEW))
    optimizer = train.make_optimizer(ml_collections.ConfigDict(dict(
        lr=1e-2, schedule="constant", warmup_steps=0, end_lr_fraction=1.0, weight_decay=0.0, b1=0.9, b2=0.99,
        eps=1e-8, clip_norm=1.0)), 1)
    rules = sharding.DEFAULT_RULES
    out = {"devices": len(jax.devices())}
    for shape in ((1, 1, 1), (2, 2, 2)):
        mesh = sharding.make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])
        example = train.split_micro(train.make_rollout_batch([], 8, seq_len=24, pad_id=0), 2)
        step = train.make_grpo_step(config, g, optimizer, mesh, rules, example)
        state = jax.device_put(train.init_state(params, optimizer),
                               train.state_shardings(config, optimizer, mesh, rules))
        new, metrics = step(state, train.device_rollouts(rows, 8, mesh=mesh, rules=rules, grad_accum=2, seq_len=24,
                                                         pad_id=0), np.float32(sum(len(r["completion_ids"]) for r in rows)))
        flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(new["params"])])
        out["x".join(map(str, shape))] = {"metrics": {k: float(v) for k, v in metrics.items()},
                                          "params": flat.tolist(), "q_spec": str(new["params"]["layers"]["q"].sharding.spec)}
    out["moved"] = float(np.abs(np.asarray(out["2x2x2"]["params"]) - np.concatenate(
        [np.asarray(x).ravel() for x in jax.tree.leaves(params)])).max())
    return out


def test_sharded_grpo_step_equals_one_device_step():
    r = sharded_check(__file__)
    assert r["devices"] == 8 and r["2x2x2"]["q_spec"] == "P(None, 'fsdp', 'tensor', None)"
    one, eight = r["1x1x1"], r["2x2x2"]
    for key, value in one["metrics"].items():
        np.testing.assert_allclose(eight["metrics"][key], value, rtol=2e-5, atol=1e-6, err_msg=key)
    assert 0 < one["metrics"]["clip/region"] < 1 and one["metrics"]["kl"] > 0
    diff = np.abs(np.asarray(one["params"]) - np.asarray(eight["params"])).max()
    assert r["moved"] > 1e-3 and diff < 0.01 * r["moved"], (diff, r["moved"])


if __name__ == "__main__" and sys.argv[1:] == ["--sharded-check"]:
    print(json.dumps(_sharded_check()))
