"""Calibration: table building, gap filling and solving on synthetic acceptance (exact numbers), budget
grids, prompt files; and one real end-to-end run on the embedded tiny model through SGLang."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sparrow_megatron.calibration import CalibrateConfig, load_prompt_texts
from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.calibrate import (
    Measurement,
    build_table,
    check_budgets,
    default_budgets,
    fill_unmeasured,
    measure_sequences,
    solve_calibrated,
)
from sparrow_megatron.sparsity.selection import PageGeometry
from sparrow_megatron.sparsity.solver import TailTable


def _measurement(budget: int, per_bin: dict[int, list[float]], width: int = 100) -> Measurement:
    """Tokens with the given acceptance in each bin (positions at the bin's start)."""
    alpha = np.array([a for b in sorted(per_bin) for a in per_bin[b]])
    positions = np.array([b * width + i for b in sorted(per_bin) for i in range(len(per_bin[b]))])
    return Measurement(budget, alpha, alpha.copy(), alpha.copy(), positions)


# 20 tokens per cell: np.percentile(x, 5) interpolates at rank 0.95 between the two smallest values.
def _cell(low: float, second: float) -> list[float]:
    return [low, second] + [1.0] * 18


def test_build_table_p5_per_budget_and_bin_exact():
    ms = [
        _measurement(64, {2: _cell(0.50, 0.70), 3: _cell(0.40, 0.60)}),
        _measurement(128, {2: _cell(0.80, 0.90), 3: _cell(0.70, 0.90)}),
        _measurement(256, {2: _cell(0.90, 1.00), 3: _cell(0.88, 0.98)}),
    ]
    table, cells = build_table(ms, bin_width=100, min_bin_tokens=20, tau=0.86)
    assert table.budgets == (64, 128, 256)
    assert table.num_bins == 4  # bins 0 and 1 (the prompts) have no generated token
    expected = {
        64: (None, None, 0.5 + 0.95 * 0.2, 0.4 + 0.95 * 0.2),
        128: (None, None, 0.8 + 0.95 * 0.1, 0.7 + 0.95 * 0.2),
        256: (None, None, 0.9 + 0.95 * 0.1, 0.88 + 0.95 * 0.1),
    }
    for budget, row in zip(table.budgets, table.p5, strict=True):
        for got, want in zip(row, expected[budget], strict=True):
            assert got == want if want is None else got == pytest.approx(want, abs=1e-12)
    by_key = {(c.budget, c.bin): c for c in cells}
    assert by_key[(64, 2)].count == 20
    assert by_key[(64, 2)].mean == pytest.approx((0.5 + 0.7 + 18) / 20)
    assert by_key[(64, 3)].frac_below_tau == pytest.approx(2 / 20)


def test_sparse_cells_count_as_unmeasured_and_none_at_all_is_an_error():
    ms = [_measurement(64, {2: _cell(0.5, 0.7), 3: [0.1] * 5})]
    table, cells = build_table(ms, bin_width=100, min_bin_tokens=20)
    assert table.num_bins == 3 and table.p5[0][2] is not None
    assert {(c.bin, c.count) for c in cells} == {(2, 20), (3, 5)}  # kept in the raw cells
    with pytest.raises(UserError, match="no \\(budget, bin\\) cell got 50 tokens \\(most: 20\\)"):
        build_table(ms, bin_width=100, min_bin_tokens=50)


def test_fill_unmeasured_takes_the_next_measured_bin_of_the_row():
    table = TailTable((64, 128), ((None, None, 0.8, None, 0.6), (None, 0.95, None, 0.9, None)), bin_width=10)
    filled, cells = fill_unmeasured(table)
    assert filled.p5 == ((0.8, 0.8, 0.8, 0.6, 0.6), (0.95, 0.95, 0.9, 0.9, None))
    assert cells == [(64, 0, 2), (64, 1, 2), (64, 3, 4), (128, 0, 1), (128, 2, 3)]
    assert filled.provenance["filled_cells"] == [list(c) for c in cells]
    assert table.p5[0][0] is None  # the measured table is left alone


def test_solve_calibrated_end_to_end_from_acceptance():
    # p5 falls with position; 64 holds tau only in bin 2, 128 until bin 3, 256 everywhere.
    ms = [
        _measurement(64, {2: _cell(0.90, 0.90), 3: _cell(0.50, 0.50), 4: _cell(0.30, 0.30)}),
        _measurement(128, {2: _cell(0.95, 0.95), 3: _cell(0.87, 0.87), 4: _cell(0.70, 0.70)}),
        _measurement(256, {2: _cell(0.99, 0.99), 3: _cell(0.97, 0.97), 4: _cell(0.90, 0.90)}),
    ]
    table, _ = build_table(ms, bin_width=100, min_bin_tokens=20)
    filled, _ = fill_unmeasured(table)
    schedule = solve_calibrated(filled, tau=0.86, dense_layers=(0,), name="cal")
    assert schedule.budgets == (64, 64, 64, 128, 256)
    assert schedule.bin_width == 100 and schedule.dense_layers == (0,) and schedule.name == "cal"
    assert schedule.provenance["tau"] == 0.86
    # A higher tau than any candidate reaches in the last bin: an error naming it, or dense there.
    with pytest.raises(UserError, match=r"bin 4 \(positions 400-500\)"):
        solve_calibrated(filled, tau=0.95)
    assert solve_calibrated(filled, tau=0.95, dense_fallback=True).budgets == (128, 128, 128, 256, None)


def test_the_written_table_round_trips_through_the_solver_format(tmp_path):
    ms = [_measurement(64, {1: _cell(0.9, 0.9)}), _measurement(128, {1: _cell(0.95, 0.95)})]
    table, _ = build_table(ms, bin_width=100, min_bin_tokens=20, provenance={"model": "m"})
    filled, _ = fill_unmeasured(table)
    loaded = TailTable.load(filled.save(tmp_path / "tails.json"))
    assert loaded.budgets == filled.budgets and loaded.p5 == filled.p5
    assert loaded.provenance["model"] == "m" and loaded.provenance["filled_cells"] == [
        [64, 0, 1],
        [128, 0, 1],
    ]


def test_measure_sequences_acceptance_and_positions():
    # Full-vocabulary lists over 3 tokens: alpha = sum min(p, q) exactly.
    ids = torch.tensor([[0, 1, 2], [0, 1, 2]])
    p = torch.tensor([[0.5, 0.3, 0.2], [1.0, 1e-30, 1e-30]]).log()
    q = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]]).log()
    m = measure_sequences(48, [10, 20], [(ids, p), (ids[:1], p[:1])], [(ids, q), (ids[:1], q[:1])])
    np.testing.assert_allclose(m.alpha, [0.7, 0.6, 0.7], atol=1e-9)
    np.testing.assert_allclose(m.lower, m.alpha) and np.testing.assert_allclose(m.upper, m.alpha)
    assert m.positions.tolist() == [10, 11, 20] and m.sequences == 2 and m.nan_tokens == 0


