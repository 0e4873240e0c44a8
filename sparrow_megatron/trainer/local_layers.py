"""The two layers the trainer's spec uses when Transformer Engine is absent (CPU, or a GPU without TE).

Megatron's local spec cannot run the long-context settings: its `WrappedTorchNorm` asserts sequence
parallelism off, and its `DotProductAttention` refuses packed (THD) sequences and materialises the
[b, heads, s, s] scores. These replacements keep Megatron's module interfaces (and parameter names, so
checkpoints and the HF export do not change):

- `SequenceParallelRMSNorm`: torch RMSNorm whose weight is marked `sequence_parallel`, so Megatron's
  finalize_model_grads all-reduces its gradient over TP when each rank saw only its slice of the tokens.
- `SdpaCoreAttention`: causal attention through `torch.nn.functional.scaled_dot_product_attention`
  (flash / memory-efficient kernels, no s x s mask), per packed sequence for THD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps)
        if config.sequence_parallel:
            self.weight.sequence_parallel = True


class SdpaCoreAttention(torch.nn.Module):
    """Drop-in for Megatron's core attention: q [s, b, np, hn] (THD: [t, np, hn]) -> [s, b, np * hn]."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str = "self", **kwargs):
        super().__init__()
        self.config = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        scale = kwargs.get("softmax_scale")
        self.softmax_scale = scale if scale is not None else config.kv_channels**-0.5

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_unused):  # fmt: skip
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._packed(query, key, value, packed_seq_params)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        out = self._sdpa(q, k, v, attention_mask)
        s, b = query.shape[:2]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _sdpa(self, q, k, v, attention_mask):
        # attention_mask: None = causal; else Megatron's boolean mask (True = masked out).
        mask = None if attention_mask is None else ~attention_mask
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=attention_mask is None, scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )  # fmt: skip

    def _packed(self, query, key, value, params):
        # One causal SDPA per packed sequence: no block-diagonal [t, t] mask is ever built.
        cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        bounds = cu.tolist()  # a handful of sequences per micro-batch: one host read per layer
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            if end > start:
                q, k, v = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
                outs.append(self._sdpa(q, k, v, None)[0].transpose(0, 1))
        return torch.cat(outs).reshape(query.shape[0], -1)
