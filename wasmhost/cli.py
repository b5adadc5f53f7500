"""The `wasmhost` command line: run the daemon, check a config, control a running daemon, read logs."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from wasmhost import __version__
from wasmhost.core.errors import LoadError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EMBEDDED_CONFIG = Path(__file__).resolve().parent.parent / "config" / "wasmhost.toml"


def config_path(args: argparse.Namespace) -> Path:
    """CONFIG or --config, else $WASMHOST_CONFIG, else the embedded default configuration."""
    given = getattr(args, "config_file", None) or getattr(args, "config", None) or os.environ.get("WASMHOST_CONFIG")
    return Path(given) if given else EMBEDDED_CONFIG


def socket_path(args: argparse.Namespace) -> Path:
    """--socket, else the control socket named by the configuration (read without validating it)."""
    if getattr(args, "socket", None):
        return Path(args.socket)
    source = config_path(args)
    try:
        host = tomllib.loads(source.read_text()).get("host", {})
    except (OSError, tomllib.TOMLDecodeError):
        host = {}
    state_dir = source.parent / str(host.get("state_dir", "state"))
    return state_dir / str(host.get("control_socket", "wasmhost.sock"))


def _payload(text: str) -> bytes:
    """PAYLOAD, or the contents of FILE for @FILE ('@-' for stdin), refused before sending when no
    component could take it (above the largest `max_message_bytes`; the daemon checks the target's own)."""
    from wasmhost.core.message_size import MAX_MESSAGE_BYTES_CEILING

    if text == "@-":
        payload, where = sys.stdin.buffer.read(MAX_MESSAGE_BYTES_CEILING + 1), "stdin"
        size = len(payload) if len(payload) <= MAX_MESSAGE_BYTES_CEILING else None
    elif text.startswith("@"):
        path = Path(text[1:])
        where, size, payload = text[1:], path.stat().st_size, b""
        if size <= MAX_MESSAGE_BYTES_CEILING:
            payload = path.read_bytes()
            size = len(payload)
    else:
        payload, where = text.encode(), "PAYLOAD"
        size = len(payload)
    if size is None or size > MAX_MESSAGE_BYTES_CEILING:
        amount = f"{size} bytes" if size is not None else f"more than {MAX_MESSAGE_BYTES_CEILING} bytes"
        raise ValueError(f"{where}: {amount} is too large to send: no component takes more than "
                         f"{MAX_MESSAGE_BYTES_CEILING} bytes (the largest max_message_bytes)")
    return payload


# --- daemon and config ---


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground."""
    import uvloop

    from wasmhost.runtime.guest_log import flush_suppressed
    from wasmhost.system.daemon import run_daemon
    from wasmhost.system.detached import busy
    from wasmhost.system.logging import configure_logging, shutdown_logging

    source = config_path(args)
    level, fmt, log_file = _log_settings(source)
    configure_logging(args.log_level or level, args.log_format or fmt, log_file)
    code = 1
    try:
        code = uvloop.run(run_daemon(source))
        return code
    finally:
        flush_suppressed()  # the last `suppressed=N` counts of guests that flooded their logs
        shutdown_logging()  # bounded: a destination nobody reads does not hold the exit
        if busy():  # a compile the stop abandoned: do not finalize the interpreter under it
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _log_settings(source: Path) -> tuple[str, str, str | None]:
    try:
        host = tomllib.loads(source.read_text()).get("host", {})
    except (OSError, tomllib.TOMLDecodeError):
        host = {}
    log_file = host.get("log_file")
    if isinstance(log_file, str) and log_file and not os.path.isabs(log_file):
        log_file = str(source.parent / log_file)
    return str(host.get("log_level", "info")), str(host.get("log_format", "auto")), log_file or None


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the configuration and compile every component, without starting anything."""
    from wasmhost.runtime.engine import EngineSettings
    from wasmhost.runtime.runtime import Runtime
    from wasmhost.system.config import ConfigError, load_config
    from wasmhost.system.daemon import load_plan, prepare_state_dir

    source = config_path(args)
    try:
        config = load_config(source)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAILED
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    prepare_state_dir(config)  # the cache is created inside it: owner-only, as the daemon makes it
    runtime = Runtime(EngineSettings(epoch_tick_ms=config.host.epoch_tick_ms), config.cache_dir,
                      config.components_dir)
    failures = []
    try:
        for plan in config.components:
            try:
                load_plan(runtime, plan)  # the load step of run and reload, budget check included
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

    response = request(socket_path(args), message, timeout=getattr(args, "timeout", 30.0) + 5.0)
    if not response.ok:
        print(f"wasmhost: {response.error}", file=sys.stderr)
        return None
    return response


def cmd_status(args: argparse.Namespace) -> int:
    """Show every component: state (and phase while starting), health, restarts, mailbox depth, counters,
    last error."""
    from wasmhost.system import protocol

    response = _ask(args, protocol.Status())
    if response is None:
        return EXIT_FAILED
    rows = response.data["components"]
    if args.json:
        print(json.dumps(response.data, indent=2))
        return EXIT_OK
    columns = ["id", "state", "health", "restarts", "mailbox", "handled", "failed", "last_error"]
    for row in rows:
        if row.get("phase"):  # what a starting component is doing: starting/compiling
            row["state"] = f"{row['state']}/{row['phase']}"
    table = [[str(row.get(c) if row.get(c) is not None else "-") for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in table]) for i, c in enumerate(columns[:-1])]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns[:-1], widths, strict=True)) + "  LAST ERROR")
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1][:120])
    if response.data.get("log_lines_dropped"):
        print(f"logs: {response.data['log_lines_dropped']} line(s) dropped: a log destination could not keep up")
    if response.data.get("storage_io_errors"):
        data = response.data
        print(f"storage: {data['storage_io_errors']} I/O error(s), last: {data['storage_last_error']}")
    return EXIT_OK


