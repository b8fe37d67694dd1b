"""Compose a project's image: the base, the environment, the project, the model.

The layers are ordered by how often they change, so a push after an edit sends
little: the environment changes with the wheels, the project layer with any code
or config edit, and the model files come last, on their own, so a handler change
never re-sends the weights (and a new model never re-sends the code). The project
files are exactly what `kiln deploy` packs (`.kilnignore` honoured); the files under
the API's local model paths go to the model layer instead.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.build.base import RUNTIME_UID, BaseImage, BuildError, go_arch, open_base
from kiln.build.install import VENV, install
from kiln.build.oci import Entry, Image, Layer, tree_entries, write_layer
from kiln.build.wheels import download, kiln_wheel, project_extras, requirement_lines
from kiln.control.packaging import content_hash, project_files, short_revision

APP = "/app"
HOME = "/home/kiln"
PORTS = (8080, 8081, 8082)
LAYER_FORMAT = "1"
HEALTH_CMD = (
    f"{VENV}/bin/python -c 'import urllib.request as u; "
    'u.urlopen("http://127.0.0.1:8080/healthz", timeout=4)\''
)
SERVE_CMD = [
    f"{VENV}/bin/kiln",
    "serve",
    APP,
    "--host",
    "0.0.0.0",
    "--port",
    "8080",
    "--management-port",
    "8081",
    "--metrics-port",
    "8082",
    "--auth",
]


@dataclass
class Built:
    """What a build made: the image's digest, where it is, and its layers by role."""

    digest: str
    output: Path
    ref: str
    revision: str
    layers: list[tuple[str, Layer]]
    timings: dict[str, float] = field(default_factory=dict)
    pyc: bool = False


def image_name(project: Any, tag: str | None) -> str:
    """NAME:TAG: -t as given (":latest"-less NAME gets the default tag), else
    the deployment's or folder's name and the APIs' one version or the revision."""
    default_name = (
        re.sub(
            r"[^a-z0-9._-]+", "-", (project.deployment_name or Path(project.root).name).lower()
        ).strip("-._")
        or "kiln-app"
    )
    versions = {api.version for api in project.apis if getattr(api, "version", None)}
    default_tag = (
        versions.pop() if len(versions) == 1 else short_revision(content_hash(project.root))
    )
    if not tag:
        return f"{default_name}:{default_tag}"
    last = tag.rsplit("/", 1)[-1]
    return tag if ":" in last else f"{tag}:{default_tag}"


