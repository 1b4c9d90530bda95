"""docker-compose.yml: the services a new user starts, read as Compose reads them (merge keys
resolved). `docker-compose config` validates the file where Compose is installed; this runs
everywhere."""

from __future__ import annotations

from pathlib import Path

import yaml

from app.cli import cli

REPO = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def subcommands() -> set[str]:
    return {c.name or (c.callback.__name__ if c.callback else "") for c in cli.registered_commands}


def test_every_service_runs_a_real_tuneboard_command_on_the_shared_volume():
    services = compose()["services"]
    assert {"migrate", "web", "worker", "postgres"} <= set(services)
    for name in ("migrate", "web", "worker"):
        service = services[name]
        assert service["command"][0] in subcommands(), (name, service["command"])
        assert "tuneboard-data:/data" in service["volumes"]
        assert service["environment"]["TUNEBOARD_DATA_DIR"] == "/data"
        assert "TUNEBOARD_DATABASE_URL" in service["environment"]
    assert services["web"]["command"] == ["serve", "--no-worker", "--host", "0.0.0.0"]
    assert "TUNEBOARD_TOKEN" in services["web"]["environment"]
    assert "TUNEBOARD_ALLOWED_HOSTS" in services["web"]["environment"]
    assert services["worker"]["command"] == ["worker", "--gpu", "0"]
    assert "HF_TOKEN" in services["worker"]["environment"]  # gated models download in the worker
    for name in ("web", "worker"):
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }


def test_the_worker_reserves_nvidia_gpus_and_postgres_is_a_profile():
    services = compose()["services"]
    (device,) = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in services["web"]  # the web server needs no GPU
    assert services["postgres"]["profiles"] == ["postgres"]
    text = (REPO / "docker-compose.yml").read_text()
    assert "postgresql+psycopg://tuneboard:tuneboard@postgres:5432/tuneboard" in text
    # The commented one-worker-per-GPU example.
    assert '#   command: ["worker", "--gpu", "1"]' in text


def test_the_image_installs_the_worker_extras_and_ignores_local_data():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.12-slim" in dockerfile
    assert '".[worker]"' in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"data", ".venv", ".git"} <= set(ignored)
