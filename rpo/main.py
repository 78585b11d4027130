"""Entry point: flags, config, dispatch.

  python -m rpo.main [--config=configs/<experiment>.py[:arg]] [--config.<field>=<value>] [--workdir=DIR]

Without --config it runs configs/arith_tiny.py (Iterative RPO on the synthetic task). The config's `mode` picks the job.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
import time

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from rpo import distributed, files, report

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "arith_tiny.py")


def _field_paths(node, prefix=()):
    for k, v in node.items():
        yield prefix + (k,)
        if isinstance(v, ml_collections.ConfigDict):
            yield from _field_paths(v, prefix + (k,))


def check_overrides(argv: list[str]) -> str | None:
    """The one-line error for a `--config.<field>` override that names no field of the config (ml_collections
    would end in a 20-line traceback whose last line is `AttributeError: "'bta'"`), or None."""
    spec, names, args = _DEFAULT_CONFIG, [], iter(argv[1:])
    for a in args:
        if a == "--config":
            spec = next(args, spec)
        elif a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a.startswith("--config."):
            names.append(a[len("--config."):].split("=", 1)[0])
    if not names:
        return None
    path, _, arg = spec.partition(":")
    try:
        config = files.load_module(path).get_config(arg or None)
    except Exception:  # noqa: BLE001 - a broken config file is reported by config_flags itself, with its traceback
        return None
    for name in names:
        node, parts = config, name.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                close = ['.'.join(parts[:i] + [c]) for c in difflib.get_close_matches(part, keys, n=3)]
                if not close:  # the name elsewhere in the config (irpo.bta -> train.loss.beta)
                    paths = {p[-1]: [] for p in _field_paths(config)}
                    for p in _field_paths(config):
                        paths[p[-1]].append(".".join(p))
                    close = [q for c in difflib.get_close_matches(part, list(paths), n=2) for q in paths[c]][:4]
                hint = f"; did you mean {' or '.join(close)}?" if close else ""
                return f"--config.{name}: {spec} declares no field {'.'.join(parts[:i + 1])}{hint}"
            node = node[part]
    return None


if __name__ == "__main__" and (_error := check_overrides(sys.argv)) is not None:
    sys.exit(f"rpo.main: {_error}")  # before the flag below parses the overrides
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Experiment config file (get_config).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<mode>-<time>).")


def _load_model(config):
    from rpo import sharding
    from rpo.models.hf import load_model

    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    what = config.model.path or f"a random {config.model.random.model_type} (model.path is empty)"
    logging.info(f"loading {what} ({config.model.dtype}) onto a {dict(mesh.shape)} mesh")
    model_config, params = load_model(
        config.model, param_dtype=config.model.dtype, shardings_for=lambda c: sharding.param_shardings(c, mesh)
    )
    logging.info(f"{model_config.model_type}: {model_config.num_params / 1e6:.2f}M params")
    return model_config, params, mesh


def sample_job(config, workdir: str) -> str:
    """Samples completions for config.sample.prompts; writes <workdir>/samples.jsonl."""
    from rpo import sampling

    model_config, params, mesh = _load_model(config)
    s = config.sample
    prompts = [list(p) for p in s.prompts]
    logging.info(f"sampling {len(prompts)} prompts x {s.n}, up to {s.max_new_tokens} new tokens, "
                 f"temperature {s.temperature}")
    t0 = time.time()
    out = sampling.generate(
        model_config, params, prompts, n=s.n, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
        top_p=s.top_p, top_k=s.top_k, seed=config.seed, batch_size=s.batch_prompts, mesh=mesh,
    )
    n_tokens = sum(len(c) for per_prompt in out.tokens for c in per_prompt)
    logging.info(f"{n_tokens} tokens in {time.time() - t0:.1f}s (compile included)")
    path = os.path.join(workdir, "samples.jsonl")
    files.write_jsonl(
        path,
        (
            {"prompt": i, "sample": j, "prompt_ids": prompts[i], "completion_ids": toks, "logprobs": [float(x) for x in lps]}
            for i in range(len(prompts))
            for j, (toks, lps) in enumerate(zip(out.tokens[i], out.logprobs[i]))
        ),
    )
    logging.info(f"wrote {path}")
    return path


def train_job(config, workdir: str) -> None:
    """One training phase (DPO + NLL, IPO, DPO or SFT) from a pairs / SFT file: rpo.train.run."""
    from rpo import train

    train.run(config, workdir)


def irpo_job(config, workdir: str) -> None:
    """The Iterative RPO loop (or a baseline): rpo.irpo.run."""
    from rpo import irpo

    rows = irpo.run(config, workdir)
    shown = ("iteration", "greedy_accuracy", "maj_accuracy", "train_sample_accuracy", "winner_precision", "pairs",
             "selected_step", "heldout_accuracy", "train_steps")
    table = report.format_table([{k: row[k] for k in shown if k in row} for row in rows])
    logging.info(f"results ({workdir}/results.json, accuracy.png):\n{table}")


def grpo_job(config, workdir: str) -> None:
    """GRPO on a task (rpo.grpo.run): the same stages, evaluation and results table as IRPO."""
    from rpo import grpo

    rows = grpo.run(config, workdir)
    shown = ("iteration", "greedy_accuracy", "maj_accuracy", "train_reward_mean", "train_zero_adv_fraction",
             "grpo_steps", "samples")
    table = report.format_table([{k: row[k] for k in shown if k in row} for row in rows])
    logging.info(f"results ({workdir}/results.json, accuracy.png, grpo_curves.png):\n{table}")


def rm_dpo_job(config, workdir: str) -> None:
    """DPO on best-vs-worst pairs chosen by a reward model (rpo.rm_dpo.run)."""
    from rpo import rm_dpo

    rows = rm_dpo.run(config, workdir)
    shown = ("iteration", "eval_reward_mean", "win_rate_vs_m0", "train_reward_mean", "pairs")
    table = report.format_table([{k: row[k] for k in shown if k in row} for row in rows])
    logging.info(f"results ({workdir}/results.json, reward.png):\n{table}")


def self_instruct_job(config, workdir: str) -> None:
    """CoT-Self-Instruct synthesis and filtering (then IRPO with synth.then_irpo, or the method of a `chain`
    block: rpo.chain): rpo.self_instruct.run."""
    from rpo import chain, self_instruct

    if chain.chained(config):
        counts = chain.run(config, workdir)
    else:
        counts = self_instruct.run(config, workdir)
    rows = [{"outcome": "kept", "count": counts["kept"]}] + [
        {"outcome": f"rejected: {k}", "count": v} for k, v in counts["reasons"].items()]
    logging.info(f"{counts['generations']} generations ({workdir}/dataset.jsonl, rejected.jsonl, counts.json):\n"
                 + report.format_table(rows))


def _logged(job):
    """A job that shows rpo's log messages on stderr however it is called (by main, or from Python)."""
    @functools.wraps(job)
    def run(config, workdir: str):
        report.log_to_stderr()
        return job(config, workdir)
    return run


