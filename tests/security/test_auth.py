"""With a token set, every route of the app needs it: 401 for API, SSE, /v1 and /healthz; a redirect
to /login for pages asked for as HTML. The bearer header and the login cookie both open every route.
"""

from __future__ import annotations

import inspect
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from app.web import security
from app.web.routes import auth
from tests.security.conftest import ORIGIN, TOKEN, all_routes, fill_path, is_page

PUBLIC = {("GET", "/login"), ("POST", "/login"), ("GET", "/static/app.css")}
HTML = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


def protected_routes(app) -> list[tuple[str, str]]:
    return [r for r in all_routes(app) if r not in PUBLIC]


def test_the_docs_and_the_schema_are_among_the_protected_routes(token_app):
    paths = {path for _, path in protected_routes(token_app)}
    assert {"/api/docs", "/api/openapi.json", "/healthz"} <= paths


def test_every_route_answers_401_without_the_token(token_app, anon):
    wrong = []
    for method, template in protected_routes(token_app):
        path = fill_path(template)
        response = anon.request(method, path, headers={"origin": ORIGIN})
        if response.status_code != 401 or response.json()["error"]["code"] != "unauthorized":
            wrong.append(f"{method} {path} -> {response.status_code}")
        elif response.headers.get("www-authenticate") != "Bearer":
            wrong.append(f"{method} {path}: no WWW-Authenticate")
    assert not wrong, wrong


def test_api_routes_answer_401_even_when_a_browser_asks_for_html(token_app, anon):
    """A redirect to a login page is useless to fetch(), EventSource or a script."""
    wrong = []
    for method, template in protected_routes(token_app):
        if is_page(template):
            continue
        path = fill_path(template)
        response = anon.request(method, path, headers={**HTML, "origin": ORIGIN})
        if response.status_code != 401:
            wrong.append(f"{method} {path} -> {response.status_code}")
    assert not wrong, wrong


def test_pages_redirect_to_login_and_come_back(token_app, anon):
    wrong = []
    for method, template in protected_routes(token_app):
        if not is_page(template):
            continue
        path = fill_path(template)
        response = anon.request(method, f"{path}?tab=a b", headers={**HTML, "origin": ORIGIN})
        location = response.headers.get("location", "")
        target = urlsplit(location)
        if response.status_code != 303 or target.path != "/login":
            wrong.append(f"{method} {path} -> {response.status_code} {location}")
        elif parse_qs(target.query).get("next") != [f"{path}?tab=a%20b"]:
            wrong.append(f"{method} {path}: next is {target.query!r}")
    assert not wrong, wrong


def test_htmx_swaps_without_the_token_get_401_and_a_client_redirect(anon):
    """htmx does not swap a 401, and HX-Redirect makes it load the login page as a whole page."""
    response = anon.get("/partials/jobs", headers={"hx-request": "true", "accept": "text/html"})
    assert response.status_code == 401
    assert response.headers["hx-redirect"].startswith("/login")


def test_public_routes_need_no_token(anon):
    assert anon.get("/login", headers=HTML).status_code == 200
    assert anon.get("/static/app.css").status_code == 200


def _not_locked_out(client: TestClient, routes, seeded) -> list[str]:
    wrong = []
    for method, template in routes:
        path = fill_path(template, seeded)
        kwargs = {}
        if method == "POST" and path == f"/api/jobs/{seeded.job_id}/move":
            kwargs["json"] = {"where": "top"}
        response = client.request(method, path, headers={"origin": ORIGIN}, **kwargs)
        login = response.headers.get("location", "").startswith("/login")
        if response.status_code in (401, 403) or login or response.status_code >= 500:
            wrong.append(f"{method} {path} -> {response.status_code}")
    return wrong


def test_the_bearer_token_opens_every_route(token_app, authed, seeded):
    for path in ("/", "/jobs", "/models", "/system", "/api/docs", "/api/openapi.json"):
        assert authed.get(path).status_code == 200, path
    assert authed.get(f"/api/jobs/{seeded.job_id}").json()["id"] == seeded.job_id
    assert not _not_locked_out(authed, protected_routes(token_app), seeded)


