"""CoT-Self-Instruct on the synthetic arithmetic task, on a laptop CPU, then Iterative RPO on what it kept.

  python -m rpo.main --config=configs/self_instruct_tiny.py                 # synthesize + filter
  python -m rpo.main --config=configs/self_instruct_tiny.py:irpo            # ... then IRPO on the kept problems
  python -m rpo.main --config=configs/self_instruct_tiny.py:filter=self_consistency,method=self_instruct

A random model cannot follow a template, so M_0 is first trained (init) on the task's gold solutions plus
demonstrations of the synthesis format: two seed problems in configs/templates/self_instruct_arith.txt, then a
fresh problem from the task's generator written as CoT-Self-Instruct asks (its solution, the question between
[New Question Begin]/[New Question End], the \\boxed{} answer between the final-answer markers). The model then
writes new problems from seed pairs it has not seen; parsing, near-duplicate removal and Answer-Consistency
(K = 8 solutions by the same model) decide which are kept. Outputs: <workdir>/dataset.jsonl, rejected.jsonl,
counts.json (rpo/self_instruct.py describes every file).

Variants (comma-separated): irpo (then 2 IRPO iterations on dataset.jsonl, in <workdir>/irpo),
method=cot|self_instruct, filter=answer_consistency|self_consistency|none, quick (seconds, for tests),
workdir=<dir>. Model, training and IRPO fields are configs/arith_tiny.py's, with a longer context.
"""

from __future__ import annotations

import os

import ml_collections

from rpo import configlib
from rpo.files import load_module

HERE = os.path.dirname(os.path.abspath(__file__))




def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = configlib.variants(arg, ("quick", "filter", "irpo", "method", "workdir"), "configs/self_instruct_tiny.py")
    arith_tiny = load_module(os.path.join(HERE, "arith_tiny.py"))  # config files are not a package
    c = arith_tiny.get_config("quick" if "quick" in opts else None)
    c.mode = "self_instruct"
    c.workdir = opts.get("workdir", "runs/self_instruct_tiny")
    c.model.path = ""  # a model of its own, warm-started from random weights (below)
    c.model.random.max_position_embeddings = 512
    # Easier problems than arith_tiny's (values <= 10, 1-2 steps, sums and differences), with gold solutions in
    # the model's own style: the model that writes problems must also solve them well enough for
    # Answer-Consistency to mean something.
    c.task.update(style="equations", ops="+-")
    if "quick" not in opts:  # quick keeps arith_tiny:quick's one-step sums
        c.task.update(max_value=10, min_steps=1, max_steps=2, num_train=20000, num_test=200)
    c.select.update(every=0, heldout=0)  # each iteration keeps its last step
    c.seq_len = 384  # the longest warm-start row (two seeds + a demonstration) is 366 characters
    method = opts.get("method", "cot")
    c.synth = ml_collections.ConfigDict(dict(
        kind="verifiable", method=method,
        template=os.path.join(HERE, "templates", "self_instruct_arith.txt"),  # '' = rpo's <method>_<kind>.txt
        judge_template="",  # RIP with the policy as judge; '' = rpo's judge.txt
        seeds_file="",  # '' = the task's train split
        max_seeds=64,  # a few seeds: the generations must be new problems, not recalled ones
        num_generations=256, temperature=0.8, top_p=1.0, top_k=0, max_new_tokens=224, chunk_prompts=128,
        filter=opts.get("filter", "answer_consistency" if method == "cot" else "self_consistency"),
        num_solutions=8, solve_temperature=0.8, solve_max_new_tokens=48,
        min_vote_share=0.0, ties="reject",  # answer-consistency: a tie for the top rejects
        self_consistency_threshold=0.5,
        rip_percentile=50.0, reward_model="", reward_batch_size=16, judge_max_new_tokens=16,
        dedup_threshold=0.7,  # ROUGE-L F1 against the seeds and earlier kept questions
        then_irpo="irpo" in opts,
    ))
    # M_0: gold solutions (20k rows) plus num_demos synthesis demonstrations.
    c.init.update(num_steps=600, batch_size=16)
    if "quick" not in opts:  # (quick keeps arith_tiny:quick's)
        c.init.optim.update(lr=3e-3, warmup_steps=20)
    c.init.num_demos = 4000
    c.irpo.update(iterations=2, prompts_per_iteration=0)

    if "quick" in opts:
        c.seq_len = 320
        # 64 generations, and a tie that includes the generated answer keeps it: a half-trained model still
        # leaves a few problems for the IRPO stage of the chain.
        c.synth.update(max_seeds=16, num_generations=64, max_new_tokens=200, num_solutions=4, chunk_prompts=64,
                       solve_max_new_tokens=32, ties="any")
        c.init.update(num_steps=200, batch_size=8)
        c.init.num_demos = 256
        c.irpo.iterations = 1
    return c
