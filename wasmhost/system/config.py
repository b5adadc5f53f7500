"""The daemon's TOML configuration: schema (msgspec Structs), and validation that reports every
mistake at once with its place and what was expected."""

from __future__ import annotations

import functools
import grp
import os
import pwd
import tomllib
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import msgspec

from wasmhost.actors.forensics import MAX_PAYLOAD_PREFIX
from wasmhost.actors.restart import Backoff, Intensity, RestartPolicy, Strategy
from wasmhost.actors.spec import ActorSpec
from wasmhost.core.errors import LoadError
from wasmhost.core.ids import HOST_ID, ComponentId, InvalidComponentId
from wasmhost.core.limits import DEFAULT_MAX_OUTSTANDING_REQUESTS, ResourceLimits
from wasmhost.core.message_size import DEFAULT_MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES_CEILING, WASMTIME_LIST_U8_CEILING
from wasmhost.core.private_files import NotRegularFile, read_regular_file, regular_file
from wasmhost.core.rate_limit import DEFAULT_LOG_BURST, DEFAULT_LOG_RATE, RateLimit
from wasmhost.lattice.settings import LatticeSection, LatticeSettings, lattice_settings
from wasmhost.runtime.engine import EngineSettings
from wasmhost.runtime.loader import MAX_COMPONENT_BYTES, check_header
from wasmhost.security.capabilities import Capabilities as Grants
from wasmhost.storage.read_cache import DEFAULT_MAX_BYTES as DEFAULT_CACHE_BYTES
from wasmhost.system.listen import ListenAddress, parse_listen

