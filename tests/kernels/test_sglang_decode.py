"""The SGLang seam (`sparrow_kernels.sglang_decode.sparse_decode`) against the torch reference.

The pool mimics SGLang with `--page-size 16`: each logical page of a request sits in a whole physical
page chosen at random, and the backend's landmark buffer is indexed by physical page. `layer` and
`forward_batch` are duck-typed stand-ins with only the attributes the seam reads (unit isolation; the
real backend is exercised by tests/sglang_patches).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sparrow_kernels.sglang_decode import sparse_decode

from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.reference import sparse_decode_reference
from sparrow_megatron.sparsity.schedule import Schedule
from sparrow_megatron.sparsity.selection import PageGeometry, compute_landmarks
from tests.kernels.pool import DEVICE

P = 16
HQ, HKV, D = 4, 2, 32
SCALE = 0.3  # not 1/sqrt(D): proves layer.scaling reaches the kernel
LENGTHS = [150, 300, 61, 230]
# Batch row 2 stays dense (its output must be left untouched); the others have different budgets.
SPARSE_ROWS = [(0, 64), (1, 128), (3, 96)]


class KVPool:
    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.keys

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.values


def build_batch(dtype: torch.dtype, seed: int = 0, seq_lens_cpu: bool = True):
    """(q, out, layer, forward_batch, physical-page landmarks, per-request logical K/V)."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_req = [-(-n // P) for n in LENGTHS]
    num_phys = sum(pages_per_req) + 5  # a few pages nobody owns
    k_buffer = torch.randn(num_phys * P, HKV, D, generator=gen).to(dtype)
    v_buffer = torch.randn(num_phys * P, HKV, D, generator=gen).to(dtype)
    # Junk in every landmark a request does not own: a wrong gather shows up as a wrong selection.
    marks_all = torch.randn(num_phys, HKV, D, generator=gen).to(dtype)
    pool_size, ctx = 7, max(LENGTHS) + 20
    # Stale slots past each request's length, as a reused req_to_token row has.
    req_to_token = torch.randint(0, num_phys * P, (pool_size, ctx), generator=gen, dtype=torch.int32)
    req_pool_indices = torch.randperm(pool_size, generator=gen)[: len(LENGTHS)]
    phys_order = torch.randperm(num_phys, generator=gen).tolist()
    keys, values = [], []
    for b, n in enumerate(LENGTHS):
        phys = [phys_order.pop() for _ in range(pages_per_req[b])]
        locs = (torch.tensor(phys)[:, None] * P + torch.arange(P)[None, :]).reshape(-1)[:n]
        req_to_token[req_pool_indices[b], :n] = locs.to(torch.int32)
        keys.append(k_buffer[locs])
        values.append(v_buffer[locs])
        full = n // P
        marks_all[torch.tensor(phys[:full])] = compute_landmarks(keys[b], P)
    q = torch.randn(len(LENGTHS), HQ, D, generator=gen).to(dtype)
    out = torch.full((len(LENGTHS), HQ, D), 7.0, dtype=dtype)  # "the dense delegate's output"
    layer = SimpleNamespace(layer_id=3, scaling=SCALE, tp_q_head_num=HQ, qk_head_dim=D, v_head_dim=D)
    lens = torch.tensor(LENGTHS, dtype=torch.int64)
    forward_batch = SimpleNamespace(
        token_to_kv_pool=KVPool(k_buffer.to(DEVICE), v_buffer.to(DEVICE)),
        req_to_token_pool=SimpleNamespace(req_to_token=req_to_token.to(DEVICE)),
        req_pool_indices=req_pool_indices.to(DEVICE),
        seq_lens=lens.to(DEVICE),
        seq_lens_cpu=lens if seq_lens_cpu else None,
    )
    return q.to(DEVICE), out.to(DEVICE), layer, forward_batch, marks_all.to(DEVICE), keys, values


def rows_of(sparse_rows):
    return [(r, budget, Schedule.fixed(budget)) for r, budget in sparse_rows]


def check_against_reference(dtype, atol, rtol, seq_lens_cpu=True):
    q, out, layer, forward_batch, marks_all, keys, values = build_batch(dtype, seq_lens_cpu=seq_lens_cpu)
    rows = rows_of(SPARSE_ROWS)
    page_table, num_selected = sparse_decode(q, out, layer, forward_batch, marks_all, rows)
    batch_rows = [r for r, _ in SPARSE_ROWS]
    want, want_pages = sparse_decode_reference(
        q[batch_rows].cpu(),
        [keys[r] for r in batch_rows],
        [values[r] for r in batch_rows],
        [budget for _, budget in SPARSE_ROWS],
        scale=SCALE,
    )
    out = out.cpu()
    torch.testing.assert_close(out[batch_rows].float(), want.float(), atol=atol, rtol=rtol)
    assert torch.equal(out[2], torch.full((HQ, D), 7.0, dtype=dtype)), "the dense row was overwritten"
    for i, (r, budget) in enumerate(SPARSE_ROWS):
        assert int(num_selected[i]) == budget // P
        got = page_table[i, :, : int(num_selected[i])].cpu().long()
        assert torch.equal(got, want_pages[i]), f"batch row {r} (L={LENGTHS[r]}, budget={budget})"


