"""SIGHUP and SIGUSR1 before the daemon's own signal handling is up.

Their default action ends the process, and the daemon reads its configuration, opens storage and starts its
worker threads (imports included, a good part of a second; more with thousands of components) before its
signal receiver is open: a reload asked for then, or logrotate's postrotate, killed it (exit by SIGHUP,
measured 0.2 s after the start). `wasmhost run` records them from its first moment instead, and the daemon
acts on what was recorded once its receiver is open (a reload once the start is done, a log file reopen).
This module imports nothing heavy, so that it is set up before anything slow.
"""

from __future__ import annotations

import signal

EARLY_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)
_early: list[signal.Signals] = []


def hold_early_signals() -> None:
    """Record SIGHUP and SIGUSR1 from now until the daemon's signal receiver replaces these handlers."""
    for sig in EARLY_SIGNALS:
        signal.signal(sig, _record)


def _record(number: int, _frame: object) -> None:
    # Each signal once: one reload reads the newest config, one reopen the newest log file, however many were
    # asked for. A list of every one grew by each signal of a storm for as long as the start lasted.
    sig = signal.Signals(number)
    if sig not in _early:
        _early.append(sig)


def take_early_signals() -> list[signal.Signals]:
    """The signals recorded so far, in order; forgotten here once taken."""
    taken = _early[:]
    del _early[:len(taken)]
    return taken
