"""Runs the selected benchmarks one after another, so that one that fails costs only its own rows:
the others' rows are still reported, the failure is reported with its error, and the run fails."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Mapping

from bench.harness import Row

Benchmark = Callable[[float], list[Row]]
"""A benchmark: given the seconds per measurement, returns its rows (or raises)."""


def run_all(benchmarks: Mapping[str, Benchmark], names: Iterable[str],
            seconds: float) -> tuple[list[Row], dict[str, str]]:
    """Run `names` in order: the rows of those that returned, and the error of each that raised, by
    name. A Ctrl-C ends the run there (recorded as that benchmark's error), so that what was measured
    is still reported."""
    rows: list[Row] = []
    failed: dict[str, str] = {}
    for name in names:
        try:
            rows += benchmarks[name](seconds)
        except KeyboardInterrupt:
            failed[name] = "interrupted (Ctrl-C); the benchmarks after it were not run"
            break
        except Exception as exc:
            traceback.print_exc()  # the whole story on stderr; the table gets one line
            failed[name] = f"{type(exc).__name__}: {exc}"
    return rows, failed
