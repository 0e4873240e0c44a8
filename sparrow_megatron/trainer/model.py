"""Qwen3 dense config (HF config.json) -> Megatron-Core TransformerConfig + GPTModel.

The layer spec is a Megatron `ModuleSpec` (Transformer Engine when installed, local otherwise): later
features (a LoRA adapter, a block-sparse attention path) replace submodules of that spec rather than
patching the built model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sparrow_megatron.errors import UserError, where
from sparrow_megatron.models.config import read_hf_config
from sparrow_megatron.trainer import compat


@dataclass(frozen=True)
class Qwen3Arch:
    """The fields of an HF Qwen3 config the Megatron model needs."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention_bias: bool = False


def read_qwen3_config(model_dir: str | Path) -> Qwen3Arch:
    """Parse `model_dir/config.json`; anything that is not a dense Qwen3 is a UserError naming the field."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: no config.json in the model directory")
    cfg = read_hf_config(path)
    model_type = cfg.get("model_type")
    if model_type != "qwen3":
        raise UserError(
            f"{where(path, field='model_type')}: expected 'qwen3' (dense Qwen3), got {model_type!r}"
        )

    def need(name: str):
        if name not in cfg:
            raise UserError(f"{where(path, field=name)}: missing")
        return cfg[name]

    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise UserError(f"{where(path, field='rope_scaling')}: rope type {rope_type!r} is not supported")
    rope_theta = cfg.get("rope_theta", rope.get("rope_theta"))
    if rope_theta is None:
        raise UserError(f"{where(path, field='rope_theta')}: missing")
    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    return Qwen3Arch(
        num_layers=int(need("num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(need("intermediate_size")),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        vocab_size=int(need("vocab_size")),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        attention_bias=bool(cfg.get("attention_bias", False)),
    )


def check_parallel_split(arch: Qwen3Arch, tp: int, pp: int, source: str = "model") -> None:
    """TP must divide heads, KV heads, FFN and vocab; PP must divide layers (uniform stages)."""
    checks = [
        ("num_attention_heads", arch.num_heads, tp, "tp"),
        ("num_key_value_heads", arch.num_kv_heads, tp, "tp"),
        ("intermediate_size", arch.ffn_hidden_size, tp, "tp"),
        ("vocab_size", arch.vocab_size, tp, "tp"),
        ("num_hidden_layers", arch.num_layers, pp, "pp"),
    ]
    for field, value, size, name in checks:
        if value % size:
            raise UserError(f"{source}: {field}={value} is not divisible by {name}={size}")


@dataclass(frozen=True)
class LongContext:
    """The memory settings of the trainer (TrainerConfig fields), as Megatron TransformerConfig fields."""

    sequence_parallel: bool = False
    recompute: str = "none"  # none | selective | full
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    cp: int = 1

    @classmethod
    def of(cls, trainer) -> LongContext:
        """From the job config's trainer section (a TrainerConfig)."""
        return cls(
            sequence_parallel=trainer.use_sequence_parallel,
            recompute=trainer.recompute,
            recompute_method=trainer.recompute_method,
            recompute_num_layers=trainer.recompute_num_layers,
            cp=trainer.cp,
        )

    def config_fields(self, arch: Qwen3Arch, tp: int, pp: int) -> dict:
        fields: dict = dict(
            sequence_parallel=self.sequence_parallel and tp > 1, context_parallel_size=self.cp
        )
        if self.recompute == "full":
            per_stage = arch.num_layers // pp
            if not 1 <= self.recompute_num_layers <= per_stage:
                raise UserError(
                    f"field 'trainer.recompute_num_layers' must be in [1, {per_stage}] "
                    f"(layers per pipeline stage), got {self.recompute_num_layers}"
                )
            fields.update(
                recompute_granularity="full",
                recompute_method=self.recompute_method,
                recompute_num_layers=self.recompute_num_layers,
            )
        elif self.recompute == "selective":
            # Attention and the MLP are recomputed from their inputs. ("layernorm" is left out: TE's spec
            # fuses the norms into the next linear, where it does nothing, and without TE it needs TE.)
            fields.update(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"])
        return fields


def has_transformer_engine() -> bool:
    compat.apply_cpu_shims()
    from megatron.core.models.gpt import gpt_layer_specs as specs

    return bool(compat.HAS_CUDA and getattr(specs, "HAVE_TE", False))


def transformer_config(
    arch: Qwen3Arch, tp: int, pp: int, long_context: LongContext | bool, dtype: torch.dtype
):
    """long_context: the recompute / SP / CP settings (a bool is the SP switch alone)."""
    compat.apply_cpu_shims()
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not isinstance(long_context, LongContext):
        long_context = LongContext(sequence_parallel=bool(long_context))
    if long_context.cp > 1 and not has_transformer_engine():
        raise UserError(
            f"field 'trainer.cp' = {long_context.cp}: trainer.cp > 1 needs Transformer Engine's attention "
            "(the GPU image; Megatron's local attention has no context parallelism), which this machine "
            "does not have; use cp=1 with recompute='full' and sequence parallelism"
        )

    fields = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,  # Qwen3-4B has head_dim != hidden/heads
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.attention_bias,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Rollout batches have variable lengths; Megatron requires alltoall for that even when dense.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        # Losses are already normalised by the global token/sequence count; Megatron must not rescale.
        calculate_per_token_loss=True,
        apply_rope_fusion=False,
    )
    fields.update(long_context.config_fields(arch, tp, pp))
    fields.update(compat.cpu_config_overrides())
    return TransformerConfig(**compat.dataclass_kwargs(TransformerConfig, **fields))


def layer_spec(arch: Qwen3Arch):
    """Transformer Engine spec on GPU when TE is installed, Megatron's local spec otherwise."""
    compat.apply_cpu_shims()
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if has_transformer_engine():
        return compat.call_with_supported(specs.get_gpt_layer_with_transformer_engine_spec, qk_layernorm=True)
    spec = compat.call_with_supported(
        specs.get_gpt_layer_local_spec, qk_layernorm=True, normalization="RMSNorm"
    )
    return with_local_layers(spec)


def with_local_layers(spec):
    """The local spec with SP-capable norms and SDPA core attention (packed THD, no s x s mask)."""
    from megatron.core.transformer import transformer_block

    from sparrow_megatron.trainer.local_layers import SdpaCoreAttention, SequenceParallelRMSNorm

    spec = copy.deepcopy(spec)
    sub = spec.submodules
    sub.input_layernorm = SequenceParallelRMSNorm
    sub.pre_mlp_layernorm = SequenceParallelRMSNorm
    attn = sub.self_attention.submodules
    attn.core_attention = SdpaCoreAttention
    attn.q_layernorm = SequenceParallelRMSNorm
    attn.k_layernorm = SequenceParallelRMSNorm
    # The block's final norm is not part of the layer spec: Megatron reads a module global for it.
    transformer_block.LayerNormImpl = SequenceParallelRMSNorm
    return spec


def build_gpt_model(arch: Qwen3Arch, config, spec=None):
    """The GPTModel stage for this rank (pre/post process from the pipeline position)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    pre = parallel_state.is_pipeline_first_stage()
    post = parallel_state.is_pipeline_last_stage()
    with compat.model_construction():
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec if spec is not None else layer_spec(arch),
            vocab_size=arch.vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=int(arch.rope_theta),
        )
    return model.to(compat.device())
