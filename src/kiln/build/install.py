"""Install wheels into a virtual environment for another machine's Python, on the host.

A wheel is a zip with a fixed layout (PEP 427), so installing one is unpacking it:
the package files go to site-packages, `<name>.data/scripts` to bin/ (a `#!python`
line becomes the venv's interpreter), `.data/purelib|platlib` to site-packages,
`.data/data` to the venv's root, and each console script of entry_points.txt
becomes a small launcher. The venv itself is `pyvenv.cfg` plus bin/python linking to
the base's interpreter. Nothing runs the base's Python, so the build needs no
container, chroot or root; what must match is the Python version, checked against
every wheel's tags here.
"""

from __future__ import annotations

import compileall
import configparser
import re
import stat
import sys
import zipfile
from pathlib import Path, PurePosixPath

from kiln.build.base import BuildError

VENV = "/opt/kiln/venv"
_SCRIPT = """#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from {module} import {head}
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit({call}())
"""


def check_tags(wheel: Path, version: str) -> None:
    """Fail, naming both versions, on a wheel built for another Python."""
    tags = wheel.name[:-4].split("-")[-3:]
    wanted = "cp" + version.replace(".", "")
    pythons = tags[0].split(".")
    abis = tags[1].split(".")
    fits = any(
        p in (wanted, "py3", f"py{version.replace('.', '')}")
        or (p.startswith("cp3") and "abi3" in abis and int(p[3:]) <= int(wanted[3:]))
        for p in pythons
    )
    if not fits:
        raise BuildError(
            f"{wheel.name} is built for Python {', '.join(pythons)}, but the base image has "
            f"Python {version}: resolve the wheels again for {version} (kiln build does), or "
            f"use a base with the Python those wheels need"
        )


def make_venv(root: Path, python: str, version: str) -> Path:
    """A venv skeleton under `root` (the image's /) for the interpreter `python`."""
    venv = root / VENV.lstrip("/")
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    site = venv / "lib" / f"python{version}" / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    (venv / "lib64").symlink_to("lib")
    (venv / "pyvenv.cfg").write_text(
        f"home = {PurePosixPath(python).parent}\ninclude-system-site-packages = false\n"
        f"version = {version}\n"
    )
    (venv / "bin" / "python").symlink_to(python)
    for alias in ("python3", f"python{version}"):
        (venv / "bin" / alias).symlink_to("python")
    return site


def install_wheel(wheel: Path, venv: Path, site: Path) -> None:
    """Unpack one wheel into the staging venv whose image path is VENV."""
    interpreter = f"{VENV}/bin/python"
    with zipfile.ZipFile(wheel) as zf:
        data_dir = next(
            (n.split("/", 1)[0] for n in zf.namelist() if n.split("/", 1)[0].endswith(".data")),
            None,
        )
        dist_info = next(
            n.split("/", 1)[0] for n in zf.namelist() if n.split("/", 1)[0].endswith(".dist-info")
        )
        for info in zf.infolist():
            name = info.filename
            if name.endswith("/"):
                continue
            parts = PurePosixPath(name).parts
            if ".." in parts or name.startswith("/"):
                raise BuildError(f"{wheel.name} has an unsafe path: {name}")
            data = zf.read(info)
            if data_dir is not None and parts[0] == data_dir:
                kind, rest = parts[1], PurePosixPath(*parts[2:])
                if kind in ("purelib", "platlib"):
                    target = site / rest
                elif kind == "scripts":
                    target = venv / "bin" / rest
                    if data.startswith(b"#!python"):
                        body = data.partition(b"\n")[2]
                        data = b"#!" + interpreter.encode() + b"\n" + body
                elif kind == "headers":
                    target = venv / "include" / "site" / rest
                else:
                    target = venv / rest
            else:
                target = site / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            executable = (info.external_attr >> 16) & 0o111 or (
                data_dir is not None and parts[0] == data_dir and parts[1] == "scripts"
            )
            target.chmod(0o755 if executable else 0o644)
        (site / dist_info / "INSTALLER").write_text("kiln build\n")
        entry_points = site / dist_info / "entry_points.txt"
        if entry_points.is_file():
            _console_scripts(entry_points, venv / "bin", interpreter)


def _console_scripts(entry_points: Path, bin_dir: Path, interpreter: str) -> None:
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(entry_points)
    if not parser.has_section("console_scripts"):
        return
    for name, spec in sorted(parser.items("console_scripts")):
        match = re.match(r"^\s*([\w.]+)\s*:\s*([\w.]+)", spec)
        if match is None:
            continue
        module, attr = match.groups()
        head = attr.split(".", 1)[0]
        script = bin_dir / name
        script.write_text(_SCRIPT.format(python=interpreter, module=module, head=head, call=attr))
        script.chmod(0o755)


def install(
    wheels: list[Path], root: Path, python: str, version: str, compile_pyc: bool = True
) -> bool:
    """The whole environment under `root`; True when .pyc files were compiled too.

    Compiling needs this very Python version here (bytecode is per version); the
    .pyc files use `unchecked-hash` so they never depend on file times, which the
    layer sets to 0, and they are tagged with the path they have in the image.
    """
    for wheel in wheels:
        check_tags(wheel, version)
    site = make_venv(root, python, version)
    venv = root / VENV.lstrip("/")
    for wheel in wheels:
        install_wheel(wheel, venv, site)
    if compile_pyc and f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
        import py_compile

        compileall.compile_dir(  # a file that fails (py2 test data) stays source
            site,
            quiet=2,
            stripdir=str(root),
            prependdir="/",
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            workers=1,
        )
        for pyc in site.rglob("*.pyc"):
            pyc.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
        return True
    return False
