"""Reload with rollback: a real daemon is reloaded onto a bad new version of a component (one whose
initialize traps, one that reports unhealthy in its check window); measured from the reload request to
the previous version answering a call again."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench.harness import Row, running_daemon
from wasmhost.system import protocol
from wasmhost.system.client import request

ROUNDS = 10
WINDOW_S = 0.5
"""rollout_check_s of the version that turns unhealthy: the rollback cannot come before its window ends."""


def _component(path: str, check_s: float) -> str:
    return f'[[components]]\nid = "b/svc/0"\npath = "{path}"\nrollout_check_s = {check_s}\n'


def _rollback_times(bad: str, check_s: float, rounds: int) -> list[float]:
    """Seconds from `reload` onto `bad` to the previous version (echo) answering again, per round."""
    with running_daemon(_component("echo.wasm", check_s)) as daemon:
        config = Path(daemon.socket).parent.parent / "wasmhost.toml"  # where running_daemon wrote it
        config.write_text(config.read_text().replace('path = "echo.wasm"', f'path = "{bad}"'))
        samples = []
        for _ in range(rounds):  # the config still names the bad version: every reload tries it again
            began = time.perf_counter()
            report = request(daemon.socket, protocol.Reload(), timeout=60).data
            assert report["outcome"] == "rolled-back", report
            reply = request(daemon.socket, protocol.Call("b/svc/0", b"back", 10.0), timeout=60)
            samples.append(time.perf_counter() - began)
            assert reply.data == b"back", reply
    return samples


def run(seconds: float = 1.0) -> list[Row]:
    """p50 of reload-to-old-version-answering for a version that traps in initialize (no window to wait
    for), and for one that reports unhealthy (its WINDOW_S check window plus the same work)."""
    trap = _rollback_times("inittrap.wasm", 5.0, ROUNDS)
    sick = _rollback_times("sickly.wasm", WINDOW_S, 3)
    # Targets: the config parse, a cached load and two instantiations take tens of milliseconds on a busy
    # laptop; 100 ms leaves room for a loaded machine, and the unhealthy case cannot beat its window.
    return [
        Row("reload with rollback", "initialize traps p50", 100.0, statistics.median(trap) * 1000, "ms", 100.0,
            at_most=True),
        Row("reload with rollback", f"unhealthy, {WINDOW_S:g} s window p50", WINDOW_S * 1000 + 100,
            statistics.median(sick) * 1000, "ms", WINDOW_S * 1000 + 100, at_most=True),
    ]
