import json

import numpy as np
import pytest

from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.cost import (
    HARDWARE,
    MODELS,
    CostModel,
    Hardware,
    ModelShape,
    page_size_search,
    predict_speedup,
    resolve_model,
)
from sparrow_megatron.sparsity.schedule import PRESETS, Schedule

TOY = ModelShape(
    "toy",
    num_layers=2,
    hidden_size=8,
    num_heads=4,
    num_kv_heads=2,
    head_dim=2,
    intermediate_size=16,
    vocab_size=10,
    tied_embeddings=True,
)
HW = Hardware("toy", bf16_flops=100.0, hbm_bandwidth=10.0)  # I = 10 FLOPs per byte


def test_parameter_counts_match_the_published_sizes():
    # Qwen3 model cards: 1.7B (1.4B non-embedding), 4B, 8B (8.2B), 14B (14.8B), 32B (32.8B)
    for name, billions in [
        ("qwen3-1.7b", 1.72),
        ("qwen3-4b", 4.02),
        ("qwen3-8b", 8.19),
        ("qwen3-14b", 14.77),
        ("qwen3-32b", 32.76),
    ]:
        assert MODELS[name].params / 1e9 == pytest.approx(billions, rel=0.01)


def test_decode_step_cost_by_hand():
    cm = CostModel(TOY, HW, batch=4)
    layer = TOY.layer_params  # 8*2*(8+4) + 3*8*16 + 16 + 4 = 192 + 384 + 20 = 596
    assert layer == 596
    params = 2 * layer + 10 * 8 + 8  # two layers, tied embedding, final norm = 1280
    assert TOY.params == 1280
    param_term = 2 * (2 * layer + 80) + 10 * (params * 2 / 4)  # matmuls + I * weight bytes / batch
    # dense at context 64: per layer 4*4*2*64 FLOPs + I * 2*2*2*64*2 bytes
    dense_layer = 4 * 4 * 2 * 64 + 10 * (2 * 2 * 2 * 64 * 2)
    assert cm.decode_step_cost(np.array([64]), None)[0] == pytest.approx(2 * dense_layer + param_term)
    # sparse, budget 48 (3 pages of 16), no dense layers: 4 pages scored, 48 tokens attended
    s = Schedule((48,), bin_width=1000, dense_layers=())
    score = 2 * 2 * 2 * 4 + 10 * (2 * 2 * 4 * 2 + 8 * 2 * 4)
    attend = 4 * 4 * 2 * 48 + 10 * (2 * 2 * 2 * 48 * 2)
    assert cm.decode_step_cost(np.array([64]), s)[0] == pytest.approx(2 * (score + attend) + param_term)
    # a dense layer in the sparse model pays the dense cost; context within budget is dense
    s1 = Schedule((48,), bin_width=1000, dense_layers=(0,))
    assert cm.decode_step_cost(np.array([64]), s1)[0] == pytest.approx(
        dense_layer + score + attend + param_term
    )
    assert cm.decode_step_cost(np.array([40]), s)[0] == pytest.approx(
        cm.decode_step_cost(np.array([40]), None)[0]
    )


def test_published_schedules_predict_a_speedup_that_grows_with_length():
    for size in ["1.7b", "4b", "8b", "14b"]:
        short = predict_speedup(
            MODELS[f"qwen3-{size}"], HARDWARE["h200"], PRESETS[f"qwen3-{size}-0.86"], 1024, 8192, 8
        )
        long = predict_speedup(
            MODELS[f"qwen3-{size}"], HARDWARE["h200"], PRESETS[f"qwen3-{size}-0.86"], 1024, 32768, 8
        )
        assert 1.0 < short.predicted_speedup < long.predicted_speedup < long.kv_bytes_ratio


def test_length_distribution_is_an_average_and_page_search_covers_sizes(tmp_path):
    m, hw, s = MODELS["qwen3-8b"], HARDWARE["h100"], PRESETS["qwen3-8b-0.86"]
    mixed = predict_speedup(m, hw, s, 512, [4000, 30000], samples=4)
    a, b = (predict_speedup(m, hw, s, 512, n, samples=4) for n in (4000, 30000))
    assert mixed.dense_cost == pytest.approx((a.dense_cost + b.dense_cost) / 2)
    rows = page_size_search(m, hw, s, 512, 16384)
    assert [r["page_size"] for r in rows] == [8, 16, 32, 64, 128]


def test_model_from_hf_config_and_errors(tmp_path):
    cfg = {
        "num_hidden_layers": 2,
        "hidden_size": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 2,
        "intermediate_size": 16,
        "vocab_size": 10,
        "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = resolve_model(str(tmp_path))
    assert shape.params == TOY.params
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_size": "8"}))
    with pytest.raises(UserError, match="field 'hidden_size'"):
        resolve_model(str(tmp_path))
    with pytest.raises(UserError, match="unknown model 'qwen9'"):
        resolve_model("qwen9")
