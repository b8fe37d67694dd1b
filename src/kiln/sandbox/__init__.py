"""Where user code runs: the launch spec of a worker and the sandbox that applies it.

`LaunchSpec` (spec.py) is plain data: what to run, with which environment, as
whom, seeing which files, on which network, within which limits. `command()`
(bwrap.py) turns it into the argv that starts it sandboxed; `probe()` tells what
this machine offers. Nothing here imports the rest of Kiln.
"""

from kiln.sandbox.probe import SandboxUnavailable, probe
from kiln.sandbox.spec import LaunchSpec, Limits

__all__ = ["LaunchSpec", "Limits", "SandboxUnavailable", "probe"]