Positive = Annotated[int, msgspec.Meta(gt=0, le=2**63 - 1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
MAX_SECONDS = 86400.0
"""The longest timeout or interval accepted: longer is a mistake, and `inf` would make a stop wait forever or
overflow a deadline when the daemon is already running."""
Seconds = Annotated[float, msgspec.Meta(gt=0, le=MAX_SECONDS)]
CheckSeconds = Annotated[float, msgspec.Meta(ge=0, le=MAX_SECONDS)]
Milliseconds = Annotated[int, msgspec.Meta(gt=0, le=int(MAX_SECONDS * 1000))]
"""A delay in milliseconds, at most MAX_SECONDS: a restart backoff of 2^63 ms left a component `restarting`
for good, its status saying nothing of why."""
DEFAULT_ROLLOUT_CHECK_S = 3.0
"""Seconds a new version handed over by a reload must stay up and healthy, or the old one comes back."""
MAX_SOCKET_PATH = 107
"""Bytes in a Unix socket path (sun_path is 108 with its NUL on Linux)."""
MAX_WORKER_THREADS = 4096
"""The most `worker_threads`: each is started with the daemon, so 1,000,000 (a typo) tried to start as many
threads and ended in a traceback ('can't start new thread'), taking the machine's thread budget meanwhile."""
MAX_CONFIG_BYTES = 8 * 1024 * 1024
"""The largest configuration file read: some 50,000 [[components]] entries. Parsing and checking takes about
1.1 s and 55 MB per MiB (measured), so a 100 MB file (a log or a dump written to the wrong path) took
110 s and 5 GB, and outlasted a reload's read timeout on a thread nothing stops."""
MAX_CONFIG_DATA_BYTES = 1024 * 1024
"""The largest `config_data` or `config_file` handed to a component's `initialize`: it is lowered anew
for each instance at 32 bytes of C values per byte (a 10 MB config_file peaked the daemon at 1.3 GB)."""


class Limits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`limits` tables: memory cap, per-call deadline, per-call fuel."""

    max_memory_bytes: Positive | None = None
    max_execution_time_ms: Milliseconds | None = None
    """A call's deadline is a timeout like the others (MAX_SECONDS): one past about 292 years (2^63 - 1, meant as
    "none") made the worker pool's deadline thread die on its wait (OverflowError), after which no component's
    calls were timed out."""
    max_fuel: Positive | None = None


class Capabilities(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What a component may do beyond computing: targets per messaging action, storage."""

    send: list[str] = msgspec.field(default_factory=list)
    request: list[str] = msgspec.field(default_factory=list)
    broadcast: list[str] = msgspec.field(default_factory=list)
    storage: bool = False
    storage_quota_bytes: Positive | None = None


class ComponentSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One `[[components]]` table."""

    id: str
    path: str | None = None
    limits: Limits = msgspec.field(default_factory=Limits)
    env: dict[str, str] = msgspec.field(default_factory=dict)
    config_data: str | None = None
    config_file: str | None = None
    mailbox_capacity: Positive | None = None
    restart: Literal["permanent", "transient", "temporary"] = "transient"
    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 5
    restart_window_s: Seconds = 60.0
    backoff_base_ms: Milliseconds = 50
    backoff_max_ms: Milliseconds = 5000
    group: str | None = None
    strategy: Literal["one-for-one", "one-for-all", "rest-for-one"] = "one-for-one"
    health_interval_s: Seconds = 30.0
    shutdown_timeout_s: Seconds = 5.0
    capabilities: Capabilities = msgspec.field(default_factory=Capabilities)
    wasi: bool = False
    outbound_http: bool = False
    log_rate: PositiveFloat | None = None
    log_burst: Positive | None = None
    max_message_bytes: Positive | None = None
    max_outstanding_requests: Positive | None = None
    rollout_check_s: CheckSeconds | None = None
    accept_external: bool = False  # lattice: plain NATS clients may message it


class HostSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The `[host]` table."""

    components_dir: str = "components"
    state_dir: str = "state"
    control_socket: str = "wasmhost.sock"
    socket_mode: str = "0600"
    socket_group: str | None = None
    control_users: list[str] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    log_file: str | None = None
    epoch_tick_ms: Annotated[int, msgspec.Meta(gt=0, le=1000)] = 10  # deadlines are counted in ticks
    worker_threads: Annotated[int, msgspec.Meta(gt=0, le=MAX_WORKER_THREADS)] | None = None  # all started at once
    default_mailbox_capacity: Positive = 1024
    drain_timeout_s: Annotated[float, msgspec.Meta(ge=0, le=MAX_SECONDS)] = 5.0
    default_storage_quota_bytes: Positive = 16 * 1024 * 1024
    storage_cache_bytes: Annotated[int, msgspec.Meta(ge=0)] = DEFAULT_CACHE_BYTES  # committed values of hot keys
    default_limits: Limits = msgspec.field(default_factory=Limits)
    default_log_rate: PositiveFloat = DEFAULT_LOG_RATE
    default_log_burst: Positive = DEFAULT_LOG_BURST
    max_message_bytes: Positive = DEFAULT_MAX_MESSAGE_BYTES
    max_outstanding_requests: Positive = DEFAULT_MAX_OUTSTANDING_REQUESTS
    rollout_check_s: CheckSeconds = DEFAULT_ROLLOUT_CHECK_S
    metrics: str = "off"  # or "ADDRESS:PORT": the Prometheus endpoint (see system/metrics.py)
    metrics_by: Literal["component", "namespace"] = "component"
    forensics_payload_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_PAYLOAD_PREFIX)] = 0
    memory_accounting: bool = False  # per-component linear-memory figures, at the cost of copy-on-write images


class ConfigFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The whole file."""

    host: HostSection = msgspec.field(default_factory=HostSection)
    components: list[ComponentSection] = msgspec.field(default_factory=list)
    lattice: LatticeSection | None = None


class ConfigError(Exception):
    """A configuration that cannot be used; `errors` lists every problem with its place."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s):\n" + "\n".join(f"  {e}" for e in errors))


@dataclass(frozen=True)
class ComponentPlan:
    """A validated component: its actor spec, where its binary is, and its capabilities."""

    spec: ActorSpec
    wasm_path: Path
    capabilities: Capabilities
    storage_quota_bytes: int
    grants: Grants
    """The capabilities parsed for the checker (every pattern was validated with the config)."""
    outbound_http: bool = False
    """Whether the component may import wasi:http: outbound HTTP(S) to any host, all or nothing."""
    rollout_check_s: float = DEFAULT_ROLLOUT_CHECK_S
    """Seconds a new version of it must stay up and healthy after a reload, or the previous one comes back."""
    accept_external: bool = False
    """Whether plain NATS clients (no wasmhost host behind them) may message it through the lattice."""


