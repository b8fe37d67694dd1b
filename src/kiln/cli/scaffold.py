"""`kiln init`: create a ready-to-serve project folder from a template.

A new user's first five minutes decide whether they keep going, so the
scaffold must serve real answers as created (a small real model ships with
every template) and must show every hook the user can fill in. Templates are
plain files under `templates/<name>/` (plus `templates/_common/`, shared by
all) so they can be read, linted and tested like any other code; `{{name}}`
in text files becomes the project name.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from kiln.config.blocks import RESERVED_NAMES

TEMPLATES = ("python", "onnx")
# Other platforms' layouts, written as their own `init` writes them (no kiln.yaml, no
# _common files): `hub` is a CellStrat Hub project, which Kiln serves as it is.
LAYOUTS = ("hub",)

TEMPLATE_ROOT = Path(__file__).resolve().parent / "templates"
COMMON = "_common"

# Package data globs skip dotfiles, so dotfiles ship without their dot.
RENAMES = {"dockerignore": ".dockerignore"}
# Copied byte for byte: no placeholder substitution.
BINARY_SUFFIXES = {".onnx", ".npz", ".npy", ".pb", ".pt", ".bin"}
SKIPPED = {"__pycache__", ".DS_Store"}

# API names become URL path segments; RESERVED_NAMES would shadow fixed routes.
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def suggest_name(raw: str) -> str:
    """A DNS-label version of `raw`, offered in error messages as the fix."""
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)[:63].strip("-")
    return name or "my-api"


def validate_name(name: str) -> None:
    """Raise ValueError, naming the fix, unless `name` can be an API name."""
    if not _DNS_LABEL.match(name):
        raise ValueError(
            f"project name {name!r} is not a DNS label: use 1-63 lowercase letters, "
            f"digits and hyphens, starting and ending with a letter or digit "
            f"(for example {suggest_name(name)!r})"
        )
    if name in RESERVED_NAMES:
        raise ValueError(
            f"project name {name!r} would shadow Kiln's fixed route /{name}; "
            f"choose another name (for example {name + '-api'!r})"
        )


def template_files(template: str) -> dict[Path, Path]:
    """Map each output path (relative) to its source file for `template`.

    Files of the template itself win over `_common` ones with the same path.
    """
    if template not in TEMPLATES + LAYOUTS:
        choices = ", ".join(TEMPLATES + LAYOUTS)
        raise ValueError(f"unknown template {template!r}; choose one of: {choices}")
    files: dict[Path, Path] = {}
    common = () if template in LAYOUTS else (TEMPLATE_ROOT / COMMON,)
    for folder in (*common, TEMPLATE_ROOT / template):
        for src in sorted(folder.rglob("*")):
            rel = src.relative_to(folder)
            if src.is_dir() or SKIPPED.intersection(rel.parts) or src.suffix == ".pyc":
                continue
            files[rel.with_name(RENAMES.get(rel.name, rel.name))] = src
    return files


def _render(src: Path, name: str) -> bytes:
    data = src.read_bytes()
    if src.suffix in BINARY_SUFFIXES:
        return data
    return data.decode("utf-8").replace("{{name}}", name).encode("utf-8")


def create_project(dest: Path, template: str = "python", name: str | None = None) -> list[Path]:
    """Create a new project in `dest` (which must not exist) from `template`.

    `name` defaults to the folder name and becomes the API name in kiln.yaml.
    Returns the created files, relative to `dest`, sorted. A half-written
    project is removed again if anything fails, so a retry starts clean.
    """
    dest = Path(dest)
    files = template_files(template)
    name = dest.resolve().name if name is None else name
    validate_name(name)
    if dest.exists() or dest.is_symlink():
        kind = "folder" if dest.is_dir() else "file"
        raise FileExistsError(
            f"{dest} already exists (a {kind}); Kiln will not write into it. "
            f"Choose a new folder name, or remove {dest} first"
        )
    dest.mkdir(parents=True)
    try:
        for rel, src in files.items():
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(_render(src, name))
            if src.stat().st_mode & 0o111:
                out.chmod(out.stat().st_mode | 0o111)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return sorted(files)


def stale_template_sample(root: Path) -> bool:
    """Whether `root`'s sample.json is a template's example left beside another handler.

    `kiln init` writes an iris request that fits the template's iris handler; once the
    user replaces src/handler.py, that sample no longer fits, and a hint that sends it
    would answer 400. True when sample.json is byte for byte a template's and the
    project's src/handler.py is none of the templates' handlers (as rendered)."""
    sample = root / "sample.json"
    if not sample.is_file():
        return False
    data = sample.read_bytes()
    try:
        handler = (root / "src" / "handler.py").read_bytes()
    except OSError:
        handler = b""  # the template's handler is gone
    matched = False
    for template in TEMPLATES:
        folder = TEMPLATE_ROOT / template
        if (folder / "sample.json").is_file() and (folder / "sample.json").read_bytes() == data:
            matched = True
            src = folder / "src" / "handler.py"
            if src.is_file() and _same_template(src.read_bytes(), handler):
                return False
    return matched


def _same_template(template: bytes, file: bytes) -> bool:
    """`file` is `template` rendered with some project name (the folder may be renamed)."""
    parts = [re.escape(p) for p in template.split(b"{{name}}")]
    return re.fullmatch(b"[a-z0-9-]+".join(parts), file) is not None
