"""Shared plumbing of the real-dataset tasks (GSM8K, MATH, ARC): config, jsonl rows, prepared TFDS data, prompts.

Conventions:
- Config fields of the task block read here: name, source_dir (the directory of the official
  files; required), tfds_dir (where prepared TFDS data goes; '' -> TFDS's default,
  $TFDS_DATA_DIR or ~/tensorflow_datasets), skip_bad_rows (bool), max_examples (0 = all; else
  the first N of the split).
- TFDS runs without TensorFlow: datasets are written as array_record and read back through
  `builder.as_data_source(split)`, never tf.data. `JsonlBuilder` is the base of our own
  builders over <manual_dir>/{train,test}.jsonl; `load_jsonl_split` prepares one (the task's
  source_dir is its manual dir) and reads a split.
- A jsonl row is numbered by its line (1-based in messages, `row` = line - 1 in the data and
  in uids). A bad row stops preparation with "file:line: why", or, with skip_bad_rows, is
  left out and listed; blank lines are ignored.
- Prepare once, reuse after: inside each prepared dataset `rpo_source.json` records the
  sha256 of every source file and the rows that were skipped. A later load reuses the data
  (and its skipped rows) while the hashes match and re-prepares it (deleting only data that
  carries our record) when a source changed. While rpo prepares, a marker file
  <data dir>.rpo_preparing sits beside the data dir (outside it: TFDS reuses any data dir
  that exists); a data dir with that marker and no record is what an interrupted rpo run
  left, and is deleted and prepared again. Data in the same place with neither is refused,
  never overwritten.
- Prompt templates are rpo/data/templates/<name>.txt, used verbatim; `{question}` and
  `{choices}` are the only placeholders (other braces, e.g. LaTeX, are left alone). A
  template ends with a newline: the separator between the prompt and the response.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from rpo import files
from rpo.configlib import ConfigError

# TFDS 4.9.10 imports the `importlib_resources` backport when preparing any packaged builder but declares it only
# for Python < 3.9: requirements.txt pins it.
import tensorflow_datasets as tfds

RECORD = "rpo_source.json"
PREPARING = ".rpo_preparing"  # suffix of the marker beside a data dir being prepared
TEMPLATES = Path(__file__).parent / "templates"
PLACEHOLDER = re.compile(r"\{(question|choices)\}")


class BadRow(ValueError):
    """A source row that cannot be used; the message says why (the caller adds file:line)."""


def data_dir(cfg) -> str | None:
    """Where prepared TFDS data goes: cfg.tfds_dir, or None (TFDS's default) when empty."""
    return os.path.expanduser(cfg.tfds_dir) if cfg.tfds_dir else None


def source_dir(cfg) -> Path:
    """cfg.source_dir, checked to be a directory."""
    if not cfg.source_dir:
        raise ConfigError(f"config field task.source_dir is empty: set it to the directory of the {cfg.name} files")
    path = Path(cfg.source_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory (config field task.source_dir)")
    return path


def missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path}: not found (config field task.source_dir): {what}")


def max_examples(cfg) -> int:
    n = cfg.max_examples
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"config field task.max_examples: must be an int >= 0 (0 = all), got {n!r}")
    return n


def jsonl_rows(
    name: str, lines: Iterable[str], parse: Callable[[dict], dict], skip: bool, skipped: list[str]
) -> Iterator[tuple[int, dict]]:
    """(row, parse(obj)) for each good line of a jsonl stream; `name` labels it in messages.

    A line that is not a JSON object, or that `parse` rejects with BadRow, raises ValueError
    naming name:line; with `skip` it is appended to `skipped` as "name:line: why" instead.
    """
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise BadRow("not a JSON object")
            parsed = parse(obj)
        except (json.JSONDecodeError, BadRow) as err:
            where = f"{name}:{lineno}: {err}"
            if not skip:
                raise ValueError(f"{where} (config field task.skip_bad_rows=True skips such rows)") from None
            skipped.append(where)
            continue
        yield lineno - 1, parsed


def prepare_or_reuse(
    make_builder: Callable[[], tfds.core.DatasetBuilder],
    sources: Sequence[Path],
    prepare: Callable[[tfds.core.DatasetBuilder], dict[str, list[str]]],
) -> tuple[tfds.core.DatasetBuilder, dict[str, list[str]]]:
    """A builder whose data is prepared from `sources`, and the rows skipped per split.

    `prepare(builder)` runs builder.download_and_prepare and returns the skipped rows; it is
    called only when no data prepared from these exact sources exists.
    """
    want = {p.name: files.sha256(p) for p in sources}
    builder = make_builder()
    data_path = Path(os.fspath(builder.data_path))
    record_path, marker = data_path / RECORD, preparing_marker(data_path)
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record["sha256"] == want:
            marker.unlink(missing_ok=True)  # a run that stopped right after writing the record
            return builder, record["skipped"]
        logging.info("%s: source files changed since it was prepared; preparing it again", data_path)
        shutil.rmtree(data_path)
        builder = make_builder()
    elif data_path.exists():
        if not marker.exists():
            raise FileExistsError(
                f"{data_path} holds {builder.name} data that rpo did not prepare (no {RECORD} in it, no {marker.name} "
                "beside it); delete it or point config field task.tfds_dir elsewhere"
            )
        logging.warning("%s: an rpo run stopped before recording it (%s exists); preparing it again", data_path, marker)
        shutil.rmtree(data_path)
        builder = make_builder()
    marker.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(os.fspath(marker), {"data_dir": os.fspath(data_path), "pid": os.getpid()})
    try:
        skipped = prepare(builder)
    except BaseException:
        if not data_path.exists():  # TFDS wrote nothing there: nothing of ours to mark
            marker.unlink(missing_ok=True)
        raise
    record = {"source_dir": os.fspath(sources[0].parent), "sha256": want, "skipped": skipped}
    files.write_json(os.fspath(record_path), record)
    marker.unlink()
    return builder, skipped


