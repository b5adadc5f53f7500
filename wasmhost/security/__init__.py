"""Capabilities (deny by default) and the audit log of denials."""
