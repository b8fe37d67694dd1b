"""`kiln`: init a project, validate it, serve it, call it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kiln import __version__
from kiln.cli.common import console, err_console, fail
from kiln.cli.tables import OUTPUT_HELP


def _flags_without_types() -> None:
    """Typer prints `<bool>` beside every flag in --help (--help itself included), as if
    a flag took a value; a flag takes none, so it shows no type."""
    from typer.core import TyperOption

    original = TyperOption.display_type_rich
    if getattr(original, "_kiln", False):
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else original(self, ctx)

    display_type_rich._kiln = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_without_types()

app = typer.Typer(
    name="kiln",
    help="Turn trained models into web services: kiln init, kiln serve, kiln predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # -h as well as --help, on every command (sub-commands inherit it).
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"kiln {__version__}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            help="Print Kiln's version and exit.",
            callback=_print_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """Turn trained models into web services: kiln init, kiln serve, kiln predict."""


@app.command()
def version() -> None:
    """Print Kiln's version."""
    console.print(__version__)


@app.command()
def init(
    name: Annotated[str, typer.Argument(help="Folder (and API name) to create.")],
    template: Annotated[
        str,
        typer.Option(
            "--template",
            "-t",
            help="Starting point: python, onnx or hub (a CellStrat Hub project).",
        ),
    ] = "python",
) -> None:
    """Create a new project folder with kiln.yaml, a handler, a model folder and a Dockerfile."""
    from kiln.cli.scaffold import create_project

    dest = Path(name)
    try:
        files = create_project(dest, template, name=dest.name)
    except (FileExistsError, ValueError) as exc:
        fail(str(exc), 2)
    console.print(f"Created [bold]{dest}[/] from the {template} template:")
    for file in files:
        console.print(f"  {dest / file}")
    sample = "--file sample.json" if template != "hub" else "'\"hello\"'"
    console.print(
        f"\nNext:\n  cd {dest}\n  kiln serve\n"
        f"  kiln predict {dest.name} {sample}   (in another terminal)"
    )


@app.command()
def validate(
    project_dir: Annotated[Path, typer.Argument(help="Project folder.")] = Path("."),
    file: Annotated[
        str | None, typer.Option("-f", "--file", help="Config file (default kiln.yaml).")
    ] = None,
    load: Annotated[
        bool,
        typer.Option(
            "--load",
            help="Also load each API in a worker, as kiln serve does, and report what fails.",
        ),
    ] = False,
) -> None:
    """Check kiln.yaml (or cortex.yaml) and report every problem; --load also loads each API."""
    project = _load(project_dir, file)
    from kiln.cli.tables import api_table

    console.print(
        f"[green]{project.config_file.name} is valid[/]: {describe_apis(project)}",
        highlight=False,
    )
    if project.apis or project.batch_apis:
        console.print(api_table([*project.apis, *project.batch_apis]))
    if load:
        from kiln.cli.validate_cmd import report_loads

        raise typer.Exit(report_loads(project))


def describe_apis(project: Any) -> str:
    """ "1 API", "2 APIs (3 versions)", "1 Batch API", "1 API and 1 Batch API" or "no APIs"."""

    def count(n: int, what: str) -> str:
        return f"{n} {what}{'s' if n != 1 else ''}"

    parts = []
    names = {api.name for api in project.apis}
    if names:
        versions = (
            f" ({count(len(project.apis), 'version')})" if len(project.apis) > len(names) else ""
        )
        parts.append(count(len(names), "API") + versions)
    if project.batch_apis:
        parts.append(count(len(project.batch_apis), "Batch API"))
    return " and ".join(parts) or "no APIs"


def _load(project_dir: Path, file: str | None):  # noqa: ANN202 - returns kiln.config.Project
    from kiln.config import ConfigError, load_project

    try:
        return load_project(project_dir, file)
    except ConfigError as exc:
        count = len(exc.issues)
        err_console.print(
            f"[bold red]The configuration has {count} problem{'s' if count != 1 else ''}:[/]",
            highlight=False,
        )
        for line in str(exc).splitlines():
            err_console.print(f"  {line}", highlight=False, markup=False)
        raise typer.Exit(2) from None


