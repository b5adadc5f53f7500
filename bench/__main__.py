"""`python -m bench`: run every benchmark, print one table, save it as JSON."""

from __future__ import annotations

import argparse

from bench import actors, calls, density, fairness, logs, memory, payload, reload, restart, startup, stop, storage
from bench.harness import report, save

BENCHMARKS = {
    "calls": calls.run, "actors": actors.run, "startup": startup.run, "restart": restart.run,
    "density": density.run, "fairness": fairness.run, "memory": memory.run, "logs": logs.run,
    "storage": storage.run,
    "payload": payload.run, "stop": stop.run, "reload": reload.run,
}


def main() -> None:
    """Run the benchmarks selected on the command line (all by default)."""
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("only", nargs="*", choices=[[], *BENCHMARKS], help="benchmarks to run (default: all)")
    args = parser.parse_args()
    rows = []
    for name in args.only or BENCHMARKS:
        rows += BENCHMARKS[name](args.seconds)
    print(report(rows))
    print(f"saved {save(rows)}")


if __name__ == "__main__":
    main()
