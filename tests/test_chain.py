"""The paper's two protocols as chained runs (rpo.chain, through rpo.main's self_instruct job):
CoT-Self-Instruct -> filter -> GRPO (configs/self_instruct_grpo_tiny.py) and CoT-Self-Instruct -> RIP -> reward-model
DPO (configs/self_instruct_rm_dpo_tiny.py).

A random model cannot write in a synthesis template, so the generations are given as the generation stage's own
artifacts (generate/prompts.jsonl and generate/samples/part-00000.jsonl, in the format rpo.stages.sample_and_score
writes, parsed by rpo.self_instruct's own parser); every stage after them runs: parsing, near-duplicate removal,
the filter (RIP with a random transformers reward model; 'none' for the verifiable chain, whose filters
test_self_instruct.py covers), then the method on exactly the kept prompts, from the synthesising model."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from rpo import chain, main, stages
from rpo import self_instruct as si
from rpo.files import load_module, write_jsonl

# Its module-scoped fixtures are costly: all of its tests go to one xdist worker (launch.sh: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("chain")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERIFIABLE = ["97 -88 = 9. 9 +5 = 14.\n[New Question Begin]97 -88 +5[New Question End]\n"
              "[Final Answer to New Question Begin]\\boxed{14}[Final Answer to New Question End]",
              "[New Question Begin]60 +31[New Question End]\n[Final Answer to New Question Begin]\\boxed{91}"
              "[Final Answer to New Question End]",
              "no markers at all",  # rejected by the parser
              "[New Question Begin]50 -27 -3[New Question End]\n[Final Answer to New Question Begin]\\boxed{20}"
              "[Final Answer to New Question End]"]
INSTRUCTIONS = ["[New Prompt Begin]Write a poem about maps.[New Prompt End]",
                "[New Prompt Begin]Name three teas.[New Prompt End]", "[New Prompt Begin]Describe rain.[New Prompt End]",
                "[New Prompt Begin]Plan a walk.[New Prompt End]", "[New Prompt Begin][New Prompt End]",  # empty
                "[New Prompt Begin]Sing of snow.[New Prompt End]", "[New Prompt Begin]Count the stars.[New Prompt End]"]


def _jsonl(path):
    return [json.loads(line) for line in open(path) if line.strip()]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A random model of the quick config's shape (as in test_grpo.py and test_rm_dpo.py, so that a worker running
    them compiles once), with the character tokenizer."""
    import jax

    import rpo.models as M
    from rpo.data.synthetic import char_tokenizer
    from rpo.models.config import ModelConfig
    from rpo.models.decoder import init_params

    path = str(tmp_path_factory.mktemp("chain") / "policy")
    arith = load_module(os.path.join(ROOT, "configs", "arith_tiny.py")).get_config("quick")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in arith.model.random.items()}
    M.save_pretrained(ModelConfig(**fields), init_params(ModelConfig(**fields), jax.random.PRNGKey(7)), path)
    char_tokenizer().save_pretrained(path)
    return path


def _given_generations(cfg, workdir, texts, kind, method):
    """generate/prompts.jsonl and the one chunk of generate/samples/, as the generation stage writes them."""
    from rpo.data.synthetic import char_tokenizer

    tok = char_tokenizer()
    os.makedirs(os.path.join(workdir, "generate", "samples"))
    prompts = [{"uid": f"synth/{g}", "seeds": ["s/0", "s/1"], "category": "", "prompt": f"Seed pair {g}\n",
                "prompt_ids": stages.encode(tok, f"Seed pair {g}\n", cfg.data.add_bos)} for g in range(len(texts))]
    write_jsonl(os.path.join(workdir, "generate", "prompts.jsonl"), prompts)
    write_jsonl(os.path.join(workdir, "generate", "samples", "part-00000.jsonl"), (
        {"uid": p["uid"], "prompt_index": g, "sample": 0, "completion_ids": stages.encode(tok, t, False),
         "text": t, "finish_reason": "stop", **dataclasses.asdict(si.parse_generation(t, kind, method))}
        for g, (p, t) in enumerate(zip(prompts, texts))))