def test_the_login_cookie_opens_every_route(token_app, anon, authed, seeded):
    response = anon.post("/login", data={"token": TOKEN, "next": "/jobs"})
    assert response.status_code == 303 and response.headers["location"] == "/jobs"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "Secure" not in cookie  # plain http on loopback: a Secure cookie would never come back
    assert TOKEN not in cookie  # the cookie holds a derived value, not the token
    assert anon.get(f"/jobs/{seeded.job_id}", headers=HTML).status_code == 200
    assert not _not_locked_out(anon, protected_routes(token_app), seeded)


def test_the_login_cookie_is_secure_over_https(token_app):
    with TestClient(token_app, base_url="https://127.0.0.1", follow_redirects=False) as c:
        response = c.post("/login", data={"token": TOKEN}, headers={"origin": "https://127.0.0.1"})
    assert response.status_code == 303
    assert "Secure" in response.headers["set-cookie"]


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": "Bearer not-the-token-at-all-000"},
        {"authorization": f"Bearer {TOKEN}x"},
        {"authorization": f"Bearer {TOKEN[:-1]}"},
        {"authorization": f"Basic {TOKEN}"},
        {"authorization": "Bearer"},
        {"authorization": "Bearer \u00e9\u00e9\u00e9".encode()},
        {"cookie": f"{security.COOKIE_NAME}={TOKEN}"},  # the token itself is not the session
        {"cookie": f"{security.COOKIE_NAME}=; other=1"},
        {"cookie": 'broken="; ' + security.COOKIE_NAME + "=x"},
    ],
)
def test_a_wrong_token_is_refused(anon, headers):
    assert anon.get("/api/jobs", headers=headers).status_code == 401


def test_the_login_cookie_survives_other_sites_cookies(anon):
    """Cookies are per host, not per port: other apps on localhost add theirs, some malformed.
    One bad cookie must not hide ours."""
    value = security.session_value(TOKEN)
    jar = f'other={{"json": "value"}}; {security.COOKIE_NAME}={value}; x=1'
    assert anon.get("/api/jobs", headers={"cookie": jar}).status_code == 200


def test_a_wrong_login_says_so_and_sets_no_cookie(anon):
    response = anon.post("/login", data={"token": "wrong-wrong-wrong-wrong"})
    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    assert "That token is not right" in response.text


def test_tokens_are_compared_in_constant_time():
    """Design review as a test: every comparison with the token goes through `same_secret`, which
    hashes both sides and uses hmac.compare_digest (never ==, which stops at the first differing
    byte; compare_digest alone would still leak the length). Timing it would be flaky."""
    assert "hmac.compare_digest(" in inspect.getsource(security.same_secret)
    for function in (security.SecurityMiddleware._authenticated, auth.login):
        source = inspect.getsource(function)
        assert "same_secret(" in source, function
        assert "==" not in source.replace('== "', ""), function


@pytest.mark.parametrize(
    "target",
    [
        "//evil.com",
        "https://evil.com",
        "http:evil.com",
        "/\\evil.com",
        "\\\\evil.com",
        "/\t/evil.com",
        "/\n/evil.com",
        " //evil.com",
        "javascript:alert(1)",
        "///evil.com",
        "/%2F/evil.com",
        "evil.com",
    ],
)
def test_login_next_never_leaves_the_site(anon, target):
    response = anon.post("/login", data={"token": TOKEN, "next": target})
    assert response.status_code == 303
    location = response.headers["location"]
    parts = urlsplit(location.replace("\\", "/"))
    assert not parts.scheme and not parts.netloc, location
    assert location.startswith("/") and not location.startswith(("//", "/\\")), location
    page = anon.get("/login", params={"next": target})
    assert 'name="next" value="/' in page.text
    assert "evil.com" not in page.text or target == "/%2F/evil.com"


def test_login_next_keeps_a_local_path_and_its_query(anon):
    response = anon.post("/login", data={"token": TOKEN, "next": "/jobs/3?tab=log"})
    assert response.headers["location"] == "/jobs/3?tab=log"
