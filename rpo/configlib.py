"""What the experiment configs (configs/*.py) share, and the error every job raises for a bad config field.

  variants(arg, known, where)   the `:a=1,b` after a config file's name as {"a": "1", "b": "1"}; an unknown
                                word is an error naming the file and the words it knows
  optim(lr, ...)                an optimizer block (AdamW, schedule, clipping): every field rpo.train reads
  loss(kind, ...)               a loss block (rpo.losses.LOSS_KINDS)
  phase(kind, steps, lr, ...)   a training phase: loss, optim, batch and checkpoint cadence
  mesh(...), sharding_rules()   the device mesh and the logical-axis table (rpo.sharding.DEFAULT_RULES)
  bad(field, why)               raises ConfigError("config field <field>: <why>"); rpo.main prints it as one line

Config files are loaded by path (ml_collections' config_flags), not imported as a package, so what they share
lives here, inside rpo.
"""

from __future__ import annotations

import ml_collections


class ConfigError(ValueError):
    """A config field (or a `:variant`) that a job cannot run with; its message names the field."""


def bad(field: str, why: str):
    raise ConfigError(f"config field {field}: {why}")


def variants(arg: str | None, known, where: str) -> dict[str, str]:
    """Parses a config file's argument "a=1,b" into {"a": "1", "b": "1"} (a bare word is "1")."""
    words = [w for w in (arg or "").split(",") if w]
    opts = dict(w.split("=", 1) if "=" in w else (w, "1") for w in words)
    unknown = [k for k in opts if k not in known]
    if unknown:
        raise ConfigError(f"{where}: unknown variant(s) {unknown}; known: {', '.join(known)}")
    return opts


def optim(lr: float, *, schedule: str = "cosine", warmup_steps: int = 0, end_lr_fraction: float = 0.1,
          weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          clip_norm: float = 1.0) -> ml_collections.ConfigDict:
    """AdamW with linear warmup then a constant | linear | cosine schedule down to end_lr_fraction x lr; global
    gradient-norm clipping at clip_norm (<= 0: none)."""
    return ml_collections.ConfigDict(dict(lr=lr, schedule=schedule, warmup_steps=warmup_steps,
                                          end_lr_fraction=end_lr_fraction, weight_decay=weight_decay, b1=b1, b2=b2,
                                          eps=eps, clip_norm=clip_norm))


def loss(kind: str, *, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
         chunk_size: int = 64) -> ml_collections.ConfigDict:
    """kind: dpo_nll (Iterative RPO's Eq. 1) | dpo | ipo | sft; beta: the DPO temperature; alpha: the NLL weight;
    chunk_size: vocabulary rows per chunk of the log-prob computation (memory, not math)."""
    return ml_collections.ConfigDict(dict(kind=kind, beta=beta, alpha=alpha, label_smoothing=label_smoothing,
                                          chunk_size=chunk_size))


def phase(kind: str, steps: int, lr: float, *, batch_size: int, warmup_steps: int, optimizer: dict | None = None,
          loss_args: dict | None = None, grad_accum: int = 1, remat: bool = False, log_every: int = 10,
          checkpoint_every: int = 25, keep_checkpoints: int = 1, **more) -> ml_collections.ConfigDict:
    """A training phase (rpo.train's fields): `steps` optimizer steps of batch_size rows (grad_accum micro-batches
    each), a checkpoint every checkpoint_every steps (the last keep_checkpoints kept); `more`: further fields (a
    standalone phase's export_every; IRPO and GRPO set that one from select.every)."""
    return ml_collections.ConfigDict(dict(
        loss=loss(kind, **(loss_args or {})), optim=optim(lr, warmup_steps=warmup_steps, **(optimizer or {})),
        batch_size=batch_size, grad_accum=grad_accum, num_steps=steps, remat=remat, log_every=log_every,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, **more,
    ))


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
    """Device mesh axis sizes (-1: all devices left over)."""
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def sharding_rules() -> tuple:
    """The logical-axis -> mesh-axis table (rpo.sharding.DEFAULT_RULES); a config may write its own."""
    from rpo import sharding

    return tuple(sharding.DEFAULT_RULES)
