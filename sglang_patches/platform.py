"""The opt-in CPU platform: SGLang on machines without a GPU (CI, laptops).

SGLang's in-tree CPU platform needs a CPU build of sgl_kernel that PyPI does not ship. Declaring the same
CPU device as *out-of-tree* makes RoPE, norms and fused ops take their pure-torch paths instead. The
platform activates only when SPARROW_SGLANG_CPU=1, so a GPU machine with this package installed is
untouched.
"""

from __future__ import annotations

import os

from sglang.srt.platforms.cpu import CpuDeviceMixin
from sglang.srt.platforms.device_mixin import PlatformEnum
from sglang.srt.platforms.interface import SRTPlatform

ENV_FLAG = "SPARROW_SGLANG_CPU"


def cpu_platform_enabled() -> bool:
    return os.environ.get(ENV_FLAG, "0").strip().lower() in ("1", "true", "yes", "on")


def activate() -> str | None:
    """Entry point of group `sglang.srt.platforms`: the platform class path, or None when not opted in."""
    return f"{__name__}.SparrowCpuPlatform" if cpu_platform_enabled() else None


class SparrowCpuPlatform(CpuDeviceMixin, SRTPlatform):
    _enum = PlatformEnum.OOT
    device_name = "cpu"
    device_type = "cpu"

    def get_default_attention_backend(self) -> str:
        return "torch_native"

    def get_dispatch_key_name(self) -> str:
        return "native"

    def is_pin_memory_available(self, device=None) -> bool:
        return False
