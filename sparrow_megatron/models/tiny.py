"""Tiny Qwen3 checkpoints and a character tokenizer, built locally (no hub downloads).

Tests and the embedded default need real HF-format Qwen3 directories (config.json, safetensors,
tokenizer.json) that SGLang, transformers and the Megatron loader all read. A character tokenizer keeps
them a few MB and lets the synthetic task control exactly how many tokens a prompt has.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHARACTERS = string.printable[:-2]  # printable ASCII with \n and \t, without \r \x0b \x0c


@dataclass(frozen=True)
class TinyQwen3Shape:
    vocab_size: int = 128
    hidden_size: int = 64
    intermediate_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    max_position_embeddings: int = 8192
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True


def build_char_tokenizer(out_dir: str | Path):
    """A fast (tokenizers) character-level tokenizer with Qwen3's special tokens, saved to out_dir."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab.setdefault(ch, len(vocab))
    # A BPE model with no merges and no pre-tokenizer maps every character to its own id.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def qwen3_config(shape: TinyQwen3Shape, eos_token_id: int, pad_token_id: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        **asdict(shape),
        hidden_act="silu",
        rms_norm_eps=1e-6,
        attention_bias=False,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        torch_dtype="float32",
    )


def make_tiny_qwen3(out_dir: str | Path, shape: TinyQwen3Shape = TinyQwen3Shape(), seed: int = 0) -> Path:
    """Write a randomly initialised tiny Qwen3 (HF format, safetensors) plus its tokenizer to out_dir."""
    import torch
    from transformers import Qwen3ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer(out_dir)
    if len(tokenizer) > shape.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size {shape.vocab_size}")
    config = qwen3_config(shape, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
