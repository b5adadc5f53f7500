"""Build the example components of the default configuration into config/build.

The WAT examples are the test fixtures (tests/fixtures/build.py); the greeter is Python, built
with componentize-py. Outputs newer than their sources are kept.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "config" / "build"
GREETER = ROOT / "config" / "examples" / "greeter"


def main() -> int:
    """Build everything the default configuration deploys."""
    status = subprocess.call([sys.executable, str(ROOT / "tests" / "fixtures" / "build.py"), "--out", str(OUT),
                             "--wat-only", "--label", "examples"])
    if status:
        return status
    target = OUT / "greeter.wasm"
    sources = [*GREETER.glob("*.py"), *(ROOT / "wasmhost" / "wit").glob("*.wit")]
    if target.exists() and all(target.stat().st_mtime >= s.stat().st_mtime for s in sources):
        return 0
    tool = Path(sys.executable).parent / "componentize-py"
    status = subprocess.call([str(tool), "-d", str(ROOT / "wasmhost" / "wit"), "-w", "runtime-host", "componentize",
                              "-p", str(GREETER), "app", "-o", str(target)])
    if status == 0:
        print(f"examples: greeter built -> {target}")
    return status


if __name__ == "__main__":
    sys.exit(main())
