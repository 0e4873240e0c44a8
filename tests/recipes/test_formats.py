"""The dataset files of the rehearsal, in the public formats users bring, read by the loaders.

Fast (no engine, no trainer): what each format turns into, and that a broken row is named file:row.
"""

from __future__ import annotations

import json

import pytest

from sparrow_megatron.data.datasets import DatasetConfig, load_code_dataset, load_math_dataset
from sparrow_megatron.errors import UserError
from tests.recipes import fixtures


@pytest.mark.parametrize(
    "writer,suffix",
    [
        (fixtures.write_dapo_parquet, "parquet"),
        (fixtures.write_polaris_jsonl, "jsonl"),
        (fixtures.write_aime_jsonl, "jsonl"),
    ],
)
def test_math_formats_give_problem_and_answer(tmp_path, writer, suffix):
    path = writer(tmp_path / f"data.{suffix}")
    examples, report = load_math_dataset(DatasetConfig(path=str(path)))
    assert report.loaded == report.rows == len(fixtures.MATH) and not report.skipped
    assert [e.answer for e in examples] == [a for _, a in fixtures.MATH]  # AIME's ints as text
    assert all(p in e.problem for e, (p, _) in zip(examples, fixtures.MATH, strict=True))
    assert examples[0].source == f"{path}:1"


@pytest.mark.parametrize("writer", [fixtures.write_taco_jsonl, fixtures.write_livecodebench_jsonl])
def test_code_formats_give_problem_and_stdio_tests(tmp_path, writer):
    path = writer(tmp_path / "code.jsonl")
    examples, report = load_code_dataset(DatasetConfig(path=str(path)))
    assert report.loaded == len(fixtures.CODE) and not report.skipped
    first = examples[0]
    assert first.problem == fixtures.CODE[0][0]
    assert first.tests.kind == "stdio" and first.tests.inputs == ["1 2\n", "5 7\n"]
    assert first.tests.outputs == ["3\n", "12\n"]


def test_livecodebench_functional_and_broken_tests_are_skipped_and_counted(tmp_path):
    path = fixtures.write_livecodebench_jsonl(tmp_path / "lcb.jsonl")
    functional = [{"input": "[1, 2]", "output": "3", "testtype": "functional"}]
    extra = [
        {"question_content": "f", "public_test_cases": json.dumps(functional)},
        {"question_content": "g", "public_test_cases": "[{broken"},
        {"question_content": "h", "public_test_cases": json.dumps([{"input": "1"}])},
    ]
    with path.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in extra)
    examples, report = load_code_dataset(DatasetConfig(path=str(path)))
    assert len(examples) == len(fixtures.CODE)
    assert dict(report.skipped) == {"functional_tests": 1, "broken_tests": 2}


def test_columns_map_another_schema(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"q": "What is 1+1?", "meta": {"gold": 2}}) + "\n")
    examples, _ = load_math_dataset(DatasetConfig(path=str(path), problem_key="q", answer_key="meta.gold"))
    assert (examples[0].problem, examples[0].answer) == ("What is 1+1?", "2")


def test_no_usable_rows_names_the_file_and_the_reasons(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"problem": "x"}) + "\n" + json.dumps({"answer": "1"}) + "\n")
    with pytest.raises(UserError) as err:
        load_math_dataset(DatasetConfig(path=str(path)))
    assert str(path) in str(err.value) and "0/2 rows" in str(err.value)
    assert "missing_answer=1" in str(err.value) and "missing_problem=1" in str(err.value)


def test_long_prompts_are_skipped_and_counted_or_refused(tmp_path, user_files):
    from sparrow_megatron.data.datasets import fit_prompts, load_tokenizer

    tokenizer = load_tokenizer(user_files["model"])  # the rehearsal's checkpoint: built once per session
    path = tmp_path / "long.jsonl"
    rows = [{"problem": "What is 1+1?", "answer": "2"}, {"problem": "word " * 300, "answer": "3"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, report = load_math_dataset(DatasetConfig(path=str(path)))
    kept = fit_prompts(examples, report, tokenizer, max_tokens=100, refuse=False)
    assert [e.answer for e in kept] == ["2"]
    assert report.skipped == {"prompt_too_long": 1} and report.loaded == 1
    examples, report = load_math_dataset(DatasetConfig(path=str(path)))
    with pytest.raises(
        UserError, match=rf"{path}:2: prompt of \d+ tokens is longer than data.max_prompt_tokens=100"
    ):
        fit_prompts(examples, report, tokenizer, max_tokens=100, refuse=True)
    with pytest.raises(UserError, match="no usable rows.*prompt_too_long=2"):
        fit_prompts(*load_math_dataset(DatasetConfig(path=str(path))), tokenizer, max_tokens=5, refuse=False)
