"""CoT-Self-Instruct (Yu et al. 2025): synthesize new training problems from a few seeds, keep the good ones.

  seeds (a task's train split or a JSONL file) -> two seeds per generation, of one category when seeds
  have categories -> the model writes a new question (and, for verifiable tasks, its answer) from a
  template -> parse (malformed: rejected with a reason) -> near-duplicates of a seed or of an earlier
  question: rejected -> the filter -> dataset.jsonl (kept) and rejected.jsonl (each with its reason)

synth.kind / synth.method pick the template family (rpo/data/templates/self_instruct/<method>_<kind>.txt,
or synth.template, a file of your own with {seed1} and {seed2}):
  verifiable, cot            reason, write a question, solve it; question and \\boxed{} answer between markers
  verifiable, self_instruct  the baseline: the question only, no reasoning; its label is the majority answer
  instruction, cot           list what the seeds share, plan, write one new prompt
  instruction, self_instruct the baseline: the prompt only

synth.filter:
  answer_consistency  sample K solutions with the task's own prompt; keep the question if the majority answer
                      equals the generated one (the task's own equivalence: a solution whose answer the task
                      scores equal to the generated answer votes for it), with synth.min_vote_share and
                      synth.ties ('reject' | 'first' | 'any')
  self_consistency    keep if the majority answer's share of the K votes is >= synth.self_consistency_threshold;
                      the majority answer is the label (the Self-Instruct baseline's only source of an answer)
  rip                 K responses per prompt scored by a reward model (synth.reward_model, an HF
                      sequence-classification directory) or the policy as a judge (judge template, "Score: N";
                      a judgement without a score counts as 0); keep if the lowest score is >= the
                      synth.rip_percentile-th percentile of the lowest scores over the batch
  none                parsing and near-duplicate removal only
Majority votes come from rpo.consistency (the jitted vote IRPO's evaluation uses), through rpo.filters.

Stages (workdir/...), resumable like rpo.irpo's (rpo.stages): a stage whose file exists is skipped; sampling
resumes at its first unwritten chunk:
  seeds.jsonl                  the seed pool
  init/train/final/            the warm start, when init.num_steps > 0 (arith only: see below)
  generate/prompts.jsonl       one synthesis prompt per generation (its two seeds)
  generate/part-*.jsonl        each generation, parsed (question, answer, reason)
  solve/part-*.jsonl           K solutions per candidate (answer- and self-consistency)
  respond/, judge/             K responses per candidate and their judgements (RIP with the policy as judge)
  dataset.jsonl                kept: uid, question, answer, category, seeds, and the filter's numbers
  rejected.jsonl               every other generation: its text, what was parsed, and the reason
  counts.json                  generations, kept, and the count of each rejection reason
With synth.then_irpo, rpo.irpo then runs in workdir/irpo with dataset.jsonl as its training prompts
(task.train_file) and the synthesizing model as M_0.

Warm start (init.num_steps > 0, the laptop demo on the arith task): a random model cannot follow a template, so
it is first trained on the task's gold solutions plus demonstrations of the synthesis format, each a fresh
problem the task's generator writes (task.new_problem) in the format the template asks for.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random

import ml_collections
import numpy as np
from absl import logging

from rpo import configlib, files, filters, stages

KINDS = ("verifiable", "instruction")
METHODS = ("cot", "self_instruct")
FILTERS = ("answer_consistency", "self_consistency", "rip", "none")
# The end marker of each template family: sampling stops there.
END_MARKER = {("verifiable", "cot"): "[Final Answer to New Question End]",
              ("verifiable", "self_instruct"): "[New Question End]",
              ("instruction", "cot"): "[New Prompt End]", ("instruction", "self_instruct"): "[New Prompt End]"}


def check_config(cfg) -> None:
    s = cfg.synth

    def bad(field, why):
        configlib.bad(f"synth.{field}", why)

    if s.kind not in KINDS:
        bad("kind", f"{s.kind!r} is not one of {KINDS}")
    if s.method not in METHODS:
        bad("method", f"{s.method!r} is not one of {METHODS}")
    if s.filter not in FILTERS:
        bad("filter", f"{s.filter!r} is not one of {FILTERS}")
    for field in ("num_generations", "max_new_tokens", "chunk_prompts", "num_solutions", "solve_max_new_tokens"):
        if not isinstance(s[field], int) or s[field] < 1:
            bad(field, f"must be a positive int, got {s[field]!r}")
    if s.kind == "instruction" and s.filter in ("answer_consistency", "self_consistency"):
        bad("filter", f"{s.filter!r} needs answers to vote on: instructions have none (use 'rip' or 'none')")
    if s.filter == "answer_consistency" and s.method == "self_instruct":
        bad("filter", "'answer_consistency' needs a generated answer: the self_instruct template writes none "
                      "(use 'self_consistency', which labels by the majority)")
    if s.kind == "verifiable" and s.method == "self_instruct" and s.filter in ("rip", "none"):
        bad("filter", f"{s.filter!r} leaves the self_instruct questions without answers: use 'self_consistency'")
    for field in ("min_vote_share", "self_consistency_threshold", "dedup_threshold"):
        if not 0.0 <= float(s[field]) <= 1.0:
            bad(field, f"must be in [0, 1], got {s[field]!r}")
    if not 0.0 <= float(s.rip_percentile) <= 100.0:
        bad("rip_percentile", f"must be in [0, 100], got {s.rip_percentile!r}")
    if s.filter == "answer_consistency" and s.num_solutions < 2:
        bad("num_solutions", "a majority of one solution is that solution: use >= 2")
    if not cfg.model.path and not cfg.init.num_steps:
        raise configlib.ConfigError("config field init.num_steps: 0 (no warm start) needs model.path: a random model "
                         "cannot follow a template")


# ---------------------------------------------------------------------------------------
# Seeds and synthesis prompts
# ---------------------------------------------------------------------------------------


def load_seeds(cfg, task) -> list[dict]:
    """The seed pool: synth.seeds_file (JSONL: "question", optional "answer", "category", "uid") or the task's
    train split; the first synth.max_seeds of them (0: all)."""
    s = cfg.synth
    if s.seeds_file:
        if not os.path.isfile(s.seeds_file):
            raise configlib.ConfigError(f"config field synth.seeds_file: {s.seeds_file} does not exist")
        seeds = []
        for n, obj in files.jsonl_rows(s.seeds_file):
            if not isinstance(obj.get("question"), str) or not obj["question"].strip():
                raise ValueError(f"{s.seeds_file}:{n}: no 'question' string")
            seeds.append({"uid": str(obj.get("uid", f"seed/{n}")), "question": obj["question"],
                          "answer": str(obj.get("answer", "")), "category": str(obj.get("category", ""))})
    else:
        seeds = [{"uid": ex.uid, "question": ex.question, "answer": ex.answer, "category": ex.category}
                 for ex in task.load("train")]
    if s.max_seeds:
        seeds = seeds[: s.max_seeds]
    if len(seeds) < 2:
        raise configlib.ConfigError(f"config field synth.seeds_file / task: {len(seeds)} seed(s); a generation shows two")
    return seeds


def seed_pairs(seeds: list[dict], count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """count pairs of distinct seed indices, both of one category when the seeds have categories (a seed alone in
    its category is never drawn). The first seed is uniform over the usable seeds, the second uniform over the
    rest of its category."""
    groups = collections.defaultdict(list)
    for i, seed in enumerate(seeds):
        groups[seed["category"]].append(i)
    usable = [i for members in groups.values() if len(members) >= 2 for i in members]
    if not usable:
        raise ValueError("seeds: no category has two seeds, so no pair of one category can be shown")
    pairs = []
    for _ in range(count):
        a = usable[rng.integers(len(usable))]
        members = [i for i in groups[seeds[a]["category"]] if i != a]
        pairs.append((a, members[rng.integers(len(members))]))
    return pairs


def parse_generation(text: str, kind: str, method: str) -> filters.Parsed:
    """A generation parsed for its template family. A reasoning model's <think>...</think> block is dropped first:
    draft markers in it are not its answer."""
    text = text.rpartition("</think>")[2]
    if kind == "instruction":
        return filters.parse_instruction(text)
    return filters.parse_verifiable(text, with_answer=method == "cot")


def template_name(cfg) -> str:
    return cfg.synth.template or f"{cfg.synth.method}_{cfg.synth.kind}"


def demo_response(kind: str, method: str, question: str, solution: str, answer: str) -> str:
    """What a generation in the template's format looks like for a problem with a known solution (the warm
    start's demonstrations; rpo.filters parses it back)."""
    if kind != "verifiable":
        raise ValueError("the warm start demonstrates verifiable problems only (synth.kind='verifiable')")
    q = f"[New Question Begin]{question}[New Question End]"
    if method == "self_instruct":
        return q
    return (f"{solution}\n{q}\n[Final Answer to New Question Begin]\\boxed{{{answer}}}"
            "[Final Answer to New Question End]")


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def run(cfg, workdir: str) -> dict:
    """The whole synthesis (and, with synth.then_irpo, the IRPO run on its output); returns counts.json."""
    from rpo.data import get_task

    check_config(cfg)
    s = cfg.synth
    os.makedirs(workdir, exist_ok=True)
    stages.check_same_run(cfg, workdir, record=True, name="self_instruct_config.json")
    task = get_task(cfg.task)
    tokenizer = stages.task_tokenizer(cfg, task)
    stages.context_length(cfg)  # checks seq_len (warm-start rows) against the model
    context = stages.model_context(cfg)[0]  # prompt + new tokens must fit when sampling
    models = stages.Models(cfg)
    template = filters.load_template(template_name(cfg))

    seeds = stages.artifact(os.path.join(workdir, "seeds.jsonl"), lambda: load_seeds(cfg, task))
    stages.save_tokenizer(tokenizer, os.path.join(workdir, "tokenizer"))

    def synthesis_prompt(a: dict, b: dict) -> str:
        return stages.chat_wrap(cfg, tokenizer, template.format(seed1=a["question"], seed2=b["question"]))

    model_path = cfg.model.path
    if cfg.init.num_steps:
        model_path = _warm_start(cfg, task, tokenizer, seeds, synthesis_prompt, models, workdir)

    # Generation.
    gen_dir = os.path.join(workdir, "generate")

    def synthesis_prompts() -> list[dict]:
        pairs = seed_pairs(seeds, s.num_generations, np.random.default_rng([cfg.seed, 2]))
        rows = []
        for g, (a, b) in enumerate(pairs):
            text = synthesis_prompt(seeds[a], seeds[b])
            rows.append({"uid": f"synth/{g}", "seeds": [seeds[a]["uid"], seeds[b]["uid"]],
                         "category": seeds[a]["category"], "prompt": text,
                         "prompt_ids": stages.encode(tokenizer, text, cfg.data.add_bos)})
        return rows

    prompts = stages.artifact(os.path.join(gen_dir, "prompts.jsonl"), synthesis_prompts)
    fits = [r for r in prompts if len(r["prompt_ids"]) + s.max_new_tokens <= context]

    def parsed_fields(texts, rows):
        return [dataclasses.asdict(parse_generation(t, s.kind, s.method)) for t in texts]

    gens = stages.sample_and_score(
        models, model_path, None, tokenizer, fits, os.path.join(gen_dir, "samples"), n=1, temperature=s.temperature,
        top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens, chunk=s.chunk_prompts, seed=cfg.seed + 11,
        desc="self-instruct generate", stop=[END_MARKER[(s.kind, s.method)]], score=parsed_fields)
    by_uid = {g["uid"]: g for g in gens}

    rejected, candidates = [], []
    for r in prompts:
        g = by_uid.get(r["uid"])
        item = {"uid": r["uid"], "seeds": r["seeds"], "category": r["category"]}
        if g is None:
            rejected.append({**item, "reason": "prompt_too_long"})
        elif g["reason"] is not None:
            reason = "cut_off" if g["finish_reason"] == "length" else g["reason"]
            rejected.append({**item, "generation": g["text"], "reason": reason})
        else:
            candidates.append({**item, "generation": g["text"], "question": g["question"], "answer": g["answer"]})

    # Near-duplicates of a seed or of an earlier candidate.
    dup = filters.near_duplicates([c["question"] for c in candidates], [sd["question"] for sd in seeds],
                                  threshold=s.dedup_threshold)
    kept = []
    for c, why in zip(candidates, dup):
        if why:
            reason, _, of = why.partition(":")
            rejected.append({**c, "reason": reason, "duplicate": of})
        else:
            kept.append(c)
    candidates = kept

    # The filter.
    if candidates and s.filter in ("answer_consistency", "self_consistency"):
        candidates, more = _consistency_filter(cfg, task, tokenizer, models, model_path, candidates, workdir, context)
        rejected += more
    elif candidates and s.filter == "rip":
        candidates, more = _rip_filter(cfg, tokenizer, models, model_path, candidates, workdir, context)
        rejected += more

    dataset = [{k: c[k] for k in c if k != "generation"} for c in candidates]
    files.write_jsonl(os.path.join(workdir, "dataset.jsonl"), dataset)
    files.write_jsonl(os.path.join(workdir, "rejected.jsonl"), sorted(rejected, key=lambda r: _order(r["uid"])))
    counts = {"generations": len(prompts), "kept": len(dataset), "rejected": len(rejected),
              "reasons": dict(sorted(collections.Counter(r["reason"] for r in rejected).items())),
              "filter": s.filter, "template": template_name(cfg), "seeds": len(seeds)}
    files.write_json(os.path.join(workdir, "counts.json"), counts)
    logging.info(f"{len(dataset)} of {len(prompts)} generations kept -> {workdir}/dataset.jsonl; rejected: "
                 + (", ".join(f"{k} {v}" for k, v in counts["reasons"].items()) or "none"))

    if s.then_irpo:
        from rpo import irpo

        if not dataset:
            raise RuntimeError(f"synth.then_irpo: {workdir}/dataset.jsonl is empty, nothing to train on")
        icfg = ml_collections.ConfigDict(cfg.to_dict())
        icfg.task.train_file = os.path.join(workdir, "dataset.jsonl")
        icfg.model.path = model_path
        icfg.init.num_steps = 0
        irpo.run(icfg, os.path.join(workdir, "irpo"))
    return counts