def test_default_budgets_grid():
    assert default_budgets(1132) == (256, 512, 768, 1024)
    assert default_budgets(1024) == (256, 512, 768)  # 1024 would be dense at every step
    grid = default_budgets(32768, max_candidates=8)
    assert len(grid) <= 8 and grid[-1] == 32768 - 256 and all(b % 256 == 0 for b in grid)
    assert list(grid) == sorted(set(grid))
    with pytest.raises(UserError, match="nothing to calibrate"):
        default_budgets(200)


@pytest.mark.parametrize(
    ("budgets", "match"),
    [((100,), "100 is not a multiple of the page size 16"), ((32,), "32 is not"), ((64, 64), "duplicate")],
)
def test_check_budgets_names_the_field(budgets, match):
    with pytest.raises(UserError, match=f"field 'budgets'.*{match}"):
        check_budgets(budgets, PageGeometry())


def test_config_validation(tmp_path):
    with pytest.raises(UserError, match="field 'model'.*no config.json"):
        CalibrateConfig(model=str(tmp_path / "nope")).resolved()
    with pytest.raises(UserError, match="field 'tau'"):
        CalibrateConfig(tau=1.5).resolved()
    with pytest.raises(UserError, match="field 'samples' must be >= 1"):
        CalibrateConfig(samples=0).resolved()
    with pytest.raises(UserError, match="field 'prompts'.*not found"):
        CalibrateConfig(prompts=str(tmp_path / "x.jsonl")).resolved()
    tiny = CalibrateConfig().resolved()
    assert (tiny.num_prompts, tiny.samples, tiny.max_new_tokens, tiny.bin_width) == (16, 2, 8, 256)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    big = CalibrateConfig(model=str(tmp_path / "m")).resolved()
    assert (big.num_prompts, big.bin_width) == (64, 2000)


