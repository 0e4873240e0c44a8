"""An opt-in recorder of the sparse backend's decisions, for tests that recompute them independently.

Set SPARROW_RECORD_DIR to a directory: every sparse (layer, request, step) writes one small .pt file with
the query, the request's keys, the landmarks the backend used and the pages it selected. Never on in
production: it copies the request's keys each step.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

RECORD_DIR_ENV = "SPARROW_RECORD_DIR"


class SelectionRecorder:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_env(cls) -> SelectionRecorder | None:
        directory = os.environ.get(RECORD_DIR_ENV, "").strip()
        return cls(directory) if directory else None

    def record(self, layer_id, rid, total_len, budget, q, keys, landmarks, selected) -> None:
        item = {
            "layer": layer_id, "rid": rid, "total_len": total_len, "budget": budget,
            "q": q.detach().float().cpu().clone(), "keys": keys.detach().cpu().clone(),
            "landmarks": landmarks.detach().cpu().clone(), "selected": selected.detach().cpu().clone(),
        }  # fmt: skip
        torch.save(item, self.directory / f"{rid}-{total_len:06d}-{layer_id:03d}.pt")


def load_records(directory: str | Path) -> list[dict]:
    return [torch.load(path) for path in sorted(Path(directory).glob("*.pt"))]
