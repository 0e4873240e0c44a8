"""`sparrow calibrate` argument and input errors: a message naming the file or field, exit 2, no traceback.

Every case here fails before an engine starts (the real run is tests/sparsity/test_calibrate.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def model_dir(tmp_path):
    from sparrow_megatron.data.recall import TINY_RECALL_DIR

    return TINY_RECALL_DIR


def _assert_user_error(result, *needles):
    code, out, err = result
    assert code == 2, (out, err)
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_missing_model_dir(sparrow, tmp_path):
    missing = tmp_path / "no-such-model"
    _assert_user_error(sparrow("calibrate", "--model", str(missing)), "field 'model'", str(missing))


def test_model_dir_without_config(sparrow, tmp_path):
    _assert_user_error(sparrow("calibrate", "--model", str(tmp_path)), "no config.json")


def test_missing_prompt_file(sparrow, tmp_path):
    path = tmp_path / "prompts.jsonl"
    _assert_user_error(sparrow("calibrate", "--prompts", str(path)), "field 'prompts'", "not found")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("", "0 rows read"),
        ('{"text": "x"}\n{"prompt": ""}\n', "missing_or_empty_prompt=2"),
        ("{oops\n", "0 rows"),
    ],
)
def test_empty_or_malformed_prompt_file(sparrow, tmp_path, model_dir, content, needle):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    result = sparrow(
        "calibrate", "--model", str(model_dir), "--prompts", str(path), "--out", str(tmp_path / "o")
    )
    _assert_user_error(result, str(path), "no usable prompt rows", needle)
    assert not (tmp_path / "o").exists()  # nothing started, nothing written


def test_unknown_prompt_format(sparrow, tmp_path, model_dir):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt\nx\n")
    _assert_user_error(sparrow("calibrate", "--model", str(model_dir), "--prompts", str(path)), "prompts.csv")


@pytest.mark.parametrize(("budgets", "needle"), [("100", "100 is not a multiple"), ("32", "32 is not"),
                                                 ("64,64", "duplicate")])  # fmt: skip
def test_bad_budgets(sparrow, budgets, needle):
    _assert_user_error(sparrow("calibrate", "--budgets", budgets), "field 'budgets'", needle)


def test_unparsable_budgets_exit_2(sparrow):
    with pytest.raises(SystemExit) as exc:
        sparrow("calibrate", "--budgets", "abc")
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tau", "1.2"], "field 'tau'"),
        (["--samples", "0"], "field 'samples'"),
        (["--bin-width", "0"], "field 'bin_width'"),
        (["--top-k", "0"], "field 'top_k'"),
        (["--hardware", "tpu"], "unknown hardware 'tpu'"),
        (["--cost-model", "qwen9"], "unknown model 'qwen9'"),
    ],
)
def test_bad_fields(sparrow, args, needle):
    _assert_user_error(sparrow("calibrate", *args), needle)


def test_unsolvable_table_prints_it_and_exits_2(sparrow, tmp_path, monkeypatch):
    """The solve step failing after measuring: the table is shown, the error names the bin and the file
    to re-solve. The measuring run is replaced here only to reach that branch without an engine."""
    import numpy as np

    import sparrow_megatron.calibration as cal

    def fake_run(cfg, progress=None):
        ms = [cal.Measurement(b, np.full(30, a), np.full(30, a), np.full(30, a), np.arange(200, 230))
              for b, a in ((48, 0.5), (64, 0.7))]  # fmt: skip
        table, cells = cal.build_table(ms, bin_width=100)
        filled, _ = cal.fill_unmeasured(table)
        try:
            cal.solve_calibrated(filled, cfg.tau)
        except cal.UserError as err:
            error = f"{err} (re-solve with `sparrow schedule solve {tmp_path / 'tails.json'}`)"
        return cal.CalibrationResult(tmp_path, table, filled, cells, None, None, ms, {}, {}, error)

    monkeypatch.setattr(cal, "run_calibration", fake_run)
    code, out, err = sparrow("calibrate", "--out", str(tmp_path))
    assert code == 2 and "Traceback" not in err
    assert "bin 0 (positions 0-100)" in err and "sparrow schedule solve" in err and "tails.json" in err
    assert "0.500" in out and "0.700" in out and "200-300" in out
