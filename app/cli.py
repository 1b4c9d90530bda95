"""The `tuneboard` command: serve, worker, migrate, demo, doctor, settings.

Commands that need the ML stack (worker, demo, the GPU half of doctor) run it in a child Python
process (`python -m worker...`), so this module and the web server never import torch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from app.settings import LOOPBACK_NAMES, Settings, settings_table_markdown

cli = typer.Typer(
    help="Tuneboard: fine-tune LLMs on your own GPU from the browser.",
    no_args_is_help=True,
    add_completion=False,
)

DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="Data directory.")]


def load_settings(create_dirs: bool = True, **overrides: Any) -> Settings:
    """Settings from the environment plus command-line overrides; exits with the reason if unsafe.
    Creates the data dir's folders unless `create_dirs` is false (doctor only looks)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            typer.secho(f"{where}: {message}" if where else message, fg="red", err=True)
        raise typer.Exit(2) from exc
    # Children (worker, demo builder) read the same settings from the environment.
    os.environ["TUNEBOARD_DATA_DIR"] = str(settings.resolved_data_dir)
    if settings.database_url:
        os.environ["TUNEBOARD_DATABASE_URL"] = settings.database_url
    if create_dirs:
        settings.ensure_dirs()
    return settings


@cli.command()
def migrate(data_dir: DataDirOption = None) -> None:
    """Create or upgrade the database tables."""
    from app.migrate import current_revision, head_revision, upgrade

    settings = load_settings(data_dir=data_dir)
    url = settings.resolved_database_url
    before = current_revision(url)
    upgrade(url)
    if before is None:
        typer.echo(f"Created the database ({_shown_url(settings)}).")
    elif before != head_revision():
        typer.echo(f"Upgraded the database to {head_revision()} ({_shown_url(settings)}).")
    else:
        typer.echo(f"Database is up to date ({_shown_url(settings)}).")


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    data_dir: DataDirOption = None,
    no_worker: Annotated[
        bool, typer.Option("--no-worker", help="Run the web server only.")
    ] = False,
    gpus: Annotated[str, typer.Option(help="GPUs for the supervised worker, e.g. 0 or 0,1.")] = "",
) -> None:
    """Start the dashboard and, unless --no-worker, one supervised worker beside it."""
    import uvicorn

    from app.main import create_app
    from app.migrate import upgrade
    from app.supervisor import WorkerSupervisor

    settings = load_settings(host=host, port=port, data_dir=data_dir)
    upgrade(settings.resolved_database_url)
    supervisor = None
    if not no_worker:
        supervisor = WorkerSupervisor(
            worker_command(gpus, parent_pid=os.getpid()), settings.layout.worker_log
        )
        supervisor.start()
    shown_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    typer.secho(
        f"Tuneboard is running at http://{shown_host}:{settings.port}", fg="green", bold=True
    )
    if not settings.binds_loopback:
        names = ", ".join(dict.fromkeys((*LOOPBACK_NAMES, *settings.allowed_hosts)))
        typer.echo(
            f"Listening beyond this machine: every request needs the token. Requests are answered "
            f"only for the host names {names}; add the name or address people type in the "
            "browser to TUNEBOARD_ALLOWED_HOSTS, a JSON list such as "
            '\'["gpu-box.lan", "192.168.1.20"]\' (this check guards against DNS rebinding).'
        )
    # uvicorn shuts down gracefully on SIGTERM and then raises the signal again with the handler
    # it found. The default one would end this process on the spot and orphan the worker, so the
    # handler it finds turns SIGTERM into an exit that runs the `finally` below.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level="warning",
            timeout_graceful_shutdown=5,
        )
    except KeyboardInterrupt:
        pass  # Ctrl-C: uvicorn has already shut down; stop the worker below
    finally:
        if supervisor is not None:
            supervisor.stop()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def worker_command(gpus: str, parent_pid: int | None = None) -> list[str]:
    """`python -m worker`; with `parent_pid` the worker stops when that process (the server that
    supervises it) is gone, even after a SIGKILL."""
    command = [sys.executable, "-m", "worker"]
    if gpus:
        command += ["--gpus", gpus]
    return [*command, "--parent-pid", str(parent_pid)] if parent_pid else command


@cli.command()
def worker(
    gpu: Annotated[
        int | None, typer.Option(help="Own this one GPU (sets CUDA_VISIBLE_DEVICES).")
    ] = None,
    gpus: Annotated[
        str, typer.Option(help="Own several GPUs, e.g. 0,1 (for multi-GPU jobs).")
    ] = "",
    data_dir: DataDirOption = None,
) -> None:
    """Run a worker: claim queued jobs one at a time and train them on this machine's GPU."""
    if gpu is not None and gpus:
        typer.secho("Give --gpu N (one GPU) or --gpus 0,1 (several), not both.", fg="red", err=True)
        raise typer.Exit(2)
    load_settings(data_dir=data_dir)
    chosen = str(gpu) if gpu is not None else gpus
    command = worker_command(chosen)
    os.execv(command[0], command)


