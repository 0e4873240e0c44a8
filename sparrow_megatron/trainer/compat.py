"""Every CPU shim and version shim Megatron-Core needs, in one place.

Megatron-Core assumes CUDA in a handful of spots that have nothing to do with the math. On a CPU-only
machine (CI, dev boxes) `apply_cpu_shims()` patches exactly those spots, each with a one-line reason;
with CUDA present it does nothing, so a GPU run executes stock Megatron code. `call_with_supported`
filters optional keyword arguments by signature so one code path serves megatron-core 0.16 (Python
3.11) and the newest release (Python 3.12).
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

HAS_CUDA = torch.cuda.is_available()

_applied = False


def device() -> torch.device:
    """The device model tensors and activations live on."""
    return torch.device("cuda", torch.cuda.current_device()) if HAS_CUDA else torch.device("cpu")


def supported_kwargs(fn: Callable, **kwargs: Any) -> dict[str, Any]:
    """The subset of kwargs that fn's signature accepts (new optional args differ across versions)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def call_with_supported(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **supported_kwargs(fn, **kwargs))


def dataclass_kwargs(cls: type, **kwargs: Any) -> dict[str, Any]:
    """The subset of kwargs that a config dataclass still has as fields (some were removed upstream)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in kwargs.items() if k in names}


class _CpuRNGTracker:
    """Stands in for Megatron's CudaRNGStatesTracker: dropout is 0 in RL training, forks are no-ops."""

    def reset(self) -> None:
        pass

    def get_states(self) -> dict:
        return {}

    def set_states(self, states: dict) -> None:
        pass

    def add(self, name: str, seed: int) -> None:
        pass

    def is_initialized(self) -> bool:
        return True

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        yield


class _NullStream:
    """A CUDA stream stand-in: on CPU every op is synchronous, so waits are no-ops."""

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _TorchWithCpuDefault(types.ModuleType):
    """A view of `torch` for one Megatron module whose factory calls pass device="cuda" literally."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args: Any, **kwargs: Any) -> torch.Tensor:
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


def apply_cpu_shims() -> None:
    """Patch the CUDA-only spots of Megatron-Core; a no-op when CUDA is present or already applied."""
    global _applied
    if HAS_CUDA or _applied:
        return
    import sys

    # flash_mla (pulled in by SGLang) raises OSError, not ImportError, without libcuda; Megatron's
    # attention module only catches ImportError. A None entry makes `import flash_mla` an ImportError.
    if "flash_mla" not in sys.modules:
        sys.modules["flash_mla"] = None
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.tensor_parallel.random as mrandom

    # Dozens of Megatron factory calls use device=torch.cuda.current_device(); "cpu" is a valid device.
    torch.cuda.current_device = lambda: "cpu"
    # p2p _communicate_shapes (variable seq lengths) and DDP buffer code call it; nothing to wait for.
    torch.cuda.synchronize = lambda device=None: None
    # megatron-core >= 0.19 grad sync waits on torch.cuda.current_stream() for CUDA-graph events.
    torch.cuda.current_stream = lambda device=None: _NullStream()
    # The CUDA RNG tracker reads CUDA generator states; with no dropout a null tracker is exact.
    mrandom._CUDA_RNG_STATE_TRACKER = _CpuRNGTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Activation recompute saves and restores the CUDA RNG state around each checkpoint; on CPU there
    # is none (and no dropout), so an empty state and a no-op restore keep recompute exact.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    # The schedules build total_num_tokens with device="cuda" literally.
    schedules.torch = _TorchWithCpuDefault()
    _applied = True


@contextlib.contextmanager
def model_construction() -> Iterator[None]:
    """Scope for GPTModel.__init__: tied embeddings under PP>1 call Tensor.cuda() before an all-reduce."""
    if HAS_CUDA:
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # the all-reduce that follows works on CPU tensors
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def cpu_config_overrides() -> dict[str, Any]:
    """TransformerConfig fields that must differ on CPU (flags, not a second implementation)."""
    if HAS_CUDA:
        return {}
    return {
        # Batched isend/irecv needs a CUDA stream sync; plain p2p works over gloo.
        "batch_p2p_sync": False,
        "use_cpu_initialization": True,
        # Fused kernels (rope, bias-act, masked softmax, grad-accum) are CUDA-only.
        "apply_rope_fusion": False,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "gradient_accumulation_fusion": False,
        "persist_layer_norm": False,
    }
