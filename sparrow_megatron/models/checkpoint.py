"""What a user's checkpoint dir must hold for the loop, checked at validation (before any process starts).

A Qwen3 `config.json` (the trainer builds Qwen3 only), a tokenizer with a chat template (every prompt
goes through it), and a vocabulary the embedding covers (an id past the embedding crashes the engine
and the trainer mid-run). Torch-free: reads the JSON files only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen3",)
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def checkpoint_problems(model_dir: Path, config: dict[str, Any]) -> list[str]:
    """Problems of an HF model dir whose config.json has been read as `config`; [] when usable.
    What is absent is not judged (a config.json without model_type, a dir without tokenizer files, as
    `sparrow plan` may be given); the run's own loaders refuse those when it starts."""
    problems = []
    model_type = config.get("model_type")
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(
            f"{model_dir / 'config.json'}: model_type is {model_type!r}, not 'qwen3' "
            "(the trainer builds Qwen3 dense models only)"
        )
    tokenizer_config = _json(model_dir / "tokenizer_config.json")
    tokenizer = _json(model_dir / "tokenizer.json")
    if tokenizer_config is None and tokenizer is None:
        return problems  # a config-only dir (planning, submitting from a login node): the run checks it
    template = (tokenizer_config or {}).get("chat_template")
    if not template and not any((model_dir / name).is_file() for name in CHAT_TEMPLATE_FILES):
        problems.append(
            f"{model_dir}: the tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
            "chat_template.jinja); prompts are formatted with it"
        )
    vocab = config.get("vocab_size")
    size = tokenizer_size(tokenizer) if tokenizer is not None else None
    if isinstance(vocab, int) and size is not None and size > vocab:
        problems.append(
            f"{model_dir}: the tokenizer has ids up to {size - 1} but config.json vocab_size is {vocab} "
            "(an id past the embedding crashes the engine and the trainer)"
        )
    return problems


def tokenizer_size(tokenizer: dict[str, Any]) -> int | None:
    """Highest token id + 1 of a tokenizer.json (model vocabulary and added tokens)."""
    ids = [t.get("id") for t in tokenizer.get("added_tokens") or [] if isinstance(t, dict)]
    vocab = (tokenizer.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        ids += list(vocab.values())
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], ids are positions
        ids.append(len(vocab) - 1)
    ids = [i for i in ids if isinstance(i, int)]
    return max(ids) + 1 if ids else None


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
