"""Which configuration file the `wasmhost` command uses when it is not told.

In order: `--config` (or `check CONFIG`), `$WASMHOST_CONFIG`, the checkout's `config/wasmhost.toml`
when wasmhost runs from a source checkout, `/etc/wasmhost/wasmhost.toml`. An installed package
(site-packages) is no checkout, so it never looks for a `config/` directory beside itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV_VAR = "WASMHOST_CONFIG"
SYSTEM_CONFIG = Path("/etc/wasmhost/wasmhost.toml")
"""Where an installed wasmhost looks (deploy/README.md installs the example there)."""
PACKAGE_DIR = Path(__file__).resolve().parent.parent


class ConfigNotFound(ValueError):
    """No configuration file was named and no default place has one; the message lists every place
    tried, in order, and why it was passed over."""

    def __init__(self, tried: list[tuple[str, str]]) -> None:
        self.tried = tried
        width = max(len(place) for place, _ in tried)
        lines = [f"  {place.ljust(width)}  {why}" for place, why in tried]
        super().__init__("no configuration file found; tried, in order:\n" + "\n".join(lines)
                         + "\nname one with --config FILE or WASMHOST_CONFIG=FILE")


def checkout_config(package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The checkout's `config/wasmhost.toml` when the package runs from a source checkout (a
    pyproject.toml beside the package directory: an editable install or PYTHONPATH), else None."""
    root = package_dir.parent
    return root / "config" / "wasmhost.toml" if (root / "pyproject.toml").is_file() else None


def _missing(path: Path) -> str | None:
    """Why `path` cannot be the configuration, or None when it is there (or cannot be told apart from
    there, such as behind a directory we may not search: reading it then says why it fails)."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return "no such file"
    except OSError:
        return None
    return "not a file" if path.is_dir() else None


def find_config(given: str | None, environ: Mapping[str, str] = os.environ,
                package_dir: Path = PACKAGE_DIR, system_config: Path = SYSTEM_CONFIG) -> Path:
    """The configuration file to use: `given` (from the command line) as it is, else $WASMHOST_CONFIG
    as it is, else the first default place that has a file; ConfigNotFound when none has."""
    if given:
        return Path(given)
    if environ.get(ENV_VAR):
        return Path(environ[ENV_VAR])
    tried = [("--config", "not given"), (f"${ENV_VAR}", "not set")]
    checkout = checkout_config(package_dir)
    if checkout is None:
        tried.append(("source checkout", f"none: {package_dir} is an installed package"))
    for candidate in (checkout, system_config):
        if candidate is None:
            continue
        why = _missing(candidate)
        if why is None:
            return candidate
        tried.append((str(candidate), why))
    raise ConfigNotFound(tried)
