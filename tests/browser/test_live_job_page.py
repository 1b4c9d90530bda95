"""A job page in a real browser while a writer process records metrics the way the worker does."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from app import queue
from devkit.live_server import ROOT
from devkit.simulated_run import finish, metric_row, resume, start_running_job, write_metrics

pytestmark = pytest.mark.browser


def writer(
    server,
    claim,
    first: int,
    rows: int,
    interval: float,
    *,
    end: bool = False,
    rewards=False,
    cpu=False,
):
    """A separate process writing metric rows to the server's database file, like a worker."""
    command = [
        sys.executable,
        "-m",
        "devkit.simulated_run",
        server.database_url,
        str(claim.job_id),
        str(claim.attempt),
        "--first",
        str(first),
        "--rows",
        str(rows),
        "--interval",
        str(interval),
    ]
    command += ["--finish"] if end else []
    command += ["--cpu"] if cpu else []
    return subprocess.Popen([*command, "--preference"] if rewards else command, cwd=ROOT)


def points(page, chart: str = "loss") -> int:
    return int(page.get_attribute(f".chart[data-chart={chart}]", "data-points") or 0)


def wait_points(page, predicate, timeout: float = 15.0, chart: str = "loss") -> int:
    deadline = time.monotonic() + timeout
    n = points(page, chart)
    while time.monotonic() < deadline:
        n = points(page, chart)
        if predicate(n):
            return n
        page.wait_for_timeout(100)
    raise AssertionError(f"{chart} chart stuck at {n} points")


# Per chart on the page, per uPlot series after x: how many points it holds (not null).
DRAWN = """() => {
  const out = {};
  window.tuneboard.feeds.forEach((feed) => feed.charts.forEach((chart) => {
    out[chart.el.getAttribute("data-chart")] = chart.plot.data.slice(1).map(
      (ys) => ys.filter((y) => y != null).length);
  }));
  return out;
}"""


# The loss chart's x values: the steps it draws.
LOSS_STEPS = """() => {
  let steps = null;
  window.tuneboard.feeds.forEach((feed) => feed.charts.forEach((chart) => {
    if (chart.el.getAttribute("data-chart") === "loss") steps = Array.from(chart.plot.data[0]);
  }));
  return steps;
}"""


