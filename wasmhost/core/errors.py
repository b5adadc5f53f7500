"""Error types: mirrors of the WIT error variants, and the host's own failures."""

from __future__ import annotations

from typing import ClassVar

from wasmhost.core.ids import ComponentId

Payload = str | ComponentId | None


class HostError(Exception):
    """A WIT error variant value: a case name and its payload, readable as text."""

    WIT_NAME: ClassVar[str] = ""
    # case name -> payload kind: None (no payload), "string" or "component-id"
    CASES: ClassVar[dict[str, str | None]] = {}

    def __init__(self, case: str, payload: Payload = None) -> None:
        kind = self.CASES.get(case, "unknown")
        if kind == "unknown":
            raise ValueError(f"{self.WIT_NAME}: unknown case {case!r}, expected one of {sorted(self.CASES)}")
        if (kind is None) != (payload is None):
            raise ValueError(f"{self.WIT_NAME}.{case}: payload {payload!r} does not fit kind {kind}")
        self.case = case
        self.payload = payload
        super().__init__(self.describe())

    def describe(self) -> str:
        """`case: payload`, or just the case when it carries nothing."""
        return self.case if self.payload is None else f"{self.case}: {self.payload}"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and (self.case, self.payload) == (other.case, other.payload)  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.case, self.payload))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.case!r}, {self.payload!r})"


class WasmError(HostError):
    """WIT `wasm-error`: a failure of the runtime or a guest export."""

    WIT_NAME = "wasm-error"
    CASES = {
        "component-not-found": "string",
        "instantiation-failed": "string",
        "export-not-found": "string",
        "timeout": None,
        "resource-limit-exceeded": "string",
        "invalid-component": "string",
        "runtime-error": "string",
    }


class ComponentError(HostError):
    """WIT `component-error`: a failure of a component's lifecycle."""

    WIT_NAME = "component-error"
    CASES = {
        "initialization-failed": "string",
        "already-initialized": None,
        "not-initialized": None,
        "shutdown-failed": "string",
        "invalid-state": "string",
    }


class MessagingError(HostError):
    """WIT `messaging-error`: a failure of host messaging."""

    WIT_NAME = "messaging-error"
    CASES = {
        "delivery-failed": "string",
        "correlation-timeout": "string",
        "invalid-message": "string",
        "queue-full": None,
        "target-not-found": "component-id",
    }


class StorageError(HostError):
    """WIT `storage-error`: a failure of component storage."""

    WIT_NAME = "storage-error"
    CASES = {
        "not-found": "string",
        "already-exists": "string",
        "quota-exceeded": None,
        "invalid-key": "string",
        "io-error": "string",
    }


class SecurityError(HostError):
    """WIT `security-error`: a failed capability or permission check."""

    WIT_NAME = "security-error"
    CASES = {
        "capability-denied": "string",
        "policy-violation": "string",
        "invalid-context": "string",
        "permission-denied": "string",
    }


class ExecutionError(HostError):
    """WIT `execution-error`: a generic execution failure."""

    WIT_NAME = "execution-error"
    CASES = {
        "invalid-operation": "string",
        "operation-failed": "string",
        "unsupported-codec": "string",
        "serialization-error": "string",
    }


class LoadError(Exception):
    """A component could not be loaded; the message names the input and the reason."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class NotWasmError(LoadError):
    """The bytes are not WebAssembly at all."""


class CoreModuleError(LoadError):
    """The bytes are a core WebAssembly module, not a component."""


class CompileError(LoadError):
    """The component failed to validate or compile."""


class MissingExportsError(LoadError):
    """The component lacks the lifecycle interface or some of its functions, or has wrong signatures."""

    def __init__(self, source: str, reason: str, missing: list[str]) -> None:
        self.missing = missing
        super().__init__(source, reason)


class UnsatisfiedImportsError(LoadError):
    """The component imports something the host does not provide."""

    def __init__(self, source: str, reason: str, imports: list[str]) -> None:
        self.imports = imports
        super().__init__(source, reason)


class InstantiationError(LoadError):
    """The component compiled but could not be instantiated (e.g. memory above its cap)."""


class FootprintError(LoadError):
    """The component creates more core instances, memories or tables than a Store allows, or
    creates them in a way the host cannot count."""


class MemoryBudgetError(InstantiationError):
    """max_memory_bytes cannot hold the memories and tables the component creates."""


class GuestFailure(Exception):
    """A call into a guest ended abnormally; the instance's Store is no longer usable."""

    kind: ClassVar[str] = "trap"

    def __init__(self, component: str, function: str, detail: str) -> None:
        self.component = component
        self.function = function
        self.detail = detail
        # The first line says what happened; wasmtime's full text (its backtrace) follows when it has more.
        full = detail.strip()
        super().__init__(self.summary if "\n" not in full else f"{self.summary}\n{full}")

    @property
    def summary(self) -> str:
        """One line: the component, the export and wasmtime's cause (the last line of its text, after the
        guest backtrace), e.g. `a/b/0: handle-message trapped: wasm trap: wasm `unreachable` ...`."""
        lines = [line.strip() for line in self.detail.strip().splitlines() if line.strip()]
        return f"{self.component}: {self.function} {self.kind}: {lines[-1] if lines else 'no detail'}"


class GuestTrap(GuestFailure):
    """The guest trapped (unreachable, memory fault, ...); detail carries the guest backtrace."""

    kind = "trapped"


class GuestTimeout(GuestFailure):
    """The guest ran past its wall-clock deadline and was interrupted."""

    kind = "timed out"


class GuestWaitTimeout(GuestTimeout):
    """The guest was still blocked in a WASI call (a pollable, a blocked write) STOP_GRACE past its deadline:
    nothing can interrupt that wait, so the call was given up on. Its thread and Store stay with the guest
    until the wait ends (see ComponentActor._gave_up); the component goes on with a fresh Store."""


class GuestExit(GuestFailure):
    """The guest ended itself (WASI `exit`) with `status`; status 0 is a normal exit, not a failure."""

    kind = "exited"

    def __init__(self, component: str, function: str, detail: str, status: int) -> None:
        super().__init__(component, function, detail)
        self.status = status

    @property
    def clean(self) -> bool:
        """Whether the exit status was 0."""
        return self.status == 0


class FuelExhausted(GuestFailure):
    """The guest used up its per-call fuel budget."""

    kind = "ran out of fuel"


class InstanceStateError(Exception):
    """A call that the instance's state does not allow (not instantiated, not initialized, dead)."""


class CallInProgress(InstanceStateError):
    """A call while another call on the instance is suspended between its slices (a message being handled)."""
