import json

import pytest

from sparrow_megatron.sparsity.cost import HARDWARE, MODELS, predict_speedup
from sparrow_megatron.sparsity.schedule import PRESETS


def test_cost_json_is_the_cost_model(sparrow):
    code, out, err = sparrow(
        "cost",
        "--model",
        "qwen3-8b",
        "--schedule",
        "qwen3-8b-0.86",
        "--prompt-len",
        "1024",
        "--gen-len",
        "32768",
        "--samples",
        "8",
        "--hardware",
        "h200",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    expected = predict_speedup(MODELS["qwen3-8b"], HARDWARE["h200"], PRESETS["qwen3-8b-0.86"], 1024, 32768, 8)
    assert result["dense_cost"] == pytest.approx(expected.dense_cost)
    assert result["sparse_cost"] == pytest.approx(expected.sparse_cost)
    assert result["predicted_speedup"] == pytest.approx(expected.dense_cost / expected.sparse_cost)


def test_cost_with_a_length_file_and_schedule_file(sparrow, tmp_path):
    (tmp_path / "lens.txt").write_text("1000\n20000\n")
    path = PRESETS["qwen3-1.7b-0.86"].save(tmp_path / "s.json")
    code, out, _ = sparrow(
        "cost",
        "--model",
        "qwen3-1.7b",
        "--schedule",
        str(path),
        "--gen-len",
        str(tmp_path / "lens.txt"),
        "--json",
        "--page-sizes",
    )
    assert code == 0
    result = json.loads(out)
    assert result["gen_lens"] == [1000, 20000] and len(result["page_sizes"]) == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "qwen3-99b"], "unknown model 'qwen3-99b'"),
        (["--hardware", "tpu"], "unknown hardware 'tpu'"),
        (["--gen-len", "abc"], "--gen-len"),
        (["--gen-len", "0"], "--gen-len"),
        (["--schedule", "nope"], "unknown schedule 'nope'"),
        (["--schedule", "dense"], "'dense'"),
        (["--samples", "0"], "must be positive"),
    ],
)
def test_cost_bad_input(sparrow, args, message):
    base = {"--model": "qwen3-8b", "--schedule": "qwen3-8b-0.86"}
    argv = ["cost"]
    for key, value in base.items():
        if key not in args:
            argv += [key, value]
    code, _, err = sparrow(*argv, *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_overview_writes_results_and_plot(sparrow, tmp_path):
    code, out, _ = sparrow("overview", "--out", str(tmp_path))
    assert code == 0
    rows = json.loads((tmp_path / "speedups.json").read_text())
    assert len(rows) == 4 * 3 and all(r["predicted_speedup"] > 1 for r in rows)
    assert (tmp_path / "schedules.png").stat().st_size > 10_000
