"""The web skeleton: every page renders, errors have one JSON shape, security headers are set."""

import pytest

NAV = ["/", "/datasets", "/jobs", "/playground", "/models", "/system"]


@pytest.mark.parametrize("path", NAV)
def test_every_navigation_page_renders(client, path):
    response = client.get(path, headers={"accept": "text/html"})
    assert response.status_code == 200, response.text[:500]
    for label in ("Datasets", "Jobs", "Playground", "Models", "System"):
        assert f">{label}</a>" in response.text


def test_healthz_reports_database_and_workers(client):
    body = client.get("/healthz").json()
    assert body["database"] == "ok"
    assert body["workers"] == 0 and body["worker_heartbeat_age_seconds"] is None


def test_pages_send_a_content_security_policy(client):
    response = client.get("/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "access-control-allow-origin" not in response.headers


def test_unknown_api_route_gives_the_json_error_shape(client):
    response = client.get("/api/nothing-here")
    assert response.status_code == 404
    error = response.json()["error"]
    assert set(error) == {"code", "message", "hint"}


def test_serving_app_freezes_its_startup_objects(client) -> None:
    """The long-lived heap stays out of full garbage collections (page-latency tail)."""
    import gc

    assert gc.get_freeze_count() > 0
