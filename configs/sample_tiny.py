"""Sampling only: load an HF model directory (or, with model.path empty, build a tiny random
Llama), sample completions for token-id prompts and write them to <workdir>/samples.jsonl.

  python -m rpo.main --config=configs/sample_tiny.py                     # a tiny random model
  python -m rpo.main --config=configs/sample_tiny.py:model=/path/to/hf_dir \
      --config.sample.temperature=0.8 --config.sample.n=4 --workdir=runs/try
"""

import ml_collections

from rpo import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: optional "model=<HF directory>" to sample from a real checkpoint."""
    args = configlib.variants(arg, ("model",), "configs/sample_tiny.py")

    c = ml_collections.ConfigDict()
    c.mode = "sample"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.path = args.get("model", "")  # HF directory; empty: build the tiny random model below
    c.model.dtype = "float32"  # params and compute dtype: float32 | bfloat16
    c.model.seed = 0
    # The random model used when model.path is empty (ModelConfig fields): a tiny Llama.
    c.model.random = ml_collections.ConfigDict(
        dict(
            model_type="llama",
            vocab_size=512,
            hidden_size=128,
            intermediate_size=344,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            eos_token_ids=(2,),
        )
    )

    c.mesh = configlib.mesh()

    c.sample = ml_collections.ConfigDict()
    # Token-id prompts (a real run reads them from a task's data instead).
    c.sample.prompts = ((1, 17, 42, 99, 7), (1, 5, 6), (1, 300, 301, 302, 303, 304, 305))
    c.sample.n = 2
    c.sample.max_new_tokens = 32
    c.sample.temperature = 0.0  # 0: greedy
    c.sample.top_p = 1.0
    c.sample.top_k = 0
    c.sample.batch_prompts = 32  # prompts per sampling batch (batch_prompts x n rows decode together)
    return c