def preparing_marker(data_path: Path) -> Path:
    """The marker file that says rpo is preparing `data_path` (beside it)."""
    return data_path.with_name(data_path.name + PREPARING)


class JsonlBuilder(tfds.core.GeneratorBasedBuilder):
    """A builder over <manual_dir>/train.jsonl and test.jsonl (the splits are the files present).

    Subclasses give `_info` (disable_shuffling=True keeps the file order; features include an
    int64 "row") and `parse_row(obj) -> features` (raising BadRow). `skipped` collects the
    rows left out with skip_bad_rows, per split.
    """

    SPLITS = ("train", "test")

    def __init__(self, *, skip_bad_rows: bool = False, **kwargs):
        self.skip_bad_rows = skip_bad_rows
        self.skipped: dict[str, list[str]] = {}
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        paths = {split: dl_manager.manual_dir / f"{split}.jsonl" for split in self.SPLITS}
        present = {split: path for split, path in paths.items() if path.exists()}
        if not present:
            raise FileNotFoundError(f"{dl_manager.manual_dir}: none of {', '.join(p.name for p in paths.values())}")
        return {split: self._generate_examples(path, split) for split, path in present.items()}

    def _generate_examples(self, path, split):
        skipped = self.skipped.setdefault(split, [])
        with path.open(encoding="utf-8") as f:
            for row, ex in jsonl_rows(str(path), f, self.parse_row, self.skip_bad_rows, skipped):
                yield row, {**ex, "row": row}


def load_jsonl_split(cfg, split: str, builder_cls: type[JsonlBuilder], what: str) -> tuple[list[dict], list[str]]:
    """The rows of <source_dir>/<split>.jsonl through `builder_cls`, and the rows skipped in it.

    `what` describes the expected file in the missing-file error.
    """
    if split not in builder_cls.SPLITS:
        raise ValueError(f"task {cfg.name}: no split {split!r} ({' | '.join(builder_cls.SPLITS)})")
    src = source_dir(cfg)
    if not (src / f"{split}.jsonl").exists():
        raise missing(src / f"{split}.jsonl", what)
    sources = [src / f"{s}.jsonl" for s in builder_cls.SPLITS if (src / f"{s}.jsonl").exists()]

    def make() -> JsonlBuilder:
        return builder_cls(data_dir=data_dir(cfg), file_format="array_record", skip_bad_rows=cfg.skip_bad_rows)

    def prepare(builder: JsonlBuilder) -> dict[str, list[str]]:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(src)))
        return builder.skipped

    builder, skipped = prepare_or_reuse(make, sources, prepare)
    return read_split(builder, split, skipped, cfg), skipped.get(split, [])


def read_split(
    builder: tfds.core.DatasetBuilder, split: str, skipped: dict[str, list[str]], cfg
) -> list[dict]:
    """The rows of a prepared split (the first cfg.max_examples when > 0), numpy-decoded.

    Rows skipped at preparation raise unless cfg.skip_bad_rows; else they are logged.
    """
    bad = skipped.get(split, [])
    if bad and not cfg.skip_bad_rows:
        raise ValueError(
            f"{bad[0]} ({len(bad)} bad rows in split {split!r}; config field task.skip_bad_rows=True skips them)"
        )
    if bad:
        logging.warning("task %s: skipped %d bad rows of split %r, the first: %s", cfg.name, len(bad), split, bad[0])
    source = builder.as_data_source(split)
    n = min(len(source), max_examples(cfg) or len(source))
    return source.__getitems__(list(range(n)))


def text(value) -> str:
    """A decoded tfds Text feature."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_template(name: str, fields: Sequence[str]) -> str:
    """The prompt template rpo/data/templates/<name>.txt, verbatim; it must use exactly the placeholders
    `fields` and end with a newline (the separator before the response)."""
    path = TEMPLATES / f"{name}.txt"
    template = path.read_text(encoding="utf-8")
    if not template.endswith("\n"):
        raise ValueError(f"{path}: the template must end with a newline, the separator before the response")
    found = set(PLACEHOLDER.findall(template))
    if found != set(fields):
        want = ", ".join("{" + f + "}" for f in fields)
        raise ValueError(f"{path}: the template must use the placeholders {want}, it uses {sorted(found)}")
    return template


def fill(template: str, **values: str) -> str:
    """The template with each {question} / {choices} replaced in one pass (values are not re-scanned)."""
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
