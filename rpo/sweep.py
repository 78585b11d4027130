"""Sweeps: one rpo.main run per point of a sweep declared beside its config, then a summary table.

  python -m rpo.sweep CONFIG[:arg] [--dry-run] [--base-workdir DIR] [--config.<field>=<value> ...]

Convention (big_vision style): a config file that can be swept defines, beside get_config(arg),

  def get_sweep(arg=None) -> list[dict[str, value]]

one dict per point, mapping dotted config fields to values (`{"train.loss.beta": 0.5}`); `arg` is
the same string get_config gets. `product({"train.loss.beta": (0.1, 0.5), "train.optim.lr": (5e-4, 5e-5)})`
gives the grid, and lists of points add up (`product(a) + product(b)`). A point `{}` is the config as is.

Each point runs `python -m rpo.main --config=CONFIG[:arg] --workdir=<base>/<name> [--config.<field>=<value> ...]`,
the command-line overrides first, then the point's. The name joins `field=value` for each
swept field (the field's last component unless two swept fields share it). The base defaults
to runs/<config stem>_sweep[_<arg>]. Points run one after another on this machine.

Before anything runs, every point is parsed exactly as rpo.main will parse it (and, for
mode irpo, checked by rpo.irpo.check_config): an empty sweep, an unknown field, a bad value,
a duplicate point or a swept field also given on the command line stops the sweep with a
message naming the config file, the point and the field.

Resume: a point whose run finished (exit 0) leaves <workdir>/sweep_point.json with its exact
arguments and resolved config; rerunning the sweep skips such a point when both are unchanged
and reruns every other one with the same command, which resumes it (rpo.main skips the stages
already done). A failed point does not stop the others; the sweep then exits 1.

Summary: <base>/sweep_summary.json (per point: name, workdir, overrides, status, the last row
of its results.json, i.e. the final iteration, not the best) and <base>/sweep_summary.md (a
table: point, the swept values, status, and that row's iteration, *_accuracy, pass_at_* and
train_steps), also printed on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Mapping, Sequence

from rpo import files

MARKER = "sweep_point.json"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def product(axes: Mapping[str, Sequence]) -> list[dict[str, Any]]:
    """The grid over `axes` ({field: values}), the last field varying fastest."""
    for field, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"sweep axis {field}: needs a non-empty list or tuple of values, got {values!r}")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    overrides: dict[str, Any]  # dotted field -> value, as get_sweep gave it
    workdir: str
    args: list[str]  # rpo.main's arguments
    config: dict  # the resolved config, as JSON


def split_spec(spec: str) -> tuple[str, str | None]:
    """"path.py:arg" -> ("path.py", "arg"); the first colon splits, as ml_collections does."""
    path, sep, arg = spec.partition(":")
    return path, (arg if sep else None)


def load_sweep(spec: str) -> list[dict[str, Any]]:
    """The points of the config file's get_sweep(arg), checked for shape."""
    path, arg = split_spec(spec)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sweep config {path}: no such file")
    module = files.load_module(path)
    if not callable(getattr(module, "get_sweep", None)):
        raise ValueError(f"sweep config {path}: defines no get_sweep(arg=None) (see rpo/sweep.py)")
    where = f"{path}: get_sweep({arg!r})"
    try:
        points = module.get_sweep(arg) if arg is not None else module.get_sweep()
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{where}: {e}") from e
    if not isinstance(points, (list, tuple)) or not points:
        raise ValueError(f"{where} returned no points ({points!r}): a sweep needs at least one")
    for i, point in enumerate(points):
        if not isinstance(point, Mapping):
            raise ValueError(f"{where} point {i}: not a dict of config fields ({point!r})")
        for field in point:
            if not isinstance(field, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", field):
                raise ValueError(f"{where} point {i}: {field!r} is not a dotted config field name")
    return [dict(p) for p in points]


def flag_value(value) -> str:
    """A value as ml_collections parses it back from `--config.<field>=<text>`."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        value = tuple(value)
    return repr(value)


def _name_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "_".join(_name_value(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", flag_value(value))


def _short_names(points: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Swept field -> its last component, or the whole field where two swept fields share that."""
    fields = list(dict.fromkeys(f for p in points for f in p))
    last = [f.rsplit(".", 1)[-1] for f in fields]
    return {f: (s if last.count(s) == 1 else f) for f, s in zip(fields, last)}


def point_names(points: Sequence[Mapping[str, Any]]) -> list[str]:
    """One directory-safe name per point from its values: "beta=0.5,lr=5e-05" ("base" for {})."""
    short = _short_names(points)
    return [",".join(f"{short[f]}={_name_value(v)}" for f, v in p.items()) or "base" for p in points]


def _parse_common(overrides: Sequence[str]) -> dict[str, str]:
    out = {}
    for arg in overrides:
        m = re.fullmatch(r"--config\.([\w.]+)=(.*)", arg, flags=re.S)
        if m is None:
            raise ValueError(f"command-line override {arg!r}: expected --config.<field>=<value>")
        if m.group(1) == "workdir":
            raise ValueError("--config.workdir: each point gets its own workdir; set the base with --base-workdir")
        out[m.group(1)] = m.group(2)
    return out


def _check_field(cfg, field: str, where: str) -> None:
    import ml_collections

    node = cfg
    for depth, part in enumerate(field.split(".")):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            prefix = ".".join(field.split(".")[:depth]) or "the config"
            raise ValueError(f"{where}: unknown config field {field} ({prefix} has no field {part!r})")
        node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
        raise ValueError(f"{where}: {field} is a group of fields; sweep its fields one by one")


def parse_config(args: Sequence[str]):
    """The config rpo.main builds from these arguments (same parser, fresh flag registry)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["rpo.main", *args]
    registry = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=registry, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "output directory", flag_values=registry)
    registry(argv)
    return registry.config


def default_base(spec: str) -> str:
    path, arg = split_spec(spec)
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{stem}_sweep" + (f"_{_name_value(arg)}" if arg else ""))


def plan(spec: str, base_workdir: str | None = None, overrides: Sequence[str] = ()) -> list[Point]:
    """Expands and validates the sweep: one Point per get_sweep point, nothing run or written."""
    path, arg = split_spec(spec)
    base = base_workdir or default_base(spec)
    common = _parse_common(overrides)
    points = load_sweep(spec)
    names = point_names(points)
    where = f"{path}: get_sweep({arg!r})"
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"{where} points {seen[name]} and {i} are both named {name} (the same values, or values "
                             f"that differ only in characters a directory name cannot hold)")
        seen[name] = i
    base_cfg = parse_config([f"--config={spec}"])
    for field in common:
        _check_field(base_cfg, field, f"{path}: command-line override --config.{field}")
    out = []
    for i, (name, point) in enumerate(zip(names, points)):
        here = f"{where} point {i} ({name})"
        for field in point:
            if field == "workdir":
                raise ValueError(f"{here}: field workdir is set by the sweep (<base>/<point name>)")
            if field in common:
                raise ValueError(f"{here}: field {field} is swept and also given on the command line")
        workdir = os.path.join(base, name)
        args = [f"--config={spec}", f"--workdir={workdir}"]
        args += [f"--config.{f}={v}" for f, v in common.items()]
        args += [f"--config.{f}={flag_value(v)}" for f, v in point.items()]
        for field in point:
            _check_field(base_cfg, field, here)
        try:
            cfg = parse_config(args)
        except Exception as e:  # absl reports a bad value as IllegalFlagValueError; name the point too
            raise ValueError(f"{here}: {e}") from e
        if cfg.get("mode") == "irpo":
            from rpo import irpo

            try:
                irpo.check_config(cfg)
            except ValueError as e:
                raise ValueError(f"{here}: {e}") from e
        out.append(Point(name, dict(point), workdir, args, json.loads(cfg.to_json_best_effort())))
    return out


def _finished(point: Point) -> bool:
    marker = os.path.join(point.workdir, MARKER)
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        return json.load(f) == {"args": point.args, "config": point.config}


def run_point(point: Point) -> int:
    """rpo.main on one point (output streamed through); writes the marker on success."""
    marker = os.path.join(point.workdir, MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_REPO, os.environ.get("PYTHONPATH")])))
    code = subprocess.run([sys.executable, "-m", "rpo.main", *point.args], env=env).returncode
    if code == 0:
        os.makedirs(point.workdir, exist_ok=True)
        files.write_json(marker, {"args": point.args, "config": point.config})
    return code


def _final_row(point: Point) -> tuple[dict | None, int]:
    path = os.path.join(point.workdir, "results.json")
    if not os.path.exists(path):
        return None, 0
    with open(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: not a JSON list of result rows")
    return (rows[-1] if rows else None), len(rows)


def _shown(key: str) -> bool:
    return key in ("iteration", "train_steps") or key.endswith("_accuracy") or key.startswith("pass_at_")


def summarize(points: Sequence[Point], statuses: Sequence[str]) -> tuple[list[dict], str]:
    """(JSON rows, Markdown table): one per point, with the last row of its results.json."""
    from rpo import report

    column = _short_names([p.overrides for p in points])
    rows, table = [], []
    for point, status in zip(points, statuses):
        final, n = _final_row(point)
        rows.append({"point": point.name, "workdir": point.workdir, "overrides": point.overrides, "status": status,
                     "results_rows": n, "final": final})
        flat = {"point": point.name, **{column[f]: v for f, v in point.overrides.items()}, "status": status}
        flat.update({k: v for k, v in (final or {}).items() if _shown(k)})
        table.append(flat)
    return rows, report.format_table(table)


def run(points: Sequence[Point], base_workdir: str) -> int:
    """Runs (or skips) every point, writes the summary; 0 if every point finished, else 1."""
    statuses = []
    for i, point in enumerate(points, 1):
        head = f"[rpo.sweep {i}/{len(points)}] {point.name}"
        if _finished(point):
            print(f"{head}: finished before, skipped ({point.workdir}/{MARKER})", file=sys.stderr, flush=True)
            statuses.append("done before")
            continue
        print(f"{head}: {shlex.join([sys.executable, '-m', 'rpo.main', *point.args])}", file=sys.stderr, flush=True)
        code = run_point(point)
        statuses.append("done" if code == 0 else f"failed (exit {code})")
        if code:
            print(f"{head}: failed with exit code {code}; going on with the other points", file=sys.stderr, flush=True)
    rows, table = summarize(points, statuses)
    os.makedirs(base_workdir, exist_ok=True)
    files.write_json(os.path.join(base_workdir, "sweep_summary.json"), rows)
    with files.atomic_write(os.path.join(base_workdir, "sweep_summary.md")) as f:
        f.write(table)
    print(f"[rpo.sweep] {base_workdir}/sweep_summary.md (last results.json row of each point):", file=sys.stderr)
    print(table, end="", flush=True)
    return 0 if all(s.startswith("done") for s in statuses) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rpo.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="CONFIG[:arg], a config file that defines get_sweep(arg=None)")
    parser.add_argument("--dry-run", action="store_true", help="print the points' commands; run nothing")
    parser.add_argument("--base-workdir", help="each point runs in <base>/<point name> (default runs/<stem>_sweep)")
    args, overrides = parser.parse_known_args(argv)
    try:
        points = plan(args.config, args.base_workdir, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"rpo.sweep: {e}", file=sys.stderr)
        return 2
    base = args.base_workdir or default_base(args.config)
    print(f"[rpo.sweep] {args.config}: {len(points)} points under {base}:", file=sys.stderr)
    for point in points:
        print(f"  {shlex.join([sys.executable, '-m', 'rpo.main', *point.args])}", file=sys.stderr)
    if args.dry_run:
        return 0
    return run(points, base)


if __name__ == "__main__":
    sys.exit(main())