def _order(uid: str) -> int:
    return int(uid.rsplit("/", 1)[1])


def _warm_start(cfg, task, tokenizer, seeds, synthesis_prompt, models, workdir) -> str:
    """M_0 for the laptop demo: SFT on the task's gold solutions plus synthesis-format demonstrations."""
    if not hasattr(task, "new_problem"):
        raise configlib.ConfigError(f"config field init.num_steps: the warm start writes demonstrations with task.new_problem, "
                         f"which task {task.name} does not have; set model.path to an instruction-following model")
    path = os.path.join(workdir, "init", "sft.jsonl")

    def demos() -> list[dict]:
        rows = []
        for ex in task.load("train"):
            prompt = stages.prompt_text(cfg, task, tokenizer, ex)
            rows.append({"prompt_ids": stages.encode(tokenizer, prompt, cfg.data.add_bos),
                         "response_ids": stages.encode(tokenizer, task.target(ex), False) + [tokenizer.eos_token_id]})
        rng = random.Random(f"{cfg.seed}/demos")
        pairs = seed_pairs(seeds, cfg.init.num_demos, np.random.default_rng([cfg.seed, 3]))
        for a, b in pairs:
            new = task.new_problem(rng)
            response = demo_response(cfg.synth.kind, cfg.synth.method, new.question, new.solution, new.answer)
            rows.append({"prompt_ids": stages.encode(tokenizer, synthesis_prompt(seeds[a], seeds[b]), cfg.data.add_bos),
                         "response_ids": stages.encode(tokenizer, response, False) + [tokenizer.eos_token_id]})
        too_long = [n for n, r in enumerate(rows) if len(r["prompt_ids"]) + len(r["response_ids"]) > cfg.seq_len]
        if too_long:
            raise configlib.ConfigError(f"config field seq_len={cfg.seq_len}: {len(too_long)} warm-start rows are longer "
                             f"(row {too_long[0]} of {path}); raise it or shorten synth.template")
        rng.shuffle(rows)
        return rows

    stages.artifact(path, demos, read=False)
    return stages.train_phase(cfg, cfg.init, models, model_path=cfg.model.path, train_path=path, kind="sft",
                              out_dir=os.path.join(workdir, "init", "train"), tokenizer=tokenizer,
                              desc="warm start (gold + synthesis demos)")


