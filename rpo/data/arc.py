"""ARC-Challenge (Clark et al. 2018) through TFDS's own `ai2_arc` builder (config ARC-Challenge), offline, and its task.

TFDS's ai2_arc downloads ARC-V1-Feb2018.zip and extracts it; offline, and without TensorFlow,
neither step can run inside TFDS (its archive extractor calls tf.io.gfile). So rpo does those
two steps and hands TFDS the result where its DownloadManager looks for them: the cached
download (download_dir/ai2_arc/<url name + registered sha256>, with its .INFO) and its
extraction (download_dir/extracted/ZIP.<that name>/ARC-V1-Feb2018-2/ARC-Challenge/*.jsonl),
in a temporary download_dir. TFDS then reuses both, and its own builder code parses the
rows (numeric labels 1-5 -> A-E), defines the features and writes the array_record files.

Source (config field task.source_dir), either
  - the official ARC-V1-Feb2018.zip: its sha256 must equal the one TFDS registers for it
    (ai2_arc/checksums.tsv), and the cached download is a link to it; or
  - the extracted ARC-Challenge-{Train,Dev,Test}.jsonl, directly in source_dir or under
    ARC-Challenge/ or ARC-V1-Feb2018-2/ARC-Challenge/ (no checksum exists for these); the
    cached download is then a small stand-in file that says so (TFDS never opens it: the
    extraction beside it exists).
Every row is checked before TFDS sees it (id, question.stem, >= 2 choices with labels A-E or
1-5, answerKey among them); a bad row is an error naming file:line or, with skip_bad_rows,
left out and listed (see tfds_util).

Task config fields (the `task` block, name='arc'): source_dir, tfds_dir, skip_bad_rows,
max_examples, strict (passed to rpo.rewards). Splits: train, validation, test.
Order: TFDS stores ai2_arc shuffled by example id (deterministic); max_examples takes the
first N of that order. uid: "arc/<split>/<ARC id>". Prompt: zero-shot, templates/arc.txt,
the options rendered one a line as "(A) text", ending "Solution:\n". target(): None (ARC has
no worked solutions). stop: a new "Question:" block or a repeat of the instruction.
score(): each completion's letter (rpo.rewards.arc_answer) against the gold one (arc_gold).
"""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

from rpo import files
from rpo.data import Example, score_by_answer
from rpo.data import tfds_util
from rpo.data.tfds_util import BadRow, tfds

ZIP_NAME = "ARC-V1-Feb2018.zip"
ZIP_URL = "https://ai2-public-datasets.s3-us-west-2.amazonaws.com/arc/ARC-V1-Feb2018.zip"  # ai2_arc's _URL
INNER_DIR = "ARC-V1-Feb2018-2/ARC-Challenge"
FILES = {
    "train": "ARC-Challenge-Train.jsonl",
    "validation": "ARC-Challenge-Dev.jsonl",
    "test": "ARC-Challenge-Test.jsonl",
}
LETTERS = "ABCDE"
NUMBERS = "12345"


def check_row(obj: dict) -> dict:
    """The row itself, once it has everything ai2_arc's _generate_examples reads, in range."""
    question = obj.get("question")
    if not isinstance(obj.get("id"), str) or not isinstance(question, dict):
        raise BadRow("no 'id' or 'question'")
    if not isinstance(question.get("stem"), str):
        raise BadRow("no 'question.stem'")
    choices = question.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        raise BadRow("fewer than 2 'question.choices'")
    labels = []
    for choice in choices:
        if not isinstance(choice, dict) or not isinstance(choice.get("text"), str):
            raise BadRow(f"a choice without 'text': {choice!r}")
        labels.append(letter(choice.get("label")))
    if None in labels or len(set(labels)) != len(labels):
        raise BadRow(f"choice labels must be distinct and in A-E or 1-5: {[c.get('label') for c in choices]}")
    key = letter(obj.get("answerKey"))
    if key not in labels:
        raise BadRow(f"no 'answerKey' among the choice labels: {obj.get('answerKey')!r}")
    return obj


def letter(label) -> str | None:
    """A-E for a label 'A'-'E' or '1'-'5' (ai2_arc's mapping); None otherwise."""
    if not isinstance(label, str) or len(label) != 1:
        return None
    if label in NUMBERS:
        return LETTERS[NUMBERS.index(label)]
    return label if label in LETTERS else None


def find_sources(src: Path) -> list[Path]:
    """[the zip] or [the three jsonl files in split order]."""
    if (src / ZIP_NAME).exists():
        return [src / ZIP_NAME]
    for folder in (src, src / "ARC-Challenge", src / INNER_DIR):
        paths = [folder / name for name in FILES.values()]
        present = [p.exists() for p in paths]
        if any(present):
            if not all(present):
                raise tfds_util.missing(paths[present.index(False)], "ai2_arc builds train, validation and test")
            return paths
    raise tfds_util.missing(src / ZIP_NAME, f"the official zip, or {', '.join(FILES.values())} from it")


