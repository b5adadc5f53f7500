"""The `wasmhost` command line: run the daemon, check a config, control a running daemon, read logs."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

import structlog

from wasmhost import __version__
from wasmhost.core.errors import LoadError
from wasmhost.core.terminal import printable

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_ANSWER = 0, 1, 2, 3
"""EXIT_FAILED: the command failed (the daemon's answer said so, or the CLI's own checks);
EXIT_NO_ANSWER: no answer from a daemon (nothing listening on the socket, not a daemon's socket, the
connection closed, or no answer within --timeout), so a script can tell "not there" from "refused"."""
DEFAULT_TIMEOUT = 30.0
"""Seconds `call` and `send` wait by default (the daemon answers `timeout` then)."""
ANSWER_MARGIN = 5.0
"""Seconds the CLI waits for the daemon beyond a request's own timeout: the daemon answers first."""
LAST_ERROR_WIDTH = 100
"""Characters of a component's last error shown in the status table (the whole text: `status --json`)."""


class CliError(Exception):
    """A mistake in what the command was given: printed as `wasmhost: MESSAGE`, exit status 1."""


def _os_reason(exc: OSError) -> str:
    """What went wrong with a file, without the errno noise: `no such file`, `permission denied`..."""
    return (exc.strerror or str(exc)).lower().replace("no such file or directory", "no such file")


def config_path(args: argparse.Namespace) -> Path:
    """CONFIG or --config, else $WASMHOST_CONFIG, else the checkout's or /etc's (system/config_location.py)."""
    from wasmhost.system.config_location import find_config

    return find_config(getattr(args, "config_file", None) or getattr(args, "config", None))


def _host_table(source: Path) -> Any:
    """The [host] table of the configuration at `source`, read as `run` reads it (config.read_config_bytes)
    but not validated. OSError when it cannot be read, ValueError (ConfigTooLarge, TOMLDecodeError,
    UnicodeDecodeError) when it is no TOML configuration."""
    from wasmhost.core.private_files import NotRegularFile
    from wasmhost.system.config import read_config_bytes

    try:
        data = read_config_bytes(source)
    except NotRegularFile:
        raise OSError(0, "not a regular file") from None
    return tomllib.loads(data.decode()).get("host", {})


def socket_path(args: argparse.Namespace) -> Path:
    """--socket, else the control socket named by the configuration (read without validating it)."""
    if getattr(args, "socket", None):
        return Path(args.socket)
    source = config_path(args)
    try:
        host = _host_table(source)
    except OSError as exc:
        raise CliError(f"cannot read the configuration {source} to find the control socket: {_os_reason(exc)} "
                       "(expected --config FILE or $WASMHOST_CONFIG naming a readable file, "
                       "or --socket PATH)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CliError(f"{source}: not valid TOML ({exc}); expected a wasmhost configuration "
                       "(or give the control socket with --socket PATH)") from None
    except ValueError as exc:  # too large
        raise CliError(f"{source}: {exc}; expected a wasmhost configuration "
                       "(or give the control socket with --socket PATH)") from None
    if not isinstance(host, dict):
        host = {}
    state_dir = source.parent / str(host.get("state_dir", "state"))
    return state_dir / str(host.get("control_socket", "wasmhost.sock"))


def _payload(text: str) -> bytes:
    """PAYLOAD as it is; `@FILE` the contents of FILE, `@-` stdin, and `@@TEXT` the literal `@TEXT` (a
    payload starting with `@`). Refused before sending when no component could take it (above the
    largest `max_message_bytes`; the daemon checks the target's own)."""
    from wasmhost.core.message_size import MAX_MESSAGE_BYTES_CEILING

    if text == "@-":
        payload, where = sys.stdin.buffer.read(MAX_MESSAGE_BYTES_CEILING + 1), "stdin"
        size = len(payload) if len(payload) <= MAX_MESSAGE_BYTES_CEILING else None
    elif text.startswith("@") and not text.startswith("@@"):
        if text == "@":
            raise CliError("PAYLOAD '@': expected @FILE naming a file, @- for stdin, or @@TEXT for a literal "
                           "payload starting with @")
        where = text[1:]
        payload = b""
        try:
            with open(where, "rb") as stream:
                size = os.fstat(stream.fileno()).st_size
                if size <= MAX_MESSAGE_BYTES_CEILING:
                    payload = stream.read(MAX_MESSAGE_BYTES_CEILING + 1)
                    size = len(payload)
        except OSError as exc:
            raise CliError(f"cannot read payload file {where}: {_os_reason(exc)} (expected @FILE to name a "
                           "readable file; for a literal payload starting with @ write @@)") from None
    else:
        payload, where = (text[1:] if text.startswith("@@") else text).encode(), "PAYLOAD"
        size = len(payload)
    if size is None or size > MAX_MESSAGE_BYTES_CEILING:
        amount = f"{size} bytes" if size is not None else f"more than {MAX_MESSAGE_BYTES_CEILING} bytes"
        raise ValueError(f"{where}: {amount} is too large to send: no component takes more than "
                         f"{MAX_MESSAGE_BYTES_CEILING} bytes (the largest max_message_bytes)")
    return payload