JOBS = {name: _logged(job) for name, job in (
    ("irpo", irpo_job), ("grpo", grpo_job), ("rm_dpo", rm_dpo_job), ("sample", sample_job),
    ("self_instruct", self_instruct_job), ("train", train_job))}


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize()  # several hosts: RPO_* / SLURM / Cloud TPU environment (rpo.distributed)
    report.log_to_stderr()  # rpo's messages at INFO; orbax / XLA only from WARNING up (their INFO is chatter)
    config = _CONFIG.value
    if config.mode not in JOBS:
        raise app.UsageError(f"--config: field mode={config.mode!r} is not one of {sorted(JOBS)}")
    workdir = _WORKDIR.value or config.get("workdir") or os.path.join("runs", f"{config.mode}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(workdir, exist_ok=True)
    with files.atomic_write(os.path.join(workdir, "config.json")) as f:
        f.write(config.to_json_best_effort(indent=2))
    from rpo.configlib import ConfigError
    from rpo.models.config import UnsupportedConfigError
    from rpo.models.safetensors_io import CheckpointError

    try:
        JOBS[config.mode](config, workdir)
    except (ConfigError, files.DataError, CheckpointError, UnsupportedConfigError) as e:
        if os.environ.get("RPO_TRACEBACK"):
            raise
        # A bad field, file, row or checkpoint, named in the message: one line, not a traceback.
        sys.exit(f"rpo.main: {type(e).__name__}: {e} (RPO_TRACEBACK=1 shows the traceback)")


if __name__ == "__main__":
    app.run(main)
