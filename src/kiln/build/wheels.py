"""The wheels an image's environment is installed from, resolved on the host.

Kiln is not on PyPI, so its own wheel is built here (`pip wheel --no-deps` of the
source tree the running Kiln comes from) and cached by the source's content hash.
Everything else is resolved by pip on the host *for the base's* Python version and
platform (`--python-version X.Y --platform manylinux_2_N_<arch> --only-binary=:all:`),
so nothing is compiled and nothing is fetched inside the image. Downloads go to
KILN_HOME/build/wheels/pypi/, and a build first resolves from that folder alone
(`--no-index`), which makes a warm build need no network at all.
"""

from __future__ import annotations

import hashlib
import importlib.util
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kiln.build.base import BuildError

# Which kiln-serve extra each runtime block needs (python/predictor: none).
RUNTIME_EXTRAS = {
    "onnx": "onnx",
    "tensorflow": "tensorflow",
    "torch": "torch",
    "torchserve": "torch",
    "sklearn": "sklearn",
}
SCHEME_EXTRAS = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}


ASKABLE_EXTRAS = ("ray", "postgres", "s3", "gcs", "http", "batch", "otel", "grpc")
"""Extras `kiln build --extra` may add: what the image needs beyond the project's runtimes
(`ray` and `postgres` for a KubeRay cluster's nodes and control plane, storage schemes)."""