from kiln.cli.server_cmd_edge import (  # noqa: E402 - the edge flags `kiln server` shares
    BodyIdleTimeoutOption,
    BusyPollOption,
    GrpcCertOption,
    GrpcKeyOption,
    GrpcPortOption,
    HeaderTimeoutOption,
    KeepaliveTimeoutOption,
    MaxConnectionsOption,
    MaxHeaderBytesOption,
    OtlpEndpointOption,
    OtlpProtocolOption,
)


@app.command()
def serve(
    project_dir: Annotated[Path, typer.Argument(help="Project folder.")] = Path("."),
    file: Annotated[str | None, typer.Option("-f", "--file", help="Config file.")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            envvar="KILN_PORT",
            help="Inference port; 0 picks a free one (default: $KILN_PORT, else 8080).",
        ),
    ] = 8080,
    management_port: Annotated[
        int,
        typer.Option(
            envvar="KILN_MANAGEMENT_PORT",
            help="Management port (TorchServe management API); 0 picks a free one "
            "(default: $KILN_MANAGEMENT_PORT, else 8081).",
        ),
    ] = 8081,
    metrics_port: Annotated[
        int,
        typer.Option(
            envvar="KILN_METRICS_PORT", help="Prometheus metrics port; 0 picks a free one."
        ),
    ] = 8082,
    model_store: Annotated[
        Path | None,
        typer.Option(
            help="Folder that POST /models may register from (default: <home>/model-store)."
        ),
    ] = None,
    enable_model_api: Annotated[
        bool,
        typer.Option(
            "--enable-model-api",
            help="Allow TorchServe's register (POST /models) and delete routes.",
        ),
    ] = False,
    home: Annotated[
        Path | None, typer.Option(help="State folder (logs, server.json); default: temporary.")
    ] = None,
    auth: Annotated[
        bool,
        typer.Option(
            help="Require API keys. The admin key: $KILN_API_KEY_FILE's content, else "
            "$KILN_API_KEY, else a new one written to <home>/admin.key."
        ),
    ] = False,
    allow_unauthenticated: Annotated[
        bool,
        typer.Option(
            "--allow-unauthenticated",
            help="Serve on a non-loopback --host without API keys (e.g. inside a container).",
        ),
    ] = False,
    sandbox: Annotated[
        bool,
        typer.Option(
            "--sandbox",
            help="Run workers in the sandbox `kiln server` uses (own filesystem view, no "
            "network, a clean environment, kernel limits).",
        ),
    ] = False,
    header_timeout_s: HeaderTimeoutOption = None,
    body_idle_timeout_s: BodyIdleTimeoutOption = None,
    keepalive_timeout_s: KeepaliveTimeoutOption = None,
    max_connections: MaxConnectionsOption = None,
    max_header_bytes: MaxHeaderBytesOption = None,
    webhook_allow: Annotated[
        list[str] | None,
        typer.Option(
            "--webhook-allow",
            help="A network (CIDR) AsyncAPI webhooks may call although it is loopback, "
            "link-local or private (repeatable): --webhook-allow 127.0.0.1/32.",
        ),
    ] = None,
    grpc_port: GrpcPortOption = None,
    grpc_tls_cert: GrpcCertOption = None,
    grpc_tls_key: GrpcKeyOption = None,
    otlp_endpoint: OtlpEndpointOption = None,
    otlp_protocol: OtlpProtocolOption = None,
    busy_poll_us: BusyPollOption = None,
) -> None:
    """Serve every API of a project on this machine, in the foreground (Ctrl-C stops)."""
    from kiln.cli.serve_cmd import run_serve
    from kiln.cli.server_cmd_edge import given_edge

    edge = given_edge(locals())
    from kiln.control.server import is_loopback

    if not is_loopback(host) and not allow_unauthenticated and not auth:
        fail(
            f"refusing to serve on {host} without authentication: anyone who can reach this "
            f"machine could call your models. Use --host 127.0.0.1, or pass "
            f"--allow-unauthenticated if a gateway in front of Kiln checks callers",
            2,
        )
    from kiln.cli.serve_cmd import given_admin_key

    admin_key = given_admin_key() if auth else None
    project = _load(project_dir, file)
    raise typer.Exit(
        run_serve(
            project,
            host,
            port,
            home,
            management_port,
            enable_model_api,
            metrics_port,
            model_store,
            auth,
            sandbox,
            edge,
            admin_key,
            webhook_allow,
            grpc_port,
            grpc_tls_cert,
            grpc_tls_key,
            otlp_endpoint,
            otlp_protocol,
            busy_poll_us,
        )
    )


