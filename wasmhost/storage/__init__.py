"""Per-component key-value storage."""
