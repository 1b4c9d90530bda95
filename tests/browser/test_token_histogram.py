"""The token histogram's axis labels, drawn by static/app.js in a real browser: each label sits
at the value it names. The canvas's text calls are recorded as the page draws them."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.browser

RECORD_TEXT = """
window.drawnText = [];
const fillText = CanvasRenderingContext2D.prototype.fillText;
CanvasRenderingContext2D.prototype.fillText = function (text, x, y) {
  window.drawnText.push({ text: String(text), x: x, align: this.textAlign });
  return fillText.apply(this, arguments);
};
"""

# Rows of up to 600 tokens measured against a max length of 2048: the axis runs past 2048.
BINS = [{"lo": lo, "hi": lo + 100, "count": 10 + lo // 100} for lo in range(0, 600, 100)]


def test_the_longest_bins_label_sits_under_its_bar_not_at_the_max_length_marker(live_server, page):
    page.add_init_script(RECORD_TEXT)
    page.goto(live_server.url + "/")
    page.evaluate(
        """([bins]) => {
          const div = document.createElement("div");
          div.className = "histogram";
          div.style.width = "800px";
          div.style.height = "200px";
          div.setAttribute("data-bins", bins);
          div.setAttribute("data-max-len", "2048");
          const box = document.createElement("section");
          box.appendChild(div);
          document.querySelector("main").appendChild(box);
          // What htmx signals after a swap brings a report in: app.js wires what it finds.
          box.dispatchEvent(new CustomEvent("htmx:load", { bubbles: true }));
        }""",
        [json.dumps(BINS)],
    )
    page.wait_for_selector(".histogram canvas[aria-label]")
    texts = page.evaluate("window.drawnText")
    # The last drawing (a resize draws again).
    longest = [t for t in texts if t["text"].startswith("600")][-1]
    marker = [t for t in texts if t["text"] == "max length 2048"][-1]
    first = [t for t in texts if t["text"] == "0" and t["align"] == "left"][-1]
    # 600 of the axis's 0..2089 tokens: under the last bar, well left of the 2048 marker.
    assert longest["x"] < marker["x"] - 300
    share = (longest["x"] - first["x"]) / (marker["x"] - first["x"])
    assert 0.25 < share < 0.35
    assert page.js_errors == []
