"""Component identity: `namespace/name/instance`."""

from __future__ import annotations

import msgspec


class InvalidComponentId(ValueError):
    """A string or part that is not a valid component id."""


MAX_PART_CHARS = 255
"""Characters in each part at most: ids are kept, logged and sent around, and guests name them."""


def _shown(whole: str) -> str:
    """`whole` quoted for an error message, shortened when long."""
    return repr(whole) if len(whole) <= 80 else f"{whole[:80]!r}... ({len(whole)} characters)"


def _check_part(label: str, value: str, whole: str) -> None:
    if len(value) > MAX_PART_CHARS:
        raise InvalidComponentId(f"component id {_shown(whole)}: {label} is {len(value)} characters, "
                                 f"at most {MAX_PART_CHARS} are allowed")
    if not value:
        raise InvalidComponentId(f"component id {_shown(whole)}: {label} is empty")
    if "/" in value:
        raise InvalidComponentId(f"component id {_shown(whole)}: {label} {value!r} contains '/'")
    if "\x00" in value:
        raise InvalidComponentId(f"component id {_shown(whole)}: {label} contains a NUL byte")
    if value in (".", "..") or ".." in value:
        raise InvalidComponentId(f"component id {_shown(whole)}: {label} {value!r} contains '..'")


class ComponentId(msgspec.Struct, frozen=True, order=True):
    """Identity of one component instance; string form `namespace/name/instance`."""

    namespace: str
    name: str
    instance: str

    def __post_init__(self) -> None:
        whole = f"{self.namespace}/{self.name}/{self.instance}"
        _check_part("namespace", self.namespace, whole)
        _check_part("name", self.name, whole)
        _check_part("instance", self.instance, whole)

    @classmethod
    def parse(cls, text: str) -> ComponentId:
        """Parse `namespace/name/instance`, raising InvalidComponentId with the reason."""
        parts = text.split("/")
        if len(parts) != 3:
            raise InvalidComponentId(
                f"component id {_shown(text)}: expected namespace/name/instance (three parts separated by '/'), "
                f"got {len(parts)} part(s)"
            )
        return cls(parts[0], parts[1], parts[2])

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}/{self.instance}"


HOST_ID = ComponentId("wasmhost", "host", "0")
"""The sender id of messages the host itself sends (control socket, CLI); always allowed."""