def wait_until(check, timeout: float = 10.0) -> None:
    """Poll from Python: the page's CSP (no eval) rules out wait_for_function strings."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def db_rows(db, job_id: int) -> int:
    return len(queue.metrics_after(db, job_id, 0, limit=1_000_000))


def test_loss_chart_gains_points_live_without_a_reload(live_server, server_db, page, screenshots):
    claim = start_running_job(server_db, "live loss", total=400)
    write_metrics(server_db, claim, 1, 5)
    header_fetches: list[str] = []
    page.on("request", lambda r: header_fetches.append(r.url) if "/header" in r.url else None)
    metric_fetches: list[str] = []
    page.on("request", lambda r: metric_fetches.append(r.url) if "/metrics" in r.url else None)
    page.goto(f"{live_server.url}/jobs/{claim.job_id}")
    wait_points(page, lambda n: n == 5)
    page.evaluate("window.__same_page = true")

    proc = writer(live_server, claim, 6, 120, 0.04)
    try:
        wait_points(page, lambda n: n >= 40)
        # The header follows `progress` events: its step moves without a reload, and without
        # refetching the header partial (only `status` events, on connect and on a real change,
        # do that: one fetch per open page per step would be 50 requests a step for 50 pages).
        wait_until(lambda: int(page.text_content("#job-header .step") or 0) >= 30)
        assert len(header_fetches) <= 2, header_fetches
        page.wait_for_timeout(300)  # let uPlot paint the last frame
        page.screenshot(path=str(screenshots / "job-page.png"))  # the viewport: header and charts
    finally:
        proc.wait(30)
    assert wait_points(page, lambda n: n == 125) == 125
    assert page.evaluate("window.__same_page") is True
    assert metric_fetches == []  # the rows came over the event stream only
    assert page.get_attribute(".chart[data-chart=loss]", "data-status") == "running"
    assert "ETA" in page.text_content("#job-header .eta")
    assert page.js_errors == []


def test_a_cpu_run_charts_process_memory_live_in_place_of_vram(
    live_server, server_db, page, screenshots
):
    """A run on the CPU reads no card: its page draws the training process's resident memory,
    labelled, and no empty VRAM box (docs/job-page-cpu.png under `make screenshots`)."""
    claim = start_running_job(server_db, "demo on the CPU", total=300)
    queue.update_progress(
        server_db,
        claim.job_id,
        claim.attempt,
        compute_mode="fp32 LoRA on the CPU (no CUDA device)",
        memory_policy="off",
        memory_policy_reason="no CUDA device: activations stay in CPU memory",
    )
    write_metrics(server_db, claim, 1, 5, cpu=True)
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(f"{live_server.url}/jobs/{claim.job_id}")
    titles = [" ".join(t.split()) for t in page.locator(".charts .card h2").all_inner_texts()]
    assert "Process memory (RSS, GiB)" in titles and "VRAM (GiB)" not in titles
    assert page.locator(".chart[data-chart=vram]").count() == 0
    wait_points(page, lambda n: n == 5, chart="rss")

    proc = writer(live_server, claim, 6, 80, 0.03, cpu=True)
    try:
        wait_points(page, lambda n: n >= 60, chart="rss")
        page.wait_for_timeout(300)  # let uPlot paint the last frame
        page.screenshot(path=str(screenshots / "job-page-cpu.png"))
    finally:
        proc.wait(30)
    wait_points(page, lambda n: n == 85, chart="rss")
    drawn = page.evaluate(DRAWN)
    assert drawn["rss"] == [85]  # one line, every row
    legend = " ".join(page.locator(".chart[data-chart=rss]").inner_text().split())
    assert "RSS" in legend
    assert (screenshots / "job-page-cpu.png").stat().st_size > 10_000
    assert page.js_errors == []


def test_reload_mid_run_shows_the_whole_history(live_server, server_db, page):
    claim = start_running_job(server_db, "reloaded", total=400)
    write_metrics(server_db, claim, 1, 10)
    page.goto(f"{live_server.url}/jobs/{claim.job_id}")
    wait_points(page, lambda n: n == 10)
    proc = writer(live_server, claim, 11, 80, 0.03, end=True)
    try:
        wait_points(page, lambda n: n >= 30)
        page.reload()
        after_reload = wait_points(page, lambda n: n >= 30)
        assert after_reload >= 30  # history up to the reload, not just what came after it
    finally:
        proc.wait(30)
    assert wait_points(page, lambda n: n == 90) == db_rows(server_db, claim.job_id)
    loss = ".chart[data-chart=loss]"
    wait_until(lambda: page.get_attribute(loss, "data-status") == "succeeded")
    wait_until(lambda: page.get_attribute("#job-header", "data-status") == "succeeded")
    assert page.js_errors == []


def test_server_killed_and_restarted_mid_run_the_page_fills_the_gap(live_server, server_db, page):
    claim = start_running_job(server_db, "server crash", total=400)
    write_metrics(server_db, claim, 1, 5)
    page.goto(f"{live_server.url}/jobs/{claim.job_id}")
    wait_points(page, lambda n: n == 5)
    proc = writer(live_server, claim, 6, 150, 0.03)
    try:
        wait_points(page, lambda n: n >= 25)
        live_server.kill()  # SIGKILL: no goodbye to the open stream
        frozen = points(page)
        time.sleep(1.5)  # the worker keeps writing while the server is down
        assert db_rows(server_db, claim.job_id) > frozen + 5
        live_server.start()
    finally:
        proc.wait(30)
    rows = db_rows(server_db, claim.job_id)
    assert rows == 155
    assert wait_points(page, lambda n: n == rows, timeout=30) == rows
    assert page.js_errors == []


def test_a_resume_seen_live_leaves_one_point_a_step_the_latest_attempts(
    live_server, server_db, page
):
    """Attempt 1 logs steps 1..55 (evals at 25 and 50) and dies; attempt 2 resumes from the
    checkpoint at step 49 and logs 50..60 without an eval yet: the eval at step 50 was of
    weights that are gone, so it leaves the chart with the rest of attempt 1's steps 50..55."""
    claim = start_running_job(server_db, "resumed live", total=60)
    write_metrics(server_db, claim, 1, 55)
    page.goto(f"{live_server.url}/jobs/{claim.job_id}")
    wait_points(page, lambda n: n == 55)
    again = resume(server_db, claim)
    rows = [metric_row(step, seed=1.0) | {"eval_loss": None} for step in range(50, 61)]
    assert queue.record_metrics(server_db, again.job_id, again.attempt, rows)
    wait_points(page, lambda n: n == 60)
    page.wait_for_timeout(300)  # uPlot takes the columns on the next frame
    assert page.evaluate(LOSS_STEPS) == list(range(1, 61))
    assert page.evaluate(DRAWN)["loss"] == [60, 60, 1]  # loss, smoothed, the eval at step 25
    assert page.js_errors == []