# fp32: exact math under the interpreter (ieee dots); on a GPU tl.dot takes fp32 operands as TF32
# (10-bit mantissa), about 1e-3 relative on these O(1) outputs.
FP32_TOL = dict(atol=1e-5, rtol=1e-5) if DEVICE == "cpu" else dict(atol=5e-3, rtol=5e-3)


def test_fp32_matches_reference():
    check_against_reference(torch.float32, **FP32_TOL)


def test_bf16_matches_reference():
    # Both round the output to bf16 (2^-8 relative); the kernel also rounds probabilities to bf16
    # before the P.V product, so allow about two bf16 ulps of an O(1) output.
    check_against_reference(torch.bfloat16, atol=2e-2, rtol=2e-2)


def test_device_seq_lens_when_no_host_copy():
    check_against_reference(torch.float32, **FP32_TOL, seq_lens_cpu=False)


def test_mixed_page_geometries_are_refused():
    q, out, layer, forward_batch, marks_all, _, _ = build_batch(torch.float32)
    before = out.clone()
    rows = [(0, 64, Schedule.fixed(64)), (1, 128, Schedule.fixed(128, geometry=PageGeometry(P, 2, 2)))]
    with pytest.raises(UserError, match="mixes page geometries"):
        sparse_decode(q, out, layer, forward_batch, marks_all, rows)
    assert torch.equal(out, before)


def test_kv_dtype_other_than_query_is_refused():
    q, out, layer, forward_batch, marks_all, _, _ = build_batch(torch.float32)
    with pytest.raises(UserError, match="KV cache in the query dtype"):
        sparse_decode(q.to(torch.bfloat16), out, layer, forward_batch, marks_all, rows_of(SPARSE_ROWS))


def test_no_rows_is_a_no_op():
    q, out, layer, forward_batch, marks_all, _, _ = build_batch(torch.float32)
    before = out.clone()
    assert sparse_decode(q, out, layer, forward_batch, marks_all, []) is None
    assert torch.equal(out, before)


def test_backend_kernel_branch_equals_its_torch_branch(tmp_path):
    """`SparrowAttnBackend._sparse_decode` with the seam vs without: same outputs, same recorded pages.

    The backend object is assembled by hand (no model runner); only the sparse-decode step runs.
    """
    pytest.importorskip("sglang")
    from sglang_patches.backend import SparrowAttnBackend
    from sglang_patches.recorder import SelectionRecorder, load_records

    results = {}
    for name, seam in (("torch", None), ("kernels", sparse_decode)):
        q, out, layer, forward_batch, marks_all, _, _ = build_batch(torch.float32)
        forward_batch.rids = [f"req{i}" for i in range(len(LENGTHS))]
        backend = object.__new__(SparrowAttnBackend)
        backend.page_size = P
        backend.token_to_kv_pool = forward_batch.token_to_kv_pool
        backend.req_to_token_pool = forward_batch.req_to_token_pool
        backend.landmarks = {layer.layer_id: marks_all}
        backend.recorder = SelectionRecorder(tmp_path / name)
        backend.gpu_sparse_decode = seam
        slots = forward_batch.req_pool_indices.tolist()
        flat_out = out.reshape(len(LENGTHS), HQ * D)
        backend._sparse_decode(
            q.reshape(len(LENGTHS), HQ * D),
            flat_out,
            layer,
            forward_batch,
            slots,
            LENGTHS,
            rows_of(SPARSE_ROWS),
        )
        results[name] = (flat_out.cpu(), load_records(tmp_path / name))
    (out_t, rec_t), (out_k, rec_k) = results["torch"], results["kernels"]
    torch.testing.assert_close(out_k, out_t, **FP32_TOL)
    assert len(rec_t) == len(rec_k) == len(SPARSE_ROWS)
    for a, b in zip(rec_t, rec_k, strict=True):
        assert (a["rid"], a["total_len"], a["budget"]) == (b["rid"], b["total_len"], b["budget"])
        assert torch.equal(a["selected"], b["selected"])
        assert torch.equal(a["landmarks"], b["landmarks"]) and torch.equal(a["keys"], b["keys"])
