"""`python -m bench`: run every benchmark, print one table, save it as JSON. A benchmark that fails
is marked FAILED with its error in the table; the others' rows are still printed and saved, and the
exit status is 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

from bench import (
    accounting,
    actors,
    calls,
    density,
    fairness,
    forensics,
    hostile,
    lattice,
    listing,
    logs,
    memory,
    messaging,
    metrics,
    payload,
    reload,
    restart,
    startup,
    stop,
    storage,
)
from bench.harness import RESULTS, report, save
from bench.runner import Benchmark, run_all

BENCHMARKS: dict[str, Benchmark] = {
    "calls": calls.run, "actors": actors.run, "startup": startup.run, "restart": restart.run,
    "density": density.run, "fairness": fairness.run, "memory": memory.run, "logs": logs.run,
    "storage": storage.run, "messaging": messaging.run,
    "payload": payload.run, "stop": stop.run, "reload": reload.run, "metrics": metrics.run,
    "forensics": forensics.run, "lattice": lattice.run, "accounting": accounting.run, "listing": listing.run,
    "hostile": hostile.run,
}


def main(argv: list[str] | None = None, benchmarks: Mapping[str, Benchmark] = BENCHMARKS,
         results: Path = RESULTS) -> int:
    """Run the benchmarks selected on the command line (all by default); 1 when any failed."""
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("only", nargs="*", choices=[[], *benchmarks], help="benchmarks to run (default: all)")
    args = parser.parse_args(argv)
    rows, failed = run_all(benchmarks, args.only or list(benchmarks), args.seconds)
    print(report(rows, failed))
    print(f"saved {save(rows, failed, results)}")
    if failed:
        print(f"{len(failed)} benchmark(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
