"""`python -m wasmhost ...`: the `wasmhost` command, for an interpreter whose scripts are not on PATH."""

import sys

from wasmhost.cli import main

if __name__ == "__main__":
    sys.exit(main())