@dataclass(frozen=True)
class Config:
    """A validated configuration with every path resolved."""

    source: Path
    host: HostSection
    components_dir: Path
    state_dir: Path
    control_socket: Path
    socket_mode: int
    socket_gid: int | None
    control_uids: frozenset[int] | None  # None: anyone who can open the socket
    components: list[ComponentPlan]
    warnings: list[str] = field(default_factory=list)
    metrics: ListenAddress | None = None
    """Where the Prometheus endpoint listens ([host] metrics), None when off."""
    lattice: LatticeSettings | None = None
    """The `[lattice]` section; None: a single host, no NATS."""
    remote_grants: tuple[tuple[ComponentId, Grants], ...] = ()
    """What components of other hosts may do to this host's components (`[[lattice.grants]]`)."""

    @functools.cached_property
    def plans_by_id(self) -> dict[ComponentId, ComponentPlan]:
        """Each component's plan by its id (worked out once per configuration)."""
        return {plan.spec.component_id: plan for plan in self.components}

    @property
    def engine_settings(self) -> EngineSettings:
        """The engine `run` and `check` build (the same, so `check` fills the cache `run` reads)."""
        return EngineSettings(epoch_tick_ms=self.host.epoch_tick_ms, memory_accounting=self.host.memory_accounting)

    @property
    def cache_dir(self) -> Path:
        """Where compiled components are cached."""
        return self.state_dir / "cache"

    @property
    def storage_path(self) -> Path:
        """The SQLite file holding component storage."""
        return self.state_dir / "storage.sqlite3"


# --- validation of shapes: every field on its own, so that all mistakes are reported ---

def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


_WORDS: dict[Any, tuple[str, str]] = {
    int: ("an integer", "integers"), str: ("a string", "strings"), bool: ("true or false", "booleans"),
    float: ("a number", "numbers"),
}


def _expected(tp: Any, value: Any) -> str:
    """What a field of type `tp` accepts, in words."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, meta = get_args(tp)[:2]
        text = _expected(base, value)
        if meta.gt is not None:
            text += f" > {meta.gt}"
        if meta.ge is not None:
            text += f" >= {meta.ge}"
        if meta.le is not None and isinstance(value, int | float) and not isinstance(value, bool) \
                and value > meta.le:
            text += f" and <= {meta.le}"
        return text
    if origin in (Union, UnionType):
        return " or ".join(_expected(arg, value) for arg in get_args(tp) if arg is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(f'"{arg}"' for arg in get_args(tp))
    if origin is list:
        return f"an array of {_WORDS.get(get_args(tp)[0], ('', 'values'))[1]}"
    if origin is dict:
        return f"a table of {_WORDS.get(get_args(tp)[1], ('', 'values'))[1]}"
    return str(_WORDS.get(tp, (getattr(tp, "__name__", str(tp)), ""))[0])


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


@functools.cache
def _fields(cls: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    """The fields of `cls` by their key in the file, read once per class: msgspec evaluates the type
    annotations on every call (1.5 ms per [[components]] entry, 15 s of a 10,000-component start)."""
    return {f.encode_name: f for f in msgspec.structs.fields(cls)}


def _check(value: Any, cls: type[msgspec.Struct], path: str, errors: list[str], keep_valid: bool = False) -> Any:
    """Convert `value` to `cls`, collecting one error per bad field (None when any was bad, unless `keep_valid`:
    then the fields that were good are kept and the bad ones take their defaults)."""
    try:
        # A table without mistakes converts in one go, in C (a [[components]] entry: 5 us instead of 15 - 23 us
        # field by field); any mistake is looked for field by field below, to report every one.
        return msgspec.convert(value, type=cls)
    except msgspec.ValidationError:
        pass
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a table, got {_describe(value)}")
        return None
    fields = _fields(cls)
    before = len(errors)
    for key in value:
        if key not in fields:
            errors.append(f"{path}.{key}: unknown key (expected one of {', '.join(fields)})")
    converted: dict[str, Any] = {}
    for name, info in fields.items():
        where = f"{path}.{name}" if path else name
        if name not in value:
            if info.required:
                errors.append(f"{where}: missing (required)")
            continue
        raw = value[name]
        if _is_struct(info.type):
            converted[name] = _check(raw, info.type, where, errors)
        elif get_origin(info.type) is list and _is_struct(get_args(info.type)[0]):
            if not isinstance(raw, list):
                errors.append(f"{where}: expected an array of tables, got {_describe(raw)}")
                continue
            converted[name] = [_check(item, get_args(info.type)[0], f"{where}[{i}]", errors)
                               for i, item in enumerate(raw)]
        else:
            try:
                converted[name] = msgspec.convert(raw, type=info.type)
            except msgspec.ValidationError:
                errors.append(f"{where}: expected {_expected(info.type, raw)}, got {_describe(raw)}")
    if len(errors) > before:
        if not keep_valid:
            return None
        converted = {k: v for k, v in converted.items() if v is not None}
    return cls(**{fields[k].name: v for k, v in converted.items()})


# --- validation of meaning ---


def _inside(base: Path, candidate: Path) -> bool:
    try:
        return candidate.resolve().is_relative_to(base.resolve())
    except (OSError, ValueError):
        return False


def _limits(section: Limits, defaults: ResourceLimits) -> ResourceLimits:
    return ResourceLimits(
        max_memory_bytes=section.max_memory_bytes or defaults.max_memory_bytes,
        max_execution_time_ms=section.max_execution_time_ms or defaults.max_execution_time_ms,
        max_fuel=section.max_fuel if section.max_fuel is not None else defaults.max_fuel,
    )


def _entry_limits(where: str, section: Limits, defaults: ResourceLimits, errors: list[str]) -> ResourceLimits | None:
    """An entry's limits, or None with the error added at `where`.limits."""
    try:
        return _limits(section, defaults)
    except ValueError as exc:
        errors.append(f"{where}.limits: {exc}")
        return None


