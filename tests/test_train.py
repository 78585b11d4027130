"""rpo.train: data files, exact gradient accumulation, sharded == one-device step, learning in
miniature (IRPO's NLL ablation), NaN stop, checkpoint resume.

The sharded check needs 8 fake CPU devices, which XLA only gives a process that sets
XLA_FLAGS before importing jax: it runs this file as a script in a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fake_devices import sharded_check
from rpo import losses
from rpo import train as T
from rpo.models import ModelConfig, init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config(arg=None):
    spec = importlib.util.spec_from_file_location("train_tiny", os.path.join(ROOT, "configs", "train_tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def _model_config(cfg) -> ModelConfig:
    return ModelConfig(**dict(cfg.model.random))


def _pair_rows(seed, n, vocab=64, ref=True, diff_positions=None):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        prompt = rng.integers(3, vocab, int(rng.integers(1, 6))).tolist()
        chosen = rng.integers(3, vocab, int(rng.integers(2, 12))).tolist()
        if diff_positions is None:
            rejected = rng.integers(3, vocab, int(rng.integers(2, 12))).tolist()
        else:
            rejected = list(chosen)
            for pos in diff_positions:
                rejected[pos] = int(rng.integers(3, vocab))
        row = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
        if ref:
            row["ref_chosen_logp"] = float(-rng.uniform(5, 50))
            row["ref_rejected_logp"] = float(-rng.uniform(5, 50))
        rows.append(row)
    return rows


def _sft_rows(seed, n, vocab=64):
    return [{"prompt_ids": r["prompt_ids"], "response_ids": r["chosen_ids"]} for r in _pair_rows(seed, n, vocab, ref=False)]


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad,needle",
    [
        ("{not json", "not valid JSON"),
        ('{"prompt_ids": [1], "chosen_ids": [2]}', "'rejected_ids' is missing"),
        ('{"prompt_ids": [1], "chosen_ids": [2, "x"], "rejected_ids": [3]}', "'chosen_ids' must be a list of ints"),
        ('{"prompt_ids": [1], "chosen_ids": [], "rejected_ids": [3]}', "'chosen_ids' is empty"),
        ('{"prompt_ids": [], "chosen_ids": [2], "rejected_ids": [3]}', "'prompt_ids' is empty (the first response token"),
        ('{"prompt_ids": [1], "chosen_ids": [999], "rejected_ids": [3]}', "outside [0, 64)"),
        ('{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "ref_chosen_logp": -1.0}', "both"),
        ('{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "ref_chosen_logp": NaN, "ref_rejected_logp": 1}',
         "finite"),
    ],
)
def test_malformed_pairs_row_names_file_and_line(tmp_path, bad, needle):
    good = json.dumps(_pair_rows(0, 1)[0])
    path = tmp_path / "pairs.jsonl"
    path.write_text(f"{good}\n{good}\n{bad}\n{good}\n")
    with pytest.raises(T.DataError) as e:
        T.read_rows(str(path), "pairs", vocab_size=64)
    assert f"{path}:3:" in str(e.value)
    assert needle in str(e.value)


def test_overlong_row_names_file_and_line(tmp_path):
    path = _write(tmp_path / "sft.jsonl", [{"prompt_ids": [1, 2], "response_ids": list(range(3, 40))}])
    rows = T.read_rows(path, "sft")
    with pytest.raises(T.DataError, match=f"{path}:1:.*seq_len=16"):
        T.make_batch(rows, "sft", 2, seq_len=16, pad_id=0, truncate=False)
    batch = T.make_batch(rows, "sft", 2, seq_len=16, pad_id=0, truncate=True)
    assert batch["loss_mask_BPT"][0, 0].sum() == 14 and batch["mask_BPT"][0, 0].all()


def test_batch_layout_is_right_padded_with_masks_and_positions():
    row = {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10], "ref_chosen_logp": -1.5,
           "ref_rejected_logp": -2.5}
    b = T.make_batch([row], "pairs", 2, seq_len=8, pad_id=0, truncate=False)
    np.testing.assert_array_equal(b["tokens_BPT"][0], [[5, 6, 7, 8, 9, 0, 0, 0], [5, 6, 7, 10, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b["positions_BPT"][0, 0], [0, 1, 2, 3, 4, 0, 0, 0])
    np.testing.assert_array_equal(b["loss_mask_BPT"][0, 1], [0, 0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["row_mask_B"], [True, False])
    np.testing.assert_array_equal(b["ref_logps_BP"][0], [-1.5, -2.5])


# ---------------------------------------------------------------------------------------
# Exact accumulation
# ---------------------------------------------------------------------------------------


def _one_step(cfg, mc, params, batch, optimizer):
    state = T.init_state(params, optimizer)
    return jax.jit(lambda s, b: T.train_step(s, b, model_config=mc, cfg=cfg, optimizer=optimizer))(state, batch)


@pytest.mark.parametrize("kind", ["dpo_nll", "ipo", "sft"])
def test_accumulation_equals_one_big_batch(kind):
    cfg = _tiny_config()
    cfg.loss.kind = kind
    cfg.data.kind = "sft" if kind == "sft" else "pairs"
    mc = _model_config(cfg)
    params = init_params(mc, jax.random.PRNGKey(0), std=0.1)
    rows = _sft_rows(1, 7) if kind == "sft" else _pair_rows(1, 7)
    pack = dict(seq_len=20, pad_id=0, truncate=False)
    big = T.split_micro(T.make_batch(rows, cfg.data.kind, 8, **pack), 1)  # [1, 8]: 7 real pairs + 1 padding
    # 4 micro-batches of 4 slots holding 3, 2, 1 and 1 real pairs.
    parts = [rows[0:3], rows[3:5], rows[5:6], rows[6:7]]
    micro = [T.make_batch(p, cfg.data.kind, 4, **pack) for p in parts]
    acc = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
    sgd = optax.sgd(1.0)  # the update is the gradient itself
    s_big, m_big = _one_step(cfg, mc, params, big, sgd)
    s_acc, m_acc = _one_step(cfg, mc, params, acc, sgd)
    np.testing.assert_allclose(m_acc["loss"], m_big["loss"], rtol=1e-5)
    for k in m_big:
        np.testing.assert_allclose(m_acc[k], m_big[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # sgd(1): params - new params is the gradient. Compare within float32 summation-order noise.
    g_big = [p - q for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(s_big["params"]))]
    g_acc = [p - q for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(s_acc["params"]))]
    scale = max(float(np.max(np.abs(g))) for g in g_big)
    assert scale > 1e-3
    for a, b in zip(g_acc, g_big):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
    # And the big batch's loss is the plain formula over the 7 real rows.
    tokens = big["tokens_BPT"][0]
    b, p, t = tokens.shape
    logp, n = losses.sequence_logps(mc, params, tokens.reshape(b * p, t), big["positions_BPT"][0].reshape(b * p, t),
                                    big["mask_BPT"][0].reshape(b * p, t), big["loss_mask_BPT"][0].reshape(b * p, t),
                                    chunk_size=7)
    logp, n = np.asarray(logp).reshape(b, p)[:7], np.asarray(n).reshape(b, p)[:7]
    if kind == "sft":
        want = -logp[:, 0].sum() / n[:, 0].sum()
    else:
        ref = np.asarray(big["ref_logps_BP"][0, :7], np.float64)
        h = (logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1])  # the difference of log-ratios, per pair
        if kind == "dpo_nll":  # IRPO Eq. 1
            want = np.mean(np.logaddexp(0.0, -cfg.loss.beta * h) - cfg.loss.alpha * logp[:, 0] / n[:, 0])
        else:  # IPO (Azar et al. 2023, Eq. 17)
            want = np.mean((h - 1 / (2 * cfg.loss.beta)) ** 2)
    np.testing.assert_allclose(m_big["loss"], want, rtol=1e-5)


def test_remat_and_bfloat16_steps():
    """remat=True gives the same step; bfloat16 compute keeps float32 params and Adam state."""
    cfg = _tiny_config()
    mc = _model_config(cfg)
    params = init_params(mc, jax.random.PRNGKey(0), std=0.1)
    batch = T.split_micro(T.make_batch(_pair_rows(4, 4), "pairs", 4, seq_len=20, pad_id=0, truncate=False), 2)
    opt = T.make_optimizer(cfg.optim, cfg.num_steps)
    plain, m_plain = _one_step(cfg, mc, params, batch, opt)
    cfg.remat = True
    remat, m_remat = _one_step(cfg, mc, params, batch, opt)
    np.testing.assert_allclose(m_remat["loss"], m_plain["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_remat["grad_norm"], m_plain["grad_norm"], rtol=1e-5)
    bf16, m_bf16 = _one_step(cfg, mc.replace(dtype="bfloat16"), params, batch, opt)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16["params"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16["opt_state"]) if jnp.issubdtype(x.dtype, jnp.floating))
    np.testing.assert_allclose(m_bf16["loss"], m_plain["loss"], rtol=2e-2)


# ---------------------------------------------------------------------------------------
# Sharded step == one-device step (8 fake CPU devices, in a subprocess)
# ---------------------------------------------------------------------------------------

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]


def _sharded_check() -> dict:
    """Runs in a process with 8 CPU devices: 2 steps of the real optimizer per mesh vs 1 device."""
    from rpo import sharding

    cfg = _tiny_config()
    cfg.batch_size, cfg.grad_accum = 16, 2
    cfg.optim.warmup_steps = 0
    mc = _model_config(cfg)
    optimizer = T.make_optimizer(cfg.optim, cfg.num_steps)
    params = jax.device_get(init_params(mc, jax.random.PRNGKey(0), std=0.1))
    rows = _pair_rows(2, 32)
    pack = dict(seq_len=20, pad_id=0, truncate=False)
    batches = [T.split_micro(T.make_batch(rows[i * 16:(i + 1) * 16], "pairs", 16, **pack), 2) for i in range(2)]

    def run(mesh):
        step = T.make_train_step(mc, cfg, optimizer, mesh, sharding.DEFAULT_RULES, batches[0])
        state = jax.device_put(T.init_state(params, optimizer), T.state_shardings(mc, optimizer, mesh, sharding.DEFAULT_RULES))
        out = []
        for b in batches:
            state, m = step(state, b)
            out.append((float(m["loss"]), float(m["grad_norm"]), float(m["rewards/margin"])))
        leaf = state["params"]["layers"]["q"]
        return jax.device_get(state["params"]), out, str(leaf.sharding.spec)

    ref_params, ref_loss, _ = run(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    result = {"devices": len(jax.devices())}

    # The driver on a 2x2x2 mesh, from an HF directory: params stream into their shardings.
    import pathlib
    import tempfile

    from rpo.models import save_pretrained

    tmp = pathlib.Path(tempfile.mkdtemp())
    save_pretrained(mc, params, str(tmp / "hf"))
    dcfg = _driver_config(tmp, "driver", **{"model.path": str(tmp / "hf"), "mesh.data": 2, "mesh.fsdp": 2,
                                            "mesh.tensor": 2, "num_steps": 2, "batch_size": 8})
    final = T.run(dcfg, dcfg.workdir)
    result["driver_q_spec"] = str(final["layers"]["q"].sharding.spec)
    for shape in MESHES:
        p, loss, spec = run(sharding.make_mesh(*shape))
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_params)))
        moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params)))
        result["x".join(map(str, shape))] = {"param_diff": diff, "param_moved": moved, "loss": loss,
                                             "ref_loss": ref_loss, "q_spec": spec}
    return result


def test_sharded_step_equals_one_device_step():
    result = sharded_check(__file__)
    assert result["devices"] == 8
    for shape in MESHES:
        r = result["x".join(map(str, shape))]
        assert r["param_moved"] > 1e-4, r  # the step did change the params
        # Adam divides by sqrt(v): an element whose gradient is tiny moves by ~lr whatever its
        # float32 noise, so params agree to a small fraction of the distance moved, not to 1e-7.
        assert r["param_diff"] < 1e-5 and r["param_diff"] < 0.01 * r["param_moved"], (shape, r)
        # loss, gradient norm and margin of both steps
        np.testing.assert_allclose(r["loss"], r["ref_loss"], rtol=2e-5, atol=1e-6, err_msg=str(shape))
    assert result["2x2x2"]["q_spec"] == "P(None, 'fsdp', 'tensor', None)"  # really sharded (str of a PartitionSpec)
    assert result["driver_q_spec"] == "P(None, 'fsdp', 'tensor', None)"


# ---------------------------------------------------------------------------------------
# Learning in miniature: DPO raises the margin; NLL keeps the chosen log-probs up
# ---------------------------------------------------------------------------------------


def _train(cfg, mc, params, batch, steps, lr):
    opt = optax.adam(lr)
    state = T.init_state(params, opt)
    step = jax.jit(lambda s, b: T.train_step(s, b, model_config=mc, cfg=cfg, optimizer=opt))
    for _ in range(steps):
        state, _ = step(state, batch)
    return state["params"]


def test_irpo_raises_margin_and_nll_keeps_chosen_logps_up():
    """The paper's ablation (Sec. 3, Fig. 3) in miniature. Like IRPO's pairs, chosen and
    rejected are both samples of the current model (here: a tiny model first fitted on both
    by SFT) and share all tokens but one. DPO alone raises the margin by pushing the shared
    suffix down in both; with the NLL term the chosen log-probs rise instead."""
    cfg = _tiny_config()
    mc = _model_config(cfg)
    rows = _pair_rows(0, 8, ref=False, diff_positions=(1,))
    pack = dict(seq_len=20, pad_id=0, truncate=False)
    sft_rows = [{"prompt_ids": r["prompt_ids"], "response_ids": r[k]} for r in rows for k in ("chosen_ids", "rejected_ids")]
    sft_cfg = _tiny_config("sft")
    params = _train(sft_cfg, mc, init_params(mc, jax.random.PRNGKey(0)),
                    T.split_micro(T.make_batch(sft_rows, "sft", 16, **pack), 1), steps=60, lr=1e-2)
    batch = T.make_batch(rows, "pairs", 8, **pack)
    logps_fn = T.make_logps_fn(mc, jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")),
                               cfg.sharding_rules, batch, chunk_size=cfg.loss.chunk_size)
    ref, _ = logps_fn(params, batch)
    batch["ref_logps_BP"] = np.asarray(ref)
    final = {}
    for alpha in (0.0, 1.0):
        cfg.loss.alpha = alpha
        trained = _train(cfg, mc, params, T.split_micro(batch, 1), steps=30, lr=3e-3)
        final[alpha] = np.asarray(logps_fn(trained, batch)[0])
    ref = np.asarray(ref)
    for alpha, logp in final.items():
        margin = (logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1])
        assert margin.mean() > 10.0, (alpha, margin)  # beta * margin > 1
        assert (margin > 0).all(), (alpha, margin)
    chosen_ref = ref[:, 0].mean()
    assert final[1.0][:, 0].mean() > chosen_ref, (final[1.0][:, 0], chosen_ref)  # NLL: chosen rises
    assert final[0.0][:, 0].mean() < chosen_ref - 3.0, (final[0.0][:, 0], chosen_ref)  # DPO alone: chosen falls


# ---------------------------------------------------------------------------------------
# The driver: reference log-probs, NaN stop, resume
# ---------------------------------------------------------------------------------------


def _driver_config(tmp_path, name, **overrides):
    cfg = _tiny_config(f"workdir={tmp_path / name}")
    path = str(tmp_path / "pairs.jsonl")
    if not os.path.exists(path):
        _write(path, _pair_rows(3, 12, ref=False, diff_positions=(1,)))
    cfg.data.train_path = path
    cfg.data.eval_path = path
    cfg.data.seq_len = 20
    cfg.batch_size, cfg.grad_accum = 4, 2
    cfg.num_steps, cfg.checkpoint_every, cfg.eval_every = 6, 2, 3
    for k, v in overrides.items():
        node = cfg
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return cfg


def test_driver_writes_reference_logps_metrics_and_model(tmp_path):
    cfg = _driver_config(tmp_path, "run")
    params = T.run(cfg, cfg.workdir)
    rows = [json.loads(line) for line in open(os.path.join(cfg.workdir, "train_pairs_with_ref.jsonl"))]
    assert len(rows) == 12 and all(np.isfinite(r["ref_chosen_logp"]) for r in rows)
    log = [json.loads(line) for line in open(os.path.join(cfg.workdir, "metrics.jsonl"))]
    train = [r for r in log if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert abs(train[0]["rewards/margin"]) < 1e-4  # the reference is the initial policy
    assert [r["step"] for r in log if r["split"] == "eval"] == [3, 6]
    from rpo.models import load_pretrained

    _, saved = load_pretrained(os.path.join(cfg.workdir, "final"))
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_nan_loss_stops_the_driver_naming_the_step(tmp_path):
    # A huge learning rate sends the params to inf after the first update: the loss of a
    # later step is NaN.
    cfg = _driver_config(tmp_path, "nan", **{"optim.lr": 1e30, "optim.warmup_steps": 0, "optim.clip_norm": 0.0,
                                             "optim.schedule": "constant"})
    with pytest.raises(T.NonFiniteLossError, match=r"step [2-6]: loss is nan"):
        T.run(cfg, cfg.workdir)


def test_resume_after_interruption_ends_with_same_params(tmp_path):
    full_cfg = _driver_config(tmp_path, "full")
    full = jax.device_get(T.run(full_cfg, full_cfg.workdir))

    cfg = _driver_config(tmp_path, "interrupted")

    class Crash(Exception):
        pass

    def crash_at_3(step, _):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        T.run(cfg, cfg.workdir, on_step=crash_at_3)
    assert sorted(os.listdir(os.path.join(cfg.workdir, "checkpoints"))) == ["2"]
    resumed = jax.device_get(T.run(cfg, cfg.workdir))
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
    steps = [json.loads(line)["step"] for line in open(os.path.join(cfg.workdir, "metrics.jsonl"))
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2, 3, 3, 4, 5, 6]  # step 3 was logged, lost, and redone


def test_longer_rerun_rewrites_the_final_model(tmp_path):
    """Rerunning a finished workdir with more steps resumes, trains on, and replaces final/."""
    from rpo.models import load_pretrained

    T.run(_driver_config(tmp_path, "grow", num_steps=2), str(tmp_path / "grow"))
    params = T.run(_driver_config(tmp_path, "grow", num_steps=4), str(tmp_path / "grow"))
    _, saved = load_pretrained(str(tmp_path / "grow" / "final"))
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert not [f for f in os.listdir(tmp_path / "grow") if ".tmp" in f or ".old" in f]


if __name__ == "__main__":
    if sys.argv[1:] == ["--sharded-check"]:
        print(json.dumps(_sharded_check()))