# --- daemon and config ---


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground."""
    from wasmhost.system.early_signals import hold_early_signals

    hold_early_signals()  # first: a SIGHUP or SIGUSR1 while the daemon is being set up must not end the process
    import uvloop

    from wasmhost.runtime.guest_log import flush_suppressed
    from wasmhost.system.config import Config, ConfigError, load_config
    from wasmhost.system.daemon import run_daemon
    from wasmhost.system.detached import busy
    from wasmhost.system.logging import configure_logging, shutdown_logging

    source = config_path(args)
    # Read once, before logging starts: its [host] table says how to log. 10,000 components take 0.2 s
    # to parse; a second read for the daemon would double that and could see another file.
    config: Config | ConfigError
    level: str
    fmt: str
    try:
        config = load_config(source)
        level, fmt, log_file = config.host.log_level, config.host.log_format, _log_path(source, config.host.log_file)
    except ConfigError as exc:
        config = exc  # logged by the daemon, with logging set up from the [host] values that are valid
        level, fmt, log_file = _log_settings(source)
    try:
        configure_logging(args.log_level or level, args.log_format or fmt, log_file)
    except OSError as exc:
        if not isinstance(config, ConfigError):
            why = "a FIFO no process reads" if exc.errno == errno.ENXIO else _os_reason(exc)
            raise CliError(f"host.log_file: cannot open {log_file}: {why}") from None
        configure_logging(args.log_level or level, args.log_format or fmt)  # the config's errors come first
    code = 1
    try:
        code = uvloop.run(run_daemon(config))
        return code
    finally:
        flush_suppressed()  # the last `suppressed=N` counts of guests that flooded their logs
        shutdown_logging()  # bounded: a destination nobody reads does not hold the exit
        if busy():  # a compile the stop abandoned: do not finalize the interpreter under it
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _log_settings(source: Path) -> tuple[str, str, str | None]:
    """Logging settings of a configuration that did not validate: its [host] values, as far as TOML reads."""
    try:
        host = _host_table(source)
    except (OSError, ValueError):  # UnicodeDecodeError and TOMLDecodeError are ValueErrors
        host = {}
    if not isinstance(host, dict):
        host = {}
    log_file = host.get("log_file")
    return (str(host.get("log_level", "info")), str(host.get("log_format", "auto")),
            _log_path(source, log_file if isinstance(log_file, str) else None))


def _log_path(source: Path, log_file: str | None) -> str | None:
    """`log_file` as the daemon opens it: relative to the configuration's directory; None (or empty): stderr."""
    if not log_file:
        return None
    return log_file if os.path.isabs(log_file) else str(source.parent / log_file)


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the configuration and compile every component, without starting anything."""
    from wasmhost.core.private_files import NotOwned
    from wasmhost.runtime.limiter import StoreBudget
    from wasmhost.runtime.loader import LoadedComponent
    from wasmhost.runtime.runtime import Runtime
    from wasmhost.system.config import ConfigError, load_config
    from wasmhost.system.daemon import prepare_state_dir

    source = config_path(args)
    try:
        config = load_config(source)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAILED
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        prepare_state_dir(config)  # the cache is created inside it: owner-only, as the daemon makes it
    except NotOwned as exc:
        print(f"wasmhost: state_dir {exc}", file=sys.stderr)
        return EXIT_FAILED
    runtime = Runtime(config.engine_settings, config.cache_dir, config.components_dir)
    failures = []
    # Each binary loaded once, as run and reload do (SharedLoads): 300 components of the 18 MB greeter read,
    # hashed and counted it 300 times (9 s; 10,000 of them, some 5 minutes). The budget is each component's.
    loads: dict[tuple[Path, bool], LoadedComponent | LoadError] = {}
    try:
        for plan in config.components:
            key = (plan.wasm_path, plan.outbound_http)
            if key not in loads:
                try:
                    loads[key] = runtime.load(plan.spec.component_id, plan.wasm_path, plan.outbound_http)
                except LoadError as exc:
                    loads[key] = exc
            try:
                loaded = loads[key]
                if isinstance(loaded, LoadError):
                    raise loaded
                StoreBudget.plan(plan.spec.limits.max_memory_bytes, loaded.footprint, str(loaded.source))
            except LoadError as exc:
                failures.append(f"{plan.spec.component_id}: {exc}")
    finally:
        runtime.close()
    if failures:
        print(f"{source}: {len(failures)} component(s) cannot be loaded:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{source}: ok, {len(config.components)} component(s)")
    return EXIT_OK


# --- control ---


def _ask(args: argparse.Namespace, message: Any) -> Any:
    """Send one control request; print the error and return None when it failed."""
    from wasmhost.system.client import request

    response = request(socket_path(args), message,
                       timeout=getattr(args, "timeout", DEFAULT_TIMEOUT) + ANSWER_MARGIN)
    if not response.ok:
        # Errors carry guest text (a runtime-error's message, a trapping function's name): escaped, so
        # that its control characters are shown, not obeyed by the terminal.
        print(f"wasmhost: {printable(str(response.error))}", file=sys.stderr)
        if getattr(args, "verbose", False) and isinstance(response.data, str):
            # the whole story, e.g. a wasm backtrace: several lines on purpose
            print(printable(response.data.rstrip("\n"), newlines=True), file=sys.stderr)
        return None
    return response


def _first_line(text: str, width: int) -> str:
    """The first line of `text`, control characters escaped, cut to `width` characters (`...` says it
    was cut, or that more lines follow)."""
    lines = text.strip().splitlines() or [""]
    line = printable(lines[0])
    if len(line) > width or len(lines) > 1:
        line = line[: width - 3].rstrip() + "..."
    return line


def cmd_status(args: argparse.Namespace) -> int:
    """Show every component: state (and phase while starting), health, restarts, mailbox depth, counters,
    last error."""
    from wasmhost.system import protocol

    if args.lattice:
        return _status_lattice(args)
    response = _ask(args, protocol.Status())
    if response is None:
        return EXIT_FAILED
    rows = response.data["components"]
    if args.json:
        print(json.dumps(response.data, indent=2))
        return EXIT_OK
    columns = ["id", "state", "health", "restarts", "mailbox", "handled", "failed", "last_error"]
    if any(row.get("memory_bytes") is not None for row in rows):  # [host] memory_accounting is on
        from wasmhost.top import format_bytes

        columns.insert(-1, "memory")
        for row in rows:
            row["memory"] = None if row.get("memory_bytes") is None else format_bytes(row["memory_bytes"])
    for row in rows:
        if row.get("phase"):  # what a starting component is doing: starting/compiling
            row["state"] = f"{row['state']}/{row['phase']}"
    table = [[str(row.get(c) if row.get(c) is not None else "-") for c in columns] for row in rows]
    for r in table:  # one line per row: a wasm backtrace is many lines (the whole text: --json)
        r[-1] = _first_line(r[-1], LAST_ERROR_WIDTH)
    widths = [max([len(c)] + [len(r[i]) for r in table]) for i, c in enumerate(columns[:-1])]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns[:-1], widths, strict=True)) + "  LAST ERROR")
    for r in table:
        print(("  ".join(v.ljust(w) for v, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]).rstrip())
    for row in rows:  # the reload kept (or put back) the previous version: the operator must hear why
        if str(row.get("rollout") or "").startswith("rolled back"):
            print(f"reload: {row['id']}: {printable(row['rollout'])}")
    if response.data.get("log_lines_dropped"):
        print(f"logs: {response.data['log_lines_dropped']} line(s) dropped: a log destination could not keep up")
    if response.data.get("storage_io_errors"):
        data = response.data
        print(f"storage: {data['storage_io_errors']} I/O error(s), last: {data['storage_last_error']}")
    return EXIT_OK


def cmd_top(args: argparse.Namespace) -> int:
    """A refreshing table of the components sorted by messages/s or any column; `--once` prints one frame."""
    from wasmhost import top
    from wasmhost.system import protocol
    from wasmhost.system.client import request

    if not 0.05 <= args.interval <= 3600:
        raise CliError(f"--interval {args.interval:g}: expected seconds from 0.05 to 3600")
    path = socket_path(args)

    def fetch() -> list[dict[str, Any]]:
        response = request(path, protocol.Status(), timeout=DEFAULT_TIMEOUT)
        if not response.ok:
            raise CliError(str(response.error))
        return list(response.data["components"])

    if args.once:
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 10_000
        print("\n".join(top.once(fetch, args.sort, args.reverse, args.interval, width)))
        return EXIT_OK
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise CliError("top: stdin and stdout must be a terminal (for one frame in a script: --once)")
    top.live(fetch, args.sort, args.reverse, args.interval)
    return EXIT_OK


def _status_lattice(args: argparse.Namespace) -> int:
    """`status --lattice`: every host of the lattice and where each component runs, from the local
    daemon's directory (built from heartbeats and inventories, so a few seconds old at most)."""
    from wasmhost.system import protocol

    response = _ask(args, protocol.LatticeStatus())
    if response is None:
        return EXIT_FAILED
    view = response.data
    if args.json:
        print(json.dumps(view, indent=2))
        return EXIT_OK
    link = (f"connected to NATS at {view['url']}" if view["connected"]
            else f"NOT connected to NATS: {view['cause'] or 'no connection'}; other hosts as last seen")
    print(f"lattice {view['lattice']}: {len(view['hosts'])} host(s), seen from {view['host']} ({link})")
    print(_table(["host", "last seen", "components"],
                 [[h["host"], "local" if h["local"] else f"{h['last_seen_s']:.1f} s ago", str(h["components"])]
                  for h in view["hosts"]]))
    print()
    print(_table(["id", "host", "state", "health", "external"],
                 [[c["id"], c["host"], c["state"], c["health"] or "-", "yes" if c["accepts_external"] else "no"]
                  for c in view["components"]]))
    return EXIT_OK


