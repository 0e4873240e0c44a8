import json
import math

import pytest

from sparrow_megatron.rollout.engine import (
    SCHEDULE_PARAM,
    EngineFailure,
    generate_payload,
    parse_generate_response,
)
from sparrow_megatron.rollout.types import SamplingParams
from sparrow_megatron.sparsity.schedule import PRESETS, Schedule


def answer(ids, lps, top, finish=None, version="3"):
    return {
        "output_ids": ids,
        "meta_info": {
            "output_token_logprobs": [[lp, i, None] for lp, i in zip(lps, ids, strict=True)],
            "output_top_logprobs": [[[lp, i, None] for lp, i in row] for row in top],
            "finish_reason": finish or {"type": "length", "length": len(ids)},
            "weight_version": version,
        },
    }


def test_parse_returns_tokens_logprobs_topk_and_version():
    out = parse_generate_response(
        answer([5, 6], [-0.1, -0.2], [[(-0.1, 5), (-2.0, 9)], [(-0.2, 6), (-1.9, 5)]]), "u"
    )
    assert out.output_ids == [5, 6]
    assert out.logprobs == [-0.1, -0.2]
    assert out.top_ids == [[5, 9], [6, 5]]
    assert out.top_logprobs[1] == [-0.2, -1.9]
    assert out.finish_reason == "length"
    assert out.weight_version == 3


@pytest.mark.parametrize(
    "body, problem",
    [
        ({"output_ids": [1]}, "meta_info"),
        (answer([5], [math.nan], [[(-0.1, 5)]]), "not a finite"),
        (answer([5], [-0.1], [[(-0.1, 5)]], finish={"type": "abort", "message": "x"}), "aborted"),
        (answer([5, 6], [-0.1, -0.2], [[(-0.1, 5)]]), "top-K rows"),
    ],
)
def test_unusable_answers_are_engine_failures_naming_the_problem(body, problem):
    with pytest.raises(EngineFailure, match=problem):
        parse_generate_response(body, "http://e")


def test_dense_request_says_dense_explicitly_and_has_no_cache_namespace():
    payload = generate_payload([1, 2], SamplingParams(), 20, schedule=None)
    # explicit: a server-wide default schedule must not turn the dense path sparse
    assert payload["sampling_params"]["custom_params"] == {SCHEDULE_PARAM: "dense"}
    assert "extra_key" not in payload
    assert payload["top_logprobs_num"] == 20 and payload["return_logprob"] is True


def test_sparse_request_carries_its_schedule_and_its_own_cache_namespace():
    by_name = generate_payload([1], SamplingParams(), 20, schedule="qwen3-1.7b-0.86", adapter="distill-v1")
    assert by_name["sampling_params"]["custom_params"] == {SCHEDULE_PARAM: "qwen3-1.7b-0.86"}
    assert by_name["lora_path"] == "distill-v1"
    inline = generate_payload([1], SamplingParams(), 20, schedule=Schedule.fixed(64))
    assert json.loads(inline["sampling_params"]["custom_params"][SCHEDULE_PARAM])["budgets"] == [64]
    # Sparse KV differs from dense KV past layer 0: the radix cache must not share it across schedules.
    assert by_name["extra_key"] != inline["extra_key"]
    assert generate_payload([1], SamplingParams(), 20, schedule=PRESETS["qwen3-1.7b-0.86"])["extra_key"]
