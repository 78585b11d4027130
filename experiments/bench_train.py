"""Train-step throughput: rpo (JAX) DPO + NLL step vs TRL's DPOTrainer (PyTorch), on CPU.

Both sides: the same random Llama-style model (~20M params, saved by rpo and loaded by
transformers, so the weights are identical), the same batch (the one TRL's own collator
builds: chosen rows then rejected rows, right-padded), reference log-probs precomputed
(TRL: precompute_ref_log_probs=True; rpo: stored in the batch), float32, AdamW with global
norm clipping 1.0. TRL's loss is loss_type=["sigmoid", "sft"], loss_weights=[1, alpha]:
TRL 1.13 has no `rpo_alpha` field any more; its "sft" term is the token-mean NLL of the
chosen completions over the whole batch, which equals IRPO's per-pair length-normalised NLL
only when all winners have the same length (true of this batch; the script checks the two
step-0 losses agree).

Timed: one optimizer step on the same batch, repeated; the median of --steps rounds after
--warmup rounds, each round running every implementation once (order rotating), so that
load from other processes hits all alike (rpo: the jitted, donated train step incl. AdamW,
to block_until_ready; TRL: trainer.training_step (forward, TRL's loss, backward) +
clip_grad_norm_ + torch AdamW.step).
Tokens/s counts real (non-pad) tokens of both sides of every pair.

Run (CPU; TRL lives in its own venv, see experiments/requirements-bench.txt):
  cd /work/main && flock /tmp/rpo-bench.lock env PYTHONPATH=. .venv-bench/bin/python experiments/bench_train.py

--gpu: the FLOP count and MFU formula for a GPU run are printed; the GPU part was not run
(see experiments/results/bench_train.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time


def _flops_per_step(n_params_non_embed, n_embed_out, layers, seq, d, tokens):
    """Training FLOPs of one step: 6 * (non-embedding params + output projection) per token,
    plus attention scores/values 6 * 2 * L * T * D per token (causal: half, so 6 * L * T * D)."""
    return 6 * (n_params_non_embed + n_embed_out) * tokens + 6 * layers * seq * d * tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=191)  # + EOS = 192; 256 tokens per row
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=1024)
    ap.add_argument("--chunk", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="print the GPU FLOP/MFU formula (not run on CPU)")
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from rpo import sharding
    from rpo import train as T
    from rpo.models import ModelConfig, init_params, save_pretrained

    mc = ModelConfig(
        model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
        num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
    )
    print(f"model: {mc.num_params / 1e6:.1f}M params (vocab {args.vocab}, D {args.hidden}, L {args.layers})", flush=True)
    if args.gpu:
        d, v = args.hidden, args.vocab
        non_embed = mc.num_params - 2 * v * d
        tokens = 2 * args.pairs * (args.prompt_len + args.response_len + 1)
        flops = _flops_per_step(non_embed, v * d, args.layers, args.prompt_len + args.response_len + 1, d, tokens)
        print(f"GPU: FLOPs/step = {flops:.3e}; MFU = FLOPs/step / (step time * peak FLOP/s). Not run here.")

    params = jax.device_get(init_params(mc, jax.random.PRNGKey(0)))  # host copy: the step donates device state
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    save_pretrained(mc, params, os.path.join(tmp, "model"))

    # ---- the batch, built by TRL's own pipeline ------------------------------------------
    import datasets
    import transformers
    import trl
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"t{i}": i for i in range(3, args.vocab)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                                     bos_token="<s>")
    rng = np.random.default_rng(0)
    words = lambda n: " ".join(f"t{i}" for i in rng.integers(3, args.vocab, n))  # noqa: E731
    rows = []
    for _ in range(args.pairs):
        chosen = rng.integers(3, args.vocab, args.response_len)
        rejected = chosen.copy()
        rejected[args.response_len // 2:] = rng.integers(3, args.vocab, args.response_len - args.response_len // 2)
        rows.append({"prompt": words(args.prompt_len), "chosen": " " + " ".join(f"t{i}" for i in chosen),
                     "rejected": " " + " ".join(f"t{i}" for i in rejected)})
    dataset = datasets.Dataset.from_list(rows)

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "model"), dtype=torch.float32)
    dpo_args = trl.DPOConfig(
        output_dir=os.path.join(tmp, "trl"), per_device_train_batch_size=args.pairs, precompute_ref_log_probs=True,
        loss_type=["sigmoid", "sft"], loss_weights=[1.0, args.alpha], beta=args.beta, max_length=None,
        report_to=[], use_cpu=True, bf16=False, fp16=False, learning_rate=1e-6, max_grad_norm=1.0,
        weight_decay=0.0, logging_steps=10**6, save_strategy="no", dataloader_drop_last=False,
    )
    trainer = trl.DPOTrainer(model=torch_model, args=dpo_args, train_dataset=dataset, processing_class=tokenizer)
    inputs = next(iter(trainer.get_train_dataloader()))
    inputs = {k: v.to("cpu") for k, v in inputs.items()}
    ids = inputs["input_ids"].numpy()
    b2, t = ids.shape
    b = b2 // 2
    n_tokens = int(inputs["attention_mask"].sum())
    print(f"batch: {b} pairs x 2 sides x {t} tokens ({n_tokens} real tokens)", flush=True)

    # ---- rpo (JAX) -----------------------------------------------------------------------
    def side(x):  # TRL rows are [chosen_0..b-1, rejected_0..b-1] -> [B, P, T]
        return np.stack([x[:b], x[b:]], axis=1)

    mask = side(inputs["attention_mask"].numpy().astype(bool))
    batch = {
        "tokens_BPT": side(ids).astype(np.int32),
        "positions_BPT": (np.cumsum(mask, -1) - 1).clip(0).astype(np.int32) * mask,
        "mask_BPT": mask,
        "loss_mask_BPT": side(inputs["completion_mask"].numpy().astype(bool)),
        "ref_logps_BP": np.stack([inputs["ref_chosen_logps"].numpy(), inputs["ref_rejected_logps"].numpy()], 1)
        .astype(np.float32),
        "row_mask_B": np.ones(b, bool),
    }
    batch = T.split_micro(batch, 1)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
    import train_tiny

    # Each implementation is a closure running one step; the rounds interleave them so that
    # load from other processes on the machine hits every implementation alike.
    impls = {}
    for chunk in args.chunk:
        cfg = train_tiny.get_config()
        cfg.loss.kind, cfg.loss.alpha, cfg.loss.beta, cfg.loss.chunk_size = "dpo_nll", args.alpha, args.beta, chunk
        cfg.batch_size, cfg.grad_accum, cfg.remat = b, 1, False
        cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule, cfg.optim.weight_decay = 1e-6, 0, "constant", 0.0
        mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        opt = T.make_optimizer(cfg.optim, 1000)
        step = T.make_train_step(mc, cfg, opt, mesh, sharding.DEFAULT_RULES, batch)
        holder = {"state": jax.device_put(T.init_state(params, opt), T.state_shardings(mc, opt, mesh, sharding.DEFAULT_RULES))}

        def jax_step(step=step, holder=holder):
            holder["state"], m = step(holder["state"], batch)
            return float(jax.block_until_ready(m)["loss"])

        impls[f"rpo JAX (chunk {chunk})"] = jax_step

    if not args.skip_trl:
        model = trainer.model
        model.train()
        trainer.current_gradient_accumulation_steps = 1  # normally set inside Trainer's train loop
        torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)

        def trl_step():
            loss = trainer.training_step(model, inputs)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            torch_opt.step()
            torch_opt.zero_grad(set_to_none=True)
            return float(loss)

        impls["TRL DPOTrainer"] = trl_step

    times = {name: [] for name in impls}
    loss0 = {}
    for r in range(args.warmup + args.steps):
        names = list(impls)
        names = names[r % len(names):] + names[: r % len(names)]
        for name in names:
            t0 = time.perf_counter()
            loss = impls[name]()
            dt = time.perf_counter() - t0
            loss0.setdefault(name, loss)
            if r >= args.warmup:
                times[name].append(dt)
        print(f"round {r}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in impls if times[n]), flush=True)
    results = [(name, statistics.median(times[name]), loss0[name]) for name in impls]

    base = results[-1][1] if not args.skip_trl else None
    print()
    print(f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}; threads {args.threads}")
    print("| implementation | ms/step (median) | tokens/s | speed-up vs TRL | step-0 loss |")
    print("|---|---|---|---|---|")
    for name, med, loss0 in results:
        speed = f"{base / med:.2f}x" if base else "-"
        print(f"| {name} | {med * 1e3:.0f} | {n_tokens / med:,.0f} | {speed} | {loss0:.6f} |")


if __name__ == "__main__":
    main()
