"""Calibration's science: candidate budgets, per-(budget, bin) acceptance tables, and the solve.

The paper's procedure: for each candidate budget, sample rollouts with that one budget at every position
(sparse decode, top-K log-probs), then score the very same tokens densely (teacher-forced, top-K);
alpha per token from the two lists, p5 per position bin. Sparse *generation* rather than a sparse
teacher-forced pass over dense rollouts, because the SGLang backend is sparse only in decode: an
extend/prefill is dense whatever the schedule, so teacher-forcing cannot measure a budget.

This module turns measured top-K lists into the solver's table and the schedule; driving an engine
over prompts and writing the files is `sparrow_megatron.calibration`'s (`sparrow calibrate`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.acceptance import acceptance_from_topk
from sparrow_megatron.sparsity.schedule import DEFAULT_DENSE_LAYERS, Schedule
from sparrow_megatron.sparsity.selection import DEFAULT_GEOMETRY, PageGeometry
from sparrow_megatron.sparsity.solver import TailTable, solve_schedule
from sparrow_megatron.sparsity.tails import tail_report, token_positions

log = logging.getLogger(__name__)

# Default candidates are multiples of 16 pages of 16 tokens: budgets move in steps of whole groups of
# pages, the grid the published schedules were calibrated on.
GRID_STEP = 16 * 16


def check_budgets(budgets: Sequence[int], geometry: PageGeometry) -> None:
    """Candidates must be distinct whole pages holding at least the sink and local pages."""
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, int):
            raise UserError(f"field 'budgets': {b!r} is not an integer")
        if b % geometry.page_size or b < geometry.min_budget:
            raise UserError(
                f"field 'budgets': {b} is not a multiple of the page size {geometry.page_size} "
                f">= sink + local pages ({geometry.min_budget} tokens)"
            )
    if len(set(budgets)) != len(budgets):
        raise UserError(f"field 'budgets': duplicate candidates in {list(budgets)}")


def default_budgets(max_context: int, max_candidates: int = 8, step: int = GRID_STEP) -> tuple[int, ...]:
    """Multiples of `step` strictly below the longest context (a budget >= every context is dense
    everywhere, nothing to measure), thinned to at most `max_candidates` by a common stride."""
    grid = list(range(step, max_context, step))
    if not grid:
        raise UserError(
            f"the longest context ({max_context} tokens) is within one budget step ({step}): "
            "nothing to calibrate; pass --budgets below the context length"
        )
    stride = math.ceil(len(grid) / max_candidates)
    # Keep the largest candidate: it is the one most likely to hold tau in the last bins.
    return tuple(grid[::-1][::stride][::-1])


# --- from per-token acceptance to the table -------------------------------------------------------


@dataclass
class Measurement:
    """Per-token acceptance of every generated token under one candidate budget."""

    budget: int
    alpha: np.ndarray  # estimate
    lower: np.ndarray
    upper: np.ndarray
    positions: np.ndarray  # absolute position (prompt + index) of each token
    sequences: int = 0
    nan_tokens: int = 0
    generate_s: float = 0.0
    score_s: float = 0.0


def measure_sequences(
    budget: int,
    prompt_lens: Sequence[int],
    dense_topk: Sequence[tuple[torch.Tensor, torch.Tensor]],
    sparse_topk: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> Measurement:
    """Acceptance of each token from ([T, K] ids, [T, K] log-probs) of the dense (p) and sparse (q) sides."""
    parts = [
        acceptance_from_topk(p_ids, p_lps, q_ids, q_lps)
        for (p_ids, p_lps), (q_ids, q_lps) in zip(dense_topk, sparse_topk, strict=True)
    ]
    cat = [np.concatenate([p[i].double().numpy() for p in parts]) if parts else np.zeros(0) for i in range(3)]
    lens = [len(p_ids) for p_ids, _ in dense_topk]
    positions = token_positions(prompt_lens, lens)
    return Measurement(budget, cat[0], cat[1], cat[2], positions, len(parts), int(np.isnan(cat[0]).sum()))


@dataclass
class CellStats:
    budget: int
    bin: int
    count: int
    mean: float
    p5: float
    p5_lower: float | None
    p5_upper: float | None
    frac_below_tau: float | None


def build_table(
    measurements: Sequence[Measurement],
    bin_width: int,
    geometry: PageGeometry = DEFAULT_GEOMETRY,
    min_bin_tokens: int = 20,
    tau: float | None = None,
    provenance: dict[str, Any] | None = None,
) -> tuple[TailTable, list[CellStats]]:
    """The measured budget x bin p5 table (None where a cell has < min_bin_tokens tokens) and every
    cell's statistics. Bins run from position 0 to the last populated one, as schedules index them."""
    cells: list[CellStats] = []
    for m in measurements:
        report = tail_report(m.alpha, m.positions, bin_width, m.lower, m.upper, tau=tau, fit=False)
        for b in report.bins:
            cells.append(
                CellStats(
                    m.budget,
                    b.start // bin_width,
                    b.count,
                    b.mean,
                    b.p5,
                    b.p5_lower,
                    b.p5_upper,
                    b.frac_below_tau,
                )  # fmt: skip
            )
    measured = [c for c in cells if c.count >= min_bin_tokens]
    if not measured:
        most = max((c.count for c in cells), default=0)
        raise UserError(
            f"no (budget, bin) cell got {min_bin_tokens} tokens (most: {most}): raise --num-prompts, "
            "--samples or --max-new-tokens, or lower --min-bin-tokens"
        )
    budgets = sorted(m.budget for m in measurements)
    num_bins = max(c.bin for c in measured) + 1
    grid: dict[int, list[float | None]] = {b: [None] * num_bins for b in budgets}
    for c in measured:
        grid[c.budget][c.bin] = c.p5
    table = TailTable(
        budgets=tuple(budgets),
        p5=tuple(tuple(grid[b]) for b in budgets),
        bin_width=bin_width,
        geometry=geometry,
        provenance=provenance,
    )
    return table, cells


