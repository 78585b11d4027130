"""rpo.distributed for real on one machine: two processes x 4 fake CPU devices (jax.distributed on
localhost, gloo collectives) against one process x 8 devices, on the same data=2 x fsdp=4 mesh.

Each run is tests/multihost_worker.py: a one-step DPO+NLL training phase (rpo.train.run: reference
log-probs, the sharded step, metrics, an orbax checkpoint, final/) and a generate() call. The
two-process run must give every process the one-process run's loss, updated params and samples,
and only process 0 may write the run's files. Also: when initialize() starts jax.distributed (the
environment rules of rpo.distributed), as a pure function of the environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rpo import distributed

# Its end-to-end fixture is costly: all of its tests go to one xdist worker (launch.sh: --dist loadgroup), and the
# fixture is session-scoped, so that worker builds it once even when other modules' tests run between these.
pytestmark = pytest.mark.xdist_group("multihost")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
TIMEOUT_S = 600  # a hung collective must fail the test, not hang CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], devices: int, rpo_env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RPO_", "SLURM_", "TPU_", "MEGASCALE_"))}
    env.update(rpo_env, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    log = os.path.join(args[0], f"stderr-{rpo_env.get('RPO_PROCESS_ID', 'single')}.txt")
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, WORKER, *args], env=env, cwd=ROOT, stdout=err,
                                stderr=subprocess.STDOUT)
    return proc, log


def _wait(procs: list[tuple[subprocess.Popen, str]]) -> None:
    """Waits for every worker; as soon as one fails (or the time is up) kills the rest, whose
    collectives could never finish, and fails with every worker's output."""
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p, _ in procs):
        failed = any(p.poll() not in (None, 0) for p, _ in procs)
        if failed or time.monotonic() > deadline:
            for p, _ in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            break
        time.sleep(0.2)
    if any(p.returncode != 0 for p, _ in procs):
        report = []
        for p, log in procs:
            with open(log) as f:
                text = "".join(line for line in f if not line.startswith("[Gloo]"))
            name = os.path.basename(log)
            report.append(f"--- {name} (exit code {p.returncode}; killed if negative) ---\n{text[-3000:]}")
        pytest.fail(f"a multihost worker failed or ran past {TIMEOUT_S}s:\n" + "\n".join(report), pytrace=False)