def _table(columns: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns under upper-case headers, two spaces apart."""
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    lines = [[c.upper() for c in columns], *rows]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def cmd_send(args: argparse.Namespace) -> int:
    """Send PAYLOAD to a component."""
    from wasmhost.system import protocol

    _check_timeout(args.timeout)
    message = protocol.Send(args.id, _payload(args.payload), timeout=args.timeout)
    return EXIT_OK if _ask(args, message) else EXIT_FAILED


def _check_timeout(seconds: float) -> None:
    """Refuse a --timeout the daemon would refuse (protocol.Timeout), or the client cannot wait (inf, NaN)."""
    from wasmhost.system.protocol import MAX_TIMEOUT

    if not 0 < seconds <= MAX_TIMEOUT:
        raise CliError(f"--timeout {seconds:g}: expected seconds above 0, at most {MAX_TIMEOUT:g} (a day)")


def cmd_call(args: argparse.Namespace) -> int:
    """Request-response with a component: writes the reply bytes exactly to stdout or --output FILE (on a
    terminal a newline is added when the reply does not end with one, so the prompt starts on a line of its own).
    With --lattice the request goes straight over NATS to whichever host runs the component."""
    _check_timeout(args.timeout)
    payload = _payload(args.payload)
    if args.output is not None:
        existed = os.path.exists(args.output)
        try:  # checked before the call (the component is not asked for a reply that cannot be kept), untouched
            out = open(args.output, "ab")  # noqa: SIM115 (closed below, after the call)
        except OSError as exc:
            raise CliError(f"cannot write the reply to {args.output}: {_os_reason(exc)} "
                           "(expected --output FILE in a writable directory)") from None
        ok = False
        try:
            with out:
                ok, reply = _reply(args, payload)
                if ok:  # replaced by the reply only once there is one
                    out.truncate(0)
                    out.write(reply or b"")
        finally:
            if not ok and not existed:  # a failed call leaves no empty reply file behind
                with contextlib.suppress(OSError):
                    os.unlink(args.output)
        return EXIT_OK if ok else EXIT_FAILED
    ok, reply = _reply(args, payload)
    if not ok:
        return EXIT_FAILED
    if reply is not None:
        sys.stdout.buffer.write(reply)
        if sys.stdout.isatty() and not reply.endswith(b"\n"):
            sys.stdout.buffer.write(b"\n")
        sys.stdout.buffer.flush()
    return EXIT_OK


def _reply(args: argparse.Namespace, payload: bytes) -> tuple[bool, bytes | None]:
    """Call the component (through the daemon, or over NATS with --lattice): (True, reply bytes or None
    when it returned none), or (False, None) once the failure is printed."""
    if args.lattice:
        return _lattice_reply(args, payload)
    from wasmhost.system import protocol

    response = _ask(args, protocol.Call(args.id, payload, args.timeout, verbose=args.verbose))
    return (False, None) if response is None else (True, response.data)


def _lattice_reply(args: argparse.Namespace, payload: bytes) -> tuple[bool, bytes | None]:
    """`call --lattice`: a plain NATS request in the documented wire format, with the configuration's
    [lattice] servers and credentials; no daemon needed, and the target must accept external senders."""
    import asyncio

    from wasmhost.core.ids import ComponentId
    from wasmhost.system.config import ConfigError, load_config
    from wasmhost.system.lattice_call import LatticeCallFailed, call, connect_options

    target = ComponentId.parse(args.id)
    source = config_path(args)
    try:
        settings = load_config(source).lattice
    except ConfigError as exc:
        raise CliError(f"call --lattice reads the NATS servers from the configuration, which is not valid:\n{exc}"
                       ) from None
    if settings is None:
        raise CliError(f"call --lattice: {source} has no [lattice] section (expected one naming the NATS urls; "
                       "give --config FILE of a host of the lattice)")
    try:
        answer = asyncio.run(call(connect_options(settings), settings.name, target, payload, args.timeout))
    except LatticeCallFailed as exc:  # may carry the remote guest's error text
        print(f"wasmhost: {printable(str(exc))}", file=sys.stderr)
        return False, None
    return True, (answer.payload if answer.outcome == "reply" else None)


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the daemon to reload and print its report: exit 1 when anything was rejected or rolled back."""
    import msgspec

    from wasmhost.system import protocol
    from wasmhost.system.client import request
    from wasmhost.system.reload_report import ReloadReport

    _check_timeout(args.timeout)  # before, `--timeout inf` ended in an OverflowError traceback
    # A reload lasts as long as the longest rollout check window of the versions it hands over.
    response = request(socket_path(args), protocol.Reload(), timeout=args.timeout)
    if response.data is None:  # not a report: the request itself failed
        print(f"wasmhost: {printable(str(response.error))}", file=sys.stderr)
        return EXIT_FAILED
    report = msgspec.convert(response.data, ReloadReport)  # the daemon sent msgspec.to_builtins of one
    if args.json:
        print(json.dumps(response.data, indent=2))
    else:
        # A rollback's reason and a load problem carry guest text (a trapping function's name, its error):
        # escaped, so that a new version cannot paint `reload: ok` over its own rollback.
        print("\n".join(printable(line) for line in report.lines()), file=sys.stdout if response.ok else sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_simple(args: argparse.Namespace) -> int:
    """stop ID / start ID / restart ID."""
    from wasmhost.system import protocol
    from wasmhost.system.client import NoAnswer

    _check_timeout(args.timeout)
    message: Any = {"stop": protocol.Stop, "start": protocol.Start, "restart": protocol.Restart}[args.command](args.id)
    try:
        response = _ask(args, message)
    except NoAnswer as exc:
        # Before: only `no answer from the daemon ... within 35 s`, as if the daemon were gone, while a stop
        # draining for drain_timeout_s went on (it is carried out whether its client waits or not).
        raise NoAnswer(f"{args.command} {args.id}: {exc}; the daemon carries it out even so (a stop drains "
                       "for up to drain_timeout_s): `wasmhost status` shows where it is, --timeout S waits "
                       "longer") from None
    if response is None:
        return EXIT_FAILED
    print(f"{args.command}: ok" + (f" ({response.data})" if response.data else ""))
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    """Filter and print the daemon's JSON log lines from FILE or stdin."""
    from wasmhost import logview

    keep = logview.LogFilter(args.component, args.level, _time(args.since), _time(args.until),
                             args.correlation, args.grep)
    if args.file in (None, "-"):
        counts = logview.show(sys.stdin, keep, args.json)
    else:
        try:
            stream = logview.open_log(args.file)
        except OSError as exc:
            raise CliError(f"cannot read log file {args.file}: {_os_reason(exc)} (expected a file of wasmhost "
                           "log lines, or - for stdin)") from None
        with stream:
            lines = logview.follow(stream, args.file) if args.follow else stream
            counts = logview.show(lines, keep, args.json)
    if counts.skipped:
        print(f"({counts.skipped} of {counts.read} lines were not wasmhost events and were skipped)",
              file=sys.stderr)
    return EXIT_OK


def _time(text: str | None) -> Any:
    from wasmhost import logview

    if text is None:
        return None
    stamp = logview.parse_time(text)
    if stamp is None:
        raise SystemExit(f"wasmhost logs: {text!r} is not an ISO-8601 time (e.g. 2026-01-31T12:00:00Z)")
    return stamp


def cmd_inspect(args: argparse.Namespace) -> int:
    """Describe TARGET: a component file (loaded, instantiated, its metadata and imports printed), or the
    id of a component of the running daemon (its state and last error; non-zero when it has failed)."""
    if Path(args.target).exists() or args.target.endswith(".wasm"):
        if args.json:
            raise CliError("inspect --json: only for the id of a running component, not for a file")
        return _inspect_file(args, Path(args.target))
    from wasmhost.core.ids import ComponentId, InvalidComponentId

    try:
        ComponentId.parse(args.target)
    except InvalidComponentId:
        raise ValueError(f"inspect: {args.target!r} is neither a component file (no such file) nor a component "
                         "id NAMESPACE/NAME/INSTANCE") from None
    return _inspect_running(args, args.target)


def _inspect_file(args: argparse.Namespace, path: Path) -> int:
    """Load and instantiate one component binary and print its metadata; a guest that fails says so."""
    from wasmhost.core.errors import GuestFailure, HostError, InstanceStateError
    from wasmhost.core.ids import ComponentId
    from wasmhost.runtime.runtime import Runtime

    cid = ComponentId.parse(args.id)
    runtime = Runtime()
    try:
        loaded = runtime.load(cid, path, args.outbound_http)
        manager = runtime.store(loaded, cid)
        step = "instantiating it"
        try:
            manager.instantiate()
            step = "calling its metadata export"
            meta = manager.metadata()
        except (GuestFailure, HostError, InstanceStateError) as exc:
            # The guest's own failure (a trap in `metadata`, say): the binary is valid, the component
            # is not usable, and the daemon would restart it until it is marked failed. Say so, in full.
            print(f"wasmhost: {path} is a valid component, but {step} failed, so it cannot run:\n"
                  f"{printable(str(exc), newlines=True)}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            manager.close()
    finally:
        runtime.close()
    lines = [f"component   {loaded.source} ({loaded.size:,} bytes)",
             f"name        {meta.name} {meta.version}",
             f"description {meta.description}",
             f"author      {meta.author}  license {meta.license}",
             f"operations  {', '.join(meta.supported_operations) or '-'}  stateful {meta.stateful}",
             f"imports     {', '.join(sorted(loaded.imports)) or '-'}"]
    print("\n".join(printable(line) for line in lines))  # the metadata is the guest's own text
    return EXIT_OK


def _inspect_running(args: argparse.Namespace, target: str) -> int:
    """Print one component's row of the daemon's status in full, then its last failures with the metadata
    of the messages around each (`--json`: both as one object); a failed component exits non-zero."""
    from wasmhost.system import protocol

    response = _ask(args, protocol.Status(target))  # its row alone, its last error whole
    if response is None:
        return EXIT_FAILED
    row = next(iter(response.data["components"]), None)
    if row is None:
        everything = _ask(args, protocol.Status())
        listed = sorted(r["id"] for r in everything.data["components"]) if everything is not None else []
        print(f"wasmhost: the daemon runs no component {target} (it runs: {', '.join(listed) or 'none'})",
              file=sys.stderr)
        return EXIT_FAILED
    forensics = _ask(args, protocol.Forensics(target))
    report = forensics.data if forensics is not None else None
    if args.json:
        print(json.dumps({"status": row, "forensics": report}, indent=2))
    else:
        for field in ("id", "state", "health", "restarts", "mailbox", "handled", "failed"):
            value = row.get(field)
            print(f"{field:<11} {'-' if value is None else value}")  # no health unless running, as in `status`
        # The whole error, a backtrace over several lines: each continuation line indented, so that
        # none of the guest's text can pass for a field of ours.
        last_error = printable(row.get("last_error") or "-", newlines=True)
        print(f"last error  {last_error}".replace("\n", "\n" + " " * 12))
        if report is not None:
            print("\n".join(printable(line) for line in _forensics_lines(report)))
    if row.get("state") == "failed":
        print(f"wasmhost: {target} has failed and stays down after {row.get('restarts')} restart(s); "
              "fix it, then `wasmhost start` or `wasmhost reload`", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if report is not None else EXIT_FAILED


def _forensics_lines(report: dict[str, Any]) -> list[str]:
    """The `inspect ID` text of a forensics report: each kept failure (newest first) with its whole
    text and the messages it was handling, then the messages handled last."""
    failures = report["failures"]
    lines = [f"failures    {report['total']}" + (f" (the last {len(failures)} kept, newest first)" if failures else "")]
    for failure in failures:
        where = f" in {failure['call']}" if failure.get("call") else ""
        lines += ["", f"failure #{failure['number']}  {failure['at']}  {failure['kind']}{where}  "
                      f"(instance {failure['instance']})", f"  {failure['summary']}"]
        rest = failure["detail"].removeprefix(failure["summary"]).strip("\n")
        if rest.strip():
            lines.append("  backtrace:")
            lines += [f"    {line}".rstrip() for line in rest.splitlines()]
        if failure.get("message"):
            lines.append(f"  message   {_message_line(failure['message'])}")
        for index, message in enumerate(reversed(failure["before"])):
            lines.append(f"  {'before' if index == 0 else '':<9} {_message_line(message)}")
    if report["recent"]:
        lines += ["", "recent messages (oldest first):"]
        lines += [f"  {_message_line(message)}" for message in report["recent"]]
    return lines


def _message_line(message: dict[str, Any]) -> str:
    """One handled message's metadata on a line (a payload prefix, when kept, escaped)."""
    from wasmhost.actors.forensics import escaped

    line = (f"{message['delivery']} from {message['sender']}, {message['size']} bytes, "
            f"correlation {message.get('correlation_id') or '-'}, content-type {message.get('content_type') or '-'}, "
            f"sent {message['sent_at']}, {message['outcome']}")
    if message.get("payload_prefix_hex") is not None:
        line += f", payload starts \"{escaped(message['payload_prefix_hex'])}\""
    return line


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from wasmhost.top import SORT_KEYS

    parser = argparse.ArgumentParser(prog="wasmhost", description="Host WebAssembly components as actors.")
    parser.add_argument("--version", action="version", version=f"wasmhost {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Any, help_text: str, config: bool = True, control: bool = False) -> Any:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if config:
            p.add_argument("--config", help="configuration file (default: $WASMHOST_CONFIG, else a source checkout's "
                                            "config/wasmhost.toml, else /etc/wasmhost/wasmhost.toml)")
        if control:
            p.add_argument("--socket", help="control socket (default: the one the configuration names)")
        p.set_defaults(func=func)
        return p

    run = add("run", cmd_run, "run the daemon in the foreground")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                     help="overrides host.log_level (default: the configuration's, else info)")
    run.add_argument("--log-format", choices=["auto", "json", "console"],
                     help="overrides host.log_format; auto is console on a terminal, JSON lines otherwise")
    add("check", cmd_check, "validate the configuration and compile every component").add_argument(
        "config_file", nargs="?", metavar="CONFIG", help="configuration file (same as --config)")
    status = add("status", cmd_status, "show the state of every component", control=True)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--lattice", action="store_true",
                        help="every host of the lattice and where each component runs (the daemon's [lattice])")
    top = add("top", cmd_top, "a refreshing table of the components, sorted by messages/s or any column",
              control=True)
    top.add_argument("--once", action="store_true",
                     help="print one frame of every component and exit (its rates over one --interval)")
    top.add_argument("--sort", default="rate", metavar="COL",
                     choices=SORT_KEYS,
                     help="column to sort by: id, state, health, rate (messages/s), mailbox, p50, p99, restarts, "
                          "failed, memory or error (default: %(default)s)")
    top.add_argument("--reverse", action="store_true", help="turn the column's order around")
    top.add_argument("--interval", type=float, default=1.0, metavar="S",
                     help="seconds between two refreshes (default: %(default)g)")
    payload_help = "the bytes to send; @FILE sends a file's contents, @- stdin, @@TEXT the literal @TEXT"
    send = add("send", cmd_send, "send PAYLOAD (or @FILE) to component ID", control=True)
    send.add_argument("id")
    send.add_argument("payload", help=payload_help)
    send.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                      help="seconds to wait for room in a full mailbox; then nothing is sent (default: %(default)g)")
    call = add("call", cmd_call, "send PAYLOAD (or @FILE) to component ID and write its reply", control=True)
    call.add_argument("id")
    call.add_argument("payload", help=payload_help)
    call.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                      help="seconds for the whole call, mailbox room and reply; a request not yet taken is then "
                           "withdrawn (default: %(default)g)")
    call.add_argument("-o", "--output", metavar="FILE", help="write the reply bytes to FILE instead of stdout")
    call.add_argument("-v", "--verbose", action="store_true",
                      help="on failure, also print the whole error (a trapped guest's wasm backtrace)")
    call.add_argument("--lattice", action="store_true",
                      help="call over NATS (the configuration's [lattice]) whichever host runs ID; no daemon "
                           "needed, and ID must have accept_external = true")
    reload = add("reload", cmd_reload, "re-read the configuration, apply the difference and report what changed",
                 control=True)
    reload.add_argument("--json", action="store_true", help="machine-readable report")
    reload.add_argument("--timeout", type=float, default=600.0, metavar="S",
                        help="seconds to wait for the report (a reload waits for its rollout check windows; "
                             "default: %(default)g)")
    for name in ("stop", "start", "restart"):
        simple = add(name, cmd_simple, f"{name} component ID and wait for it to be done", control=True)
        simple.add_argument("id")
        simple.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                            help="seconds to wait for the daemon to be done (a stop drains for up to "
                                 "drain_timeout_s); it goes on after (default: %(default)g)")
    logs = add("logs", cmd_logs, "filter and print the daemon's logs (JSON lines or console format)", config=False)
    logs.add_argument("file", nargs="?", help="log file, or - for stdin (default)")
    logs.add_argument("--component", help="component id glob, e.g. 'demo/*'")
    logs.add_argument("--level", choices=["debug", "info", "warning", "error"], help="minimum level")
    logs.add_argument("--since", help="ISO-8601 time")
    logs.add_argument("--until", help="ISO-8601 time")
    logs.add_argument("--correlation", help="correlation id")
    logs.add_argument("--grep", help="text anywhere in the event")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="keep reading a growing file, also after log rotation")
    logs.add_argument("--json", action="store_true", help="print the matching JSON lines unchanged")
    inspect = add("inspect", cmd_inspect, "show a component file's metadata, or a running component's state",
                  control=True)
    inspect.add_argument("target", metavar="PATH|ID",
                         help="a component file (.wasm), or the id of a component of the running daemon")
    inspect.add_argument("--id", default="local/inspect/0", help="component id to load a file under")
    inspect.add_argument("--json", action="store_true",
                         help="a running component's status row and forensics (failures, recent messages) as JSON")
    inspect.add_argument("--outbound-http", action="store_true",
                         help="link wasi:http, as `outbound_http = true` does (the component may make HTTP requests)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `wasmhost` console script."""
    args = build_parser().parse_args(argv)
    from wasmhost.system.client import DaemonUnavailable

    if args.func is not cmd_run:  # stdout is the command's answer: only warnings are logged, to stderr
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a reader that went away shows here, not at the interpreter's exit
        return code
    except BrokenPipeError:
        return _reader_gone()
    except DaemonUnavailable as exc:
        print(f"wasmhost: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
    except CliError as exc:
        print(f"wasmhost: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (LoadError, ValueError, OSError) as exc:
        print(f"wasmhost: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


def _reader_gone() -> int:
    """stdout's reader stopped reading (`wasmhost status | head`): end quietly, as it asked for no more.
    stdout is pointed at /dev/null so that the interpreter's last flush does not complain either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
