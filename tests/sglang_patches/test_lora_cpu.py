from __future__ import annotations

import importlib
import sys

import pytest
import torch

from sglang_patches.lora_cpu import LORA_MODULES, apply_lora_cpu_fix


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fix only applies without CUDA")
def test_lora_modules_get_unpinned_torch():
    assert apply_lora_cpu_fix()
    module = importlib.import_module("sglang.srt.lora.backend.chunked_backend")
    assert module.__name__ in LORA_MODULES and module.__name__ in sys.modules
    t = module.torch.zeros(4, dtype=torch.int32, pin_memory=True)
    assert t.device.type == "cpu" and t.shape == (4,)
    assert torch.ones(2).pin_memory().device.type == "cpu"
    assert module.torch.int32 is torch.int32 and module.torch.Tensor is torch.Tensor
