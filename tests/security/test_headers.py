"""Host and Origin checks (DNS rebinding, cross-site requests), no CORS, and a CSP on every kind of
response, including the middleware's own refusals, static files and unexpected errors."""

from __future__ import annotations

import httpx
import pytest
from fastapi import WebSocket
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from app.settings import Settings
from tests.security.conftest import BEARER, ORIGIN, all_routes, fill_path

CSP_MUST = ("script-src 'self'", "frame-ancestors 'none'", "base-uri 'none'")


def unsafe_routes(app) -> list[tuple[str, str]]:
    return [(m, p) for m, p in all_routes(app) if m in ("POST", "PUT", "PATCH", "DELETE")]


@pytest.mark.parametrize(
    "host", ["evil.com", "evil.com:8000", "127.0.0.1.evil.com", "localhost.", "[::2]:8000", ""]
)
def test_a_foreign_host_is_refused(authed, host):
    response = authed.get("/api/jobs", headers={"host": host})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden_host"


@pytest.mark.parametrize(
    "host", ["localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST", "127.0.0.1"]
)
def test_loopback_hosts_are_accepted(authed, host):
    assert authed.get("/api/jobs", headers={"host": host}).status_code == 200


def test_two_host_headers_are_refused(token_app):
    """Different layers could read different ones (first vs last); refuse the ambiguity."""
    with TestClient(token_app, base_url="http://127.0.0.1") as c:
        request = c.build_request("GET", "/api/jobs", headers=BEARER)
        request.headers = httpx.Headers(
            [
                *[(k, v) for k, v in request.headers.raw if k.lower() != b"host"],
                (b"host", b"127.0.0.1"),
                (b"host", b"evil.com"),
            ]
        )
        assert c.send(request).status_code == 403


def test_configured_hosts_and_an_ipv6_bind_are_accepted(tmp_path):
    from app.main import create_app
    from app.migrate import upgrade

    s = Settings(
        data_dir=tmp_path / "d",
        host="fd00::5",
        token="x" * 20,
        allowed_hosts=["gpu-box.lan:8000", "Tuneboard.Example"],
    )
    s.ensure_dirs()
    upgrade(s.resolved_database_url)
    with TestClient(create_app(s), headers={"authorization": "Bearer " + "x" * 20}) as c:
        for host in ("gpu-box.lan:8000", "gpu-box.lan", "tuneboard.example", "[fd00::5]:8000"):
            assert c.get("/healthz", headers={"host": host}).status_code != 403, host
        assert c.get("/healthz", headers={"host": "evil.com"}).status_code == 403


@pytest.mark.parametrize(
    "origin", ["http://evil.com", "null", "http://127.0.0.1.evil.com", "https://127.0.0.1", "x"]
)
def test_a_foreign_origin_is_refused_on_every_unsafe_route(token_app, authed, origin):
    wrong = []
    for method, template in unsafe_routes(token_app):
        path = fill_path(template)
        response = authed.request(method, path, headers={"origin": origin})
        if response.status_code != 403 or response.json()["error"]["code"] != "forbidden_origin":
            wrong.append(f"{method} {path} -> {response.status_code}")
    assert not wrong, wrong


def test_the_sites_own_origin_is_accepted_on_every_unsafe_route(token_app, authed, seeded):
    wrong = []
    for method, template in unsafe_routes(token_app):
        path = fill_path(template, seeded)
        response = authed.request(method, path, headers={"origin": ORIGIN})
        if response.status_code == 403:
            wrong.append(f"{method} {path}")
    assert not wrong, wrong


def test_no_origin_from_a_non_browser_client_is_allowed(authed, seeded):
    """curl, scripts and the OpenAI client send no Origin and no Sec-Fetch-*; a web page cannot
    make a browser drop both on a cross-site POST, so such a request is not cross-site. The
    token (when set) is what governs it."""
    response = authed.post(f"/api/jobs/{seeded.job_id}/cancel")
    assert response.status_code == 200


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
def test_a_cross_site_fetch_without_origin_is_refused(token_app, authed, site):
    for method, template in unsafe_routes(token_app):
        response = authed.request(method, fill_path(template), headers={"sec-fetch-site": site})
        assert response.status_code == 403, (method, template)