def _log_limit(where: str, rate: float, burst: int, errors: list[str]) -> RateLimit | None:
    try:
        return RateLimit(rate, burst)
    except ValueError:
        errors.append(f"{where}: expected a finite number > 0 (lines per second), got {rate!r}")
        return None


def _message_bytes_error(where: str, value: int) -> str | None:
    """Why `value` cannot be a max_message_bytes, or None."""
    if value <= MAX_MESSAGE_BYTES_CEILING:
        return None
    return (f"{where}: expected an integer <= {MAX_MESSAGE_BYTES_CEILING} (2.5 MiB; wasmtime traps a guest "
            f"passing a byte list longer than {WASMTIME_LIST_U8_CEILING}), got {value}")


def _binary_problem(wasm: Path, components_dir: Path) -> str | None:
    """What is wrong with the component file `wasm` as far as the config can tell, or None."""
    if not _inside(components_dir, wasm):
        return f"{wasm} is outside the components directory {components_dir}"
    try:
        # Checked through the descriptor it is read from: a FIFO swapped in after a look at the path
        # would otherwise hang the check on its open.
        with regular_file(wasm) as (fd, st):
            if st.st_size > MAX_COMPONENT_BYTES:
                return f"{wasm} is {st.st_size} bytes, larger than {MAX_COMPONENT_BYTES} (128 MiB), the largest " \
                       "component file loaded"
            check_header(os.read(fd, 8), str(wasm))
    except FileNotFoundError:
        return f"no component file at {wasm}"
    except NotRegularFile as exc:
        return f"{exc}, expected a component file"
    except LoadError as exc:
        return exc.reason
    except OSError as exc:
        return f"cannot read {wasm}: {exc.strerror}"
    return None


_Key = TypeVar("_Key")
_Value = TypeVar("_Value")


def _kept(shared: dict[_Key, _Value], key: _Key, make: Callable[[], _Value | None]) -> _Value | None:
    """`shared[key]`, made by `make` the first time; kept only when made (None: it failed its checks and
    said so), so that every entry with that bad value reports it at its own place (see _Shared)."""
    found = shared.get(key)
    if found is None:
        found = make()
        if found is not None:
            shared[key] = found
    return found


