"""`kiln validate --load`: each API is loaded in a real worker, and what fails is named."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support import KILN, write

CONFIG = """
- kind: api
  name: good
  python: {handler: good.py:Model}
- kind: api
  name: syntax
  python: {handler: syntax.py:Model}
- kind: api
  name: missing-module
  python: {handler: missing.py:Model}
- kind: api
  name: raises
  python: {handler: raises.py:Model}
- kind: BatchAPI
  name: batch-good
  python: {handler: good.py:Model}
- kind: BatchAPI
  name: batch-predictor
  predictor: {type: python, path: predictor.py}
"""

GOOD = """
class Model:
    def load(self, model_dir, config):
        pass

    def predict(self, payload):
        return payload
"""

RAISES = """
class Model:
    def load(self, model_dir, config):
        raise RuntimeError("no weights in the model folder")

    def predict(self, payload):
        return payload
"""

PREDICTOR = """
class PythonPredictor:
    def __init__(self, config, job_spec):
        pass

    def predict(self, payload, batch_id):
        return payload
"""


def validate(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KILN_HOME": str(project / "home"), "COLUMNS": "200"}
    return subprocess.run(
        [*KILN, "validate", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def line_of(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if f" {name}:" in line)


def test_validate_load_reports_each_api(tmp_path: Path) -> None:
    write(tmp_path / "kiln.yaml", CONFIG)
    write(tmp_path / "good.py", GOOD)
    write(tmp_path / "syntax.py", "class Model:\n    def predict(self, payload)\n        pass\n")
    write(tmp_path / "missing.py", "import kiln_no_such_module_here\n" + GOOD)
    write(tmp_path / "raises.py", RAISES)
    write(tmp_path / "predictor.py", PREDICTOR)

    plain = validate(tmp_path)
    assert plain.returncode == 0, plain.stderr  # the config itself is valid
    assert "Loading" not in plain.stdout

    loaded = validate(tmp_path, "--load")
    out = loaded.stdout
    assert loaded.returncode == 1, out + loaded.stderr
    assert "loads" in line_of(out, "good")
    syntax = line_of(out, "syntax")
    assert "fails" in syntax and "SyntaxError" in syntax and "syntax.py, line 2" in syntax
    missing = line_of(out, "missing-module")
    assert "fails" in missing and "kiln_no_such_module_here" in missing
    raises = line_of(out, "raises")
    assert "no weights in the model folder" in raises and "raises.py, line 4" in raises
    assert "requirements.txt" in out  # what to do about the missing module
    assert "loads" in line_of(out, "batch-good")
    assert "not loaded" in line_of(out, "batch-predictor")
    assert "3 of 6 API(s) failed to load" in out
    assert "Traceback" not in out + loaded.stderr


def test_validate_load_exit_0_when_every_api_loads(tmp_path: Path) -> None:
    write(tmp_path / "kiln.yaml", "- kind: api\n  name: good\n  python: {handler: good.py:Model}\n")
    write(tmp_path / "good.py", GOOD)
    loaded = validate(tmp_path, "--load")
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert "API good: loads" in loaded.stdout and "Every API loads." in loaded.stdout
