"""Parsing of the human-written quantities found in kiln.yaml.

Cortex users write resources the Kubernetes way (``cpu: 200m``, ``mem: 1Gi``)
and durations the Go way (``window: 60s``, ``5m``). Kiln keeps accepting those
spellings, and turns them into plain numbers (cores, bytes, seconds) once, here,
so nothing downstream ever parses a string again.

It sits below kiln.config (it imports only kiln.errors): the model cache reads
its size limit (KILN_CACHE_MAX_BYTES) and the control plane its quotas and ages
with the same grammar, without loading the config package.

Every parser raises :class:`~kiln.errors.FieldProblem` (a ``ValueError``)
with a message and a fix, which the loader turns into a located ConfigIssue.
"""

from __future__ import annotations

import math
import re

from kiln.errors import FieldProblem

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
_DECIMAL = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i|[kKMGTP])?[Bb]?\s*$")
_CPU_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(m)?\s*$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def type_name(value: object) -> str:
    """YAML-flavoured name of a Python value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "number", str: "string", dict: "mapping", list: "list"}.get(
        type(value), type(value).__name__
    )


def parse_cpu(value: object) -> float:
    """Turn ``200m`` / ``0.2`` / ``1`` / ``"1.5"`` into a number of cores (float).

    Milli-cores are what Cortex documented as the default (``200m``); a bare
    number is cores. ``cpu: 200m`` and ``cpu: 0.2`` therefore compare equal.
    """
    if isinstance(value, bool) or value is None:
        raise FieldProblem(
            f"expected a CPU amount, got {value!r} ({type_name(value)})",
            "write cores as a number (cpu: 0.5) or milli-cores (cpu: 500m)",
        )
    if isinstance(value, int | float):
        cores = float(value)
    elif isinstance(value, str) and (m := _CPU_RE.match(value)):
        cores = float(m.group(1)) / (1000.0 if m.group(2) else 1.0)
    else:
        raise FieldProblem(
            f"cannot read {value!r} as a CPU amount",
            "write cores as a number (cpu: 0.5) or milli-cores (cpu: 500m)",
        )
    if not math.isfinite(cores) or cores < 0:
        raise FieldProblem(f"cpu must be zero or more, got {value!r}", "use e.g. cpu: 200m")
    return round(cores, 6)


def parse_bytes(value: object, *, what: str = "memory") -> int:
    """Turn ``1Gi`` / ``512Mi`` / ``1G`` / ``500M`` / ``1024`` into a byte count.

    Binary suffixes (Ki, Mi, Gi, Ti, Pi) are powers of 1024, decimal ones
    (K, M, G, T, P) powers of 1000, exactly as Kubernetes and Cortex read them.
    """
    if isinstance(value, bool) or value is None:
        raise FieldProblem(
            f"expected a {what} size, got {value!r} ({type_name(value)})",
            "write bytes or a size with a unit, e.g. 512Mi, 1Gi, 500M",
        )
    if isinstance(value, int):
        amount = value
    elif isinstance(value, float):
        amount = int(value)
        if amount != value:
            raise FieldProblem(f"{what} size must be whole bytes, got {value!r}", "use e.g. 512Mi")
    elif isinstance(value, str) and (m := _BYTES_RE.match(value)):
        unit = m.group(2) or ""
        factor = _BINARY.get(unit) or _DECIMAL.get(unit) or 1
        amount = int(round(float(m.group(1)) * factor))
    else:
        raise FieldProblem(
            f"cannot read {value!r} as a {what} size",
            "write bytes or a size with a unit: K, M, G, T (x1000) or Ki, Mi, Gi, Ti (x1024)",
        )
    if amount <= 0:
        raise FieldProblem(f"{what} size must be more than 0, got {value!r}", "use e.g. 512Mi")
    return amount


def parse_duration(value: object) -> float:
    """Turn ``15s`` / ``5m`` / ``1h`` / ``1m30s`` / ``500ms`` / bare numbers into seconds.

    Cortex wrote autoscaling periods as Go durations; a bare number means seconds.
    """
    if isinstance(value, bool) or value is None:
        raise FieldProblem(
            f"expected a duration, got {value!r} ({type_name(value)})",
            "write a duration such as 10s, 5m or 1h (a bare number means seconds)",
        )
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise FieldProblem(
                    f"cannot read {value!r} as a duration",
                    "write a duration such as 10s, 5m, 1h or 1m30s (a bare number means seconds)",
                ) from None
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    else:
        raise FieldProblem(
            f"expected a duration, got {value!r} ({type_name(value)})",
            "write a duration such as 10s, 5m or 1h",
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise FieldProblem(f"duration must be zero or more, got {value!r}", "use e.g. 60s")
    return seconds