@app.command()
def predict(
    target: Annotated[str, typer.Argument(help="An API name, or a full URL.")],
    payload: Annotated[
        str | None, typer.Argument(help="JSON body, a JSON file, or - for stdin.")
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", "-F", help="Send this file.")] = None,
    url: Annotated[
        str | None, typer.Option("--url", help="Server URL (default: the local server).")
    ] = None,
    api_version: Annotated[
        str | None, typer.Option("--version", help="API version to call.")
    ] = None,
    debug: Annotated[bool, typer.Option(help="Log the request's four debug stages.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 120.0,
    env: Annotated[
        str | None, typer.Option("--env", "-e", help="Which server (see `kiln env list`).")
    ] = None,
) -> None:
    """Send one request to an API and print the answer (or the error)."""
    from kiln.cli.predict_cmd import run_predict

    raise typer.Exit(run_predict(target, payload, file, url, api_version, debug, timeout, env))


EnvOption = Annotated[
    str | None,
    typer.Option("--env", "-e", help="Which server (see `kiln env list`; default: local)."),
]


def _cli(action: Any) -> None:
    from kiln.cli.common import run_cli

    run_cli(action)


@app.command()
def deploy(
    project_dir: Annotated[Path, typer.Argument(help="Project folder.")] = Path("."),
    env: EnvOption = None,
    name: Annotated[
        str | None, typer.Option(help="Deployment name (default: kiln.yaml's, else the folder's).")
    ] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Return once uploaded; do not wait for live.")
    ] = False,
) -> None:
    """Pack a project, upload it to the server and roll it out (an unchanged project is a no-op)."""
    from kiln.cli.deploy_cmd import run_deploy

    _cli(lambda: run_deploy(project_dir, None, env, name, not no_wait))


@app.command()
def get(
    api: Annotated[str | None, typer.Argument(help="One API for details.")] = None,
    env: EnvOption = None,
    output: Annotated[str, typer.Option("-o", "--output", help=OUTPUT_HELP)] = "table",
    watch: Annotated[bool, typer.Option("-w", "--watch", help="Refresh every 2 s.")] = False,
) -> None:
    """Show every API with status, replicas, requests by status and latency."""
    from kiln.cli.get_cmd import run_get

    _cli(lambda: run_get(api, env, output, watch))


@app.command()
def logs(
    api: Annotated[str, typer.Argument(help="The API whose log to show.")],
    job_id: Annotated[
        str | None, typer.Argument(help="A batch job: show its log (enqueuing, workers).")
    ] = None,
    env: EnvOption = None,
    follow: Annotated[
        bool, typer.Option("-f", "--follow", help="Keep printing new lines.")
    ] = False,
    tail: Annotated[int, typer.Option(help="How many past lines to show first.")] = 200,
) -> None:
    """Print an API's log (requests, worker output by replica, scaling), or a batch job's."""
    from kiln.cli.get_cmd import run_logs

    _cli(lambda: run_logs(api, env, follow, tail, job_id))


@app.command()
def delete(
    api: Annotated[str, typer.Argument(help="The API to delete.")],
    env: EnvOption = None,
    force: Annotated[bool, typer.Option("-f", "--force", help="Do not ask first.")] = False,
) -> None:
    """Stop serving an API and forget it (asks first unless -f)."""
    from kiln.cli.deploy_cmd import run_delete

    _cli(lambda: run_delete(api, env, force))


@app.command()
def refresh(
    api: Annotated[str, typer.Argument(help="The API whose replicas to restart.")],
    env: EnvOption = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Do not wait for it.")] = False,
) -> None:
    """Restart an API's replicas without downtime (new ones load before old ones stop)."""
    from kiln.cli.deploy_cmd import run_refresh

    _cli(lambda: run_refresh(api, env, not no_wait))


@app.command()
def rollback(
    api: Annotated[str, typer.Argument(help="The API whose deployment to roll back.")],
    revision: Annotated[
        str | None, typer.Argument(help="Revision (default: the previous live one).")
    ] = None,
    env: EnvOption = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Do not wait for it.")] = False,
) -> None:
    """Return an API's deployment to an earlier revision (`kiln get API` lists them)."""
    from kiln.cli.deploy_cmd import run_rollback

    _cli(lambda: run_rollback(api, revision, env, not no_wait))


@app.command()
def traffic(
    api: Annotated[str, typer.Argument(help="The API whose traffic split to show or change.")],
    weights: Annotated[
        list[str] | None,
        typer.Argument(help="VERSION=WEIGHT pairs, e.g. 1=90 2=10 (shares are weight/total)."),
    ] = None,
    reset: Annotated[
        bool, typer.Option("--reset", help="Forget the runtime split: kiln.yaml's applies.")
    ] = False,
    env: EnvOption = None,
    output: Annotated[str, typer.Option("-o", "--output", help="table or json.")] = "table",
) -> None:
    """Show or change how unversioned requests split between an API's versions (no redeploy)."""
    from kiln.cli.traffic_cmd import run_traffic

    _cli(lambda: run_traffic(api, weights or [], reset, env, output))


@app.command()
def build(
    project_dir: Annotated[Path, typer.Argument(help="Project folder.")] = Path("."),
    tag: Annotated[
        str | None,
        typer.Option(
            "-t",
            "--tag",
            help="NAME[:TAG] (default: the folder's name and the "
            "APIs' version, else the revision).",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="PATH.tar: an OCI archive; else an OCI layout "
            "folder (default ./NAME-TAG.oci.tar).",
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(
            help="Base image: an OCI layout or archive path, or a registry "
            "reference (skopeo); default: Debian with Python from mmdebstrap."
        ),
    ] = None,
    suite: Annotated[
        str | None, typer.Option(help="Debian suite of the default base (default: the host's).")
    ] = None,
    context: Annotated[
        Path | None,
        typer.Option(
            help="Write a Docker build context (Dockerfile, project/, model/, "
            "wheels/) to this folder instead, and stop."
        ),
    ] = None,
    deploy: Annotated[
        bool, typer.Option("--deploy", help="Then deploy the same revision (kiln deploy).")
    ] = False,
    push: Annotated[
        str | None, typer.Option(help="Then copy the image to this registry reference (skopeo).")
    ] = None,
    extra: Annotated[
        list[str] | None,
        typer.Option(
            "--extra",
            help="Also install this kiln-serve extra (repeatable): `ray` and `postgres` "
            "for a Ray cluster's image (kiln export kuberay), s3, gcs, http, batch, otel, grpc.",
        ),
    ] = None,
    env: EnvOption = None,
) -> None:
    """Build the project as a runnable, reproducible OCI image (no container daemon needed)."""
    from kiln.cli.build_cmd import run_build

    extras = tuple(extra or ())
    _cli(
        lambda: run_build(
            project_dir, None, tag, output, base, suite, context, deploy, push, env, extras
        )
    )


from kiln.cli.accounts_cmd import keys_app, usage, users_app  # noqa: E402
from kiln.cli.cache_cmd import cache_app  # noqa: E402 - sub-commands register after the app
from kiln.cli.env_cmd import env_app  # noqa: E402
from kiln.cli.server_cmd import server_app  # noqa: E402

app.add_typer(users_app, name="users")
app.add_typer(keys_app, name="keys")
app.command("usage")(usage)
app.add_typer(server_app, name="server")
app.add_typer(env_app, name="env")
app.add_typer(cache_app, name="cache")
from kiln.cli.jobs_cmd import jobs_app  # noqa: E402

app.add_typer(jobs_app, name="jobs")
from kiln.cli.import_cmd import import_mar  # noqa: E402

app.command("import")(import_mar)
from kiln.cli.export_cmd import export_app  # noqa: E402

app.add_typer(export_app, name="export")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
