import json
import logging

import pytest

from sparrow_megatron.data.datasets import (
    MATH_INSTRUCTION,
    DatasetConfig,
    load_code_dataset,
    load_math_dataset,
    load_tokenizer,
)
from sparrow_megatron.errors import UserError
from sparrow_megatron.models.tiny import build_char_tokenizer


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_polaris_style_jsonl_with_malformed_rows_skipped_and_counted(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "polaris.jsonl",
        [
            {"problem": "What is 1+1?", "answer": "2"},
            {"problem": "Half of one?", "answer": "\\frac{1}{2}"},
            {"problem": "No answer here"},
            {"problem": "   ", "answer": "3"},
            {"problem": ["not", "text"], "answer": "3"},
            {"problem": "Dict answer", "answer": {"x": 1}},
            "{broken json",
            [1, 2],
            {"problem": "Integer answer", "answer": 7},
        ],
    )
    with caplog.at_level(logging.WARNING):
        examples, report = load_math_dataset(DatasetConfig(path=str(path)))
    assert [e.answer for e in examples] == ["2", "\\frac{1}{2}", "7"]
    assert examples[0].source == f"{path}:1"
    assert report.rows == 9 - 1  # the broken JSON line never became a row
    assert report.loaded == 3
    assert dict(report.skipped) == {
        "missing_answer": 1,
        "empty_problem": 1,
        "bad_problem_type": 1,
        "bad_answer_type": 1,
        "invalid_json": 1,
        "not_an_object": 1,
    }
    assert f"{path}:3: skipped row (missing_answer)" in caplog.text
    assert "skipped: bad_answer_type=1" in caplog.text


def test_dapo_style_parquet_with_chat_prompt_and_nested_ground_truth(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": "Solve 2x = 6."}],
            "reward_model": {"ground_truth": "3", "style": "rule"},
            "extra_info": {"index": "a-1"},
        },
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": "Solve x + 1 = 1."}],
            "reward_model": {"ground_truth": "0", "style": "rule"},
            "extra_info": {"index": "a-2"},
        },
    ]
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    examples, report = load_math_dataset(DatasetConfig(path=str(path)))
    assert [(e.id, e.problem, e.answer) for e in examples] == [
        ("a-1", "Solve 2x = 6.", "3"),
        ("a-2", "Solve x + 1 = 1.", "0"),
    ]
    assert report.skipped == {}


def test_aime_json_file_with_numeric_answers_and_column_mapping(tmp_path):
    path = tmp_path / "aime24.json"
    path.write_text(
        json.dumps([{"ID": "2024-I-1", "Problem": "p1", "Answer": 204.0}, {"ID": "x", "Problem": "p2"}])
    )
    examples, report = load_math_dataset(DatasetConfig(path=str(path)))
    assert [(e.id, e.answer) for e in examples] == [("2024-I-1", "204")]
    assert report.skipped == {"missing_answer": 1}
    mapped = tmp_path / "custom.jsonl"
    write_jsonl(mapped, [{"q": {"text": "custom?"}, "gold": "5", "uid": 9}])
    examples, _ = load_math_dataset(
        DatasetConfig(path=str(mapped), problem_key="q.text", answer_key="gold", id_key="uid", limit=1)
    )
    assert [(e.id, e.problem, e.answer) for e in examples] == [("9", "custom?", "5")]


def test_limit_stops_early(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": f"p{i}", "answer": str(i)} for i in range(10)])
    examples, report = load_math_dataset(DatasetConfig(path=str(path), limit=4))
    assert [e.answer for e in examples] == ["0", "1", "2", "3"]
    assert report.rows == 4


def test_unreadable_files_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_math_dataset(DatasetConfig(path=str(tmp_path / "missing.jsonl")))
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"this is not parquet")
    with pytest.raises(UserError, match="bad.parquet: cannot read parquet"):
        load_math_dataset(DatasetConfig(path=str(bad_parquet)))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    with pytest.raises(UserError, match="bad.json: not valid JSON"):
        load_math_dataset(DatasetConfig(path=str(bad_json)))
    with pytest.raises(UserError, match="unknown dataset format"):
        load_math_dataset(DatasetConfig(path=str(tmp_path / "x.csv")))
    all_bad = write_jsonl(tmp_path / "all_bad.jsonl", [{"problem": "p"}])
    with pytest.raises(UserError, match="no usable rows"):
        load_math_dataset(DatasetConfig(path=str(all_bad)))


def test_chat_template_from_model_dir(tmp_path):
    build_char_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "What is 1+1?", "answer": "2"}])
    (example,), _ = load_math_dataset(DatasetConfig(path=str(path)))
    assert example.prompt_text(tokenizer) == (
        f"<|im_start|>user\nWhat is 1+1?\n\n{MATH_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(UserError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "nowhere")


def test_taco_style_code_rows_with_broken_tests_skipped(tmp_path):
    good = {"inputs": ["1 2\n"], "outputs": ["3\n"]}
    path = write_jsonl(
        tmp_path / "taco.jsonl",
        [
            {"question": "Add two numbers.", "input_output": json.dumps(good)},
            {"question": "Call based", "input_output": {"fn_name": "f", "inputs": [[1]], "outputs": [2]}},
            {"question": "Broken", "input_output": json.dumps({"inputs": ["1"], "outputs": []})},
            {"question": "No tests"},
        ],
    )
    examples, report = load_code_dataset(DatasetConfig(path=str(path)))
    assert [e.tests.kind for e in examples] == ["stdio", "call"]
    assert report.skipped == {"broken_tests": 1, "missing_tests": 1}