def test_compare_page_overlays_two_finished_jobs(live_server, server_db, page):
    ids = []
    for name, count in (("short run", 40), ("long run", 60)):
        claim = start_running_job(server_db, name)
        write_metrics(server_db, claim, 1, count)
        finish(server_db, claim)
        ids.append(claim.job_id)
    page.goto(f"{live_server.url}/jobs")
    for job_id in ids:
        page.check(f"#compare-{job_id}")
    page.click("#compare-form button[type=submit]")
    page.wait_for_url("**/jobs/compare?**")
    loss = ".chart[data-chart=compare][data-series=loss]"
    page.wait_for_selector(f"{loss}[data-series-count]")
    assert page.get_attribute(loss, "data-series-count") == "2"
    assert page.get_attribute(loss, "data-points") == "60"
    assert page.locator(f"{loss} .u-legend .u-series").count() == 3  # x + two runs
    assert page.locator(".compare-config tr.differs").count() >= 2
    assert page.js_errors == []


def test_a_dpo_job_charts_rewards_margin_and_accuracy_live(live_server, server_db, page):
    claim = start_running_job(server_db, "dpo live", total=400, method="dpo")
    write_metrics(server_db, claim, 1, 10, preference=True)
    page.goto(f"{live_server.url}/jobs/{claim.job_id}")
    wait_points(page, lambda n: n == 10, chart="reward_margin")
    proc = writer(live_server, claim, 11, 40, 0.02, end=True, rewards=True)
    try:
        wait_points(page, lambda n: n == 50, chart="reward_margin")
    finally:
        proc.wait(30)
    page.wait_for_timeout(300)  # uPlot takes the columns on the next frame
    drawn = page.evaluate(DRAWN)
    # train series at every step; eval series at the eval steps (25 and 50)
    assert drawn["reward_margin"] == [50, 2]
    assert drawn["rewards"] == [50, 50, 2, 2]
    assert drawn["reward_accuracy"] == [50, 2]
    assert drawn["loss"][0] == 50 and drawn["vram"][0] == 50
    rewards = ".chart[data-chart=rewards] .u-legend .u-series"
    assert page.locator(rewards).count() == 5  # x + chosen, rejected, eval chosen, eval rejected
    assert page.js_errors == []


def test_an_sft_job_page_has_no_reward_charts(live_server, server_db, page):
    claim = start_running_job(server_db, "sft only")
    write_metrics(server_db, claim, 1, 5)
    finish(server_db, claim)
    page.goto(f"{live_server.url}/jobs/{claim.job_id}")
    wait_points(page, lambda n: n == 5)
    assert page.locator(".chart[data-chart=loss]").get_attribute("data-status") == "succeeded"
    for chart in ("reward_margin", "rewards", "reward_accuracy"):
        assert page.locator(f".chart[data-chart={chart}]").count() == 0
    assert page.js_errors == []


def test_compare_page_overlays_the_rewards_of_a_dpo_run(live_server, server_db, page):
    ids = []
    for name, method in (("sft run", "sft"), ("dpo run", "dpo")):
        claim = start_running_job(server_db, name, method=method)
        write_metrics(server_db, claim, 1, 30, preference=method == "dpo")
        finish(server_db, claim)
        ids.append(claim.job_id)
    page.goto(f"{live_server.url}/jobs/compare?ids={ids[0]},{ids[1]}")
    margin = ".chart[data-chart=compare][data-series=reward_margin]"
    page.wait_for_selector(f"{margin}[data-series-count]")
    assert page.get_attribute(margin, "data-series-count") == "1"  # the sft run has none
    assert page.get_attribute(margin, "data-points") == "30"
    accuracy = ".chart[data-chart=compare][data-series=eval_reward_accuracy]"
    page.wait_for_selector(f"{accuracy}[data-series-count]")
    assert page.get_attribute(accuracy, "data-points") == "1"  # one eval step (25)
    assert page.js_errors == []
