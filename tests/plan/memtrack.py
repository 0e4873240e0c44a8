"""Measured activation and logits memory of Qwen3-shaped Megatron-Core layers, for checking the plan.

The layers are built the way `trainer/model.py` builds the policy (its `transformer_config` and
`layer_spec`, the CPU shims of `trainer/compat.py`), inside `FakeTensorMode`: no tensor is allocated,
so 37K-token sequences at 14B widths run in seconds on a CPU, while `MemTracker` counts every storage
the forward keeps and the backward allocates. A fake process group ("fake" backend) gives one process
any TP size: collectives only shape their outputs, which is all the memory count needs.

The trainer's local spec already has SDPA core attention and SP-capable norms (`trainer/local_layers.py`).
Two substitutions keep what this harness has measured from the start, each standing for the GPU path:
- core attention is torch SDPA with a causal mask (the flash kernel on CPU: it saves q, k, v, the
  output and an fp32 log-sum-exp, as flash attention on GPU does).
- with sequence parallelism the norms are a `torch.nn.RMSNorm` in the parameters' dtype (bf16, as TE's
  fused norm), whose weight is marked `sequence_parallel`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import os
from collections.abc import Iterator

import torch

from sparrow_megatron.plan.shapes import TrainerShape
from sparrow_megatron.sparsity.cost import MODELS, ModelShape
from sparrow_megatron.trainer import compat
from sparrow_megatron.trainer.model import LongContext, Qwen3Arch, layer_spec, transformer_config


def arch_of(shape: TrainerShape, num_layers: int) -> Qwen3Arch:
    m = shape.model
    return Qwen3Arch(
        num_layers=num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.intermediate_size,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        vocab_size=m.vocab_size,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=m.tied_embeddings,
        max_position_embeddings=65536,
    )


@contextlib.contextmanager
def fake_parallel(tp: int) -> Iterator[None]:
    """Megatron's parallel state for a TP group of `tp` fake ranks (this process is rank 0)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    compat.apply_cpu_shims()
    if dist.is_initialized():
        raise RuntimeError("fake_parallel needs a process without a default process group")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _sdpa_core_attention():
    from megatron.core.transformer.module import MegatronModule

    class SdpaCoreAttention(MegatronModule):
        def __init__(self, config, layer_number=1, attn_mask_type=None, attention_type=None, **_):
            super().__init__(config)

        def forward(self, query, key, value, attention_mask=None, *args, **kwargs):
            sq, b, n, d = query.shape
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return out.permute(2, 0, 1, 3).reshape(sq, b, n * d)

    return SdpaCoreAttention


class _SequenceParallelRMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size, eps=1e-6, **_):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def _spec(arch: Qwen3Arch, sequence_parallel: bool):
    spec = copy.deepcopy(layer_spec(arch))
    sub = spec.submodules
    sub.self_attention.submodules.core_attention = _sdpa_core_attention()
    if sequence_parallel:
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            setattr(sub, name, _SequenceParallelRMSNorm)
        attn = sub.self_attention.submodules
        for name in ("q_layernorm", "k_layernorm"):
            setattr(attn, name, _SequenceParallelRMSNorm)
    return spec


@contextlib.contextmanager
def real_parallel(tp: int) -> Iterator[None]:
    """Megatron's parallel state in the gloo group torchrun started (shape.tp ranks)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    compat.apply_cpu_shims()
    dist.init_process_group("gloo")
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@contextlib.contextmanager
def _cpu_rng_for_recompute() -> Iterator[None]:
    """Megatron's checkpoint saves and restores the CUDA RNG state; with no dropout it is unused."""
    import megatron.core.tensor_parallel.random as mrandom

    saved = mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0)
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    try:
        yield
    finally:
        mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state = saved


@dataclasses.dataclass(frozen=True)
class Measured:
    retained: int  # bytes alive after the forward (saved for backward + the output)
    peak: int  # peak bytes of activations, temporaries and activation grads over forward + backward


def _live_bytes(snapshot: dict, exclude: tuple[str, ...] = ("Parameter", "Gradient", "Optstate")) -> int:
    return sum(v for dev in snapshot.values() for k, v in dev.items() if str(k) != "Total"
               and getattr(k, "value", k) not in exclude)  # fmt: skip


