"""Entry point of group `sglang.srt.plugins`: SGLang calls `register()` in every process it starts.

It registers the `sparrow` attention backend and its CLI choice, two hooks through SGLang's
HookRegistry (applied by SGLang right after the plugins run) and, without CUDA, the LoRA CPU fix:
- `SamplingParams.verify` (tokenizer process): a request's `custom_params.sparrow_schedule` is parsed
  there, so a bad schedule becomes HTTP 400 naming the problem and the server keeps running;
- `ForwardBatch.init_new` (scheduler process): the resolved schedule of each request of the batch
  (request override, else the server default) is noted by request id; the backend looks it up through
  `forward_batch.rids` (the runner may rebuild the ForwardBatch with `dataclasses.replace`, which keeps
  its fields but drops any attribute we would add);
- `DefaultPoolConfigurator._compute_cell_size` (scheduler process), when the server runs the `sparrow`
  backend: each KV-pool token also pays its share of the landmark buffers (one landmark per 16-token
  page per layer), so SGLang's memory budget holds them and the backend allocates them at start-up;
- `BaseTpWorker.deserialize_own_rank` (scheduler process): an `update_weights_from_tensor` request with
  one serialized entry serves every TP rank, so the trainer sends one copy of the weights per engine
  instead of one per TP rank (SGLang indexes the list by TP rank);
- with SPARROW_SEEDED_SAMPLING=1, `SamplingBatchInfo.from_schedule_batch`: per-request seeds
  (sglang_patches/seeded_sampling.py).
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
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    @register_attention_backend(BACKEND_NAME)
    def _create_sparrow_backend(model_runner):
        from sglang_patches.backend import SparrowAttnBackend

        return SparrowAttnBackend(model_runner)

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])

    HookRegistry.register(
        "sglang.srt.sampling.sampling_params.SamplingParams.verify", _verify_schedule, HookType.AFTER
    )
    HookRegistry.register(
        "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
        _attach_schedules,
        HookType.AFTER,
    )

    HookRegistry.register(
        "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size",
        _count_landmarks,
        HookType.AFTER,
    )

    HookRegistry.register(
        "sglang.srt.managers.tp_worker.BaseTpWorker.deserialize_own_rank",
        _one_copy_for_all_ranks,
        HookType.BEFORE,
    )

    from sglang_patches import seeded_sampling

    if seeded_sampling.enabled():
        HookRegistry.register(seeded_sampling.TARGET, seeded_sampling.attach_seeds, HookType.AFTER)
        seeded_sampling.patch_cpu_hash()
        logger.info("sparrow: per-request sampling seeds (%s=1)", seeded_sampling.ENV_FLAG)

    from sglang_patches.lora_cpu import apply_lora_cpu_fix

    if apply_lora_cpu_fix():
        logger.info("sparrow: no CUDA, LoRA pin-memory requests are no-ops")


def _verify_schedule(result, sampling_params, *args, **kwargs):
    from sglang_patches.schedules import validate_request

    validate_request(sampling_params.custom_params)
    return result


def _one_copy_for_all_ranks(worker, serialized_named_tensors, *args, **kwargs):
    if len(serialized_named_tensors) == 1:
        from sglang.srt.runtime_context import get_parallel

        serialized_named_tensors = list(serialized_named_tensors) * (get_parallel().tp_rank + 1)
    return (worker, serialized_named_tensors, *args), kwargs


def _attach_schedules(forward_batch, cls, batch, *args, **kwargs):
    from sglang_patches.schedules import note_request_schedules

    note_request_schedules(getattr(batch, "reqs", None) or [])
    return forward_batch


def _count_landmarks(result, configurator, kvc, num_layers, *args, **kwargs):
    from sglang_patches.backend import landmark_bytes_per_token

    server_args = kvc.server_args
    if not result or BACKEND_NAME not in (
        getattr(server_args, "attention_backend", None),
        getattr(server_args, "decode_attention_backend", None),
    ):
        return result
    import torch
    from sglang.srt.runtime_context import get_parallel

    model_config = kvc.model_config
    num_kv_heads = model_config.get_num_kv_heads(get_parallel().attn_tp_size)
    dtype_bytes = torch._utils._element_size(kvc.kv_cache_dtype)
    extra = landmark_bytes_per_token(num_layers, num_kv_heads, model_config.head_dim, dtype_bytes)
    logger.info("sparrow: landmarks add %d bytes per KV token (cell size %d)", extra, result)
    return result + extra