class _ChatTokenizer:
    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"


def test_load_prompt_texts_rows_kinds_and_skips(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "plain"},
        {"problem": "1+1?", "answer": "2"},
        {"question": "code it", "input_output": {"inputs": [], "outputs": []}},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "chat"}]},
        {"prompt": "  "},
        [1, 2],
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    texts = load_prompt_texts(path, _ChatTokenizer(), limit=10)
    assert texts[0] == "user:plain|assistant:"
    assert texts[1].startswith("user:1+1?\n\nPlease reason step by step")
    assert texts[2] == "user:code it|assistant:"
    assert texts[3] == "user:chat|assistant:"
    assert len(texts) == 4
    assert len(load_prompt_texts(path, _ChatTokenizer(), limit=2)) == 2


def test_load_prompt_texts_without_usable_rows_names_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="empty.jsonl: no usable prompt rows \\(0 rows read"):
        load_prompt_texts(empty, _ChatTokenizer(), 4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n{"prompt": ""}\n')
    with pytest.raises(UserError, match="bad.jsonl: no usable prompt rows.*missing_or_empty_prompt=2"):
        load_prompt_texts(bad, _ChatTokenizer(), 4)


# --- real run -------------------------------------------------------------------------------------

# Tolerance of "p5 grows with the budget": ~60 tokens per cell make p5 the ~3rd lowest value, noisy.
MONOTONE_TOL = 0.05


@pytest.mark.sglang
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_embedded_calibration_prompts_span_several_bins(tmp_path):
    from sparrow_megatron.calibration import recall_prompt_texts
    from sparrow_megatron.models.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer(tmp_path)
    texts = recall_prompt_texts(tokenizer, CalibrateConfig().resolved().num_prompts)
    bins = {len(tokenizer(t, add_special_tokens=False)["input_ids"]) // 256 for t in texts}
    assert len(bins) >= 4, sorted(bins)


def test_calibrate_end_to_end_on_the_tiny_model(tmp_path, monkeypatch):
    """Every layer sparse (with the default dense layers 0 and 1 the tiny model recalls the needle under
    any budget on these prompts): 48 tokens (sink + local pages only) cannot see the needle."""
    import functools

    from sparrow_megatron import calibration
    from sparrow_megatron.calibration import run_calibration
    from sparrow_megatron.cli.main import main
    from sparrow_megatron.sparsity.schedule import Schedule

    # Four fixed-length (1100-character) prompts: every token in one bin, so the numbers below are exact.
    fixed = functools.partial(calibration.recall_prompt_texts, haystack=(1100, 1100))
    monkeypatch.setattr(calibration, "recall_prompt_texts", fixed)
    out = tmp_path / "cal"
    # 4 samples per prompt: the tiny model often stops after a few tokens under a small budget, and a
    # cell needs min_bin_tokens (20) tokens to count as measured.
    cfg = CalibrateConfig(
        budgets=(48, 128, 256), dense_layers=(), out=str(out), dense_fallback=True, samples=4, num_prompts=4
    )
    result = run_calibration(cfg)
    assert result.error is None
    for name in ("tails.json", "measurements.json", "heatmap.png", "schedule.json", "summary.json"):
        assert (out / name).is_file(), name
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    for b in (48, 128, 256):  # 4 prompts x 4 samples, each response non-empty
        assert len((out / "topk" / f"budget-{b}.jsonl").read_text().splitlines()) == 16

    # ~1124-token prompts + <= 8 tokens: every token sits in bin 4 (1024-1280).
    measured = result.table
    assert measured.budgets == (48, 128, 256) and measured.num_bins == 5
    assert all(row[j] is None for row in measured.p5 for j in range(4))
    column = [row[4] for row in measured.p5]
    assert all(v is not None and 0.0 <= v <= 1.0 for v in column)
    for small, large in zip(column, column[1:], strict=False):
        assert large >= small - MONOTONE_TOL, column
    assert column[0] < cfg.tau and column[-1] >= column[0], column
    cells = json.loads((out / "measurements.json").read_text())["cells"]
    assert {(c["budget"], c["bin"]) for c in cells} == {(b, 4) for b in (48, 128, 256)}
    assert all(cfg.min_bin_tokens <= c["count"] <= 16 * 8 for c in cells)

    table = TailTable.load(out / "tails.json")  # the solver's format, leading bins filled from bin 4
    assert table.budgets == (48, 128, 256) and table.bin_width == 256
    assert table.p5 == tuple((v,) * 5 for v in column)

    schedule = Schedule.load(out / "schedule.json")
    # The cheapest candidate holding tau (on these prompts 256: p5 ~0.997), dense if none does.
    cheapest = min((b for b, v in zip(measured.budgets, column, strict=True) if v >= cfg.tau), default=None)
    assert schedule == result.schedule and schedule.budgets == (cheapest,) * 5
    assert schedule.dense_layers == () and schedule.bin_width == 256
    assert main(["schedule", "validate", str(out / "schedule.json")]) == 0
    solve = ["schedule", "solve", str(out / "tails.json"), "--tau", str(cfg.tau), "--dense-fallback"]
    assert main(solve) == 0
    speedup = json.loads((out / "summary.json").read_text())["prediction"]["predicted_speedup"]
    assert math.isfinite(speedup) and speedup > 0


def test_plain_prompt_rows_from_parquet_match_the_task_prompts(tmp_path):
    """A {"prompt": question} parquet row gets the same chat-formatted prompt as the task itself."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sparrow_megatron.calibration import recall_prompt_texts
    from sparrow_megatron.data.datasets import load_tokenizer
    from sparrow_megatron.data.recall import EMBEDDED_HAYSTACK, TINY_RECALL_DIR, RecallTask, RecallTaskConfig

    tokenizer = load_tokenizer(TINY_RECALL_DIR)
    lo, hi = EMBEDDED_HAYSTACK  # the varied lengths of the embedded prompts, as recall_prompt_texts
    examples = RecallTask(RecallTaskConfig(haystack_len=hi, min_haystack_len=lo)).examples("eval", 3)
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": ex.question} for ex in examples]), path)
    assert load_prompt_texts(path, tokenizer, limit=3) == recall_prompt_texts(tokenizer, 3)


def test_build_table_takes_p5_of_the_lower_bound_by_default():
    # The reference's metric (and tau 0.86's) is the lower bound; the estimate sits above it.
    estimate = np.array(_cell(0.80, 0.90))
    positions = np.arange(200, 220)
    m = Measurement(64, estimate, estimate - 0.1, np.minimum(estimate + 0.05, 1.0), positions)
    (row,) = build_table([m], bin_width=100, min_bin_tokens=20)[0].p5
    assert row[2] == pytest.approx(0.70 + 0.95 * 0.10, abs=1e-12)
    (row,) = build_table([m], bin_width=100, min_bin_tokens=20, signal="estimate")[0].p5
    assert row[2] == pytest.approx(0.80 + 0.95 * 0.10, abs=1e-12)