def _inputs(tmp) -> tuple[str, str, dict]:
    """A tiny random Llama (HF directory) and 16 preference pairs without reference log-probs."""
    from rpo.models import ModelConfig, param_shapes, save_pretrained

    spec = importlib.util.spec_from_file_location("train_tiny", os.path.join(ROOT, "configs", "train_tiny.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mc = ModelConfig(**dict(mod.get_config().model.random, num_layers=1))  # one layer compiles faster
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda shape: rng.normal(0.0, 0.1, shape).astype(np.float32), param_shapes(mc),
                          is_leaf=lambda x: isinstance(x, tuple))
    model_dir = str(tmp / "model")
    save_pretrained(mc, params, model_dir)
    with open(tmp / "pairs.jsonl", "w") as f:
        for _ in range(16):
            chosen = rng.integers(3, mc.vocab_size, int(rng.integers(3, 10))).tolist()
            rejected = list(chosen)
            rejected[1] = int(rng.integers(3, mc.vocab_size))
            prompt = rng.integers(3, mc.vocab_size, int(rng.integers(2, 6))).tolist()
            f.write(json.dumps({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}) + "\n")
    return model_dir, str(tmp / "pairs.jsonl"), params


def _flat(params) -> dict[str, np.ndarray]:
    """{path: flattened leaf}, as the worker reports params."""
    return {jax.tree_util.keystr(path): np.ravel(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Results of the two processes, of the one-process run, and both runs' directories."""
    tmp = tmp_path_factory.mktemp("multihost")
    model_dir, pairs, params = _inputs(tmp)
    two, one = str(tmp / "two_processes"), str(tmp / "one_process")
    os.makedirs(two)
    os.makedirs(one)
    address = f"127.0.0.1:{_free_port()}"
    procs = [_start([two, model_dir, pairs], 4, {"RPO_COORDINATOR": address, "RPO_NUM_PROCESSES": "2",
                                                 "RPO_PROCESS_ID": str(i)}) for i in range(2)]
    procs.append(_start([one, model_dir, pairs], 8, {}))
    _wait(procs)
    load = lambda d, i: json.load(open(os.path.join(d, f"result-{i}.json")))  # noqa: E731
    return {"pair": [load(two, 0), load(two, 1)], "single": load(one, 0), "two": two, "one": one,
            "before": _flat(params)}


def _jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_the_mesh_spans_two_processes(runs):
    for i, r in enumerate(runs["pair"]):
        assert (r["process_count"], r["devices"]) == (2, 8), i
        assert r["mesh_data_processes"] == [[0], [1]]  # data index 0 on process 0, 1 on process 1
        assert not r["params_fully_addressable"]  # the state lives on both processes' devices
    single = runs["single"]
    assert (single["process_count"], single["devices"], single["mesh_data_processes"]) == (1, 8, [[0], [0]])


def test_train_step_matches_one_process(runs):
    ref = {k: np.asarray(v) for k, v in runs["single"]["params"].items()}
    assert ref.keys() == runs["before"].keys()
    moved = max(np.max(np.abs(ref[k] - runs["before"][k])) for k in ref)
    assert moved > 1e-4  # the step changed the params
    want = _jsonl(os.path.join(runs["one"], "run", "metrics.jsonl"))
    got = _jsonl(os.path.join(runs["two"], "run", "metrics.jsonl"))
    assert len(got) == len(want) == 1  # one line per step: process 1 did not log
    for name in ("loss", "grad_norm", "rewards/margin", "logps/chosen", "pairs"):
        np.testing.assert_allclose(got[0][name], want[0][name], rtol=1e-5, atol=1e-6, err_msg=name)
    ref_logps = [[[r["ref_chosen_logp"], r["ref_rejected_logp"]] for r in
                  _jsonl(os.path.join(runs[d], "run", "train_pairs_with_ref.jsonl"))] for d in ("two", "one")]
    np.testing.assert_allclose(*ref_logps, rtol=1e-6)  # written by process 0 alone: 16 rows, not 32
    assert len(ref_logps[0]) == 16
    for i, r in enumerate(runs["pair"]):
        assert r["params"].keys() == ref.keys()
        diff = max(np.max(np.abs(np.asarray(r["params"][k]) - ref[k])) for k in ref)
        # Cross-process sums add in another order: agree to a small fraction of what the step moved.
        assert diff < 1e-5 and diff < 0.01 * moved, (i, diff, moved)


def test_generate_matches_one_process(runs):
    single = runs["single"]
    assert [len(per_prompt) for per_prompt in single["tokens"]] == [3] * 5
    assert all(len(t) == 20 for per_prompt in single["tokens"] for t in per_prompt)  # no EOS: max_new_tokens each
    for i, r in enumerate(runs["pair"]):
        assert r["tokens"] == single["tokens"], f"process {i}"
        for got, want in zip(r["logprobs"], single["logprobs"]):
            np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, err_msg=f"process {i}")


def test_process_zero_writes_and_every_process_checkpoints(runs):
    from rpo.models import load_pretrained

    pair, run = runs["pair"], os.path.join(runs["two"], "run")
    # rpo.files: process 0's content, readable by every process as soon as the write returns.
    assert [r["read_back"] for r in pair] == [{"writer": 0}, {"writer": 0}]
    names = sorted(os.listdir(run))
    assert len([n for n in names if n.startswith("events.out.tfevents.")]) == 1, names  # process 0's only
    assert not [n for n in names if ".tmp" in n or ".old" in n], names
    assert os.listdir(os.path.join(run, "checkpoints")) == ["1"]  # orbax, saved by both processes
    _, saved = load_pretrained(os.path.join(run, "final"))  # complete when run() returned
    flat = _flat(saved)
    assert flat.keys() == pair[0]["params"].keys()
    for k, leaf in flat.items():
        np.testing.assert_array_equal(leaf, np.asarray(pair[0]["params"][k], np.float32), err_msg=k)


# ---------------------------------------------------------------------------------------
# When initialize() starts jax.distributed
# ---------------------------------------------------------------------------------------

SLURM = {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env,plan", [
    ({}, None),
    ({"RPO_COORDINATOR": "10.0.0.1:1234", "RPO_NUM_PROCESSES": "4", "RPO_PROCESS_ID": "3"},
     {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}),
    ({"RPO_COORDINATOR": "10.0.0.1:1234", "RPO_NUM_PROCESSES": "1", "RPO_PROCESS_ID": "0"}, None),
    ({"RPO_DISTRIBUTED": "on"}, {}),
    ({"RPO_DISTRIBUTED": "off", "SLURM_NTASKS": "8", **SLURM}, None),
    ({"SLURM_NTASKS": "8", **SLURM}, {}),
    ({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "1", **SLURM}, None),  # a one-task step of a bigger job
    ({"SLURM_NTASKS": "1", **SLURM}, None),
    ({"SLURM_NTASKS": "8", "SLURM_JOB_ID": "42"}, None),  # the batch script itself, not an srun step
    ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
    ({"MEGASCALE_NUM_SLICES": "2"}, {}),
])
def test_launch_plan(env, plan):
    assert distributed.launch_plan(env) == plan


@pytest.mark.parametrize("env,needle", [
    ({"RPO_DISTRIBUTED": "yes"}, "RPO_DISTRIBUTED='yes'"),
    ({"RPO_COORDINATOR": "h:1", "RPO_NUM_PROCESSES": "2"}, "RPO_PROCESS_ID is not"),
    ({"RPO_COORDINATOR": "h:1", "RPO_NUM_PROCESSES": "two", "RPO_PROCESS_ID": "0"}, "RPO_NUM_PROCESSES='two'"),
    ({"RPO_COORDINATOR": "h:1", "RPO_NUM_PROCESSES": "2", "RPO_PROCESS_ID": "2"}, "RPO_PROCESS_ID=2"),
    ({"RPO_COORDINATOR": "h", "RPO_NUM_PROCESSES": "2", "RPO_PROCESS_ID": "0"}, "RPO_COORDINATOR='h'"),
    ({"SLURM_NTASKS": "x", **SLURM}, "SLURM_NTASKS='x'"),
])
def test_launch_plan_names_the_bad_variable(env, needle):
    with pytest.raises(ValueError, match=needle):
        distributed.launch_plan(env)


def test_one_process_is_main_and_writes_without_barriers(tmp_path):
    assert (distributed.process_index(), distributed.process_count(), distributed.is_main()) == (0, 1, True)
    distributed.sync("a no-op on one process")
    from rpo import files

    files.write_json(str(tmp_path / "a.json"), {"x": 1})
    assert json.load(open(tmp_path / "a.json")) == {"x": 1} and os.listdir(tmp_path) == ["a.json"]


def test_device_batch_on_one_process_is_the_packed_batch():
    """5 real rows in a batch of 8 in 2 micro-batches: padding rows where make_batch puts them."""
    from rpo import sharding
    from rpo import train as T

    rng = np.random.default_rng(1)
    rows = [{"prompt_ids": rng.integers(3, 60, 3).tolist(), "chosen_ids": rng.integers(3, 60, 4).tolist(),
             "rejected_ids": rng.integers(3, 60, 5).tolist(), "ref_chosen_logp": -1.0 * i, "ref_rejected_logp": -2.0}
            for i in range(5)]
    pack = dict(seq_len=16, pad_id=0, truncate=False)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    got = T.device_batch(rows, "pairs", 8, grad_accum=2, mesh=mesh, rules=sharding.DEFAULT_RULES, **pack)
    want = T.split_micro(T.make_batch(rows, "pairs", 8, **pack), 2)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)
    assert np.asarray(got["row_mask_B"]).tolist() == [[True] * 4, [True, False, False, False]]