def _consistency_filter(cfg, task, tokenizer, models, model_path, candidates, workdir, context):
    """K solutions per candidate with the task's prompt; answer- or self-consistency on their answers."""
    from rpo.data import Example

    s = cfg.synth
    scorable, rejected = [], []
    for c in candidates:
        if c["answer"] is not None:
            try:  # the task must be able to score against the generated answer (e.g. GSM8K: a number)
                task.score([""], [Example(c["uid"], c["question"], c["answer"])])
            except ValueError:
                rejected.append({**c, "reason": "answer_not_for_task"})
                continue
        scorable.append(c)
    rows = _with_prompts(cfg, tokenizer, scorable, context, rejected, lambda c: stages.prompt_text(
        cfg, task, tokenizer, Example(c["uid"], c["question"], c["answer"] or "")))

    def answers_voted(texts, block):
        """Each solution's answer; under answer-consistency one the task scores equal to the generated answer
        votes as the generated answer itself (so e.g. 1/2 and 0.5 count as one answer)."""
        if s.filter != "answer_consistency":
            return [{"answer": task.answer(text)} for text in texts]
        answers, same = task.score(texts, [Example(r["uid"], r["question"], r["answer"]) for r in block])
        return [{"answer": r["answer"] if ok else a} for a, ok, r in zip(answers, same, block)]

    k = s.num_solutions
    sols = stages.sample_and_score(
        models, model_path, task, tokenizer, rows, os.path.join(workdir, "solve"), n=k,
        temperature=s.solve_temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.solve_max_new_tokens,
        chunk=s.chunk_prompts, seed=cfg.seed + 13, desc=f"self-instruct solve x{k}", score=answers_voted)
    solutions = [[x["answer"] for x in sols[i * k: (i + 1) * k]] for i in range(len(rows))]
    if s.filter == "answer_consistency":
        res = filters.answer_consistency([r["answer"] for r in rows], solutions, min_share=s.min_vote_share,
                                         ties=s.ties)
    else:
        res = filters.self_consistency(solutions, threshold=s.self_consistency_threshold, ties=s.ties)
    return _split(rows, res, rejected, label=s.filter == "self_consistency")