@dataclass
class _Shared:
    """What [[components]] entries have in common, worked out once per configuration read. The entries of a
    large config mostly share a binary and leave limits, log rate, capabilities and restart settings as
    [host] and the defaults set them: building those again for each entry took a third of its checks
    (about 4 of 12 us). Only what passed its checks is kept: a bad value is checked, and reported at its
    place, by every entry that has it."""

    binaries: dict[str, tuple[Path, str | None]] = field(default_factory=dict)
    """Each component file as written: its path, and what `_binary_problem` said."""
    limits: dict[Limits, ResourceLimits] = field(default_factory=dict)
    log_limits: dict[tuple[float, int], RateLimit] = field(default_factory=dict)
    grants: dict[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], bool, int], Grants] = \
        field(default_factory=dict)
    restarts: dict[tuple[str, int, float, int, int, str], tuple[RestartPolicy, Intensity, Backoff, Strategy]] = \
        field(default_factory=dict)


def _plan(index: int, section: ComponentSection, host: HostSection, base: Path, components_dir: Path,
          defaults: ResourceLimits, errors: list[str], shared: _Shared) -> ComponentPlan | None:
    """The plan of one [[components]] entry, or None with its errors added; `shared` holds what the entries
    of the config being read worked out before (see _Shared)."""
    where = f"components[{index}]"
    count = len(errors)
    try:
        cid = ComponentId.parse(section.id)
    except InvalidComponentId as exc:
        errors.append(f"{where}.id: {exc}")
        return None
    if cid == HOST_ID:
        # Every capability check lets the host's id through, here and on other hosts of a lattice: a guest
        # running under it could message any component, which would take it for the operator.
        errors.append(f"{where}.id: {section.id!r} is the host's own id (the sender of what the control socket "
                      "sends, allowed to message every component); choose another")
        return None
    if section.path is not None:
        if "\x00" in section.path:
            errors.append(f"{where}.path: contains a NUL byte")
            return None
        written, place = section.path, f"{where}.path"
    else:
        written, place = f"{cid.namespace}/{cid.name}/{cid.instance}.wasm", f"{where}.id"
    known = shared.binaries.get(written)
    if known is None:  # components sharing a binary: its path made, resolved and its header read once
        wasm = Path(written) if os.path.isabs(written) else components_dir / written
        known = shared.binaries[written] = (wasm, _binary_problem(wasm, components_dir))
    wasm, problem = known
    if problem is not None:
        errors.append(f"{place}: {problem}")
    config_data: bytes | None = None
    if section.config_data is not None and section.config_file is not None:
        errors.append(f"{where}: give config_data or config_file, not both")
    elif section.config_data is not None:
        config_data = section.config_data.encode()
        if len(config_data) > MAX_CONFIG_DATA_BYTES:
            errors.append(f"{where}.config_data: {len(config_data)} bytes; at most {MAX_CONFIG_DATA_BYTES} (1 MiB) "
                          "are handed to initialize")
    elif section.config_file is not None:
        config_data = _config_file(f"{where}.config_file", section.config_file, base, errors)
    if section.max_message_bytes is not None:
        problem = _message_bytes_error(f"{where}.max_message_bytes", section.max_message_bytes)
        if problem is not None:
            errors.append(problem)
    if section.backoff_max_ms < section.backoff_base_ms:
        errors.append(f"{where}.backoff_max_ms: must be >= backoff_base_ms ({section.backoff_base_ms})")
    limits = _kept(shared.limits, section.limits, lambda: _entry_limits(where, section.limits, defaults, errors))
    rate = section.log_rate or host.default_log_rate, section.log_burst or host.default_log_burst
    log_limit = _kept(shared.log_limits, rate, lambda: _log_limit(f"{where}.log_rate", *rate, errors))
    caps = section.capabilities
    quota = caps.storage_quota_bytes or host.default_storage_quota_bytes
    granted = (tuple(caps.send), tuple(caps.request), tuple(caps.broadcast), caps.storage, quota)
    grants = _kept(shared.grants, granted, lambda: _grants(f"{where}.capabilities", caps, quota, errors))
    if len(errors) > count or limits is None or log_limit is None or grants is None:
        return None
    restart = (section.restart, section.max_restarts, section.restart_window_s, section.backoff_base_ms,
               section.backoff_max_ms, section.strategy)
    supervision = shared.restarts.get(restart)
    if supervision is None:
        supervision = shared.restarts[restart] = (
            RestartPolicy(section.restart), Intensity(section.max_restarts, section.restart_window_s),
            Backoff(section.backoff_base_ms / 1000, section.backoff_max_ms / 1000), Strategy(section.strategy))
    policy, intensity, backoff, strategy = supervision
    spec = ActorSpec(
        component_id=cid,
        path=wasm,
        limits=limits,
        env_vars=tuple(sorted(section.env.items())),
        config_data=config_data,
        mailbox_capacity=section.mailbox_capacity or host.default_mailbox_capacity,
        restart=policy,
        intensity=intensity,
        backoff=backoff,
        group=section.group,
        strategy=strategy,
        health_interval=section.health_interval_s,
        shutdown_timeout=section.shutdown_timeout_s,
        storage=section.capabilities.storage,
        wasi=section.wasi,
        log_limit=log_limit,
        max_message_bytes=section.max_message_bytes or host.max_message_bytes,
        max_outstanding_requests=section.max_outstanding_requests or host.max_outstanding_requests,
        forensics_payload_bytes=host.forensics_payload_bytes,
    )
    check = host.rollout_check_s if section.rollout_check_s is None else section.rollout_check_s
    return ComponentPlan(spec, wasm, section.capabilities, quota, grants, section.outbound_http, check,
                         section.accept_external)


