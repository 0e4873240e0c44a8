"""The top-K JSONL format of `sparrow tail`: one generated sequence per line.

    {"prompt_len": int,
     "dense":  {"ids": [[K ints] per token], "logprobs": [[K floats] per token]},
     "sparse": {"ids": ..., "logprobs": ...}}

Row t is the top-K at generated token t. K may differ between the sides and between rows (short rows
are padded with id -1). The RL loop writes the same format for every step's rollout, so a user can
re-run the tail analysis offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparrow_megatron.errors import UserError, where
from sparrow_megatron.sparsity.acceptance import PAD_ID, acceptance_from_topk


@dataclass
class TopKSequence:
    prompt_len: int
    dense_ids: torch.Tensor  # [T, K] int64, -1 padded
    dense_logprobs: torch.Tensor  # [T, K] float64
    sparse_ids: torch.Tensor
    sparse_logprobs: torch.Tensor

    def to_json(self) -> str:
        def side(ids, lps):
            rows = [
                [(i, lp) for i, lp in zip(r_ids, r_lps, strict=True) if i != PAD_ID]
                for r_ids, r_lps in zip(ids.tolist(), lps.tolist(), strict=True)
            ]
            return {"ids": [[i for i, _ in r] for r in rows], "logprobs": [[lp for _, lp in r] for r in rows]}

        return json.dumps(
            {
                "prompt_len": self.prompt_len,
                "dense": side(self.dense_ids, self.dense_logprobs),
                "sparse": side(self.sparse_ids, self.sparse_logprobs),
            }
        )


def _side(obj: object, name: str, path: Path, line: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(obj, dict):
        raise UserError(f"{where(path, line, name)} must be an object with 'ids' and 'logprobs'")
    ids, lps = obj.get("ids"), obj.get("logprobs")
    if not isinstance(ids, list) or not isinstance(lps, list):
        raise UserError(f"{where(path, line, name)} needs lists 'ids' and 'logprobs'")
    if len(ids) != len(lps):
        raise UserError(f"{where(path, line, name)}: {len(ids)} rows of ids but {len(lps)} rows of logprobs")
    width = max((len(r) for r in ids if isinstance(r, list)), default=0)
    id_arr = np.full((len(ids), width), PAD_ID, dtype=np.int64)
    lp_arr = np.full((len(ids), width), -np.inf, dtype=np.float64)
    for t, (r_ids, r_lps) in enumerate(zip(ids, lps, strict=True)):
        if not isinstance(r_ids, list) or not isinstance(r_lps, list) or len(r_ids) != len(r_lps):
            raise UserError(
                f"{where(path, line, f'{name}.ids[{t}]')}: ids and logprobs rows must be equal-length lists"
            )
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in r_ids):
            raise UserError(f"{where(path, line, f'{name}.ids[{t}]')}: ids must be integers")
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in r_lps):
            raise UserError(f"{where(path, line, f'{name}.logprobs[{t}]')}: log-probs must be numbers")
        if any(x > 1e-4 for x in r_lps):
            raise UserError(f"{where(path, line, f'{name}.logprobs[{t}]')}: log-probs must be <= 0")
        id_arr[t, : len(r_ids)] = r_ids
        lp_arr[t, : len(r_lps)] = r_lps
    # NaN log-probs carry no information: they count as absent entries (the row is kept).
    nan = np.isnan(lp_arr)
    id_arr[nan], lp_arr[nan] = PAD_ID, -np.inf
    return torch.from_numpy(id_arr), torch.from_numpy(lp_arr)


def read_topk_jsonl(path: str | Path) -> list[TopKSequence]:
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    sequences = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{where(path, number)}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where(path, number)}: each line must be a JSON object")
        prompt_len = row.get("prompt_len")
        if not isinstance(prompt_len, int) or isinstance(prompt_len, bool) or prompt_len < 0:
            raise UserError(f"{where(path, number, 'prompt_len')} must be a non-negative integer")
        dense = _side(row.get("dense"), "dense", path, number)
        sparse = _side(row.get("sparse"), "sparse", path, number)
        if dense[0].shape[0] != sparse[0].shape[0]:
            raise UserError(
                f"{where(path, number)}: dense has {dense[0].shape[0]} tokens, sparse has {sparse[0].shape[0]}"
            )
        sequences.append(TopKSequence(prompt_len, *dense, *sparse))
    if not sequences:
        raise UserError(f"{path}: no sequences (the file is empty)")
    return sequences


def acceptance_of(sequences: list[TopKSequence]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(estimate, lower, upper, positions) over every generated token of every sequence."""
    parts = []
    for s in sequences:
        est, lo, up = acceptance_from_topk(s.dense_ids, s.dense_logprobs, s.sparse_ids, s.sparse_logprobs)
        positions = s.prompt_len + np.arange(est.shape[0])
        parts.append((est.numpy(), lo.numpy(), up.numpy(), positions))
    return tuple(np.concatenate(x) for x in zip(*parts, strict=True))
