"""The backend's CUDA-graph decode path, driven on CPU as SGLang 0.5.23's graph runner drives it.

`init_cuda_graph_state` once; capture: `init_forward_metadata_out_graph(in_capture=True)` and
`_in_graph` on static buffers whose rows are all dummies (pool row 0, length = the fill value), then
the layers; replay: the live batch copied into the static buffers, padded to the captured size, the
request ids gone, `out_graph` then `in_graph`, then the same layer code (what the graph recorded).
The kernels run on CPU tensors under Triton's interpreter (tests/conftest.py turns it on without CUDA).
The outputs of the real rows must equal the torch reference, as eager decode does.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")

from sparrow_kernels._common import interpreting  # noqa: E402

# Its SGLang pools live on the CPU: compiled (GPU) kernels cannot read them.
pytestmark = pytest.mark.skipif(
    not interpreting(), reason="drives the kernels on CPU tensors: TRITON_INTERPRET=1"
)

from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from sparrow_megatron.sparsity.schedule import Schedule  # noqa: E402
from tests.sglang_patches.decode_fixture import (  # noqa: E402
    HKV,
    HQ,
    NUM_LAYERS,
    D,
    assert_landmarks_fresh,
    build_step,
    run_layers,
)

LENGTHS = [300, 160, 61, 230, 96]
SCHEDULES = [
    Schedule(budgets=(64,), dense_layers=(0,), name="b64"),
    Schedule(budgets=(96,), dense_layers=(0, 2), name="b96"),
    None,
    Schedule(budgets=(None, 128), bin_width=128, dense_layers=(), name="late"),
    Schedule(budgets=(128,), dense_layers=(), name="fits"),
]
MAX_BS, BS = 8, 6  # captured sizes; the live batch of 5 replays the graph of 6 with one padded row


@pytest.fixture(autouse=True)
def kernel_path(monkeypatch):
    monkeypatch.setenv("SPARROW_SGLANG_KERNELS", "1")
    monkeypatch.delenv("SPARROW_SCHEDULE", raising=False)
    monkeypatch.delenv("SPARROW_RECORD_DIR", raising=False)


def static_view(buffers: dict, bs: int, **live) -> SimpleNamespace:
    """What build_replay_fb_view hands the backend: static slices, no rids."""
    return SimpleNamespace(
        forward_mode=ForwardMode.DECODE, batch_size=bs, req_pool_indices=buffers["req_pool_indices"][:bs],
        seq_lens=buffers["seq_lens"][:bs], seq_lens_cpu=buffers["seq_lens_cpu"][:bs],
        out_cache_loc=buffers["out_cache_loc"][:bs], encoder_lens=None, **live,
    )  # fmt: skip


def pad(t: torch.Tensor, bs: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(bs - t.shape[0], *t.shape[1:])])


def test_capture_then_replay_matches_the_reference():
    step = build_step(SCHEDULES, LENGTHS)
    backend = step.backend
    assert backend.kernel_decode is not None
    backend.init_cuda_graph_state(MAX_BS, MAX_BS)
    fill = backend.get_cuda_graph_seq_len_fill_value()
    buffers = {
        "req_pool_indices": torch.zeros(MAX_BS, dtype=torch.int64),
        "seq_lens": torch.full((MAX_BS,), fill, dtype=torch.int64),
        "seq_lens_cpu": torch.full((MAX_BS,), fill, dtype=torch.int64),
        "out_cache_loc": torch.zeros(MAX_BS, dtype=torch.int64),
    }
    # capture, largest batch first: dummy rows only; every kernel launches and nothing raises
    capture = static_view(buffers, MAX_BS, num_padding=0)
    backend.init_forward_metadata_out_graph(capture, in_capture=True)
    backend.init_forward_metadata_in_graph(capture)
    dummy = torch.zeros(MAX_BS, HQ * D)
    for lid in range(NUM_LAYERS):
        from tests.sglang_patches.decode_fixture import layer

        out = backend.forward_decode(dummy, torch.zeros(MAX_BS, HKV, D), torch.zeros(MAX_BS, HKV, D), layer(lid),
                                     capture)  # fmt: skip
        assert out.shape == (MAX_BS, HQ * D) and torch.isfinite(out).all()
    static_plan = backend.plan
    # replay: the live batch into the static buffers, padded rows keep the fill value
    raw = len(LENGTHS)
    buffers["req_pool_indices"][:raw] = step.fb.req_pool_indices
    buffers["seq_lens"][:raw] = step.fb.seq_lens
    buffers["seq_lens_cpu"][:raw] = step.fb.seq_lens_cpu
    buffers["out_cache_loc"][:raw] = step.fb.out_cache_loc
    view = static_view(buffers, BS, num_padding=BS - raw)
    backend.init_forward_metadata_out_graph(view)
    backend.init_forward_metadata_in_graph(view)
    assert backend.plan.table.data_ptr() == static_plan.table.data_ptr()  # same static buffers
    step.q = [pad(q, BS) for q in step.q]
    step.k = [pad(k, BS) for k in step.k]
    step.v = [pad(v, BS) for v in step.v]
    outs = run_layers(step, view)
    assert backend.plan.budget[:BS].tolist() == [64, 96, 0, 128, 0, 0]
    for lid in range(NUM_LAYERS):
        torch.testing.assert_close(outs[lid][:raw], step.reference(lid), rtol=1e-4, atol=1e-4)
    assert_landmarks_fresh(step)