def test_self_instruct_then_grpo_trains_on_the_kept_problems(policy, tmp_path, capsys):
    cfg = load_module(os.path.join(ROOT, "configs", "self_instruct_grpo_tiny.py")).get_config("quick")
    cfg.model.path, cfg.init.num_steps = policy, 0
    cfg.seq_len = 96  # the policy's context is 256 (no warm-start rows to fit)
    cfg.synth.filter = "none"
    cfg.grpo.update(steps_per_iteration=2)
    workdir = str(tmp_path / "run")
    _given_generations(cfg, workdir, VERIFIABLE, "verifiable", "cot")
    main.JOBS[cfg.mode](cfg, workdir)
    assert "generations" in capsys.readouterr().err
    kept = _jsonl(os.path.join(workdir, "dataset.jsonl"))
    assert [(k["question"], k["answer"]) for k in kept] == [("97 -88 +5", "14"), ("60 +31", "91"), ("50 -27 -3", "20")]
    g = os.path.join(workdir, "grpo")
    trained = _jsonl(os.path.join(g, "data", "train.jsonl"))
    assert [(r["question"], r["answer"]) for r in trained] == [(k["question"], k["answer"]) for k in kept]
    recorded = json.load(open(os.path.join(g, "grpo_config.json")))
    assert recorded["mode"] == "grpo" and recorded["model"]["path"] == policy  # the synthesising model
    assert recorded["task"]["train_file"] == os.path.join(workdir, "dataset.jsonl")
    assert "synth" not in recorded and "irpo" not in recorded and "chain" not in recorded
    rows = json.load(open(os.path.join(g, "results.json")))
    assert [r["iteration"] for r in rows] == [0, 1] and rows[1]["samples"] == 2 * 8 * cfg.grpo.group_size
    steps = _jsonl(os.path.join(g, "iter1", "train", "metrics.jsonl"))
    assert [s["step"] for s in steps] == [1, 2]


def test_self_instruct_then_rip_then_reward_model_dpo(policy, tmp_path):
    import torch
    import transformers

    from rpo.data.synthetic import char_tokenizer

    rm_dir = str(tmp_path / "rm")
    torch.manual_seed(1)
    rm = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=104, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, num_labels=1)).eval()
    with torch.no_grad():
        for p in rm.parameters():
            p.normal_(0.0, 0.3)
    rm.save_pretrained(rm_dir)
    char_tokenizer().save_pretrained(rm_dir)
    seeds = tmp_path / "seeds.jsonl"
    write_jsonl(str(seeds), [{"question": q} for q in ("Write a haiku.", "Describe a river.", "List two fruits.")])
    cfg = load_module(os.path.join(ROOT, "configs", "self_instruct_rm_dpo_tiny.py")).get_config(
        f"quick,model={policy},rm={rm_dir},seeds={seeds}")
    cfg.synth.update(num_solutions=3, solve_max_new_tokens=8, rip_percentile=30.0)
    cfg.seq_len = cfg.rm_dpo.reward_max_len = 96  # the policy's context is 256
    workdir = str(tmp_path / "run")
    _given_generations(cfg, workdir, INSTRUCTIONS, "instruction", "cot")
    counts = chain.run(cfg, workdir)
    kept = _jsonl(os.path.join(workdir, "dataset.jsonl"))
    rejected = _jsonl(os.path.join(workdir, "rejected.jsonl"))
    assert counts["kept"] == len(kept) and {r["reason"] for r in rejected} >= {"empty_prompt"}
    assert any(r["reason"] == "low_min_reward" for r in rejected)  # RIP dropped the lowest of the six
    d = os.path.join(workdir, "rm_dpo")
    prompts = _jsonl(os.path.join(d, "prompts.jsonl")) + _jsonl(os.path.join(d, "eval_prompts.jsonl"))
    assert [p["question"] for p in prompts] == [k["question"] for k in kept]
    recorded = json.load(open(os.path.join(d, "rm_dpo_config.json")))
    assert recorded["model"]["path"] == policy and recorded["rm_dpo"]["reward_model"] == rm_dir
    assert recorded["train"]["loss"]["kind"] == "dpo"
    rows = json.load(open(os.path.join(d, "results.json")))
    assert [r["iteration"] for r in rows] == [0, 1] and rows[1]["pairs"] > 0