class ARCTask:
    name = "arc"
    stop = ("\n\nQuestion:", "\n\nYour task is")  # the template's next problem, from either of its blocks

    def __init__(self, cfg):
        self.cfg = cfg
        self.template = tfds_util.load_template("arc", ("question", "choices"))
        self.skipped_rows: dict[str, list[str]] = {}  # split -> ["file:line: why", ...] left out by skip_bad_rows

    def load(self, split: str) -> list[Example]:
        if split not in FILES:
            raise ValueError(f"task arc: no split {split!r} ({' | '.join(FILES)})")
        sources = find_sources(tfds_util.source_dir(self.cfg))

        def make():
            return tfds.builder(
                "ai2_arc", config="ARC-Challenge", data_dir=tfds_util.data_dir(self.cfg), file_format="array_record"
            )

        builder, skipped = tfds_util.prepare_or_reuse(make, sources, lambda b: self._prepare(b, sources))
        rows = tfds_util.read_split(builder, split, skipped, self.cfg)
        self.skipped_rows[split] = skipped.get(split, [])
        label_names = builder.info.features["answerKey"].names
        text = tfds_util.text
        examples = []
        for r in rows:
            choices = tuple(
                (label_names[label], text(t)) for label, t in zip(r["choices"]["label"], r["choices"]["text"])
            )
            answer = label_names[r["answerKey"]]
            examples.append(Example(f"arc/{split}/{text(r['id'])}", text(r["question"]), answer, "", choices))
        return examples

    def _prepare(self, builder, sources: list[Path]) -> dict[str, list[str]]:
        """Stage the cached download and its extraction in a temporary download_dir, then let TFDS prepare."""
        registered = builder.url_infos[ZIP_URL]
        fname = tfds.core.download.resource.get_dl_fname(ZIP_URL, registered.checksum)
        skipped: dict[str, list[str]] = {}
        with tempfile.TemporaryDirectory(prefix="rpo-arc-") as tmp:
            cached = Path(tmp) / builder.name / fname
            extracted = Path(tmp) / "extracted" / f"ZIP.{fname}" / INNER_DIR
            cached.parent.mkdir(parents=True)
            extracted.mkdir(parents=True)
            if sources[0].name == ZIP_NAME:
                zip_path = sources[0]
                got = files.sha256(zip_path)
                if got != registered.checksum:
                    raise ValueError(
                        f"{zip_path}: sha256 {got} is not the {registered.checksum} TFDS registers for the official "
                        f"{ZIP_NAME} (config field task.source_dir); use the official zip or its extracted jsonl files"
                    )
                cached.symlink_to(zip_path.resolve())
                with zipfile.ZipFile(zip_path) as archive:
                    for split, name in FILES.items():
                        with archive.open(f"{INNER_DIR}/{name}") as f:
                            lines = io.TextIOWrapper(f, encoding="utf-8")
                            label = f"{zip_path}/{INNER_DIR}/{name}"
                            skipped[split] = self._stage(label, lines, extracted / name)
            else:
                cached.write_text(
                    f"Stand-in for {ZIP_NAME}, staged by rpo from the extracted files in {sources[0].parent}; "
                    "TFDS reads the extraction beside it instead.\n"
                )
                for (split, name), path in zip(FILES.items(), sources):
                    with path.open(encoding="utf-8") as f:
                        skipped[split] = self._stage(str(path), f, extracted / name)
            info = {"urls": [ZIP_URL], "dataset_names": [builder.name], "original_fname": ZIP_NAME}
            Path(f"{cached}.INFO").write_text(json.dumps(info))
            builder.download_and_prepare(download_dir=tmp)
        return skipped

    def _stage(self, label: str, lines: Iterable[str], out: Path) -> list[str]:
        """Copy the good rows to `out`; the skipped ones are returned."""
        skipped: list[str] = []
        rows = tfds_util.jsonl_rows(label, lines, check_row, self.cfg.skip_bad_rows, skipped)
        out.write_text("".join(json.dumps(obj) + "\n" for _, obj in rows), encoding="utf-8")
        return skipped

    def prompt(self, example: Example) -> str:
        choices = "\n".join(f"({label}) {text}" for label, text in example.choices)
        return tfds_util.fill(self.template, question=example.question, choices=choices)

    def target(self, example: Example) -> None:
        return None

    def answer(self, completion: str) -> str | None:
        from rpo import rewards

        return rewards.arc_answer(completion, self.cfg.strict)

    def score(self, completions: Sequence[str], examples: Sequence[Example]) -> tuple[list[str | None], list[bool]]:
        from rpo import rewards

        return score_by_answer("arc", completions, examples, self.answer, rewards.arc_gold)
