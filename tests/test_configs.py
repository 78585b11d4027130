"""Every config file builds for the variants its docstring offers, and its job accepts the result; a variant it does
not know is an error naming the file and the words it knows (rpo.configlib.variants)."""

import os

import pytest

from rpo import chain, configlib, grpo, irpo, rm_dpo, self_instruct
from rpo.files import load_module
from rpo.main import JOBS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {  # config file -> the variants documented in it (a model path need not exist to build a config)
    "arith_tiny": [None, "quick", "baseline=star", "baseline=sft_gold", "baseline=dpo", "baseline=zero_shot"],
    "grpo_tiny": [None, "quick", "normalization=token", "normalization=constant", "beta=0.04"],
    "irpo": ["model=/m", "task=math,model=/m", "runlocal,model=/m", "chat,runlocal,model=/m",
             "baseline=star,model=/m", "baseline=dpo,model=/m"],
    "rm_dpo_tiny": ["model={tmp},rm={tmp},prompts={tmp}/p.jsonl", "quick,model={tmp},rm={tmp},prompts={tmp}/p.jsonl"],
    "sample_tiny": [None, "model=/m"],
    "self_instruct_tiny": [None, "quick"],
    "self_instruct_grpo_tiny": [None, "quick"],
    "self_instruct_rm_dpo_tiny": ["model=/m,rm=/r,seeds=/s.jsonl", "quick,model=/m,rm=/r,seeds=/s.jsonl"],
    "smollm2": ["gsm8k,model=/m",  # sample reads the model's chat template: tested in test_smollm2.py "arith,model=/m", "self_instruct,model=/m",
                "gsm8k,runlocal,model=/m"],
    "train_tiny": [None, "steps=3,alpha=0"],
}
CHECKS = {"irpo": irpo.check_config, "grpo": grpo.check_config, "rm_dpo": rm_dpo.check_config}


def test_every_config_file_is_listed():
    assert sorted(VARIANTS) == sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))


@pytest.mark.parametrize("name,variant", [(n, v) for n, vs in VARIANTS.items() for v in vs])
def test_config_builds_and_its_job_accepts_it(name, variant, tmp_path):
    variant = variant and variant.format(tmp=tmp_path)  # {tmp}: a directory that exists
    c = load_module(os.path.join(ROOT, "configs", f"{name}.py")).get_config(variant)
    assert c.mode in JOBS
    if c.mode == "self_instruct":
        self_instruct.check_config(c)
        if chain.chained(c):
            chain.check_config(c)
    elif c.mode in CHECKS:
        CHECKS[c.mode](c)


@pytest.mark.parametrize("name", ["arith_tiny", "grpo_tiny", "irpo", "sample_tiny", "train_tiny"])
def test_an_unknown_variant_names_the_file_and_the_known_words(name):
    with pytest.raises(configlib.ConfigError, match=rf"configs/{name}.py: unknown variant\(s\) \['qiuck'\]; known: "):
        load_module(os.path.join(ROOT, "configs", f"{name}.py")).get_config("qiuck")


def test_variants_parse_bare_words_and_values():
    assert configlib.variants("quick,beta=0.1,workdir=a=b", ("quick", "beta", "workdir"), "f") == {
        "quick": "1", "beta": "0.1", "workdir": "a=b"}
    assert configlib.variants(None, (), "f") == {} and configlib.variants("", (), "f") == {}
