"""The `sparrow` backend on a real SGLang server (CPU): dense parity, page selection, schedules."""

from __future__ import annotations

import json
import random
import string

import pytest
import torch

from sglang_patches.recorder import load_records
from sparrow_megatron.sparsity.schedule import Schedule
from sparrow_megatron.sparsity.selection import compute_landmarks, group_mean_query, select_pages

pytestmark = pytest.mark.sglang

NUM_KV_HEADS = 2  # TinyQwen3Shape default
# Dense up to position 128, then budget 64 tokens (sink 1 + top-1 + local 2 pages), 96 from 256 on.
SPARSE = Schedule(budgets=(None, 64, 96), bin_width=128, dense_layers=(0, 1), name="test-sparse")


def prompt(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + string.digits + " ") for _ in range(n))


def tokens_and_logprobs(out: dict) -> tuple[list[int], list[float]]:
    entries = out["meta_info"]["output_token_logprobs"]
    return [e[1] for e in entries], [e[0] for e in entries]


def generate_ok(server, text, max_new_tokens, **kwargs):
    status, out = server.generate(text, max_new_tokens, **kwargs)
    assert status == 200, out
    return out


def test_no_schedule_matches_torch_native(sparrow_server, torch_native_server):
    for seed, length in ((0, 40), (1, 230)):
        text = prompt(length, seed)
        ref_tokens, ref_lp = tokens_and_logprobs(generate_ok(torch_native_server, text, 40))
        tokens, lp = tokens_and_logprobs(generate_ok(sparrow_server, text, 40))
        assert tokens == ref_tokens
        assert max(abs(a - b) for a, b in zip(lp, ref_lp, strict=True)) < 1e-3


def test_sparse_selection_matches_sparsity_reference(sparrow_server, record_dir):
    rid = "selection-check"
    text = prompt(200, seed=2)
    generate_ok(sparrow_server, text, 80, schedule=json.dumps(SPARSE.to_dict()), rid=rid)
    records = [r for r in load_records(record_dir) if r["rid"] == rid]
    # 200 prompt tokens, 80 new: decode steps see 201..279 cached tokens; layers 2 and 3 only.
    steps = sorted({r["total_len"] for r in records})
    assert steps == list(range(201, 280))
    assert sorted({r["layer"] for r in records}) == [2, 3]
    for r in records:
        total_len = r["total_len"]
        assert r["budget"] == SPARSE.budget_at(total_len)
        assert r["keys"].shape[0] == total_len
        # The landmarks the backend kept as pages filled equal those recomputed from its keys now.
        fresh = compute_landmarks(r["keys"], 16)
        torch.testing.assert_close(r["landmarks"], fresh, rtol=0, atol=1e-6)
        expected = select_pages(group_mean_query(r["q"], NUM_KV_HEADS), fresh, total_len, r["budget"])
        assert torch.equal(r["selected"], expected), (total_len, r["layer"])
        assert r["selected"].shape == (NUM_KV_HEADS, r["budget"] // 16)


def test_small_budget_changes_greedy_output(sparrow_server, torch_native_server):
    text = prompt(200, seed=3)
    dense_tokens, _ = tokens_and_logprobs(generate_ok(torch_native_server, text, 60))
    sparse_tokens, _ = tokens_and_logprobs(
        generate_ok(sparrow_server, text, 60, schedule=json.dumps(SPARSE.to_dict()))
    )
    assert sparse_tokens != dense_tokens


def test_mixed_batch_keeps_dense_rows_exact(sparrow_server, torch_native_server):
    dense_text, sparse_text = prompt(220, seed=4), prompt(210, seed=5)
    ref_tokens, ref_lp = tokens_and_logprobs(generate_ok(torch_native_server, dense_text, 30))
    sampling = {"max_new_tokens": 30, "temperature": 0.0, "ignore_eos": True}
    status, outs = sparrow_server.post("/generate", {
        "text": [dense_text, sparse_text],
        "sampling_params": [
            {**sampling, "custom_params": {"sparrow_schedule": "dense"}},
            {**sampling, "custom_params": {"sparrow_schedule": json.dumps(SPARSE.to_dict())}},
        ],
        "return_logprob": True,
    })  # fmt: skip
    assert status == 200, outs
    tokens, lp = tokens_and_logprobs(outs[0])
    assert tokens == ref_tokens
    assert max(abs(a - b) for a, b in zip(lp, ref_lp, strict=True)) < 1e-3


def test_preset_override_accepted(sparrow_server, torch_native_server):
    # Qwen3-1.7B's preset starts at 512 tokens, above this context: same tokens as dense.
    text = prompt(100, seed=6)
    ref_tokens, _ = tokens_and_logprobs(generate_ok(torch_native_server, text, 20))
    tokens, _ = tokens_and_logprobs(generate_ok(sparrow_server, text, 20, schedule="qwen3-1.7b-0.86"))
    assert tokens == ref_tokens


@pytest.mark.parametrize(
    ("schedule", "problem"),
    [
        ("no-such-preset", "unknown schedule 'no-such-preset'"),
        ('{"schema_version": 1, "budgets": [50]}', "not a multiple of page_size"),
        ('{"schema_version": 1, "budgets": [32]}', "below sink + local"),
        ('{"schema_version": 1, "budgets": [128], "page_size": 32}', "differs from the server's KV"),
        ("{not json", "not valid JSON"),
        (17, "must be a non-empty string"),
    ],
)
def test_invalid_schedule_is_400_and_server_survives(sparrow_server, schedule, problem):
    status, out = sparrow_server.generate("hello", 4, schedule=schedule)
    assert status == 400, out
    assert "sparrow_schedule" in json.dumps(out) and problem in json.dumps(out), out
    assert sparrow_server.healthy()
    generate_ok(sparrow_server, "hello", 4)


def test_landmarks_are_counted_in_the_kv_pool_budget(sparrow_server):
    """The pool's per-token cell size includes the landmarks: one per 16-token page of K (K+V / 32)."""
    import re

    found = re.search(
        r"landmarks add (\d+) bytes per KV token \(cell size (\d+)\)", sparrow_server.log.read_text()
    )
    assert found, "the plugin's cell-size hook did not run"
    extra, kv_cell = int(found.group(1)), int(found.group(2))
    assert extra > 0 and extra * 2 * 16 == kv_cell
