"""Collecting config problems: each section's `problems(prefix)` returns messages naming the dotted field,
and the job config reports all of them at once."""

from __future__ import annotations

import math


class Problems(list):
    """A list of `field 'a.b': message` strings, with the checks every section uses."""

    def __init__(self, prefix: str = ""):
        super().__init__()
        self.prefix = prefix

    def need(self, ok: bool, name: str, message: str) -> None:
        if not ok:
            self.append(f"field '{self.prefix}{name}': {message}")

    def at_least(self, minimum: int, **values: int) -> None:
        for name, value in values.items():
            self.need(value >= minimum, name, f"must be >= {minimum}, got {value}")

    def positive(self, **values: float) -> None:
        for name, value in values.items():
            self.need(math.isfinite(value) and value > 0, name, f"must be a positive number, got {value}")

    def non_negative(self, **values: float) -> None:
        for name, value in values.items():
            self.need(math.isfinite(value) and value >= 0, name, f"must be >= 0, got {value}")

    def non_empty(self, **values: object) -> None:
        for name, value in values.items():
            self.need(bool(value), name, "is empty")