def _rip_filter(cfg, tokenizer, models, model_path, candidates, workdir, context):
    """K responses per prompt, scored by the reward model or the policy as judge; RIP on the lowest score."""
    s = cfg.synth
    rejected = []
    rows = _with_prompts(cfg, tokenizer, candidates, context, rejected,
                         lambda c: stages.chat_wrap(cfg, tokenizer, c["question"]))
    k = s.num_solutions
    none = lambda texts, block: [{} for _ in texts]  # noqa: E731
    responses = stages.sample_and_score(
        models, model_path, None, tokenizer, rows, os.path.join(workdir, "respond"), n=k,
        temperature=s.solve_temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.solve_max_new_tokens,
        chunk=s.chunk_prompts, seed=stages.sampling_seed(cfg.seed, "respond"), desc=f"self-instruct respond x{k}",
        stop=[], score=none)
    texts = [[x["text"] for x in responses[i * k: (i + 1) * k]] for i in range(len(rows))]
    if s.reward_model:
        scores = _reward_model_scores(cfg, [r["question"] for r in rows], texts)
    else:
        scores = _judge_scores(cfg, tokenizer, models, model_path, rows, texts, workdir, context)
    return _split(rows, filters.rip(scores, percentile=s.rip_percentile), rejected)


def _with_prompts(cfg, tokenizer, candidates, context, rejected, prompt_of) -> list[dict]:
    """The candidates with the ids of prompt_of(candidate), the prompt the filter samples K times from; one whose
    prompt leaves no room for synth.solve_max_new_tokens in the context goes to `rejected` (question_too_long)."""
    rows = []
    for c in candidates:
        ids = stages.encode(tokenizer, prompt_of(c), cfg.data.add_bos)
        if len(ids) + cfg.synth.solve_max_new_tokens > context:
            rejected.append({**c, "reason": "question_too_long"})
        else:
            rows.append({**c, "prompt_ids": ids})
    return rows


