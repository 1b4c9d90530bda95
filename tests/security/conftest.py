"""Fixtures for the security tests: an app started with a token, and a few real records so that
every route with a path parameter has something to find."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.routing import Mount

from app.settings import Settings
from tests.fakes.models import LLAMA_CONFIG, make_model_dir  # noqa: F401 (re-exported)

TOKEN = "correct-horse-battery-staple-42"
ORIGIN = "http://127.0.0.1"
BEARER = {"authorization": f"Bearer {TOKEN}"}

ALPACA_ROWS = b"".join(
    json.dumps({"instruction": f"say {i}", "input": "", "output": f"{i}"}).encode() + b"\n"
    for i in range(12)
)


@pytest.fixture
def token_settings(tmp_path: Path) -> Settings:
    s = Settings(data_dir=tmp_path / "data", database_url="", token=TOKEN)
    s.ensure_dirs()
    return s


@pytest.fixture
def token_app(token_settings: Settings):
    from app.main import create_app
    from app.migrate import upgrade

    upgrade(token_settings.resolved_database_url)
    app = create_app(token_settings)
    yield app
    app.state.db.dispose()


@pytest.fixture
def anon(token_app) -> Iterator[TestClient]:
    """A client without the token (and without following redirects)."""
    with TestClient(token_app, base_url="http://127.0.0.1", follow_redirects=False) as c:
        yield c


@pytest.fixture
def authed(token_app) -> Iterator[TestClient]:
    """A client that sends the token as a bearer header."""
    with TestClient(
        token_app, base_url="http://127.0.0.1", headers=BEARER, follow_redirects=False
    ) as c:
        yield c


@dataclass
class Seeded:
    model: str
    dataset_id: str
    job_id: int


@pytest.fixture
def seeded(authed: TestClient, tmp_path: Path) -> Seeded:
    """One registered model, one ready dataset and one queued job, made through the API."""
    folder = make_model_dir(tmp_path / "models" / "tiny-llama")
    response = authed.post("/api/models", json={"source": str(folder)})
    assert response.status_code == 201, response.text
    response = authed.post("/api/datasets", files={"file": ("rows.jsonl", ALPACA_ROWS)})
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]
    response = authed.post(
        "/api/jobs", json={"dataset_id": dataset_id, "base_model": "tiny-llama", "max_steps": 1}
    )
    assert response.status_code == 201, response.text
    return Seeded(model="tiny-llama", dataset_id=dataset_id, job_id=response.json()["id"])


# --- every route of the app, with its path parameters filled ---------------------------------------

PLACEHOLDER = re.compile(r"\{(\w+)(?::\w+)?\}")


def fill_path(path: str, seeded: Seeded | None = None) -> str:
    values = {
        "job_id": str(seeded.job_id) if seeded else "1",
        "dataset_id": seeded.dataset_id if seeded else "0" * 32,
        "name": seeded.model if seeded else "org/some-model",
        "action": "cancel",
        "report_id": "1",
        "merge_id": "1",
        "session_id": "1",
        "adapter_id": "job-1",
    }
    if path.endswith("/events"):
        # The event stream of a live job stays open until the job ends (the SSE tests cover it);
        # here a job that does not exist gives the route's answer without an endless body.
        values["job_id"] = "999999"
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), "x"), path)


def all_routes(app) -> list[tuple[str, str]]:
    """(method, path template) for every route of `app.routes`: included routers (FastAPI keeps
    them as one entry each), the generated docs and the static mount."""
    found: set[tuple[str, str]] = set()

    def add(path: str, methods: set[str] | None) -> None:
        for method in methods or ():
            if method != "HEAD":
                found.add((method, path))

    for route in app.routes:
        if hasattr(route, "effective_route_contexts"):  # an included APIRouter
            for context in route.effective_route_contexts():
                add(context.path, getattr(context.original_route, "methods", None))
        elif isinstance(route, Mount):
            found.add(("GET", f"{route.path}/app.css"))
        else:
            add(route.path, getattr(route, "methods", None))
    assert len(found) > 20, f"route enumeration looks broken: {sorted(found)}"
    return sorted(found, key=lambda r: (r[1], r[0]))


def is_page(path: str) -> bool:
    return not path.startswith(("/api", "/v1", "/healthz", "/static"))