def split_model_files(project: Any, files: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(code files, model files, model paths outside the project) of the packed files."""
    root = Path(project.root).resolve()
    model_paths: list[str] = []
    outside: list[str] = []
    for api in [*project.apis, *project.batch_apis]:
        model = getattr(getattr(api, "runtime_block", None), "model", None)
        if not model or "://" in str(model):
            continue
        path = Path(model)
        path = path if path.is_absolute() else root / path
        try:
            model_paths.append(path.resolve().relative_to(root).as_posix())
        except ValueError:
            outside.append(str(path))
    models = [
        f for f in files if any(f == m or f.startswith(m.rstrip("/") + "/") for m in model_paths)
    ]
    chosen = set(models)
    return [f for f in files if f not in chosen], models, outside


def environment_layer(
    wheels: list[Path], base: BaseImage, store: Path, say: Callable[[str], None]
) -> tuple[Layer, bool]:
    """The venv layer, cached by its inputs (the wheels' bytes and the interpreter)."""
    key_src = hashlib.sha256(
        json.dumps(
            [LAYER_FORMAT, VENV, HOME, RUNTIME_UID, base.python, base.python_version]
        ).encode()
    )
    for wheel in sorted(wheels, key=lambda w: w.name):
        key_src.update(wheel.name.encode() + hashlib.sha256(wheel.read_bytes()).digest())
    key = key_src.hexdigest()[:24]
    cached = store.parent / "layers" / f"env-{key}.json"
    if cached.is_file():
        record = json.loads(cached.read_text())
        if (store / record["digest"].split(":", 1)[1]).is_file():
            say(f"environment layer: cached ({record['size'] / 1e6:.1f} MB)")
            return Layer(**record), bool(record.get("comment", "").endswith("pyc"))
    say(f"environment layer: installing {len(wheels)} wheels into {VENV} ...")
    with tempfile.TemporaryDirectory(prefix="kiln-env-") as tmp:
        root = Path(tmp)
        pyc = install(wheels, root, base.python, base.python_version)
        entries = tree_entries(root / VENV.lstrip("/"), VENV)
        entries.append(Entry(HOME.lstrip("/"), "dir", mode=0o755, uid=RUNTIME_UID, gid=RUNTIME_UID))
        entries.append(Entry("home", "dir", mode=0o755))
        comment = f"{VENV}: {len(wheels)} wheels" + (", pyc" if pyc else "")
        layer = write_layer(entries, store, comment=comment)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(layer.__dict__))
    return layer, pyc


def image_config(
    base: BaseImage, name: str, revision: str, layers: list[tuple[str, Layer]]
) -> dict[str, Any]:
    """The OCI config: who runs what, on which ports; no dates (reproducible)."""
    base_env = [
        e for e in base.config.get("config", {}).get("Env", []) if not e.startswith("PATH=")
    ]
    base_path = next(
        (e[5:] for e in base.config.get("config", {}).get("Env", []) if e.startswith("PATH=")),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    )
    env = [
        *base_env,
        f"PATH={VENV}/bin:{base_path}",
        f"VIRTUAL_ENV={VENV}",
        f"HOME={HOME}",
        "USER=kiln",
        f"KILN_HOME={HOME}/.kiln",
        "PYTHONUNBUFFERED=1",
        "PYTHONDONTWRITEBYTECODE=1",
    ]
    title, _, version = name.rpartition(":")
    labels = {
        "org.opencontainers.image.title": title.rsplit("/", 1)[-1],
        "org.opencontainers.image.version": version,
        "io.kiln.revision": revision,
        "io.kiln.healthcheck": HEALTH_CMD,
        "io.kiln.auth": "API keys on: the admin key from $KILN_API_KEY_FILE or $KILN_API_KEY",
    }
    history = list(base.config.get("history", []))
    history += [
        {"created_by": f"kiln build: {role}", "comment": layer.comment} for role, layer in layers
    ]
    return {
        "architecture": base.config.get("architecture", go_arch()),
        "os": "linux",
        "config": {
            "User": f"{RUNTIME_UID}:{RUNTIME_UID}",
            "Env": env,
            "Cmd": SERVE_CMD,
            "WorkingDir": APP,
            "ExposedPorts": {f"{port}/tcp": {} for port in PORTS},
            "StopSignal": "SIGTERM",
            "Labels": labels,
            "Healthcheck": {
                "Test": ["CMD-SHELL", HEALTH_CMD],
                "Interval": 30_000_000_000,
                "Timeout": 5_000_000_000,
                "StartPeriod": 60_000_000_000,
                "Retries": 3,
            },
        },
        "history": history,
    }


def build_image(
    project: Any,
    home: Path,
    output: Path | None,
    tag: str | None,
    base_ref: str | None,
    suite: str | None,
    say: Callable[[str], None],
    extras: tuple[str, ...] = (),
) -> Built:
    """Build the project's image and write it to `output` (an archive or layout)."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    store = home / "build" / "blobs"
    root = Path(project.root).resolve()
    name = image_name(project, tag)
    if output is None:
        output = Path(f"{name.rsplit('/', 1)[-1].replace(':', '-')}.oci.tar")
    base = open_base(base_ref, suite, home, say)
    say(
        f"base: {base.source}: Python {base.python_version} ({base.python}), "
        f"glibc {base.glibc or 'unknown'}, {sum(x.size for x in base.layers) / 1e6:.0f} MB"
    )
    timings["base"] = time.monotonic() - started
    mark = time.monotonic()
    kiln_whl = kiln_wheel(home, say)
    lines = requirement_lines(kiln_whl, project_extras(project, extras), root / "requirements.txt")
    say(f"resolve: {', '.join(lines)}")
    with tempfile.TemporaryDirectory(prefix="kiln-wheels-") as tmp:
        wheels = download(home, kiln_whl, lines, base.python_version, base.glibc, Path(tmp), say)
        timings["wheels"] = time.monotonic() - mark
        mark = time.monotonic()
        env_layer, pyc = environment_layer(wheels, base, store, say)
    say(f"environment layer: {env_layer.size / 1e6:.1f} MB {env_layer.digest[:19]}")
    timings["environment"] = time.monotonic() - mark
    mark = time.monotonic()
    files = project_files(root)
    code, models, outside = split_model_files(project, files)
    if outside:
        raise BuildError(
            f"model path(s) outside the project folder: {', '.join(outside)}; the image holds "
            f"the project folder only: move the model into it, or point the API at storage"
        )
    project_layer = write_layer(tree_entries(root, APP, files=code), store, comment="project")
    say(
        f"project layer: {len(code)} files, {project_layer.size / 1e3:.0f} kB "
        f"{project_layer.digest[:19]}"
    )
    model_layer = write_layer(tree_entries(root, APP, files=models), store, comment="model")
    say(
        f"model layer: {len(models)} files, {model_layer.size / 1e6:.1f} MB "
        f"{model_layer.digest[:19]}"
    )
    timings["project"] = time.monotonic() - mark
    mark = time.monotonic()
    layers = [("base", layer) for layer in base.layers]
    layers += [("environment", env_layer), ("project", project_layer), ("model", model_layer)]
    revision = content_hash(root, files)
    image = Image(
        store,
        [layer for _, layer in layers],
        image_config(base, name, revision, layers[len(base.layers) :]),
        ref=name,
    )
    digest = image.write(output)
    timings["write"] = time.monotonic() - mark
    timings["total"] = time.monotonic() - started
    return Built(digest, output, name, short_revision(revision), layers, timings, pyc)
