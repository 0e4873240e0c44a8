"""One decode step of the `sparrow` backend on SGLang's pools (CPU, no server): routing, plan, outputs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang")

from sparrow_megatron.sparsity.schedule import Schedule  # noqa: E402
from tests.sglang_patches.decode_fixture import (  # noqa: E402
    NUM_LAYERS,
    assert_landmarks_fresh,
    build_step,
    run_layers,
)

# Lengths after the new token; 160 and 96 complete a page at this step (the landmark is written then).
LENGTHS = [300, 160, 61, 230, 96]
SCHEDULES = [
    Schedule(budgets=(64,), dense_layers=(0,), name="b64"),
    Schedule(budgets=(96,), dense_layers=(0, 2), name="b96"),
    None,  # no schedule: dense everywhere
    Schedule(budgets=(None, 128), bin_width=128, dense_layers=(), name="late"),
    Schedule(budgets=(128,), dense_layers=(), name="fits"),  # 96 tokens fit the budget: dense step
]
SPARSE_AT = {0: {3}, 1: {0, 1, 3}, 2: {0, 3}}  # layer -> rows whose step is sparse there


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    monkeypatch.delenv("SPARROW_SGLANG_KERNELS", raising=False)
    monkeypatch.delenv("SPARROW_SCHEDULE", raising=False)
    monkeypatch.delenv("SPARROW_RECORD_DIR", raising=False)


def count_delegate_rows(backend) -> list[list[int]]:
    """Wrap the delegate's decode: the pool rows of every call (what reaches dense attention)."""
    calls = []
    dense_decode = backend.dense.forward_decode

    def counting(q, k, v, layer, forward_batch, **kwargs):
        calls.append((layer.layer_id, forward_batch.req_pool_indices.tolist()))
        return dense_decode(q, k, v, layer, forward_batch, **kwargs)

    backend.dense.forward_decode = counting
    return calls


def test_sparse_rows_never_reach_the_delegate_and_match_the_reference():
    step = build_step(SCHEDULES, LENGTHS)
    calls = count_delegate_rows(step.backend)
    step.backend.init_forward_metadata(step.fb)
    outs = run_layers(step)
    pool_rows = step.fb.req_pool_indices.tolist()
    assert [lid for lid, _ in calls] == list(range(NUM_LAYERS))  # one delegate call per layer at most
    for lid, rows in calls:
        expected = [pool_rows[r] for r in range(len(LENGTHS)) if r not in SPARSE_AT[lid]]
        assert rows == expected, (lid, rows)
    for lid in range(NUM_LAYERS):
        torch.testing.assert_close(outs[lid], step.reference(lid), rtol=2e-5, atol=2e-5)
    assert_landmarks_fresh(step)  # the pages completed by this step's token got their landmark


def test_plan_is_built_once_per_step():
    step = build_step(SCHEDULES, LENGTHS)
    backend = step.backend
    backend.init_forward_metadata(step.fb)
    plan = backend.plan
    run_layers(step)
    assert backend.plans_built == 1 and backend.plan is plan
    assert plan.budget.tolist() == [64, 96, 0, 128, 0]
    assert plan.num_selected.tolist() == [4, 6, 0, 8, 0]
    assert [set(plan.layer_sparse[lid].nonzero().flatten().tolist()) for lid in range(NUM_LAYERS)] == [
        SPARSE_AT[lid] for lid in range(NUM_LAYERS)
    ]
    backend.init_forward_metadata(step.fb)
    assert backend.plans_built == 2


def test_dense_batch_goes_to_the_delegate_whole():
    step = build_step([None] * len(LENGTHS), LENGTHS)
    calls = count_delegate_rows(step.backend)
    step.backend.init_forward_metadata(step.fb)
    outs = run_layers(step)
    assert [len(rows) for _, rows in calls] == [len(LENGTHS)] * NUM_LAYERS
    for lid in range(NUM_LAYERS):
        torch.testing.assert_close(outs[lid], step.reference(lid), rtol=2e-5, atol=2e-5)
    assert_landmarks_fresh(step)


def test_mixed_page_geometries_are_refused_naming_both_schedules():
    from sparrow_megatron.errors import UserError
    from sparrow_megatron.sparsity.selection import PageGeometry

    other = Schedule(budgets=(64,), geometry=PageGeometry(16, 2, 1), dense_layers=(), name="wide-sink")
    step = build_step([SCHEDULES[0], other], [300, 200])
    with pytest.raises(UserError, match="'b64'.*'wide-sink' \\(batch row 1\\)"):
        step.backend.init_forward_metadata(step.fb)
