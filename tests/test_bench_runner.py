"""`python -m bench` when a benchmark fails. This tests our own reporting logic with stand-in
benchmarks (plain functions returning or raising), not any measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.harness import Row
from bench.runner import Benchmark


def measuring(name: str) -> Benchmark:
    """A stand-in benchmark that returns two rows."""
    return lambda seconds: [Row(name, "case one", 10.0, 20.0, "calls/s", 1.5),
                            Row(name, "case two", 0.0, 3.0, "ms", 5.0, True)]


def test_a_failing_benchmark_costs_only_its_own_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(seconds: float) -> list[Row]:
        raise FileNotFoundError("config/build/greeter.wasm")

    benchmarks = {"first": measuring("first"), "broken": broken, "last": measuring("last")}
    code = main(["--seconds", "0.01"], benchmarks=benchmarks, results=tmp_path)
    out, err = capsys.readouterr()
    assert code == 1
    table = out.splitlines()
    assert [line.split()[0] for line in table[3:-1]] == ["first", "first", "last", "last", "broken"]
    assert table[-2].startswith("broken    FAILED           FileNotFoundError: config/build/greeter.wasm")
    assert "1 benchmark(s) failed: broken" in err and "Traceback" in err  # the whole error goes to stderr
    saved = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert [r["benchmark"] for r in saved["rows"]] == ["first", "first", "last", "last"]
    assert saved["failed"] == {"broken": "FileNotFoundError: config/build/greeter.wasm"}


def test_ctrl_c_still_prints_what_was_measured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(seconds: float) -> list[Row]:
        raise KeyboardInterrupt

    def never(seconds: float) -> list[Row]:
        raise AssertionError("runs after a Ctrl-C")

    code = main([], benchmarks={"first": measuring("first"), "slow": interrupted, "never": never},
                results=tmp_path)
    out, _ = capsys.readouterr()
    assert code == 1
    assert "first     case one" in out and "slow      FAILED           interrupted (Ctrl-C)" in out
    assert "never" not in out


def test_all_passing_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["only"], benchmarks={"only": measuring("only"), "other": lambda s: []}, results=tmp_path) == 0
    assert "FAILED" not in capsys.readouterr().out
