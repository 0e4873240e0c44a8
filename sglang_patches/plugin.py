"""Entry point of group `sglang.srt.plugins`: SGLang calls `register()` in every process it starts.

Keep it cheap and idempotent: it only registers names and hooks; the heavy modules load when used.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

BACKEND_NAME = "sparrow"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    @register_attention_backend(BACKEND_NAME)
    def _create_sparrow_backend(model_runner):
        from sglang_patches.backend import SparrowAttnBackend

        return SparrowAttnBackend(model_runner)

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
