"""Unique BOLD-style processids for the synthetic data writers (fixtures and scale set).

Shared so that the fixture writer and the scale writer spell processids the same way.
"""
from __future__ import annotations

import string

import numpy as np

_LETTERS = string.ascii_uppercase


class ProcessIds:
    """A stream of unique processids such as ``AACTA1040-20``, grouped by project like BOLD's.

    A processid is <project code><sequence number>-<2-digit year>. The code is letters
    and the number has no leading zero, so each (code, year) project is drawn once and
    numbers only grow inside it: every processid the stream yields is distinct.
    """

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng([seed, 0xB01D])
        self._projects: set[tuple[str, int]] = set()
        self._prefix = ""
        self._suffix = ""
        self._next = 1
        self._left = 0

    def _new_project(self) -> None:
        """Start a new (code, year) project of 1 to ~12,000 specimens, most of them small."""
        rng = self._rng
        while True:
            code = "".join(_LETTERS[i] for i in rng.integers(0, 26, int(rng.integers(4, 6))))
            year = int(rng.integers(19, 24))
            if (code, year) not in self._projects:
                break
        self._projects.add((code, year))
        self._prefix, self._suffix = code, f"-{year}"
        # The dataset holds a subset of each project: numbering starts anywhere in 1..~10,000.
        self._next = int(np.exp(rng.uniform(0, np.log(10_000))))
        self._left = int(np.exp(rng.uniform(0, np.log(12_000))))

    def take(self, n: int) -> list[str]:
        """The next ``n`` processids (in project order; callers shuffle as they need)."""
        out: list[str] = []
        while len(out) < n:
            if not self._left:
                self._new_project()
            m = min(n - len(out), self._left)
            # Sequence numbers with small gaps, as in a project whose specimens were subsampled.
            numbers = self._next - 1 + np.cumsum(self._rng.integers(1, 4, m))
            prefix, suffix = self._prefix, self._suffix
            out.extend([f"{prefix}{k}{suffix}" for k in numbers.tolist()])
            self._next = int(numbers[-1]) + 1
            self._left -= m
        return out
