"""`kiln build --context DIR`: a Docker build context instead of an image.

For teams whose pipeline builds with Docker or buildah: the same Dockerfile `kiln init`
writes, the wheels resolved on this machine (Kiln is not on PyPI, and the build must
not need the network), the project's files and the model files, split as the image's
layers are.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.build.base import BuildError, open_base
from kiln.build.image import split_model_files
from kiln.build.wheels import download, kiln_wheel, project_extras, requirement_lines
from kiln.control.packaging import project_files

# The Dockerfile's default BASE (python:3.11-slim, Debian bookworm).
DEFAULT_PYTHON = "3.11"
DEFAULT_GLIBC = "2.36"


def write_context(
    project: Any,
    dest: Path,
    dockerfile: str,
    home: Path,
    base_ref: str | None,
    say: Callable[[str], None],
    extras: tuple[str, ...] = (),
) -> dict[str, int]:
    """Fill `dest` (new or empty); file counts of each part."""
    if dest.exists() and any(dest.iterdir()):
        raise BuildError(f"{dest} is not empty; name a new folder for the build context")
    root = Path(project.root).resolve()
    if dest.resolve() == root or root in dest.resolve().parents:
        raise BuildError(f"{dest} is inside the project; name a folder outside it")
    if base_ref is not None:
        base = open_base(base_ref, None, home, say)
        version, glibc = base.python_version, base.glibc
    else:
        version, glibc = DEFAULT_PYTHON, DEFAULT_GLIBC
        say(
            f"wheels for the Dockerfile's default BASE (python:{version}-slim); "
            f"--base picks another"
        )
    kiln_whl = kiln_wheel(home, say)
    lines = requirement_lines(kiln_whl, project_extras(project, extras), root / "requirements.txt")
    wheels = download(home, kiln_whl, lines, version, glibc, dest / "wheels", say)
    (dest / "wheels" / "requirements.txt").write_text(
        "# What the Dockerfile installs, from this folder only (pip --no-index).\n"
        + "\n".join(lines)
        + "\n"
    )
    files = project_files(root)
    code, models, outside = split_model_files(project, files)
    if outside:
        raise BuildError(f"model path(s) outside the project folder: {', '.join(outside)}")
    for folder, chosen in (("project", code), ("model", models)):
        (dest / folder).mkdir(parents=True, exist_ok=True)
        for rel in chosen:
            target = dest / folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, target)
    name = Path(project.deployment_name or root.name).name
    (dest / "Dockerfile").write_text(dockerfile.replace("{{name}}", name))
    return {"wheels": len(wheels), "project": len(code), "model": len(models)}