def project_extras(project: Any, asked: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The kiln-serve extras the project's runtime blocks (and remote model paths) need,
    plus those asked for (`kiln build --extra`); an unknown one is a BuildError."""
    unknown = sorted(set(asked) - set(ASKABLE_EXTRAS))
    if unknown:
        from kiln.build.base import BuildError

        raise BuildError(
            f"--extra {unknown[0]}: not an extra kiln build adds; use one of "
            f"{', '.join(ASKABLE_EXTRAS)} (runtimes are added from kiln.yaml)"
        )
    extras: set[str] = set(asked)
    for api in [*project.apis, *project.batch_apis]:
        runtime = getattr(api, "runtime", "")
        if runtime in RUNTIME_EXTRAS:
            extras.add(RUNTIME_EXTRAS[runtime])
        model = getattr(getattr(api, "runtime_block", None), "model", None) or ""
        scheme = model.split("://", 1)[0] if "://" in model else ""
        if scheme in SCHEME_EXTRAS:
            extras.add(SCHEME_EXTRAS[scheme])
    return sorted(extras)


def kiln_source() -> Path | None:
    """The source tree of the running Kiln (an editable or source checkout), if any."""
    import kiln

    root = Path(kiln.__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "kiln-serve"' in pyproject.read_text():
        return root
    return None


def _source_hash(root: Path) -> str:
    digest = hashlib.sha256(b"kiln-wheel-v1\0")
    paths = [root / "pyproject.toml", root / "README.md"]
    for path in sorted((root / "src" / "kiln").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            paths.append(path)
    for path in paths:
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def kiln_wheel(home: Path, say: Callable[[str], None]) -> Path:
    """The kiln-serve wheel of the running Kiln, built once per source content; or the
    one $KILN_WHEEL names (a pipeline that builds the wheel once, or pins it)."""
    import os

    given = os.environ.get("KILN_WHEEL")
    if given:
        path = Path(given)
        if not (path.is_file() and path.name.startswith("kiln_serve-") and path.suffix == ".whl"):
            raise BuildError(
                f"KILN_WHEEL names {given}, which is not a kiln_serve-*.whl file; build one "
                f"with `pip wheel --no-deps /path/to/kiln`, or unset KILN_WHEEL"
            )
        say(f"kiln-serve wheel: {path.name} (KILN_WHEEL)")
        return path
    root = kiln_source()
    if root is None:
        return _installed_kiln_wheel(home, say)
    folder = home / "build" / "wheels" / "kiln" / _source_hash(root)
    found = sorted(folder.glob("kiln_serve-*.whl"))
    if found:
        say(f"kiln-serve wheel: cached {found[0].name}")
        return found[0]
    say(f"kiln-serve wheel: building from {root} (pip wheel --no-deps) ...")
    with tempfile.TemporaryDirectory(prefix="kiln-wheel-") as tmp:
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp, str(root)]
        if importlib.util.find_spec("setuptools") is not None:
            command.insert(5, "--no-build-isolation")  # no download of setuptools
        result = subprocess.run(command, capture_output=True, text=True)
        built = sorted(Path(tmp).glob("kiln_serve-*.whl"))
        if result.returncode != 0 or not built:
            raise BuildError(
                f"pip wheel could not build kiln-serve from {root}:\n"
                + "\n".join(result.stderr.strip().splitlines()[-6:])
            )
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], folder / built[0].name)
    wheel = folder / built[0].name
    say(f"kiln-serve wheel: {wheel.name} ({wheel.stat().st_size / 1e3:.0f} kB)")
    return wheel


def _installed_kiln_wheel(home: Path, say: Callable[[str], None]) -> Path:
    """Kiln installed from a wheel (no source here): the wheel again, from its files."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("kiln-serve")
    except importlib.metadata.PackageNotFoundError:
        raise BuildError(
            "kiln build needs the kiln-serve distribution or Kiln's source tree to make the "
            "kiln-serve wheel (Kiln is not on PyPI): install Kiln with pip (pip install -e "
            "/path/to/kiln), then build again"
        ) from None
    record = dist.read_text("RECORD") or ""
    folder = (
        home
        / "build"
        / "wheels"
        / "kiln"
        / ("dist-" + hashlib.sha256(record.encode()).hexdigest()[:16])
    )
    found = sorted(folder.glob("kiln_serve-*.whl"))
    if found:
        say(f"kiln-serve wheel: cached {found[0].name}")
        return found[0]
    wheel = wheel_from_installed("kiln-serve", folder)
    say(f"kiln-serve wheel: {wheel.name} from the installed distribution")
    return wheel


def wheel_from_installed(name: str, folder: Path) -> Path:
    """A wheel of an installed pure-Python distribution, rebuilt from its RECORD:
    the package files and dist-info (scripts outside site-packages are left out: the
    installer makes them again from entry_points.txt)."""
    import base64
    import importlib.metadata
    import zipfile

    dist = importlib.metadata.distribution(name)
    normal = re.sub(r"[-_.]+", "_", dist.metadata["Name"]).lower()
    dist_info = f"{normal}-{dist.version}.dist-info"
    skip = {f"{dist_info}/{n}" for n in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{normal}-{dist.version}-py3-none-any.whl"
    tmp = out.with_suffix(".partial")
    records: list[str] = []
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        names = sorted(
            f.as_posix()
            for f in dist.files or []
            if not f.as_posix().startswith("../") and "__pycache__" not in f.parts
        )
        for member in names:
            if member in skip or member.endswith(".pyc"):
                continue
            data = Path(str(dist.locate_file(member))).read_bytes()
            zf.writestr(member, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            records.append(f"{member},sha256={digest.decode()},{len(data)}")
        if f"{dist_info}/WHEEL" not in names:
            wheel = (
                "Wheel-Version: 1.0\nGenerator: kiln build\nRoot-Is-Purelib: true\n"
                "Tag: py3-none-any\n"
            )
            zf.writestr(f"{dist_info}/WHEEL", wheel)
            records.append(f"{dist_info}/WHEEL,,")
        records.append(f"{dist_info}/RECORD,,")
        zf.writestr(f"{dist_info}/RECORD", "\n".join(records) + "\n")
    tmp.replace(out)
    return out


def platform_tags(glibc: str | None) -> list[str]:
    """manylinux tags the base can load: 2_17 up to its glibc (2_28 when unknown)."""
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())
    top = int(glibc.split(".")[1]) if glibc and glibc.startswith("2.") else 28
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(top, 16, -1)]
    return [*tags, f"manylinux2014_{machine}"]


def requirement_lines(kiln_whl: Path, extras: list[str], requirements: Path | None) -> list[str]:
    """What the environment installs: kiln-serve with its extras, then requirements.txt."""
    kiln_req = f"kiln-serve[{','.join(extras)}]" if extras else "kiln-serve"
    lines = [kiln_req]
    if requirements is not None and requirements.is_file():
        for raw in requirements.read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            if line:
                lines.append(line)
    return lines


def download(
    home: Path,
    kiln_whl: Path,
    lines: Iterable[str],
    python_version: str,
    glibc: str | None,
    dest: Path,
    say: Callable[[str], None],
) -> list[Path]:
    """Resolve `lines` for the base into `dest` (one file per distribution); the wheels.

    The cache alone first (`--no-index`); with something missing, PyPI too.
    """
    cache = home / "build" / "wheels" / "pypi"
    cache.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        req.write("\n".join(lines) + "\n")
    common = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        *[arg for tag in platform_tags(glibc) for arg in ("--platform", tag)],
        "--find-links",
        str(kiln_whl.parent),
        "--find-links",
        str(cache),
        "-d",
        str(dest),
        "-r",
        req.name,
    ]
    try:
        offline = subprocess.run([*common, "--no-index"], capture_output=True, text=True)
        if offline.returncode == 0:
            say(f"wheels: resolved from the cache for Python {python_version} (no network)")
        else:
            say(f"wheels: resolving for Python {python_version} on PyPI (pip download) ...")
            online = subprocess.Popen(
                common, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            output: list[str] = []
            assert online.stdout is not None
            for line in online.stdout:
                output.append(line.rstrip())
                if line.lstrip().startswith(("Downloading", "Saved")):
                    say(f"  {line.strip()}")
            if online.wait() != 0:
                tail = "\n".join(x for x in output if "ERROR" in x or "error" in x)[-1500:]
                raise BuildError(
                    f"the image's Python packages could not be resolved for Python "
                    f"{python_version} ({', '.join(lines)}):\n{tail or output[-1]}\n"
                    f"Every package needs a wheel for that Python and platform "
                    f"(--only-binary=:all:); pin a version that has one"
                )
    finally:
        Path(req.name).unlink(missing_ok=True)
    wheels = sorted(dest.glob("*.whl"))
    for wheel in wheels:
        if not wheel.name.startswith("kiln_serve-") and not (cache / wheel.name).exists():
            shutil.copyfile(wheel, cache / wheel.name)
    others = [p.name for p in dest.iterdir() if p.suffix != ".whl"]
    if others:
        raise BuildError(f"pip left files that are not wheels: {', '.join(others)}")
    size = sum(w.stat().st_size for w in wheels)
    say(f"wheels: {len(wheels)} wheels, {size / 1e6:.1f} MB")
    return wheels
