"""The `model` section of the job config and the one reader of a Hugging Face `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparrow_megatron.errors import UserError
from sparrow_megatron.validation import Problems


@dataclass
class ModelConfig:
    # An HF Qwen3 directory (config.json, safetensors, tokenizer). Empty: the embedded tiny Qwen3
    # that the loop builds in the run directory.
    hf_dir: str = ""
    name: str = "tiny-qwen3"

    def problems(self, prefix: str = "model.", check_paths: bool = True) -> list[str]:
        p = Problems(prefix)
        if self.hf_dir and check_paths:
            hf = Path(self.hf_dir)
            if not hf.is_dir():
                p.need(False, "hf_dir", f"{hf} does not exist")
            else:
                try:
                    config = read_hf_config(hf)
                except UserError as err:
                    p.need(False, "hf_dir", str(err))
                else:
                    from sparrow_megatron.models.checkpoint import checkpoint_problems

                    for problem in checkpoint_problems(hf, config):
                        p.need(False, "hf_dir", problem)
        return p


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The HF `config.json` of a model directory (or a config file itself); errors name the file and line."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise UserError(f"{path}: cannot read the model config ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a model config must be a JSON object")
    return data


def try_read_hf_config(path: str | Path) -> dict[str, Any] | None:
    """The config when it can be read, else None (validation reports the path separately)."""
    try:
        return read_hf_config(path)
    except UserError:
        return None