def cmd_send(args: argparse.Namespace) -> int:
    """Send PAYLOAD to a component."""
    from wasmhost.system import protocol

    return EXIT_OK if _ask(args, protocol.Send(args.id, _payload(args.payload))) else EXIT_FAILED


def cmd_call(args: argparse.Namespace) -> int:
    """Request-response with a component: prints the reply bytes."""
    from wasmhost.system import protocol

    response = _ask(args, protocol.Call(args.id, _payload(args.payload), args.timeout))
    if response is None:
        return EXIT_FAILED
    if response.data is not None:
        sys.stdout.buffer.write(response.data)
        if sys.stdout.isatty() or not response.data.endswith(b"\n"):
            sys.stdout.buffer.write(b"\n")
    return EXIT_OK


def cmd_simple(args: argparse.Namespace) -> int:
    """reload / stop ID / start ID / restart ID."""
    from wasmhost.system import protocol

    message: Any = protocol.Reload() if args.command == "reload" else {
        "stop": protocol.Stop, "start": protocol.Start, "restart": protocol.Restart}[args.command](args.id)
    response = _ask(args, message)
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
        with open(args.file, encoding="utf-8", errors="replace") as stream:
            lines = logview.follow(stream) if args.follow else stream
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
    """Validate one component binary and print its metadata and imports."""
    from wasmhost.core.ids import ComponentId
    from wasmhost.runtime.runtime import Runtime

    runtime = Runtime()
    try:
        cid = ComponentId.parse(args.id)
        loaded = runtime.load(cid, Path(args.path))
        manager = runtime.store(loaded, cid)
        manager.instantiate()
        meta = manager.metadata()
        manager.close()
    finally:
        runtime.close()
    print(f"component   {loaded.source} ({loaded.size:,} bytes)")
    print(f"name        {meta.name} {meta.version}")
    print(f"description {meta.description}")
    print(f"author      {meta.author}  license {meta.license}")
    print(f"operations  {', '.join(meta.supported_operations) or '-'}  stateful {meta.stateful}")
    print(f"imports     {', '.join(sorted(loaded.imports)) or '-'}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="wasmhost", description="Host WebAssembly components as actors.")
    parser.add_argument("--version", action="version", version=f"wasmhost {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Any, help_text: str, config: bool = True, control: bool = False) -> Any:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if config:
            p.add_argument("--config", help="configuration file (default: $WASMHOST_CONFIG or the embedded one)")
        if control:
            p.add_argument("--socket", help="control socket (default: the one the configuration names)")
        p.set_defaults(func=func)
        return p

    run = add("run", cmd_run, "run the daemon in the foreground")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", choices=["auto", "json", "console"])
    add("check", cmd_check, "validate the configuration and compile every component").add_argument(
        "config_file", nargs="?", metavar="CONFIG", help="configuration file (same as --config)")
    add("status", cmd_status, "show the state of every component", control=True).add_argument(
        "--json", action="store_true", help="machine-readable output")
    for name, func, text in (("send", cmd_send, "send PAYLOAD (or @FILE) to component ID"),
                             ("call", cmd_call, "send PAYLOAD (or @FILE) to component ID and print the reply")):
        p = add(name, func, text, control=True)
        p.add_argument("id")
        p.add_argument("payload")
        if name == "call":
            p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the reply")
    add("reload", cmd_simple, "re-read the configuration and apply the difference", control=True)
    for name in ("stop", "start", "restart"):
        add(name, cmd_simple, f"{name} component ID", control=True).add_argument("id")
    logs = add("logs", cmd_logs, "filter and print the daemon's JSON logs", config=False)
    logs.add_argument("file", nargs="?", help="log file, or - for stdin (default)")
    logs.add_argument("--component", help="component id glob, e.g. 'demo/*'")
    logs.add_argument("--level", choices=["debug", "info", "warning", "error"], help="minimum level")
    logs.add_argument("--since", help="ISO-8601 time")
    logs.add_argument("--until", help="ISO-8601 time")
    logs.add_argument("--correlation", help="correlation id")
    logs.add_argument("--grep", help="text anywhere in the event")
    logs.add_argument("--follow", "-f", action="store_true", help="keep reading a growing file")
    logs.add_argument("--json", action="store_true", help="print the matching JSON lines unchanged")
    inspect = add("inspect", cmd_inspect, "validate a component binary and show its metadata", config=False)
    inspect.add_argument("path")
    inspect.add_argument("--id", default="local/inspect/0", help="component id to load it under")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `wasmhost` console script."""
    args = build_parser().parse_args(argv)
    from wasmhost.system.client import DaemonUnavailable

    try:
        return int(args.func(args))
    except DaemonUnavailable as exc:
        print(f"wasmhost: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (LoadError, ValueError, OSError) as exc:
        print(f"wasmhost: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
