"""LoRA on CPU: SGLang's LoRA code hard-codes pinned host buffers, which torch refuses without CUDA.

Applied only when CUDA is absent (pinning means nothing without a device to copy to): the LoRA modules
see a `torch` whose tensor factories drop `pin_memory=True`, and `Tensor.pin_memory()` returns the
tensor itself instead of raising. GPU machines are untouched.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import logging
import sys
import types

import torch

logger = logging.getLogger(__name__)

LORA_MODULES = (
    "sglang.srt.lora.mem_pool",
    "sglang.srt.lora.layers",
    "sglang.srt.lora.lora",
    "sglang.srt.lora.lora_manager",
    "sglang.srt.lora.backend.chunked_backend",
    "sglang.srt.lora.backend.torch_backend",
    "sglang.srt.lora.backend.triton_backend",
    "sglang.srt.lora.backend.triton_v2_backend",
)
FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "as_tensor", "empty_like", "zeros_like")


def _drop_pin(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return factory


class NoPinTorch(types.ModuleType):
    """`torch`, except that its tensor factories ignore pin_memory."""

    def __init__(self):
        super().__init__("torch")
        for name in FACTORIES:
            setattr(self, name, _drop_pin(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _unpinned(self, *args, **kwargs):
    return self


def _patch_module(module: types.ModuleType, proxy: NoPinTorch) -> bool:
    if getattr(module, "torch", None) is torch:
        module.torch = proxy
        return True
    return False


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches each LoRA module right after it is first imported, so processes that never serve LoRA
    never import it (importing SGLang's LoRA stack costs seconds)."""

    def __init__(self, proxy: NoPinTorch):
        self.proxy = proxy

    def find_spec(self, fullname, path, target=None):
        if fullname not in LORA_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def exec_and_patch(module, _exec=exec_module, _proxy=self.proxy):
                    _exec(module)
                    _patch_module(module, _proxy)

                spec.loader.exec_module = exec_and_patch
                return spec
        return None


def apply_lora_cpu_fix() -> bool:
    """Make LoRA's pin-memory requests no-ops when CUDA is absent; True when applied."""
    if torch.cuda.is_available():
        return False
    torch.Tensor.pin_memory = _unpinned
    proxy = NoPinTorch()
    for name in LORA_MODULES:
        if name in sys.modules:
            _patch_module(sys.modules[name], proxy)
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(proxy))
    return True
