"""The real-dataset tasks (GSM8K, MATH, ARC-Challenge): TFDS preparation from fixtures, prompts, targets, scoring.

Fixtures (tests/fixtures/data, see its README): real GSM8K and MATH rows, constructed ARC rows
in the official format. Each test copies what it needs to tmp_path and prepares its own TFDS
data there. The scoring tests need rpo.rewards and skip until it exists.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_collections
import pytest

from rpo import files
from rpo.data import Example, get_task
from rpo.data import arc as arc_lib
from rpo.data import gsm8k as gsm8k_lib
from rpo.data import math as math_lib
from rpo.data import tfds_util

FIXTURES = Path(__file__).parent / "fixtures" / "data"
CALCULATOR = re.compile(r"<<[^<>]*>>")


def config(name: str, src: Path, tmp_path: Path, **overrides) -> ml_collections.ConfigDict:
    fields = dict(name=name, source_dir=str(src), tfds_dir=str(tmp_path / "tfds"), strict=False, skip_bad_rows=False,
                  max_examples=0)
    return ml_collections.ConfigDict({**fields, **overrides})


def source(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def append(path: Path, line: str) -> int:
    """Appends a line; returns its 1-based line number."""
    text = path.read_text()
    path.write_text(text + line + "\n")
    return text.count("\n") + 1


def not_prepared_again(*args):
    raise AssertionError("prepared again")


# GSM8K


def test_gsm8k_rows_fields_and_uids(tmp_path):
    src = source("gsm8k", tmp_path)
    task = get_task(config("gsm8k", src, tmp_path))
    assert task.name == "gsm8k"
    for split in ("train", "test"):
        official = rows(src / f"{split}.jsonl")
        examples = task.load(split)
        assert len(examples) == len(official) == 3
        for i, (ex, row) in enumerate(zip(examples, official)):
            assert ex.uid == f"gsm8k/{split}/{i}"
            assert ex.question == row["question"]
            solution, gold = row["answer"].split("\n#### ")
            assert (ex.solution, ex.answer) == (solution, gold)
        assert task.skipped_rows[split] == []
    assert task.load("test")[2].answer == "114,200"  # the answer as written
    assert sorted(p.name for p in (tmp_path / "tfds/rpo_gsm8k/1.0.0").glob("*.array_record*")) == [
        "rpo_gsm8k-test.array_record-00000-of-00001",
        "rpo_gsm8k-train.array_record-00000-of-00001",
    ]


def test_gsm8k_reuses_prepared_data_and_reprepares_when_a_source_changes(tmp_path, monkeypatch):
    src = source("gsm8k", tmp_path)
    cfg = config("gsm8k", src, tmp_path)
    first = gsm8k_lib.GSM8KTask(cfg).load("train")
    monkeypatch.setattr(gsm8k_lib.Gsm8kBuilder, "_generate_examples", not_prepared_again)
    assert gsm8k_lib.GSM8KTask(cfg).load("train") == first
    append(src / "train.jsonl", (src / "test.jsonl").read_text().splitlines()[0])
    with pytest.raises(AssertionError, match="prepared again"):
        gsm8k_lib.GSM8KTask(cfg).load("train")
    monkeypatch.undo()
    again = gsm8k_lib.GSM8KTask(cfg).load("train")
    assert again[:3] == first and len(again) == 4


def test_gsm8k_max_examples_takes_the_first_rows(tmp_path):
    src = source("gsm8k", tmp_path)
    full = get_task(config("gsm8k", src, tmp_path)).load("train")
    assert get_task(config("gsm8k", src, tmp_path, max_examples=2)).load("train") == full[:2]
    with pytest.raises(ValueError, match="task.max_examples"):
        get_task(config("gsm8k", src, tmp_path, max_examples=-1)).load("train")


def test_gsm8k_prompt_is_zero_shot_and_ends_in_the_answer_format(tmp_path):
    task = get_task(config("gsm8k", source("gsm8k", tmp_path), tmp_path))
    for ex in task.load("test"):
        prompt = task.prompt(ex)
        assert prompt.count(ex.question) == 1
        assert 'step by step reasoning before you answer' in prompt
        assert 'please use the format "Final answer: ..."' in prompt
        assert prompt.endswith(f"Question: {ex.question}\n\nSolution:\n")


def test_gsm8k_target_drops_calculator_annotations(tmp_path):
    task = get_task(config("gsm8k", source("gsm8k", tmp_path), tmp_path))
    first = task.load("train")[0]
    assert task.target(first) == (
        "Natalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
        "Final answer: 72"
    )
    for ex in task.load("train") + task.load("test"):
        target = task.target(ex)
        assert "<<" not in target and ">>" not in target
        assert target.endswith(f"\nFinal answer: {ex.answer}")


def test_gsm8k_target_scores_correct(tmp_path):
    rewards = pytest.importorskip("rpo.rewards")
    task = get_task(config("gsm8k", source("gsm8k", tmp_path), tmp_path, strict=True))
    examples = task.load("train") + task.load("test")
    answers, correct = task.score([task.target(ex) for ex in examples], examples)
    assert correct == [True] * len(examples)
    assert answers == [rewards.gsm8k_answer(task.target(ex), True) for ex in examples]
    assert answers[0] is not None
    wrong = [f"I think it is {ex.answer}1.\nFinal answer: {ex.answer}1" for ex in examples]
    assert task.score(wrong, examples)[1] == [False] * len(examples)
    with pytest.raises(ValueError, match="2 completions for 1 examples"):
        task.score(["a", "b"], examples[:1])


def test_gsm8k_bad_row_names_file_and_line_or_is_skipped_and_counted(tmp_path, monkeypatch):
    src = source("gsm8k", tmp_path)
    line = append(src / "train.jsonl", json.dumps({"question": "How many?", "answer": "Some reasoning, no marker."}))
    with pytest.raises(ValueError, match=re.escape(f"{src / 'train.jsonl'}:{line}: no '####' answer")):
        get_task(config("gsm8k", src, tmp_path)).load("train")

    assert not tfds_util.preparing_marker(tmp_path / "tfds/rpo_gsm8k/1.0.0").exists()  # the failure left nothing

    task = get_task(config("gsm8k", src, tmp_path, skip_bad_rows=True))
    assert [ex.uid for ex in task.load("train")] == ["gsm8k/train/0", "gsm8k/train/1", "gsm8k/train/2"]
    assert len(task.skipped_rows["train"]) == 1 and f"train.jsonl:{line}:" in task.skipped_rows["train"][0]
    # Reusing the prepared data gives the same skipped rows, read from the record.
    monkeypatch.setattr(gsm8k_lib.Gsm8kBuilder, "_generate_examples", not_prepared_again)
    reused = get_task(config("gsm8k", src, tmp_path, skip_bad_rows=True))
    reused.load("train")
    assert reused.skipped_rows == {"train": task.skipped_rows["train"]}
    monkeypatch.undo()
    # The prepared data remembers the skipped row: loading it without the flag still fails loudly.
    with pytest.raises(ValueError, match=re.escape(f"train.jsonl:{line}:")):
        get_task(config("gsm8k", src, tmp_path)).load("train")


def test_gsm8k_malformed_json_line_is_a_bad_row(tmp_path):
    src = source("gsm8k", tmp_path)
    line = append(src / "test.jsonl", '{"question": "cut off')
    with pytest.raises(ValueError, match=re.escape(f"test.jsonl:{line}:")):
        get_task(config("gsm8k", src, tmp_path)).load("test")


# Conventions every task follows


def cut(completion: str, stop: tuple[str, ...]) -> str:
    """The completion as the sampler returns it: the shortest prefix holding a stop string (kept)."""
    ends = [completion.index(s) + len(s) for s in stop if s in completion]
    return completion[: min(ends)] if ends else completion


def right_answer(task, ex: Example) -> str:
    return task.target(ex) or f"The options differ.\nFinal answer: ({ex.answer})"  # ARC has no gold text


@pytest.mark.parametrize("name, split, block", [
    ("gsm8k", "train", "Question:"), ("gsm8k", "train", "Your task"), ("math", "test", "Problem:"),
    ("arc", "test", "Question:"), ("arc", "test", "Your task"),
])
def test_stop_strings_cut_the_next_problem_the_model_starts(tmp_path, name, split, block):
    """A model that goes on with the prompt's pattern writes a blank line, the next problem from the prompt's
    last `block` on (another example's), and solves it; the stop strings cut that off, so the first answer counts."""
    pytest.importorskip("rpo.rewards")
    task = get_task(config(name, source(name, tmp_path), tmp_path, strict=True))
    assert isinstance(task.stop, tuple) and task.stop and all(isinstance(s, str) and s for s in task.stop)
    examples = task.load(split)
    pairs = [(ex, other) for ex in examples for other in examples if ex.answer != other.answer][:2]
    assert pairs
    for ex, other in pairs:
        prompt = task.prompt(other)
        continued = right_answer(task, ex) + "\n\n" + prompt[prompt.rindex(block):] + right_answer(task, other)
        assert task.score([continued], [ex])[1] == [False]  # uncut, the next problem's answer is read
        completion = cut(continued, task.stop)
        assert other.question not in completion
        assert task.score([completion], [ex])[1] == [True]


@pytest.mark.parametrize("name, split", [("gsm8k", "train"), ("math", "test"), ("math", "train")])
def test_prompt_ends_with_its_separator_and_target_follows_it(tmp_path, name, split):
    task = get_task(config(name, source(name, tmp_path), tmp_path))
    for ex in task.load(split):
        prompt, target = task.prompt(ex), task.target(ex)
        assert prompt.endswith("Solution:\n") and target == target.lstrip()
        first_line = CALCULATOR.sub("", ex.solution).split("\n")[0]
        assert f"\n\nSolution:\n{first_line}" in prompt + target


def test_template_without_final_newline_is_refused(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("Question: {question}\n\nSolution:")
    monkeypatch.setattr(tfds_util, "TEMPLATES", tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 't.txt'}: the template must end with a newline")):
        tfds_util.load_template("t", ("question",))


@pytest.mark.parametrize("name, split", [("gsm8k", "train"), ("arc", "test")])
def test_score_reads_each_answer_once(tmp_path, monkeypatch, name, split):
    rewards = pytest.importorskip("rpo.rewards")
    task = get_task(config(name, source(name, tmp_path), tmp_path))
    examples = task.load(split)
    extract = getattr(rewards, f"{name}_answer")
    calls = []
    monkeypatch.setattr(rewards, f"{name}_answer", lambda text, strict: calls.append(text) or extract(text, strict))
    completions = [right_answer(task, ex) for ex in examples]
    answers, correct = task.score(completions, examples)
    assert calls == completions and correct == [True] * len(examples)
    assert answers == [extract(c, False) for c in completions]


# Missing files and config fields, every task


@pytest.mark.parametrize("name, folder, removed", [
    ("gsm8k", "gsm8k", "test.jsonl"),
    ("math", "math", "test.jsonl"),
    ("arc", "arc", "ARC-Challenge-Test.jsonl"),
])
def test_missing_file_names_the_path_and_the_config_field(tmp_path, name, folder, removed):
    src = source(folder, tmp_path)
    (src / removed).unlink()
    expected = f"{src / removed}: not found (config field task.source_dir)"
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        get_task(config(name, src, tmp_path)).load("test")


def test_bad_source_dir_and_split_are_refused(tmp_path):
    with pytest.raises(ValueError, match="config field task.source_dir is empty"):
        get_task(config("gsm8k", Path(""), tmp_path, source_dir="")).load("train")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nowhere'}: no such directory")):
        get_task(config("arc", tmp_path / "nowhere", tmp_path)).load("train")
    with pytest.raises(ValueError, match="no split 'validation'"):
        get_task(config("gsm8k", source("gsm8k", tmp_path), tmp_path)).load("validation")


def test_data_left_by_an_interrupted_run_is_prepared_again(tmp_path):
    src = source("gsm8k", tmp_path)
    first = get_task(config("gsm8k", src, tmp_path)).load("train")
    prepared = tmp_path / "tfds/rpo_gsm8k/1.0.0"
    marker = tfds_util.preparing_marker(prepared)
    assert marker.parent == prepared.parent and not marker.exists()  # beside the data; gone once recorded
    # A run that died after TFDS finished but before rpo recorded it: our marker, no record, maybe partial files.
    (prepared / "rpo_source.json").unlink()
    (prepared / "rpo_gsm8k-train.array_record-00000-of-00001").write_bytes(b"cut off")
    marker.write_text("{}")
    assert get_task(config("gsm8k", src, tmp_path)).load("train") == first
    assert (prepared / "rpo_source.json").exists() and not marker.exists()


def test_data_rpo_did_not_prepare_is_never_overwritten(tmp_path):
    src = source("gsm8k", tmp_path)
    get_task(config("gsm8k", src, tmp_path)).load("train")
    prepared = tmp_path / "tfds/rpo_gsm8k/1.0.0"
    (prepared / "rpo_source.json").unlink()  # as if TFDS had prepared it for someone else
    before = sorted(p.name for p in prepared.iterdir())
    with pytest.raises(FileExistsError, match=re.escape(f"{prepared} holds rpo_gsm8k data that rpo did not prepare")):
        get_task(config("gsm8k", src, tmp_path)).load("train")
    assert sorted(p.name for p in prepared.iterdir()) == before


# MATH


def test_math_reads_both_spellings(tmp_path):
    pytest.importorskip("rpo.rewards")
    src = source("math", tmp_path)
    task = get_task(config("math", src, tmp_path))
    assert task.name == "math"

    # PRM800K-style spelling: "answer" is the solution + "The answer is: X"; the gold is the
    # solution's last \boxed{}, which must agree with the dataset's own trailing answer.
    official = rows(src / "test.jsonl")
    examples = task.load("test")
    assert [ex.uid for ex in examples] == [f"math/test/{i}" for i in range(4)]
    for ex, row in zip(examples, official):
        head, _, trailer = row["answer"].rpartition("The answer is:")
        assert ex.question == row["question"]
        assert ex.solution == head.strip() and "The answer is" not in ex.solution
        assert ex.answer == trailer.strip()
    assert examples[0].answer == r"\left( 3, \frac{\pi}{2} \right)"  # nested braces

    # MATH-500 spelling: the answer field when present, else the last \boxed{} of the solution.
    train = rows(src / "train.jsonl")
    examples = task.load("train")
    assert [ex.answer for ex in examples] == [train[0]["answer"], train[1]["answer"], "0.15"]
    assert [ex.question for ex in examples] == [row["problem"] for row in train]
    assert [ex.solution for ex in examples] == [row["solution"] for row in train]


def test_math_prompt_is_four_shot_boxed_and_target_is_the_solution(tmp_path):
    pytest.importorskip("rpo.rewards")
    task = get_task(config("math", source("math", tmp_path), tmp_path))
    for ex in task.load("test"):
        prompt = task.prompt(ex)
        assert prompt.endswith(f"Problem:\n{ex.question}\n\nSolution:\n")
        shots = prompt[: prompt.rindex(ex.question)]
        assert shots.count("Problem:\n") == 5 and shots.count("\\boxed{") == 5  # 4 worked examples + the instruction
        assert prompt.count("Solution:") == prompt.count("\n\nSolution:\n") == 5  # the examples read as the target
        assert task.target(ex) == ex.solution and "\\boxed{" in task.target(ex)
    no_box = Example("math/test/9", "q", "7", "The answer is seven.")
    assert task.target(no_box) is None


def test_math_target_scores_correct(tmp_path):
    pytest.importorskip("rpo.rewards")
    task = get_task(config("math", source("math", tmp_path), tmp_path, strict=True))
    examples = task.load("test") + task.load("train")
    answers, correct = task.score([task.target(ex) for ex in examples], examples)
    assert correct == [True] * len(examples)
    assert all(a is not None for a in answers)
    answers, correct = task.score(["So the answer is $\\boxed{12345}$.", "no answer here"], examples[:2])
    assert correct == [False, False] and answers[1] is None


def test_math_prm800k_spelling_splits_at_the_last_trailer():
    row = math_lib.parse_row({"question": "q", "answer": "We get 2+3=5. The answer is: 5"})
    assert (row["question"], row["solution"], row["answer"]) == ("q", "We get 2+3=5.", "5")  # no \\boxed needed
    row = math_lib.parse_row({"question": "q", "answer": "The answer is: 2, so $\\fbox{3}$.\nThe answer is:  3 "})
    assert (row["solution"], row["answer"]) == ("The answer is: 2, so $\\fbox{3}$.", "3")
    row = math_lib.parse_row({"question": "q", "answer": "So $\\fbox{7}$. The answer is: "})  # empty: the box
    assert (row["solution"], row["answer"]) == ("So $\\fbox{7}$.", "7")
    with pytest.raises(tfds_util.BadRow, match="nothing after the last 'The answer is:' in 'answer'"):
        math_lib.parse_row({"question": "q", "answer": "We get five. The answer is:"})


def test_math_row_without_answer_is_a_bad_row(tmp_path):
    pytest.importorskip("rpo.rewards")
    src = source("math", tmp_path)
    line = append(src / "train.jsonl", json.dumps({"problem": "What is 2+2?", "solution": "It is four."}))
    with pytest.raises(ValueError, match=re.escape(f"{src / 'train.jsonl'}:{line}: no answer")):
        get_task(config("math", src, tmp_path)).load("train")
    task = get_task(config("math", src, tmp_path, skip_bad_rows=True))
    assert len(task.load("train")) == 3 and len(task.skipped_rows["train"]) == 1


# ARC-Challenge


def arc_zip(src: Path, dest: Path) -> Path:
    """The fixture files in the official zip's layout."""
    path = dest / arc_lib.ZIP_NAME
    with zipfile.ZipFile(path, "w") as archive:
        for name in arc_lib.FILES.values():
            archive.write(src / name, f"{arc_lib.INNER_DIR}/{name}")
    return path


def test_arc_prepares_through_tfds_ai2_arc_from_extracted_files(tmp_path):
    src = source("arc", tmp_path)
    task = get_task(config("arc", src, tmp_path))
    assert task.name == "arc"
    for split, name in arc_lib.FILES.items():
        official = {row["id"]: row for row in rows(src / name)}
        examples = task.load(split)
        assert sorted(ex.uid for ex in examples) == sorted(f"arc/{split}/{i}" for i in official)
        for ex in examples:
            row = official[ex.uid.rsplit("/", 1)[1]]
            assert ex.question == row["question"]["stem"] and ex.solution == ""
            assert [text for _, text in ex.choices] == [c["text"] for c in row["question"]["choices"]]
            assert [label for label, _ in ex.choices] == list("ABCDE"[: len(row["question"]["choices"])])
    test = {ex.uid: ex for ex in task.load("test")}
    assert test["arc/test/Fixture_X02"].answer == "B"  # label "2" -> B, as ai2_arc maps it
    assert test["arc/test/Fixture_X03"].answer == "E" and len(test["arc/test/Fixture_X03"].choices) == 5
    assert {ex.answer for ex in task.load("train")} == {"A", "B", "C"}
    assert (tmp_path / "tfds/ai2_arc/ARC-Challenge/1.0.0/ai2_arc-test.array_record-00000-of-00001").exists()


def test_arc_from_the_official_zip_checks_tfds_registered_checksum(tmp_path, monkeypatch):
    jsonl = source("arc", tmp_path)
    src = tmp_path / "zip_source"
    src.mkdir()
    path = arc_zip(jsonl, src)
    with pytest.raises(ValueError, match=re.escape(f"{path}: sha256 ") + ".*TFDS registers"):
        get_task(config("arc", src, tmp_path)).load("test")

    # With TFDS expecting this zip (as it expects the real 680 MB one), the same rows come out.
    builder_cls = arc_lib.tfds.builder_cls("ai2_arc")
    info = arc_lib.tfds.core.download.checksums.UrlInfo(
        size=path.stat().st_size, checksum=files.sha256(path), filename=arc_lib.ZIP_NAME
    )
    monkeypatch.setattr(builder_cls, "url_infos", {arc_lib.ZIP_URL: info})
    from_zip = get_task(config("arc", src, tmp_path, tfds_dir=str(tmp_path / "tfds_zip"))).load("test")
    from_files = get_task(config("arc", jsonl, tmp_path)).load("test")
    assert from_zip == from_files and len(from_zip) == 3


def test_arc_prompt_lists_the_options_and_ends_in_the_answer_format(tmp_path):
    task = get_task(config("arc", source("arc", tmp_path), tmp_path))
    ex = {e.uid: e for e in task.load("test")}["arc/test/Fixture_X01"]
    prompt = task.prompt(ex)
    assert f"Question: {ex.question}\n\nOptions:\n(A) coal\n(B) natural gas\n(C) wind\n(D) oil\n\nSolution:" in prompt
    assert prompt.endswith("Solution:\n") and 'please use the format "Final answer: ..."' in prompt
    assert task.target(ex) is None
    odd = Example("arc/test/odd", "Is {choices} a placeholder?", "A", "", (("A", "yes {question}"), ("B", "no")))
    assert "Question: Is {choices} a placeholder?\n\nOptions:\n(A) yes {question}\n(B) no\n" in task.prompt(odd)


def test_arc_scoring_uses_the_letter(tmp_path):
    pytest.importorskip("rpo.rewards")
    task = get_task(config("arc", source("arc", tmp_path), tmp_path, strict=True))
    examples = task.load("test")
    right = [f"Reasoning.\nFinal answer: ({ex.answer})" for ex in examples]
    wrong = [f"Reasoning.\nFinal answer: ({'A' if ex.answer != 'A' else 'B'})" for ex in examples]
    answers, correct = task.score(right, examples)
    assert correct == [True] * 3 and all(a is not None for a in answers)
    assert task.score(wrong, examples)[1] == [False] * 3


def test_arc_bad_row_names_file_and_line_or_is_skipped(tmp_path, monkeypatch):
    src = source("arc", tmp_path)
    bad = rows(src / "ARC-Challenge-Test.jsonl")[0] | {"id": "Fixture_bad", "answerKey": "F"}
    line = append(src / "ARC-Challenge-Test.jsonl", json.dumps(bad))
    path = src / "ARC-Challenge-Test.jsonl"
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line}: no 'answerKey' among the choice labels")):
        get_task(config("arc", src, tmp_path)).load("test")
    task = get_task(config("arc", src, tmp_path, skip_bad_rows=True))
    assert len(task.load("test")) == 3 and len(task.skipped_rows["test"]) == 1
    monkeypatch.setattr(arc_lib.ARCTask, "_prepare", not_prepared_again)
    reused = get_task(config("arc", src, tmp_path, skip_bad_rows=True))
    assert len(reused.load("test")) == 3 and reused.skipped_rows == {"test": task.skipped_rows["test"]}


# No TensorFlow


def test_loading_never_imports_tensorflow(tmp_path):
    for name in ("gsm8k", "math", "arc"):
        source(name, tmp_path)
    script = f"""
import sys, importlib.util, ml_collections
from rpo.data import get_task
names = ["gsm8k", "arc"] + (["math"] if importlib.util.find_spec("rpo.rewards") else [])
for name in names:
    cfg = ml_collections.ConfigDict(dict(name=name, source_dir=r"{tmp_path}/" + name, tfds_dir=r"{tmp_path}/tfds",
                                         strict=False, skip_bad_rows=False, max_examples=0))
    assert get_task(cfg).load("test")
print(sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")))
"""
    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