@cli.command()
def demo(
    data_dir: DataDirOption = None,
    if_missing: Annotated[
        bool, typer.Option("--if-missing", help="Only when no model is registered.")
    ] = False,
) -> None:
    """Build the tiny demo model and demo dataset and register them."""
    from app.db import Database
    from app.migrate import upgrade
    from app.services import demo as demo_service
    from app.services import model_registry

    settings = load_settings(data_dir=data_dir)
    upgrade(settings.resolved_database_url)
    db = Database(settings.resolved_database_url)
    if if_missing and model_registry.list_models(db):
        typer.echo("Models are registered already; skipping the demo build.")
        return
    typer.echo("Building the demo model and dataset (about a minute on a CPU)...")
    result = demo_service.install_demo(db, settings)
    typer.secho(
        f"Registered model {result.model_name} and dataset {result.dataset_name}.", fg="green"
    )


Check = tuple[str, str, str, str]  # name, verdict (OK, NOTE or PROBLEM), detail, hint


@cli.command()
def doctor(data_dir: DataDirOption = None) -> None:
    """Check this machine: data dir, database, hub token, GPUs, torch and the ML stack's versions.

    Only looks: creates no folder and no database. Exits 1 when a check finds a PROBLEM.
    """
    settings = load_settings(create_dirs=False, data_dir=data_dir)
    py = sys.version_info
    checks: list[Check] = [
        (
            "Python",
            "OK" if py >= (3, 11) else "PROBLEM",
            f"{py.major}.{py.minor}.{py.micro}",
            "Tuneboard needs Python 3.11 or newer.",
        ),
        *_data_dir_checks(settings),
        _hub_token_check(),
        *_gpu_checks(),
    ]
    width = max(len(c[0]) for c in checks)
    colours = {"OK": "green", "NOTE": "cyan", "PROBLEM": "yellow"}
    for name, verdict, detail, hint in checks:
        mark = typer.style(verdict.ljust(7), fg=colours[verdict])
        typer.echo(f"{mark} {name.ljust(width)}  {detail}")
        if verdict != "OK" and hint:
            typer.echo(f"        {' ' * width}  -> {hint}")
    if any(verdict == "PROBLEM" for _, verdict, _, _ in checks):
        raise typer.Exit(1)


def _data_dir_checks(settings: Settings) -> list[Check]:
    """The data dir, its free disk and its database, looked at without creating any of them."""
    from sqlalchemy.engine import make_url

    from app.migrate import current_revision, head_revision

    folder = settings.resolved_data_dir
    elsewhere = (
        "Run doctor where you run `make run` (the data dir is ./data), or name yours with "
        "--data-dir or TUNEBOARD_DATA_DIR."
    )
    checks: list[Check] = [
        ("Data dir", "OK", str(folder), "")
        if folder.is_dir()
        else ("Data dir", "PROBLEM", f"{folder} (does not exist)", elsewhere),
    ]
    existing = next(p for p in (folder, *folder.parents) if p.is_dir())
    free = shutil.disk_usage(existing).free
    checks.append(
        (
            "Free disk in the data dir",
            "OK" if free > 10 * 1024**3 else "PROBLEM",
            f"{free / 1024**3:.1f} GiB in {existing}",
            "Models and checkpoints need tens of GB; free space or set TUNEBOARD_DATA_DIR.",
        )
    )
    url = settings.resolved_database_url
    database = make_url(url).database
    if url.startswith("sqlite") and not (database and Path(database).is_file()):
        detail, verdict = f"none at {database}", "PROBLEM"
        hint = "`tuneboard migrate` creates it (`make run` does too)."
    else:
        try:
            at, head = current_revision(url), head_revision()
        except Exception as exc:
            at, head = f"unreachable ({type(exc).__name__})", None
        verdict = "OK" if at == head else "PROBLEM"
        detail = _shown_url(settings) + ("" if at == head else f": tables at {at}, code at {head}")
        hint = (
            "Check TUNEBOARD_DATABASE_URL, and that PostgreSQL is running if you use it; "
            "`tuneboard migrate` creates or upgrades the tables."
        )
    checks.append(("Database", verdict, detail, hint))
    return checks


def _hub_token_check() -> Check:
    """Whether hub downloads go out with a token (never the token itself)."""
    from huggingface_hub import get_token

    if get_token() is None:
        return (
            "Hugging Face token",
            "NOTE",
            "none",
            "Gated models (Llama, Gemma, ...) need one: run `hf auth login`, or set HF_TOKEN.",
        )
    source = "HF_TOKEN" if os.environ.get("HF_TOKEN") else "saved by `hf auth login`"
    return ("Hugging Face token", "OK", f"present ({source})", "")


def _gpu_checks() -> list[Check]:
    """Ask a child Python with the ML stack what it sees (this process never imports torch)."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "worker.doctor"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        report = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return [
            (
                "ML stack",
                "PROBLEM",
                "could not be inspected",
                "Install the worker extras: pip install 'tuneboard[worker]'.",
            )
        ]
    return [tuple(check) for check in report["checks"]]  # type: ignore[misc]


@cli.command("settings")
def show_settings(
    markdown: Annotated[bool, typer.Option(help="Print the README table.")] = False,
) -> None:
    """List every setting with its default and what it does."""
    if markdown:
        typer.echo(settings_table_markdown())
        return
    for name, field in Settings.model_fields.items():
        typer.echo(f"TUNEBOARD_{name.upper():28} {field.description}")


def _shown_url(settings: Settings) -> str:
    url = settings.resolved_database_url
    return url.split("@")[-1] if "@" in url else url


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