def _config_file(where: str, name: str, base: Path, errors: list[str]) -> bytes | None:
    """The bytes of a component's config_file, which must be a regular file inside the config's directory tree
    (a config that can be edited by a deployer must not hand a guest any file the daemon can read)."""
    if "\x00" in name:
        errors.append(f"{where}: contains a NUL byte")
        return None
    file = base / name
    if not _inside(base, file):
        errors.append(f"{where}: {file} is outside the configuration's directory {base}")
        return None
    try:
        data = read_regular_file(file, MAX_CONFIG_DATA_BYTES)
        if len(data) <= MAX_CONFIG_DATA_BYTES:
            return data
        errors.append(f"{where}: {file} is larger than {MAX_CONFIG_DATA_BYTES} bytes (1 MiB), the most handed "
                      "to initialize")
    except NotRegularFile:
        errors.append(f"{where}: no regular file at {file}")
    except OSError as exc:
        errors.append(f"{where}: cannot read {file}: {exc.strerror or exc}")
    return None


def _grants(where: str, caps: Capabilities, quota: int, errors: list[str]) -> Grants | None:
    """Parse every target pattern, reporting each bad one at its place (`quota`: the storage quota in force)."""
    grants, bad = Grants.parse(caps.send, caps.request, caps.broadcast, caps.storage, quota)
    errors.extend(f"{where}.{error}" for error in bad)
    return None if bad else grants


def _pattern_warnings(plans: list[ComponentPlan], in_lattice: bool) -> list[str]:
    """Capabilities that name components this config does not deploy (warnings, not errors); a host of a
    lattice may mean components other hosts run, so the warning says so rather than calling it a mistake."""
    # A pattern matches an id when its fixed parts begin the id: every beginning of every id, gathered once,
    # answers each pattern in one look-up (trying each pattern on every id took 9 s for 10,000 entries that
    # each name another component, and grew with the square of the entries).
    granted = [(index, (("send", g.send), ("request", g.request), ("broadcast", g.broadcast)))
               for index, plan in enumerate(plans) for g in (plan.grants,) if g.send or g.request or g.broadcast]
    if not granted:
        return []
    beginnings: set[tuple[str, ...]] = set()
    for plan in plans:
        cid = plan.spec.component_id
        whole = (cid.namespace, cid.name, cid.instance)
        beginnings.update(whole[:length] for length in range(4))
    where = " (fine if another host of the lattice runs it)" if in_lattice else ""
    warnings = []
    for index, actions in granted:
        for action, patterns in actions:
            for i, pattern in enumerate(patterns):
                if pattern.parts not in beginnings:
                    warnings.append(f"components[{index}].capabilities.{action}[{i}]: {pattern.text!r} matches no "
                                    f"component in this configuration{where}")
    return warnings


