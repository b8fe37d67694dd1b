"""The base image: a Python 3.11+ runtime the project's layers go on.

Three ways to get one, in order: `--base PATH` (an OCI image layout folder or OCI
archive), `--base REF` (a registry reference, copied with skopeo where a registry is
reachable), or by default a minimal Debian built from packages with mmdebstrap
(the host's suite unless `--suite`), cached as an OCI archive under
KILN_HOME/build/ so a second build, and `podman build --build-arg BASE=oci-archive:...`,
reuse it. Whatever the source, the base's layers are scanned once for its Python
(`usr/local/bin/python3.X` wins over `usr/bin/python3.X`, as PATH orders them) and
its glibc version, which decide which wheels fit.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.build.oci import Image, Layer, layer_from_tar
from kiln.errors import KilnError

# What the default base holds; changing any of this changes the cache key.
PACKAGES = ("python3", "python3-venv")
DPKG_EXCLUDES = (
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/doc/*",
    "/usr/share/locale/*",
    "/usr/share/lintian/*",
)
RUNTIME_UID = 10001
RECIPE_VERSION = "1"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PYTHON = re.compile(r"^(?:\./)?(usr/(?:local/)?bin)/python(3\.\d+)$")


class BuildError(KilnError):
    """A build cannot go on; the message says what to install or pass."""


@dataclass
class BaseImage:
    """A base's layers (blobs in the shared store), config and interpreter."""

    layers: list[Layer]
    config: dict[str, Any]
    python: str  # absolute path of the interpreter, e.g. /usr/bin/python3.11
    python_version: str  # "3.11"
    glibc: str | None  # "2.36", when the base has dpkg's status file
    source: str  # what it came from, for messages


def go_arch() -> str:
    """The OCI architecture name of this machine (images are built for the host's)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


def host_suite() -> str:
    """The host's Debian suite (bookworm on Debian 12); bookworm where it is not Debian."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return "bookworm"
    fields = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )
    if fields.get("ID", "").strip('"') == "debian":
        return fields.get("VERSION_CODENAME", "bookworm").strip('"') or "bookworm"
    return "bookworm"


def base_cache_path(home: Path, suite: str) -> Path:
    recipe = json.dumps(
        [RECIPE_VERSION, suite, go_arch(), PACKAGES, DPKG_EXCLUDES, RUNTIME_UID]
    ).encode()
    return home / "build" / f"base-{suite}-{hashlib.sha256(recipe).hexdigest()[:12]}.tar"


def debian_base(home: Path, suite: str, say: Callable[[str], None]) -> Path:
    """The mmdebstrap base as an OCI archive, built once per suite and recipe."""
    archive = base_cache_path(home, suite)
    if archive.is_file():
        say(f"base: cached {archive} ({archive.stat().st_size / 1e6:.0f} MB)")
        return archive
    if shutil.which("mmdebstrap") is None:
        raise BuildError(
            "Kiln builds its base image with mmdebstrap, which is not installed. Install it "
            "(Debian/Ubuntu: sudo apt-get install mmdebstrap), or pass --base PATH: an OCI "
            "layout or archive with Python 3.11+ (made where a registry is reachable with "
            "`skopeo copy docker://python:3.11-slim oci-archive:base.tar`)"
        )
    say(f"base: building Debian {suite} with {', '.join(PACKAGES)} (mmdebstrap, once) ...")
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=archive.parent, prefix=".base-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        command = [
            "mmdebstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            *[f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES],
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            f'--customize-hook=chroot "$1" useradd --uid {RUNTIME_UID} --user-group '
            f"--no-create-home --home-dir /home/kiln --shell /usr/sbin/nologin kiln",
            '--customize-hook=rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*',
            suite,
            str(rootfs),
        ]
        env = {**os.environ, "SOURCE_DATE_EPOCH": "0"}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-8:])
            raise BuildError(
                f"mmdebstrap could not build a Debian {suite} base (exit {result.returncode}):"
                f"\n{tail}\nIt needs root or unprivileged user namespaces, and a reachable "
                f"Debian mirror; or pass --base PATH (an OCI layout or archive with Python 3.11+)"
            )
        blobs = Path(tmp) / "blobs"
        layer = layer_from_tar(rootfs, blobs, comment=f"mmdebstrap {suite} minbase")
        config = {
            "architecture": go_arch(),
            "os": "linux",
            "config": {"Env": [DEFAULT_PATH, "LANG=C.UTF-8"], "Cmd": ["/usr/bin/python3"]},
            "history": [{"created_by": " ".join(command[:-2]), "comment": "kiln build base"}],
        }
        Image(blobs, [layer], config, ref=f"kiln-base:{suite}").write(archive)
    say(f"base: built {archive} ({archive.stat().st_size / 1e6:.0f} MB)")
    return archive


