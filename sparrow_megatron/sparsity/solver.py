"""Schedule solver: from a measured tail table (candidate budget x bin -> p5) to a schedule.

Per bin, pick the cheapest budget whose p5 reaches tau, never below the previous bin's budget. Taking
the smallest feasible budget at every bin is optimal for any cost that grows with the budget: each
later bin then has the widest choice, so no feasible schedule has a smaller budget in any bin.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.schedule import DEFAULT_BIN_WIDTH, Schedule
from sparrow_megatron.sparsity.selection import PageGeometry

TABLE_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TailTable:
    """p5[i][j] = p5 acceptance of candidate budgets[i] in position bin j (None = not measured)."""

    budgets: tuple[int, ...]
    p5: tuple[tuple[float | None, ...], ...]
    bin_width: int = DEFAULT_BIN_WIDTH
    geometry: PageGeometry = PageGeometry()
    provenance: dict[str, Any] | None = None

    @property
    def num_bins(self) -> int:
        return len(self.p5[0]) if self.p5 else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": TABLE_SCHEMA_VERSION,
            "bin_width": self.bin_width,
            "page_size": self.geometry.page_size,
            "sink_pages": self.geometry.sink_pages,
            "local_pages": self.geometry.local_pages,
            "rows": [{"budget": b, "p5": list(row)} for b, row in zip(self.budgets, self.p5, strict=True)],
            "provenance": self.provenance or {},
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> TailTable:
        from sparrow_megatron.loader import read_data_file

        return cls.from_dict(read_data_file(path, "tail table"), str(Path(path)))

    @classmethod
    def from_dict(cls, data: Any, source: str = "tail table") -> TailTable:
        if not isinstance(data, dict) or data.get("schema_version") != TABLE_SCHEMA_VERSION:
            raise UserError(f"{source}: field 'schema_version' must be {TABLE_SCHEMA_VERSION}")
        rows = data.get("rows")
        if not isinstance(rows, list) or not rows:
            raise UserError(f"{source}: field 'rows' must be a non-empty list of {{budget, p5}}")
        budgets, table = [], []
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or not isinstance(row.get("budget"), int):
                raise UserError(f"{source}: field 'rows[{i}].budget' must be an integer")
            p5 = row.get("p5")
            if not isinstance(p5, list) or not all(x is None or isinstance(x, int | float) for x in p5):
                raise UserError(f"{source}: field 'rows[{i}].p5' must be a list of numbers or nulls")
            if table and len(p5) != len(table[0]):
                raise UserError(
                    f"{source}: field 'rows[{i}].p5' has {len(p5)} bins, rows[0] has {len(table[0])}"
                )
            budgets.append(row["budget"])
            table.append(tuple(None if x is None or math.isnan(x) else float(x) for x in p5))
        if len(set(budgets)) != len(budgets):
            raise UserError(f"{source}: field 'rows': duplicate candidate budgets")
        order = sorted(range(len(budgets)), key=budgets.__getitem__)
        geometry = PageGeometry(
            data.get("page_size", 16), data.get("sink_pages", 1), data.get("local_pages", 2)
        )
        for b in budgets:
            if b % geometry.page_size or b < geometry.min_budget:
                raise UserError(
                    f"{source}: candidate budget {b} is not a multiple of the page size >= sink+local"
                )
        return cls(
            budgets=tuple(budgets[i] for i in order),
            p5=tuple(table[i] for i in order),
            bin_width=int(data.get("bin_width", DEFAULT_BIN_WIDTH)),
            geometry=geometry,
            provenance=data.get("provenance") or {},
        )


def solve_schedule(
    table: TailTable,
    tau: float,
    dense_fallback: bool = False,
    name: str = "solved",
    provenance: dict[str, Any] | None = None,
) -> Schedule:
    """The cheapest non-decreasing schedule with p5 >= tau in every bin.

    A bin where no candidate at or above the previous bin's budget reaches tau is an error naming the
    bin, or, with `dense_fallback`, dense from that bin on (dense is the most expensive choice, so
    every later bin stays dense to keep the schedule non-decreasing).
    """
    if not 0.0 < tau < 1.0:
        raise UserError(f"tau must be in (0, 1), got {tau}")
    chosen: list[int | None] = []
    floor = 0
    for j in range(table.num_bins):
        if chosen and chosen[-1] is None:
            chosen.append(None)
            continue
        feasible = [
            b
            for b, row in zip(table.budgets, table.p5, strict=True)
            if b >= floor and row[j] is not None and row[j] >= tau
        ]
        if feasible:
            floor = min(feasible)
            chosen.append(floor)
        elif dense_fallback:
            chosen.append(None)
        else:
            best = max((row[j] for row in table.p5 if row[j] is not None), default=None)
            raise UserError(
                f"bin {j} ({_positions(table, j)}): no candidate budget >= {floor} reaches p5 >= {tau}"
                + (f" (best p5 {best:.3f})" if best is not None else " (no measurements)")
                + _filled_from(table, j)
                + "; add larger candidates or pass --dense-fallback"
            )
    meta = {
        "tau": tau,
        "source": "solved from a tail table",
        **(table.provenance or {}),
        **(provenance or {}),
    }
    return Schedule(tuple(chosen), table.bin_width, table.geometry, name=name, provenance=meta)


def _positions(table: TailTable, j: int) -> str:
    return f"positions {j * table.bin_width}-{(j + 1) * table.bin_width}"


def _filled_from(table: TailTable, j: int) -> str:
    """Which measured bin an unmeasured bin's cells stand in for (calibrate's fill_unmeasured)."""
    sources = sorted({src for _, cell, src in (table.provenance or {}).get("filled_cells", []) if cell == j})
    if not sources:
        return ""
    measured = ", ".join(f"bin {k} ({_positions(table, k)})" for k in sources)
    return f"; bin {j} was not measured (no rollout tokens there), its p5 is that of {measured}"