def measure_layers(
    shape: TrainerShape,
    num_layers: int,
    tokens: int,
    recompute: str = "none",
    recompute_layers: int = 1,
    fake: bool = True,
) -> Measured:
    """Forward + backward of `num_layers` transformer layers on one sequence of `tokens` tokens (this
    rank's shard of the TP group: run inside `fake_parallel(shape.tp)`, or with fake=False in a real
    gloo group of shape.tp ranks, where the tensors are allocated)."""
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_block import TransformerBlock
    from megatron.core.utils import GlobalMemoryBuffer
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    arch = arch_of(shape, num_layers)
    sp = shape.sequence_parallel and shape.tp > 1
    long_context = LongContext(
        sequence_parallel=sp, recompute=recompute, recompute_num_layers=recompute_layers
    )
    cfg = transformer_config(arch, shape.tp, 1, long_context, torch.bfloat16)
    with FakeTensorMode() if fake else contextlib.nullcontext(), _cpu_rng_for_recompute():
        # The SP all-gather buffer is a process-wide reusable tensor: a fresh one per fake mode.
        parallel_state._GLOBAL_MEMORY_BUFFER = GlobalMemoryBuffer()
        block = TransformerBlock(cfg, _spec(arch, sp), post_process=False)
        rope = RotaryEmbedding(
            kv_channels=arch.head_dim, rotary_percent=1.0, rotary_base=int(arch.rope_theta)
        )
        local = tokens // shape.tp if sp else tokens
        x = torch.zeros(local, 1, arch.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        tracker = MemTracker()
        tracker.track_external(block)
        with tracker:
            # Real tensors: garbage from the previous case, or cycles made in this forward, would
            # otherwise be counted (or freed) at the collector's whim.
            gc.collect()
            base = _live_bytes(tracker.get_tracker_snapshot("current"))
            out = block(x, attention_mask=None, rotary_pos_emb=rope(tokens))
            gc.collect()
            retained = _live_bytes(tracker.get_tracker_snapshot("current")) - base
            out.backward(torch.ones_like(out))
            del out
        peak = _live_bytes(tracker.get_tracker_snapshot("peak")) - base
    return Measured(retained=retained, peak=peak)


def measure_logprob_chunk(vocab_size: int, tp: int, chunk: int) -> int:
    """Peak bytes of the trainer's vocab-parallel log-prob over one chunk of `chunk` tokens, forward and
    backward, with entropy outside autograd (only logged): its fp32 working set and the chunk's grad."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from sparrow_megatron.trainer.logprobs import vocab_parallel_logprobs

    with FakeTensorMode():
        logits = torch.zeros(chunk, vocab_size // tp, dtype=torch.bfloat16, requires_grad=True)
        targets = torch.zeros(chunk, dtype=torch.long)
        tracker = MemTracker()
        with tracker:
            base = _live_bytes(tracker.get_tracker_snapshot("current"))
            stats = vocab_parallel_logprobs(logits, targets, 1.0, with_entropy=False)
            stats.logprobs.sum().backward()
        return _live_bytes(tracker.get_tracker_snapshot("peak")) - base


def measure_output_layer(shape: TrainerShape, tokens: int) -> Measured:
    """The output layer (vocab-parallel, SP-aware like GPTModel's) on `tokens` tokens: the bf16 logits it
    keeps and, with their gradient, its backward peak."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.utils import GlobalMemoryBuffer
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    arch = arch_of(shape, 1)
    sp = shape.sequence_parallel and shape.tp > 1
    cfg = transformer_config(arch, shape.tp, 1, LongContext(sequence_parallel=sp), torch.bfloat16)
    with FakeTensorMode():
        parallel_state._GLOBAL_MEMORY_BUFFER = GlobalMemoryBuffer()
        layer = tensor_parallel.ColumnParallelLinear(
            arch.hidden_size, arch.vocab_size, config=cfg, init_method=cfg.init_method, bias=False,
            skip_bias_add=False, gather_output=False,
        )  # fmt: skip
        local = tokens // shape.tp if sp else tokens
        x = torch.zeros(local, 1, arch.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        tracker = MemTracker()
        tracker.track_external(layer)
        with tracker:
            base = _live_bytes(tracker.get_tracker_snapshot("current"))
            logits, _ = layer(x)
            retained = _live_bytes(tracker.get_tracker_snapshot("current")) - base
            logits.backward(torch.ones_like(logits))
            del logits
        peak = _live_bytes(tracker.get_tracker_snapshot("peak")) - base
    return Measured(retained=retained, peak=peak)


def model_of(spec) -> ModelShape:
    """A Qwen3 size by name, or a ModelShape's fields as a mapping (small shapes of the real runs)."""
    return MODELS[spec] if isinstance(spec, str) else ModelShape(**spec)


def _main() -> None:
    """`python -m tests.plan.memtrack CASES.json OUT.json [--real]`: each case {kind, model, tp, sp,
    tokens, recompute, layers} measured; writes one JSON list. Fake (default): each TP size in its own
    fake group, in a fresh process, since a fake default process group cannot share a process with
    the gloo tests. --real: under torchrun with tp ranks, real tensors."""
    import json
    import sys
    import warnings

    warnings.filterwarnings("ignore")
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    real = "--real" in sys.argv
    out = []
    for tp in sorted({c["tp"] for c in cases}):
        with real_parallel(tp) if real else fake_parallel(tp):
            for case in (c for c in cases if c["tp"] == tp):
                shape = TrainerShape(model_of(case["model"]), tp=tp, sequence_parallel=case["sp"])
                kind = case["kind"]
                if kind == "layers":
                    m = measure_layers(
                        shape, case["layers"], case["tokens"], case["recompute"], fake=not real
                    )
                    out.append({**case, "retained": m.retained, "peak": m.peak})
                elif kind == "output_layer":
                    m = measure_output_layer(shape, case["tokens"])
                    out.append({**case, "retained": m.retained, "peak": m.peak})
                else:
                    peak = measure_logprob_chunk(shape.model.vocab_size, tp, case["tokens"])
                    out.append({**case, "peak": peak})
    if not real or int(os.environ.get("RANK", "0")) == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    _main()
