"""wasmhost: a daemon hosting WebAssembly Component Model components as actors."""

__version__ = "0.1.0"
