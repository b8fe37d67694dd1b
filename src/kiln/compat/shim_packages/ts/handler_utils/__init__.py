"""Part of Kiln's `ts` shim (see ts/__init__.py)."""
