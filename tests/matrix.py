"""The fault-and-hostile-input matrix: each end-to-end module that tries faults or hostile input
records one row per kind of attempt (what was tried, how many times, what came of it) and prints
its rows at the end, so a run of the suite shows the whole matrix (``pytest -s`` or the ``-rA``
summary's captured output)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    tried: str  # what was tried
    count: int  # how many times
    outcome: str  # what came of it
    ok: bool = True  # within its bound: no 5xx caused by input, no wait past its bound


class Matrix:
    """Rows of one module; ``add`` as the tests go, ``print`` once at the end (a module fixture)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.rows: list[Row] = []

    def add(self, tried: str, count: int, outcome: str, *, ok: bool = True) -> None:
        self.rows.append(Row(tried, count, outcome, ok))

    def print(self) -> None:
        if not self.rows:
            return
        width = max(len(r.tried) for r in self.rows)
        print(f"\n== fault-and-hostile-input matrix: {self.title} ==")
        for row in self.rows:
            mark = "ok  " if row.ok else "FAIL"
            print(f"{mark} {row.tried.ljust(width)}  x{row.count:<5} {row.outcome}")
