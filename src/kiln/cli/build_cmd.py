"""`kiln build`: the project as a runnable, reproducible OCI image (no container daemon).

The image's layers are built by kiln.build (docs/architecture.md, "Images"); this
module prints progress, the result (digest, each layer's size) and the commands that
load and run it, and chains `--push` (skopeo) and `--deploy` (kiln deploy's code).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.markup import escape

from kiln.cli.client import CliError
from kiln.cli.common import console, kiln_home
from kiln.cli.scaffold import COMMON, TEMPLATE_ROOT


def _say_from(started: float) -> Any:
    def say(message: str) -> None:
        console.print(
            f"[dim]{time.monotonic() - started:6.1f}s[/] {escape(message)}",
            highlight=False,
            soft_wrap=True,
        )

    return say


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def run_build(
    project_dir: Path,
    file: str | None,
    tag: str | None,
    output: Path | None,
    base: str | None,
    suite: str | None,
    context: Path | None,
    deploy: bool,
    push: str | None,
    env: str | None = None,
    extras: tuple[str, ...] = (),
) -> int:
    import os

    from kiln.build.base import BuildError
    from kiln.config import ConfigError, load_project
    from kiln.control.packaging import read_dotenv

    try:
        project = load_project(project_dir, file, env={**os.environ, **read_dotenv(project_dir)})
    except ConfigError as exc:
        count = len(exc.issues)
        raise CliError(
            f"the configuration has {count} problem{'s' if count != 1 else ''}:\n{exc}", 2
        ) from None
    say = _say_from(time.monotonic())
    home = kiln_home()
    try:
        if context is not None:
            from kiln.build.context import write_context

            dockerfile = (TEMPLATE_ROOT / COMMON / "Dockerfile").read_text()
            counts = write_context(project, context, dockerfile, home, base, say, extras)
            console.print(
                f"\nWrote the build context {escape(str(context))}: Dockerfile, wheels/ "
                f"({counts['wheels']} wheels), project/ ({counts['project']} files), model/ "
                f"({counts['model']} files). Build it with:\n"
                f"  docker build -t {project_dir.resolve().name} {shlex.quote(str(context))}\n"
                f"  podman build -t {project_dir.resolve().name} {shlex.quote(str(context))}",
                highlight=False,
                soft_wrap=True,
            )
            return 0
        from kiln.build.image import build_image

        built = build_image(project, home, output, tag, base, suite, say, extras)
    except BuildError as exc:
        raise CliError(str(exc), 1) from None
    _report(built)
    if push:
        _push(built.output, push, say)
    if deploy:
        from kiln.cli.deploy_cmd import run_deploy

        console.print(f"\nDeploying revision {built.revision} to the current environment ...")
        return run_deploy(project_dir, file, env, None, True)
    return 0


def _report(built: Any) -> None:
    total = sum(layer.size for _, layer in built.layers)
    console.print(
        f"\nBuilt [bold]{escape(built.ref)}[/] (revision {built.revision}) in "
        f"{built.timings['total']:.1f} s: {escape(str(built.output))}, {_size(total)} compressed"
        + ("" if built.pyc else " (no .pyc: this Python differs from the base's)"),
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"Digest: {built.digest}", highlight=False)
    for role, layer in built.layers:
        console.print(
            f"  {role:<12} {_size(layer.size):>10}  {layer.digest}", highlight=False, soft_wrap=True
        )
    out = shlex.quote(str(built.output))
    archive = built.output.suffix == ".tar"
    image = f"localhost/{built.ref}" if "/" not in built.ref.split(":")[0] else built.ref
    podman_load = f"podman load -i {out}" if archive else f"podman pull oci:{out}"
    docker_load = (
        f"docker load -i {out}   (Docker 25+; else: skopeo copy oci-archive:{out} "
        f"docker-daemon:{built.ref})"
        if archive
        else f"skopeo copy oci:{out} docker-daemon:{built.ref}"
    )
    run = (
        f"run --rm -p 127.0.0.1:8080:8080 -e KILN_API_KEY --health-cmd "
        f'"{_health_cmd().replace(chr(34), chr(92) + chr(34))}" {image}'
    )
    console.print(
        "\nLoad and run it (API keys are on; the admin key comes from KILN_API_KEY, or from "
        "the file KILN_API_KEY_FILE names):\n"
        "  export KILN_API_KEY=$(openssl rand -hex 24)\n"
        f"  {podman_load}\n  podman {run}\n"
        f"  {docker_load}\n  docker {run}\n"
        f'  curl -H "x-api-key: $KILN_API_KEY" http://127.0.0.1:8080/<api> ...',
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _health_cmd() -> str:
    from kiln.build.image import HEALTH_CMD

    return HEALTH_CMD


def _push(output: Path, ref: str, say: Any) -> None:
    """Copy the result to a registry with skopeo, where one is reachable."""
    if shutil.which("skopeo") is None:
        raise CliError(
            "--push needs skopeo (Debian/Ubuntu: sudo apt-get install skopeo); the image is "
            f"built at {output}",
            1,
        )
    source = f"oci-archive:{output}" if output.suffix == ".tar" else f"oci:{output}"
    target = ref if "://" in ref else f"docker://{ref}"
    say(f"push: skopeo copy {source} {target} ...")
    result = subprocess.run(["skopeo", "copy", source, target], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["skopeo failed"])[-1]
        raise CliError(
            f"could not push to {ref}: {last}. Check that the registry is reachable from here "
            f"and that you are logged in (skopeo login); the image is built at {output}",
            1,
        )
    say(f"push: {ref} done")