def fill_unmeasured(table: TailTable) -> tuple[TailTable, list[tuple[int, int, int]]]:
    """Give each unmeasured cell the p5 of the nearest measured bin after it in the same row.

    Calibration only sees positions where rollouts have tokens (after the prompts), yet a schedule has
    bins from position 0. p5 decays with position (longer contexts leave more
    mass outside a fixed budget), so a later bin's p5 is the
    conservative stand-in. Cells with no measured bin after them stay None. Returns the filled table
    and the (budget, bin, source bin) of every filled cell.
    """
    filled: list[tuple[int, int, int]] = []
    rows = []
    for budget, row in zip(table.budgets, table.p5, strict=True):
        new = list(row)
        nxt: int | None = None
        for j in range(len(row) - 1, -1, -1):
            if row[j] is not None:
                nxt = j
            elif nxt is not None:
                new[j] = row[nxt]
                filled.append((budget, j, nxt))
        rows.append(tuple(new))
    provenance = {**(table.provenance or {}), "filled_cells": [list(f) for f in sorted(filled)]}
    out = TailTable(table.budgets, tuple(rows), table.bin_width, table.geometry, provenance)
    return out, sorted(filled)


def solve_calibrated(
    table: TailTable,
    tau: float,
    dense_fallback: bool = False,
    name: str = "calibrated",
    dense_layers: tuple[int, ...] = DEFAULT_DENSE_LAYERS,
    provenance: dict[str, Any] | None = None,
) -> Schedule:
    """The solver's cheapest non-decreasing schedule over a (filled) table, with the calibration's
    dense layers (the solver keeps the default ones)."""
    solved = solve_schedule(table, tau, dense_fallback=dense_fallback, name=name, provenance=provenance)
    return Schedule(solved.budgets, solved.bin_width, solved.geometry, tuple(dense_layers), name,
                    solved.provenance)  # fmt: skip


# --- prompts --------------------------------------------------------------------------------------
