"""`kiln export kuberay`: write a project's KubeRay and Kubernetes manifests.

The manifests are built by kiln.build.kuberay (pure functions); this module loads the
project, turns every user mistake into one line naming the fix (exit 2, no traceback)
and writes the YAML to stdout or -o FILE.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.markup import escape

from kiln.cli.common import err_console

export_app = typer.Typer(
    help="Write deployment manifests for a project (kiln export kuberay).",
    no_args_is_help=True,
)


def _fail(message: str) -> NoReturn:
    err_console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _note(message: str) -> None:
    err_console.print(f"[dim]Note:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _load(project_dir: Path, file: str | None):  # noqa: ANN202 - kiln.config.Project
    from kiln.config import ConfigError, load_project
    from kiln.control.packaging import read_dotenv

    if not project_dir.is_dir():
        _fail(f"project folder not found: {project_dir}; pass the folder that holds kiln.yaml")
    try:
        return load_project(project_dir, file, env={**os.environ, **read_dotenv(project_dir)})
    except ConfigError as exc:
        first = exc.issues[0].format() if exc.issues else str(exc)
        more = len(exc.issues) - 1
        tail = f" (and {more} more: kiln validate {project_dir} lists them all)" if more else ""
        _fail(f"{first}{tail}")


@export_app.command("kuberay")
def kuberay(
    project_dir: Annotated[Path, typer.Argument(help="Project folder.")] = Path("."),
    file: Annotated[
        str | None, typer.Option("-f", "--file", help="Config file (default kiln.yaml).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write to FILE (default: stdout).")
    ] = None,
    image: Annotated[
        str | None,
        typer.Option(
            help="The project's image as the cluster pulls it, e.g. registry.example.com/"
            "team/app:1 (default: the name `kiln build` gives it)."
        ),
    ] = None,
    namespace: Annotated[
        str | None, typer.Option(help="Namespace to put every object in (default: none set).")
    ] = None,
    store_secret: Annotated[
        str,
        typer.Option(
            help="Secret whose key `url` holds the control plane's PostgreSQL URL "
            "(postgresql+psycopg://...)."
        ),
    ] = "kiln-store",
) -> None:
    """A RayService (Kiln's APIs on Ray Serve) and Kiln's control plane, as YAML."""
    from kiln.build.kuberay import ExportError, dump, image_problem, manifests

    project = _load(project_dir, file)
    if image is None:
        from kiln.build.image import image_name

        image = image_name(project, None)
        _note(
            f"no --image: using {image}, the name `kiln build` gives the image; build it "
            f"with Ray and PostgreSQL's driver and push it (kiln build --extra ray --extra "
            f"postgres --push REF) and pass --image REF so the cluster can pull it"
        )
    elif problem := image_problem(image):
        _fail(problem)
    if not project.apis:
        _note(f"{project.config_file.name} has no realtime APIs: the Serve application is empty")
    try:
        text = dump(manifests(project, image, namespace, store_secret))
    except ExportError as exc:
        _fail(str(exc))
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        _fail(f"cannot write {output}: {exc.strerror or exc}; choose a writable -o path")
    err_console.print(f"Wrote {escape(str(output))}", highlight=False, soft_wrap=True)
