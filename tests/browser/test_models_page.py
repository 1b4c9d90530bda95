"""The Models page's register form in a real browser: its inputs look like every other form's."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser

LOOK = """(selector) => {
    const style = getComputedStyle(document.querySelector(selector));
    return {
        padding: style.paddingLeft, border: style.borderTopWidth + " " + style.borderTopStyle,
        radius: style.borderTopLeftRadius, font: style.fontSize, color: style.borderTopColor,
    };
}"""


def test_the_register_inputs_are_styled_like_the_other_forms(app_server, page, dialogs):
    page.goto(app_server.url + "/datasets")
    upload_input = page.evaluate(LOOK, "#dataset-name")

    page.goto(app_server.url + "/models")
    for selector in ("#model-source", "#model-name"):
        assert page.evaluate(LOOK, selector) == upload_input, selector
        # A label above it, and the input as wide as its field (not the browser's 20 characters).
        width = page.evaluate(f"document.querySelector('{selector}').offsetWidth")
        field = page.evaluate(f"document.querySelector('{selector}').parentElement.offsetWidth")
        assert width == field, selector
        label = page.locator(f"label[for={selector[1:]}]")
        assert (
            label.count() == 1
            and label.bounding_box()["y"] < page.locator(selector).bounding_box()["y"]
        )
    assert dialogs == [] and page.js_errors == []
