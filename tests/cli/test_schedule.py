import json

from sparrow_megatron.sparsity.schedule import PRESETS, Schedule
from sparrow_megatron.sparsity.solver import TailTable


def test_show_all_presets_and_plot(sparrow, tmp_path):
    code, out, err = sparrow("schedule", "show", "--plot", str(tmp_path / "s.png"))
    assert code == 0, err
    for name in PRESETS:
        assert name in out
    assert (tmp_path / "s.png").stat().st_size > 10_000


def test_show_json_of_a_file(sparrow, tmp_path):
    path = Schedule((64, 128), bin_width=100, name="mine").save(tmp_path / "mine.yaml")
    code, out, _ = sparrow("schedule", "show", str(path), "--json")
    assert code == 0 and json.loads(out)[0]["budgets"] == [64, 128]


def test_validate_good_and_bad(sparrow, tmp_path):
    good = PRESETS["qwen3-4b-0.86"].save(tmp_path / "good.json")
    code, out, _ = sparrow("schedule", "validate", str(good))
    assert code == 0 and "ok" in out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": 1, "budgets": [512, 1000]}))
    code, _, err = sparrow("schedule", "validate", str(bad))
    assert (
        code == 2 and "budgets[1] = 1000 is not a multiple of page_size 16" in err and "Traceback" not in err
    )


def test_solve_writes_the_cheapest_schedule(sparrow, tmp_path):
    table = TailTable(
        (512, 1024, 2048), ((0.9, 0.8, 0.7), (0.95, 0.9, 0.84), (0.99, 0.95, 0.9)), bin_width=2000
    )
    table.save(tmp_path / "table.json")
    out_path = tmp_path / "solved.json"
    code, out, err = sparrow(
        "schedule", "solve", str(tmp_path / "table.json"), "--tau", "0.86", "--out", str(out_path)
    )
    assert code == 0, err
    assert Schedule.load(out_path).budgets == (512, 1024, 2048)
    assert "predicted rollout speedup" in out
    code, _, err = sparrow("schedule", "solve", str(tmp_path / "table.json"), "--tau", "0.96")
    assert code == 2 and "bin 1 (positions 2000-4000)" in err


def test_unknown_schedule(sparrow):
    code, _, err = sparrow("schedule", "show", "qwen3-99b")
    assert code == 2 and "unknown schedule 'qwen3-99b'" in err