def test_chain_configs_refuse_what_cannot_work():
    cfg = load_module(os.path.join(ROOT, "configs", "self_instruct_grpo_tiny.py")).get_config("quick")
    cfg.synth.then_irpo = True
    with pytest.raises(ValueError, match="then_irpo and chain.then"):
        chain.check_config(cfg)
    cfg.synth.then_irpo, cfg.chain.then = False, "ppo"
    with pytest.raises(ValueError, match="chain.then: 'ppo'"):
        chain.check_config(cfg)
    cfg.chain.then = "rm_dpo"
    with pytest.raises(ValueError, match="trains on instructions"):
        chain.check_config(cfg)
    with pytest.raises(ValueError, match="rm=<a reward model's HF directory> is required"):
        load_module(os.path.join(ROOT, "configs", "self_instruct_rm_dpo_tiny.py")).get_config("model=/m,seeds=/s")


def test_reproduction_config_chains_grpo_with_the_stated_settings():
    """experiments/reproduce/cot_self_instruct_qwen3_4b.py's grpo commands: the synthesis, then GRPO on its
    dataset.jsonl with issue 17's account of the paper's settings (lr 1e-6, 128 prompts x 32 rollouts, 4,096
    tokens); every config check passes, and the step's rollouts split into micro-batches over the 8 devices."""
    import re
    import shlex

    from rpo import grpo

    path = os.path.join(ROOT, "experiments", "reproduce", "cot_self_instruct_qwen3_4b.py")
    module = load_module(path)
    lines = [shlex.split(x) for x in re.sub(r"\\\n\s*", " ", module.__doc__).splitlines() if "./launch.sh" in x]
    args = [next(a for a in argv if a.startswith("experiments/reproduce/")).partition(":")[2] for argv in lines]
    with_grpo = [a for a in args if "grpo" in a.split(",")]
    assert len(with_grpo) == 2
    for arg in with_grpo:
        opts = dict(kv.split("=", 1) if "=" in kv else (kv, "1") for kv in arg.split(","))
        c = module.get_config(arg)
        si.check_config(c)
        chain.check_config(c)
        assert chain.chained(c) and not c.synth.then_irpo
        m = chain.method_config(c, "/w")
        grpo.check_config(m)
        assert m.model.path == opts["policy"] and "Base" in m.model.path and m.task.train_file == "/w/dataset.jsonl"
        assert m.task.name == "math" and m.task.source_dir == opts["data"] and m.data.chat_template
        g = m.grpo
        assert (g.train.optim.lr, g.prompts_per_step, g.group_size, g.max_new_tokens) == (1e-6, 128, 32, 4096)
        assert m.seq_len >= g.max_new_tokens + 512
        micro = g.prompts_per_step * g.group_size // g.train.grad_accum
        assert micro % 8 == 0  # one node of 8 devices: data x fsdp = 8
    assert module.PAPER == {}
    for bad, message in (("model=/m,seeds=/s,data=/d,grpo,irpo", "grpo and irpo"),
                         ("model=/m,seeds=/s,policy=/p", "needs the variant grpo"),
                         ("model=/m,seeds=/s,grpo", "data=")):
        with pytest.raises(ValueError, match=re.escape(message)):
            module.get_config(bad)