def test_same_origin_fetch_metadata_is_accepted(authed, seeded):
    response = authed.post(
        f"/api/jobs/{seeded.job_id}/cancel", headers={"sec-fetch-site": "same-origin"}
    )
    assert response.status_code == 200


def test_no_response_ever_allows_cross_origin_reads(token_app, authed, anon, seeded):
    for client in (authed, anon):
        for method in ("GET", "OPTIONS"):
            for _, template in all_routes(token_app):
                response = client.request(
                    method,
                    fill_path(template, seeded),
                    headers={"origin": "http://evil.com", "access-control-request-method": "POST"},
                )
                assert "access-control-allow-origin" not in response.headers, template
                assert "access-control-allow-credentials" not in response.headers, template


def _assert_csp(response) -> None:
    csp = response.headers.get("content-security-policy", "")
    for part in CSP_MUST:
        assert part in csp, (response.request.url, response.status_code, csp)
    assert response.headers.get_list("content-security-policy") == [csp]
    assert response.headers["x-content-type-options"] == "nosniff"


def test_every_kind_of_response_has_the_csp(token_app, anon, authed, seeded):
    html = {"accept": "text/html"}
    responses = [
        authed.get("/", headers=html),  # page
        authed.get("/partials/jobs", headers={**html, "hx-request": "true"}),  # partial
        authed.get("/api/jobs"),  # JSON
        authed.get("/api/openapi.json"),
        authed.get("/static/app.css"),  # static file
        authed.get("/static/nothing.css"),  # static 404
        authed.get("/api/jobs/999999"),  # typed error
        authed.get("/jobs/999999", headers=html),  # HTML error page
        authed.get("/api/jobs/not-a-number"),  # 422
        authed.post("/api/jobs", json={"nope": 1}),  # 422 body
        authed.put("/api/jobs"),  # 405
        anon.get("/api/jobs"),  # 401 from the middleware
        anon.get("/jobs", headers=html),  # redirect to /login
        anon.get("/login"),  # public page
        authed.get("/api/jobs", headers={"host": "evil.com"}),  # 403 host
        authed.post("/api/jobs", headers={"origin": "http://evil.com"}),  # 403 origin
    ]
    for response in responses:
        _assert_csp(response)


def test_an_unexpected_error_is_json_without_a_trace_and_has_the_csp(token_app):
    def explode() -> None:
        raise RuntimeError("secret internal detail /home/me/.cache")

    token_app.add_api_route("/api/explode", explode)
    with TestClient(
        token_app, base_url="http://127.0.0.1", raise_server_exceptions=False, headers=BEARER
    ) as c:
        for accept in ("application/json", "text/html"):
            response = c.get("/api/explode", headers={"accept": accept})
            assert response.status_code == 500
            assert response.json()["error"]["code"] == "internal"
            assert "secret internal detail" not in response.text
            assert "Traceback" not in response.text
            _assert_csp(response)


def _add_websocket(app) -> None:
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    app.add_api_websocket_route("/api/ws-probe", echo)


@pytest.mark.parametrize(
    "headers",
    [
        {"host": "127.0.0.1"},  # no token
        {**BEARER, "host": "127.0.0.1", "origin": "http://evil.com"},  # WebSocket hijacking
        {**BEARER, "host": "evil.com"},  # DNS rebinding
    ],
)
def test_websockets_get_the_same_checks(token_app, headers):
    _add_websocket(token_app)
    with (
        TestClient(token_app, base_url="http://127.0.0.1") as c,
        pytest.raises(WebSocketDisconnect),
        c.websocket_connect("/api/ws-probe", headers=headers) as ws,
    ):
        ws.receive_text()


def test_a_websocket_with_the_token_and_our_origin_connects(token_app):
    _add_websocket(token_app)
    with (
        TestClient(token_app, base_url="http://127.0.0.1") as c,
        c.websocket_connect(
            "/api/ws-probe", headers={**BEARER, "host": "127.0.0.1", "origin": ORIGIN}
        ) as ws,
    ):
        assert ws.receive_text() == "hello"
