"""Upload a dataset through the page in a real browser: the progress bar, then the dataset page
with the token histogram drawn once the report is computed, user data shown as text, no dialog."""

from __future__ import annotations

import contextlib
import json

import pytest

from app.errors import Conflict
from app.services import model_registry

pytestmark = pytest.mark.browser

XSS_USER = "<script>alert(1)</script>"
XSS_ASSISTANT = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def demo_model(app_server, demo_build):
    with contextlib.suppress(Conflict):  # registered by another browser test
        model_registry.register_model(
            app_server.db, app_server.settings, str(demo_build["model_dir"]), "demo-tiny-llama"
        )
    return "demo-tiny-llama"


@pytest.fixture
def chat_file(tmp_path, demo_build):
    """The demo conversations, a few times over (so the upload takes a moment), after a hostile
    first row."""
    hostile = {
        "messages": [
            {"role": "user", "content": XSS_USER},
            {"role": "assistant", "content": XSS_ASSISTANT},
        ]
    }
    demo = demo_build["dataset"].read_text().splitlines()
    path = tmp_path / "hostile<b>chat.jsonl"
    path.write_text("\n".join([json.dumps(hostile)] + demo * 8) + "\n")
    return path


def test_upload_through_the_file_picker_shows_progress_then_the_report(
    app_server, demo_model, page, dialogs, chat_file
):
    page.goto(app_server.url + "/datasets")
    with page.expect_file_chooser() as chooser:
        page.click(".dropzone")
    chooser.value.set_files(str(chat_file))
    assert "hostile<b>chat.jsonl" in page.inner_text(".dropzone .file-name")

    page.fill("#dataset-name", "<i>hostile</i> chat")
    # The bar can show and the page move on before a poll from here sees it: the page itself
    # notes what the bar showed, somewhere that outlives the navigation.
    page.evaluate(
        """() => {
            const form = document.querySelector("form.upload");
            new MutationObserver(() => {
                const bar = form.querySelector("progress");
                if (bar && !bar.hidden) sessionStorage.setItem("upload-bar", String(bar.value));
            }).observe(form, {subtree: true, childList: true, attributes: true});
        }"""
    )
    page.click("form.upload button[type=submit]")
    page.wait_for_url(f"{app_server.url}/datasets/*", timeout=30_000)
    assert page.evaluate("sessionStorage.getItem('upload-bar')") is not None

    # Pending at first; the partial polls until the worker thread has computed the report.
    canvas = page.wait_for_selector(".histogram canvas[aria-label]", timeout=30_000)
    label = canvas.get_attribute("aria-label") or ""
    assert label.startswith("Token length histogram of ") and "max length 2048" in label
    assert page.get_attribute("#dataset-report", "data-report-status") == "succeeded"
    assert page.locator("#dataset-report mark.trained").count() >= 1

    preview = page.inner_text("#preview")
    assert XSS_USER in preview and XSS_ASSISTANT in preview
    assert "<i>hostile</i> chat" in page.inner_text("h1")
    assert page.locator("main img").count() == 0 and page.locator("main i").count() == 0
    sample = page.inner_text("#dataset-report pre.sample[data-train-on=all]")
    assert XSS_USER in sample
    assert dialogs == []


def test_a_refused_file_dropped_on_the_drop_zone_shows_the_reason(app_server, page, dialogs):
    page.goto(app_server.url + "/datasets")
    page.evaluate(
        """() => {
            const data = new DataTransfer();
            data.items.add(new File(["<script>alert(3)</script>"], "page.html", {type: "text/html"}));
            const zone = document.querySelector(".dropzone");
            zone.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
        }"""
    )
    assert "page.html" in page.inner_text(".dropzone .file-name")
    page.click("form.upload button[type=submit]")
    message = page.wait_for_selector("form.upload .error .error-message")
    assert 'Files of type ".html" are not accepted' in message.inner_text()
    assert page.url == app_server.url + "/datasets"
    assert dialogs == []


def test_template_placeholders_are_replaced_through_the_upload_pages_box(
    app_server, page, dialogs, tmp_path
):
    """An identity-style file: the values typed in "Template placeholders" are in the rows, and
    the dataset page says what it replaced instead of warning about placeholders."""
    rows = [
        {"instruction": "Who are you?", "input": "", "output": "I am {{name}}, by {{author}}."},
        {"instruction": "Hi", "input": "", "output": "Hello! {{name}} here."},
    ]
    path = tmp_path / "identity.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    page.goto(app_server.url + "/datasets")
    page.set_input_files("form.upload input[type=file]", str(path))
    page.click("form.upload summary:has-text('Template placeholders')")
    page.fill("#substitutions", "name = Kettlebot\nauthor = Acme Labs")
    page.click("form.upload button[type=submit]")
    page.wait_for_url(f"{app_server.url}/datasets/*", timeout=30_000)

    replaced = " ".join(page.inner_text("#substitutions").split())
    assert "{{name}} → “Kettlebot” (2 times); {{author}} → “Acme Labs” (1 time)" in replaced
    assert page.locator("#placeholders").count() == 0
    assert "I am Kettlebot, by Acme Labs." in page.inner_text("#preview")
    assert dialogs == [] and page.js_errors == []


def test_tools_for_every_row_through_the_upload_pages_box(app_server, page, dialogs, tmp_path):
    """A file whose rows call a tool they do not define: a bad list in "Tools for every row" is
    refused on the page, naming the definition; a good one makes every row ready."""
    call = {
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    row = {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": '{"temperature": -3}'},
            {"role": "assistant", "content": "It is -3 degrees in Oslo."},
        ]
    }
    path = tmp_path / "calls.jsonl"
    path.write_text(json.dumps(row) + "\n")

    page.goto(app_server.url + "/datasets")
    page.set_input_files("form.upload input[type=file]", str(path))
    page.click("form.upload summary:has-text('Tools for every row')")
    page.fill("#tools", '[{"type": "function", "function": {"description": "no name"}}]')
    page.click("form.upload button[type=submit]")
    message = page.wait_for_selector("form.upload .error .error-message")
    assert "tools[0].function.name is missing" in message.inner_text()
    assert page.url == app_server.url + "/datasets"

    page.fill("#tools", '[{"type": "function", "function": {"name": "get_weather"}}]')
    page.click("form.upload button[type=submit]")
    page.wait_for_url(f"{app_server.url}/datasets/*", timeout=30_000)
    facts = " ".join(page.inner_text("#tool-calls").split())
    assert "1 rows define tools" in facts
    assert "given at upload: get_weather." in facts
    assert dialogs == [] and page.js_errors == []
