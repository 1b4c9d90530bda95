"""Numbers a client sends that no 64-bit database integer can hold (or that are not numbers at
all) are a 4xx naming the field, never a 500; and the keep-alive connection goes on serving."""

from __future__ import annotations

import http.client
import json
import socket
import typing
from collections.abc import Iterator
from pathlib import Path

import annotated_types
import httpx
import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel

from app.db import Database
from app.main import create_app
from app.settings import Settings
from devkit.live_server import LiveServer
from devkit.simulated_run import start_running_job

SQL_INT_MAX = 2**63 - 1
HUGE = "9" * 25
ENORMOUS = "9" * 5000  # past Python's int() digit limit too


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(tmp_path_factory.mktemp("numbers") / "data").start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def job_id(server: LiveServer) -> Iterator[int]:
    db = Database(server.database_url)
    yield start_running_job(db).job_id
    db.dispose()


def on_one_connection(port: int, *requests: bytes) -> list[tuple[int, bytes]]:
    """Send requests one after another on one keep-alive connection; each answer is read before
    the next request goes out (a connection the server closed fails the next read)."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        for request in requests:
            s.sendall(request)
            response = http.client.HTTPResponse(s)
            response.begin()
            answers.append((response.status, response.read()))
    return answers


def get(path: str, **headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Accept: application/json"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def assert_names(status: int, body: bytes, field: str) -> None:
    assert 400 <= status < 500, (status, body[:300])
    error = json.loads(body)["error"]
    assert field in error["message"], error
    assert error["hint"]


@pytest.mark.parametrize("value", [HUGE, ENORMOUS])
def test_an_sse_after_too_large_is_422_and_the_connection_goes_on(server, job_id, value):
    bad, good = on_one_connection(
        server.port, get(f"/api/jobs/{job_id}/events?after={value}"), get("/healthz")
    )
    assert_names(*bad, "after")
    assert good[0] == 200


@pytest.mark.parametrize("value", [HUGE, ENORMOUS, "\xb2", "-5", "abc"])
def test_a_bad_last_event_id_is_422_and_the_connection_goes_on(server, job_id, value):
    bad, good = on_one_connection(
        server.port, get(f"/api/jobs/{job_id}/events", last_event_id=value), get("/healthz")
    )
    assert_names(*bad, "Last-Event-ID")
    assert good[0] == 200


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (f"/api/jobs/{HUGE}", "job_id"),
        (f"/api/jobs/1/metrics?after={HUGE}", "after"),
        (f"/api/jobs/compare?ids=1,{HUGE}", "ids"),
        ("/api/jobs/compare?ids=1,%C2%B2", "ids"),
        (f"/api/jobs/compare?ids={ENORMOUS}", "ids"),
    ],
)
def test_other_numbers_too_large_are_4xx_naming_the_field(server, path, field):
    bad, good = on_one_connection(server.port, get(path), get("/healthz"))
    assert_names(*bad, field)
    assert good[0] == 200


@pytest.mark.parametrize("value", [ENORMOUS, HUGE, "\xb2"])
def test_a_huge_max_seq_len_in_the_report_form_is_4xx_naming_the_field(server, value):
    upload = httpx.post(
        server.url + "/api/datasets",
        files={"file": ("t.jsonl", b'{"text": "hello"}\n{"text": "again"}\n')},
    )
    assert upload.status_code == 201, upload.text
    url = f"{server.url}/datasets/{upload.json()['id']}/report"
    form = {"base_model": "sim-model", "max_seq_len": value}
    plain = httpx.post(url, data=form, headers={"accept": "text/html"})
    assert 400 <= plain.status_code < 500, plain.text[:300]
    assert "max_seq_len" in plain.text
    swapped = httpx.post(url, data=form, headers={"accept": "text/html", "hx-request": "true"})
    assert swapped.status_code == 200  # htmx swaps 2xx only: the form shows the error in place
    assert "max_seq_len" in swapped.text


@pytest.mark.parametrize("path", ["/api/jobs", "/v1/chat/completions"])
def test_a_5000_digit_number_in_a_json_body_is_a_4xx_with_a_hint(server, path):
    body = '{"name": "a", "model": "a", "messages": [], "max_steps": ' + ENORMOUS + "}"
    response = httpx.post(
        server.url + path, content=body, headers={"content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500
    assert response.json()["error"]["hint"]


# --- every integer a route reads has a bound the database can hold --------------------------------


def _is_int(annotation: object) -> bool:
    return annotation is int or int in typing.get_args(annotation)


def _upper_bound(metadata: list[object]) -> int | None:
    for item in metadata:
        if isinstance(item, annotated_types.Le):
            return int(item.le)  # type: ignore[call-overload]
        if isinstance(item, annotated_types.Lt):
            return int(item.lt) - 1  # type: ignore[call-overload]
    return None


def _unbounded_in_model(model: type[BaseModel], where: str) -> Iterator[str]:
    for name, field in model.model_fields.items():
        if _is_int(field.annotation) and (_upper_bound(field.metadata) or 2**64) > SQL_INT_MAX:
            yield f"{where}.{name}"
        for arg in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                yield from _unbounded_in_model(arg, f"{where}.{name}")


def _unbounded(dependant: Dependant, where: str) -> Iterator[str]:
    params = [
        *dependant.path_params,
        *dependant.query_params,
        *dependant.header_params,
        *dependant.cookie_params,
    ]
    for param in params:
        info = param.field_info
        if _is_int(info.annotation) and (_upper_bound(info.metadata) or 2**64) > SQL_INT_MAX:
            yield f"{where} {param.name}"
    for param in dependant.body_params:
        for arg in (param.field_info.annotation, *typing.get_args(param.field_info.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                yield from _unbounded_in_model(arg, f"{where} body")
    for sub in dependant.dependencies:
        yield from _unbounded(sub, where)


def _api_routes(routes: list[typing.Any]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):  # an included router (FastAPI keeps it nested)
            yield from _api_routes(route.original_router.routes)


def test_every_integer_a_route_reads_is_bounded_to_a_64_bit_database_integer(tmp_path: Path):
    app = create_app(Settings(data_dir=tmp_path / "data", database_url=""))
    routes = list(_api_routes(app.routes))
    assert any(r.path == "/api/jobs/{job_id}/events" for r in routes)
    unbounded = [
        problem
        for route in routes
        for problem in _unbounded(route.dependant, f"{sorted(route.methods)} {route.path}")
    ]
    assert unbounded == []
