"""The wasmtime layer: engine, compilation cache, loader, stores, host functions, limits, codec."""
