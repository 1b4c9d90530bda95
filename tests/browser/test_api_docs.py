"""/api/docs renders the API reference in a real browser under the strict CSP (no CDN, no inline
script): the operations are listed and no script error or CSP violation is reported."""

import pytest

pytestmark = pytest.mark.browser


def test_the_api_reference_renders_under_the_csp(app_server, page):
    violations: list[str] = []
    page.on(
        "console",
        lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None,
    )
    page.goto(app_server.url + "/api/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)
    assert "Tuneboard" in page.inner_text(".swagger-ui .info")
    assert page.locator(".opblock-summary-path", has_text="/api/jobs").count() > 0
    assert page.locator(".opblock-summary-path", has_text="/v1/completions").count() > 0
    assert page.js_errors == []
    assert violations == []
