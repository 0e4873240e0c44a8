"""A decode step of the real `SparrowAttnBackend` on real SGLang pools (CPU), without a server.

The model runner, layers and ForwardBatch are stand-ins with only the attributes the backend and its
torch_native delegate read (unit isolation); the KV pool (`MHATokenToKVPool`), the request pool
(`ReqToTokenPool`) and the delegate are SGLang's own. Each request's prompt KV sits in whole physical
pages chosen at random (SGLang with --page-size 16); the decode step's new token is written by the
backend itself through `out_cache_loc`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sglang_patches import schedules as schedules_mod
from sparrow_megatron.sparsity.reference import sparse_decode_reference
from sparrow_megatron.sparsity.schedule import Schedule
from sparrow_megatron.sparsity.selection import compute_landmarks

P = 16
HQ, HKV, D = 4, 2, 32
NUM_LAYERS = 3
SCALE = 0.3  # not 1/sqrt(D): proves layer.scaling reaches every path
DTYPE = torch.float32
_STEPS = 0


def layer(layer_id: int) -> SimpleNamespace:
    return SimpleNamespace(
        layer_id=layer_id, tp_q_head_num=HQ, tp_k_head_num=HKV, tp_v_head_num=HKV, qk_head_dim=D, v_head_dim=D,
        scaling=SCALE, is_cross_attention=False, logit_cap=0.0, sliding_window_size=-1, k_scale=None,
        v_scale=None,
    )  # fmt: skip


@dataclass
class Step:
    backend: object
    fb: SimpleNamespace
    q: list[torch.Tensor]  # per layer [B, HQ * D]
    k: list[torch.Tensor]  # per layer [B, HKV, D], the new token
    v: list[torch.Tensor]
    schedules: list[Schedule | None]
    lengths: list[int]  # KV length after the new token

    def logical_kv(self, layer_id: int, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.backend.token_to_kv_pool
        slot = int(self.fb.req_pool_indices[row])
        locs = self.backend.req_to_token_pool.req_to_token[slot, : self.lengths[row]].long()
        return pool.get_key_buffer(layer_id)[locs], pool.get_value_buffer(layer_id)[locs]

    def reference(self, layer_id: int) -> torch.Tensor:
        """The torch reference's output of every row at this layer, [B, HQ, D]."""
        outs = []
        for row, schedule in enumerate(self.schedules):
            keys, values = self.logical_kv(layer_id, row)
            dense = schedule is None or layer_id in schedule.dense_layers
            budget = None if dense else schedule.budget_at(self.lengths[row])
            q = self.q[layer_id][row].view(1, HQ, D)
            o, _ = sparse_decode_reference(q, [keys], [values], [budget], scale=SCALE)
            outs.append(o[0])
        return torch.stack(outs)