def pull(ref: str, home: Path, say: Callable[[str], None]) -> Path:
    """Copy a registry image to an OCI archive under KILN_HOME with skopeo."""
    target = home / "build" / "pulled" / f"{hashlib.sha256(ref.encode()).hexdigest()[:16]}.tar"
    if shutil.which("skopeo") is None:
        raise BuildError(
            f"--base {ref} is neither a file nor a folder, and pulling it needs skopeo "
            f"(Debian/Ubuntu: sudo apt-get install skopeo); or pass --base PATH (an OCI "
            f"layout or archive)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    source = ref if "://" in ref or ref.startswith(("oci:", "oci-archive:")) else f"docker://{ref}"
    say(f"base: pulling {source} with skopeo ...")
    result = subprocess.run(
        ["skopeo", "copy", "--override-arch", go_arch(), source, f"oci-archive:{target}"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise BuildError(
            f"could not pull {ref}: {result.stderr.strip().splitlines()[-1:] or ['skopeo failed']}"
            f"[0]. No registry may be reachable from here: build without --base (Kiln makes a "
            f"Debian base with mmdebstrap) or pass --base PATH (an OCI layout or archive)"
        )
    return target


def open_base(
    ref: str | None, suite: str | None, home: Path, say: Callable[[str], None]
) -> BaseImage:
    """The base for a build: `--base` (path or registry reference), else the Debian one."""
    store = home / "build" / "blobs"
    if ref is None:
        path = debian_base(home, suite or host_suite(), say)
    elif Path(ref).exists():
        path = Path(ref)
    else:
        path = pull(ref, home, say)
    layers, config = import_image(path, store)
    return _probe(layers, config, store, str(path))


def import_image(path: Path, store: Path) -> tuple[list[Layer], dict[str, Any]]:
    """Copy an OCI layout folder's or archive's blobs into `store`; (layers, config)."""
    store.mkdir(parents=True, exist_ok=True)
    if path.is_dir():

        def read(name: str) -> bytes:
            return (path / name).read_bytes()

        def copy_blob(hex_digest: str) -> None:
            if not (store / hex_digest).exists():
                shutil.copyfile(path / "blobs" / "sha256" / hex_digest, store / hex_digest)

        return _walk(read, copy_blob)
    try:
        with tarfile.open(path) as tar:
            names = {m.name.lstrip("./"): m for m in tar.getmembers()}

            def read_member(name: str) -> bytes:
                member = names.get(name)
                handle = tar.extractfile(member) if member is not None else None
                if handle is None:
                    raise BuildError(f"{path} is not an OCI archive: it has no {name}")
                return handle.read()

            def copy_member(hex_digest: str) -> None:
                if (store / hex_digest).exists():
                    return
                member = names.get(f"blobs/sha256/{hex_digest}")
                handle = tar.extractfile(member) if member is not None else None
                if handle is None:
                    raise BuildError(f"{path} lacks the blob sha256:{hex_digest}")
                tmp = store / f".tmp-{hex_digest}"
                with tmp.open("wb") as out:
                    shutil.copyfileobj(handle, out, 1 << 20)
                os.replace(tmp, store / hex_digest)

            return _walk(read_member, copy_member)
    except tarfile.TarError as exc:
        raise BuildError(
            f"--base {path}: not an OCI archive ({exc}); pass an OCI layout folder or an "
            f"archive written by `skopeo copy ... oci-archive:FILE` or `kiln build`"
        ) from None


def _walk(
    read: Callable[[str], bytes], copy: Callable[[str], None]
) -> tuple[list[Layer], dict[str, Any]]:
    index = json.loads(read("index.json"))
    descriptor = index["manifests"][0]
    document = json.loads(read(f"blobs/sha256/{descriptor['digest'].split(':', 1)[1]}"))
    if "manifests" in document:  # an index: take this machine's platform
        chosen = [
            m
            for m in document["manifests"]
            if m.get("platform", {}).get("architecture") == go_arch()
        ]
        if not chosen:
            raise BuildError(f"the base has no image for {go_arch()}")
        document = json.loads(read(f"blobs/sha256/{chosen[0]['digest'].split(':', 1)[1]}"))
    config = json.loads(read(f"blobs/sha256/{document['config']['digest'].split(':', 1)[1]}"))
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    layers = []
    for i, layer in enumerate(document["layers"]):
        copy(layer["digest"].split(":", 1)[1])
        layers.append(Layer(layer["digest"], diff_ids[i], layer["size"], layer["mediaType"]))
    return layers, config


def _probe(layers: list[Layer], config: dict[str, Any], store: Path, source: str) -> BaseImage:
    """Find the base's Python and glibc by reading its layers (cached per layer set)."""
    key = hashlib.sha256("".join(layer.digest for layer in layers).encode()).hexdigest()[:16]
    cache = store.parent / "probes" / f"{key}.json"
    if cache.is_file():
        found = json.loads(cache.read_text())
    else:
        pythons: dict[str, str] = {}
        status: bytes | None = None
        for layer in layers:
            blob = store / layer.digest.split(":", 1)[1]
            opener: Any = gzip.open if "gzip" in layer.media_type else open
            with opener(blob, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
                for member in tar:
                    name = member.name
                    match = _PYTHON.match(name)
                    if match:
                        pythons[f"/{match.group(1)}/python{match.group(2)}"] = match.group(2)
                    elif name.lstrip("./") == "var/lib/dpkg/status" and member.isfile():
                        handle = tar.extractfile(member)
                        status = handle.read() if handle else status
        glibc = None
        if status is not None:
            found_libc = re.search(
                rb"^Package: libc6\n(?:[^\n]+\n)*?Version: (\d+\.\d+)", status, re.M
            )
            glibc = found_libc.group(1).decode() if found_libc else None
        found = {"pythons": pythons, "glibc": glibc}
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(found))
    pythons = found["pythons"]
    ordered = sorted(
        pythons,
        key=lambda p: (not p.startswith("/usr/local/"), [-int(x) for x in pythons[p].split(".")]),
    )
    if not ordered:
        raise BuildError(
            f"the base {source} has no Python 3 (no usr/local/bin/python3.X or usr/bin/"
            f"python3.X); pass a base with Python 3.11+, or build without --base"
        )
    python = ordered[0]
    version = pythons[python]
    if tuple(int(x) for x in version.split(".")) < (3, 11):
        raise BuildError(
            f"the base {source} has Python {version} ({python}); Kiln needs 3.11 or newer: "
            f"pass another --base, or build without --base for a Debian one"
        )
    return BaseImage(layers, config, python, version, found["glibc"], source)