def _split(rows, res, rejected, *, label: bool = False) -> tuple[list[dict], list[dict]]:
    """(kept, rejected): each row with the filter's numbers for it; a rejected one with its reason. With `label`
    (self-consistency), a row without a generated answer takes the majority answer as its label."""
    kept = []
    for i, r in enumerate(rows):
        item = {k: v for k, v in r.items() if k != "prompt_ids"}
        item.update({k: v for k, v in res.row(i).items() if k not in ("keep", "reason")})
        if label and item["answer"] is None:
            item["answer"] = item["majority"]  # the Self-Instruct baseline's label
        if res.keep[i]:
            kept.append(item)
        else:
            rejected.append({**item, "reason": res.reason[i]})
    return kept, rejected


def _reward_model_scores(cfg, prompts: list[str], texts: list[list[str]]) -> np.ndarray:
    from rpo.models import reward
    from rpo.models.hf import load_tokenizer

    s = cfg.synth
    model_config, params, _ = reward.load_reward_model(s.reward_model, dtype=cfg.model.dtype)
    tok = load_tokenizer(s.reward_model)
    flat_p = [p for p, per in zip(prompts, texts) for _ in per]
    flat_r = [t for per in texts for t in per]
    scores = reward.score_texts(model_config, params, tok, flat_p, flat_r, batch_size=s.reward_batch_size,
                                max_len=cfg.seq_len, chat_template=cfg.data.chat_template)
    return np.asarray(scores, np.float64).reshape(len(prompts), -1)


