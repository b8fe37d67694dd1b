"""kiln.yaml's quantities (cpu, mem, durations): the grammar itself is kiln.quantities.

Kept so `kiln.config.quantities` goes on naming the parsers the schema uses.
"""

from __future__ import annotations

from kiln.quantities import parse_bytes, parse_cpu, parse_duration, type_name

__all__ = ["parse_bytes", "parse_cpu", "parse_duration", "type_name"]