def build_step(schedules, lengths, seed: int = 0, pool_rows: int = 8) -> Step:
    """A backend whose pools hold the prompts (lengths - 1 tokens, landmarks written as at extend) and a
    decode ForwardBatch for the next token of every request, with its schedules noted as the plugin does."""
    from sglang_patches import torch_decode
    from sglang_patches.backend import SparrowAttnBackend

    gen = torch.Generator().manual_seed(seed)
    pages_per_req = [-(-n // P) for n in lengths]
    num_phys = sum(pages_per_req) + 6
    kv_pool = MHATokenToKVPool(
        size=num_phys * P, page_size=P, dtype=DTYPE, head_num=HKV, head_dim=D, layer_num=NUM_LAYERS,
        device="cpu", enable_memory_saver=False,
    )  # fmt: skip
    req_pool = ReqToTokenPool(size=pool_rows, max_context_len=max(lengths) + 40, device="cpu",
                              enable_memory_saver=False)  # fmt: skip
    runner = SimpleNamespace(device="cpu", req_to_token_pool=req_pool, token_to_kv_pool=kv_pool, page_size=P)
    backend = SparrowAttnBackend(runner)
    # Junk everywhere first: a wrong gather shows up as a wrong output.
    for lid in range(NUM_LAYERS):
        kv_pool.get_key_buffer(lid).copy_(torch.randn(kv_pool.get_key_buffer(lid).shape, generator=gen))
        kv_pool.get_value_buffer(lid).copy_(torch.randn(kv_pool.get_value_buffer(lid).shape, generator=gen))
        backend.landmarks[lid].copy_(torch.randn(backend.landmarks[lid].shape, generator=gen))
    rt = req_pool.req_to_token
    rt.copy_(torch.randint(0, num_phys * P, rt.shape, generator=gen, dtype=rt.dtype))  # stale slots
    rt[0] = 0  # the padding row (CUDA-graph padded rows point at it), on the padding page
    rows = (torch.randperm(pool_rows, generator=gen)[: len(lengths)] + 1).to(torch.int64)  # row 0 = padding
    phys = (torch.randperm(num_phys - 1, generator=gen) + 1).tolist()  # page 0 = padding
    out_cache_loc = []
    for b, n in enumerate(lengths):
        own = torch.tensor([phys.pop() for _ in range(pages_per_req[b])])
        locs = (own[:, None] * P + torch.arange(P)[None, :]).reshape(-1)[:n]
        rt[rows[b], :n] = locs.to(rt.dtype)
        out_cache_loc.append(int(locs[n - 1]))
    old = torch.zeros(len(lengths), dtype=torch.int64)
    prompt = torch.tensor(lengths, dtype=torch.int64) - 1
    pages = torch_decode.completed_pages(rt, rows, old, prompt, P)
    for lid in range(NUM_LAYERS):
        torch_decode.write_page_landmarks(kv_pool.get_key_buffer(lid), backend.landmarks[lid], pages, P)
    global _STEPS
    _STEPS += 1  # request ids are unique per process, as SGLang's are (schedules are noted by rid)
    rids = [f"step{_STEPS}-r{b}" for b in range(len(lengths))]
    reqs = [
        SimpleNamespace(rid=rid, sampling_params=SimpleNamespace(custom_params={
            "sparrow_schedule": "dense" if s is None else json.dumps(s.to_dict())}))
        for rid, s in zip(rids, schedules, strict=True)
    ]  # fmt: skip
    schedules_mod.note_request_schedules(reqs)
    seq_lens = torch.tensor(lengths, dtype=torch.int64)
    fb = SimpleNamespace(
        forward_mode=ForwardMode.DECODE, batch_size=len(lengths), req_pool_indices=rows, seq_lens=seq_lens,
        seq_lens_cpu=seq_lens.clone(), seq_lens_sum=int(seq_lens.sum()), out_cache_loc=torch.tensor(out_cache_loc),
        rids=rids, encoder_lens=None,
    )  # fmt: skip
    q = [torch.randn(len(lengths), HQ * D, generator=gen) * 3 for _ in range(NUM_LAYERS)]
    k = [torch.randn(len(lengths), HKV, D, generator=gen) for _ in range(NUM_LAYERS)]
    v = [torch.randn(len(lengths), HKV, D, generator=gen) for _ in range(NUM_LAYERS)]
    return Step(backend, fb, q, k, v, list(schedules), list(lengths))


def run_layers(step: Step, fb=None) -> list[torch.Tensor]:
    """forward_decode of every layer, as the model does after the metadata step: [B, HQ, D] per layer."""
    fb = fb or step.fb
    outs = []
    for lid in range(NUM_LAYERS):
        o = step.backend.forward_decode(step.q[lid], step.k[lid], step.v[lid], layer(lid), fb)
        outs.append(o.view(-1, HQ, D))
    return outs


def assert_landmarks_fresh(step: Step) -> None:
    """Every full page of every request has the landmark computed from its keys."""
    for lid in range(NUM_LAYERS):
        for row, n in enumerate(step.lengths):
            keys, _ = step.logical_kv(lid, row)
            slot = int(step.fb.req_pool_indices[row])
            locs = step.backend.req_to_token_pool.req_to_token[slot, : (n // P) * P : P].long()
            torch.testing.assert_close(
                step.backend.landmarks[lid][locs // P], compute_landmarks(keys, P), rtol=0, atol=1e-6
            )