def parse_config(text: str, source: Path) -> Config:
    """Validate a configuration text; raises ConfigError listing every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(source), [f"not valid TOML: {exc}"]) from None
    errors: list[str] = []
    for key in raw:
        if key not in ("host", "components", "lattice"):
            errors.append(f"{key}: unknown key (expected host, components or lattice)")
    # A bad [host] value takes its default; the good ones (components_dir above all) still apply, so that
    # the errors reported about components are the true ones.
    host = _check(raw.get("host", {}), HostSection, "host", errors, keep_valid=True) or HostSection()
    for key in ("components_dir", "state_dir", "control_socket", "log_file"):
        if "\x00" in (getattr(host, key) or ""):
            errors.append(f"host.{key}: contains a NUL byte")
            host = msgspec.structs.replace(host, **{key: getattr(HostSection(), key)})
    sections = raw.get("components", [])
    if not isinstance(sections, list):
        errors.append(f"components: expected an array of tables ([[components]]), got {_describe(sections)}")
        sections = []
    checked = [_check(item, ComponentSection, f"components[{i}]", errors) for i, item in enumerate(sections)]
    base = source.parent
    components_dir = (base / host.components_dir).resolve()
    state_dir = (base / host.state_dir).resolve()
    for key, place in (("components_dir", components_dir), ("state_dir", state_dir)):
        if place.exists() and not place.is_dir():  # state_dir is created when missing, never over a file
            errors.append(f"host.{key}: {place} is not a directory")
    if host.log_file and (base / host.log_file).is_dir():  # `run` could not open it; `check` said ok
        errors.append(f"host.log_file: {base / host.log_file} is a directory, expected a file to append to")
    control_socket = state_dir / host.control_socket if not os.path.isabs(host.control_socket) \
        else Path(host.control_socket)
    if len(os.fsencode(control_socket)) > MAX_SOCKET_PATH:
        errors.append(f"host.control_socket: {control_socket} is {len(os.fsencode(control_socket))} bytes long; "
                      f"a Unix socket path holds at most {MAX_SOCKET_PATH} (shorten state_dir or control_socket)")
    try:
        socket_mode = int(host.socket_mode, 8)
        if socket_mode & ~0o770 or not socket_mode & 0o600 == 0o600:
            raise ValueError
    except ValueError:
        errors.append(f"host.socket_mode: expected an octal mode like \"0600\" or \"0660\" "
                      f"(owner read-write, no access for others), got \"{host.socket_mode}\"")
        socket_mode = 0o600
    control_uids: frozenset[int] | None = None
    if host.control_users is not None:
        uids = set()
        for index, user in enumerate(host.control_users):
            try:
                uids.add(int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid)
            except (KeyError, ValueError):  # ValueError: a NUL in the name
                errors.append(f"host.control_users[{index}]: no user named \"{user}\" on this system")
        control_uids = frozenset(uids)
    socket_gid: int | None = None
    if host.socket_group is not None:
        try:
            socket_gid = grp.getgrnam(host.socket_group).gr_gid
        except (KeyError, ValueError):
            errors.append(f"host.socket_group: no group named \"{host.socket_group}\" on this system")
    if _log_limit("host.default_log_rate", host.default_log_rate, host.default_log_burst, errors) is None:
        host = msgspec.structs.replace(host, default_log_rate=DEFAULT_LOG_RATE)
    metrics: ListenAddress | None = None
    try:
        metrics = parse_listen("host.metrics", host.metrics)
    except ValueError as exc:
        errors.append(str(exc))
    problem = _message_bytes_error("host.max_message_bytes", host.max_message_bytes)
    if problem is not None:
        errors.append(problem)
    try:
        defaults = _limits(host.default_limits, ResourceLimits())
    except ValueError as exc:
        errors.append(f"host.default_limits: {exc}")
        defaults = ResourceLimits()
    plans = []
    seen: dict[str, int] = {}
    lookalikes: dict[str, int] = {}  # by the id's NFC form: the same text to anyone who reads or types it
    folded: dict[str, int] = {}  # by the NFC form case-folded
    warnings: list[str] = []
    shared = _Shared()
    for index, (raw_section, section) in enumerate(zip(sections, checked, strict=True)):
        cid = raw_section.get("id") if isinstance(raw_section, dict) else None
        if isinstance(cid, str):
            if cid in seen:
                errors.append(f"components[{index}].id: duplicate id {cid!r} (also components[{seen[cid]}])")
                continue
            seen[cid] = index
            same = unicodedata.normalize("NFC", cid)
            if same in lookalikes:
                # Two components printed alike in status, logs and metrics; `wasmhost call` reaches the one
                # whose bytes the terminal happens to send.
                errors.append(f"components[{index}].id: {cid!r} is components[{lookalikes[same]}]'s id written in "
                              "another Unicode normalisation form (it prints the same): use one spelling, or "
                              "different ids")
                continue
            lookalikes[same] = index
            # `wasmhost call t/echo/0` misses `t/echo/0 `; an id without any whitespace (split() gives it whole:
            # the common case) is not looked at part by part
            if cid.split(maxsplit=1) != [cid] and any(part != part.strip() for part in cid.split("/")):
                warnings.append(f"components[{index}].id: {cid!r} has a part starting or ending with whitespace")
            other = folded.setdefault(same.casefold(), index)
            if other != index:
                warnings.append(f"components[{index}].id: {cid!r} differs from components[{other}]'s id only in "
                                "case: they are two components")
        if section is None:
            continue
        plan = _plan(index, section, host, base, components_dir, defaults, errors, shared)
        if plan is not None:
            plans.append(plan)
    lattice, remote_grants = _lattice(raw, base, errors)
    if errors:
        raise ConfigError(str(source), errors)
    return Config(source, host, components_dir, state_dir, control_socket, socket_mode, socket_gid, control_uids,
                  plans, warnings + _pattern_warnings(plans, lattice is not None), metrics, lattice, remote_grants)


def _lattice(raw: dict[str, Any], base: Path, errors: list[str]
             ) -> tuple[LatticeSettings | None, tuple[tuple[ComponentId, Grants], ...]]:
    """The `[lattice]` settings (None when absent) and its remote grants, parsed as capabilities."""
    if "lattice" not in raw:
        return None, ()
    section = _check(raw["lattice"], LatticeSection, "lattice", errors, keep_valid=True)
    if section is None:
        return None, ()
    settings = lattice_settings(section, base, errors)
    grants = []
    for index, grant in enumerate(section.grants):
        where = f"lattice.grants[{index}]"
        try:
            cid = ComponentId.parse(grant.id)
        except InvalidComponentId as exc:
            errors.append(f"{where}.id: {exc}")
            continue
        parsed, bad = Grants.parse(grant.send, grant.request, grant.broadcast, False, None)
        errors.extend(f"{where}.{error}" for error in bad)
        grants.append((cid, parsed))
    return settings, tuple(grants)


class ConfigTooLarge(ValueError):
    """A configuration file larger than MAX_CONFIG_BYTES."""


def read_config_bytes(path: Path) -> bytes:
    """The bytes of the configuration file at `path`, as `run`, `check`, `reload` and the CLI's look for the
    control socket read it: a regular file (NotRegularFile, an OSError, otherwise: a FIFO is refused, not
    waited on) of at most MAX_CONFIG_BYTES (ConfigTooLarge otherwise), never read further than that."""
    data = read_regular_file(path, MAX_CONFIG_BYTES)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigTooLarge(f"larger than {MAX_CONFIG_BYTES} bytes (8 MiB): not a wasmhost configuration (large "
                             "component data belongs in a config_file)")
    return data


def load_config(path: Path) -> Config:
    """Read and validate the configuration file at `path` (read_config_bytes)."""
    try:
        data = read_config_bytes(path)
        text = data.decode()
    except ConfigTooLarge as exc:
        raise ConfigError(str(path), [str(exc)]) from None
    except NotRegularFile:
        raise ConfigError(str(path), ["cannot read: not a regular file"]) from None
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(str(path), [f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}, column "
                                      f"{column} (save the file as UTF-8)"]) from None
    if text.startswith("\ufeff"):  # tomllib's own error points at line 1, column 1, which looks fine
        raise ConfigError(str(path), ["starts with a byte order mark (U+FEFF), which TOML does not allow: save the "
                                      "file as UTF-8 without one"])
    return parse_config(text, path)