def _judge_scores(cfg, tokenizer, models, model_path, rows, texts, workdir, context) -> np.ndarray:
    """The policy as a judge: one greedy judgement per response; its "Score: N" (none: 0)."""
    s = cfg.synth
    judge = filters.load_template(s.judge_template or "judge")
    room = context - s.judge_max_new_tokens

    def judge_ids(question: str, response: str) -> list[int]:
        text = stages.chat_wrap(cfg, tokenizer, judge.format(prompt=question, response=response))
        return stages.encode(tokenizer, text, cfg.data.add_bos)

    jrows = []
    for i, r in enumerate(rows):
        for j, t in enumerate(texts[i]):
            ids = judge_ids(r["question"], t)
            if len(ids) > room:  # a long response is judged on its beginning, cut to fit the context
                resp = tokenizer.encode(t, add_special_tokens=False)
                ids = judge_ids(r["question"], tokenizer.decode(resp[: max(0, len(resp) - (len(ids) - room))]))
            jrows.append({"uid": f"{r['uid']}/{j}", "prompt_ids": ids[:room]})
    out = stages.sample_and_score(
        models, model_path, None, tokenizer, jrows, os.path.join(workdir, "judge"), n=1, temperature=0.0,
        top_p=1.0, top_k=0, max_new_tokens=s.judge_max_new_tokens, chunk=s.chunk_prompts, seed=cfg.seed + 19,
        desc="self-instruct judge", stop=[],
        score=lambda ts, block: [{"score": filters.judge_score(t)} for t in ts])
    return np.asarray([0.0 if o["score"] is None else o["score"] for o in out], np.float64).reshape(len(rows), -1)
