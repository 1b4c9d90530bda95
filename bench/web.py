"""Dashboard under load: N open job-page streams while a "training" process writes metric rows.

Runs on any machine (no GPU). It starts a real server (uvicorn subprocess, SQLite file in a temp
data dir), a running job (the same queue calls the worker makes), and then twice runs a writer
process for --seconds: a loop of one simulated training step (--step-ms of CPU work in Python) and
one `record_metrics` + `update_progress`, like the worker's metric sink at logging_every=1:

  1. with no clients (baseline),
  2. with --clients SSE streams open on the job (as many open job pages) and a page-GET loop.

Printed: the writer's steps/s and per-write time in both phases (its slowdown is the cost of the
open pages to training), the insert-to-client latency of every row at every client (p50/p95/max),
whether every client got every row exactly once, and job-page GET latency (p50/p99) while streaming.

    python bench/web.py [--clients 50] [--seconds 20] [--step-ms 20] [--pin]

--pin gives the writer a CPU core of its own and the server and clients the rest, as on a host
with a core to spare for the dashboard: the slowdown is then what the open pages cost the writer
through the database, not a share of its core (without it, on a 2-core machine, the 50 clients
and the server take turns with the writer on the same cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from app.db import Database  # noqa: E402
from app.queue import Claim  # noqa: E402
from devkit.live_server import LiveServer  # noqa: E402
from devkit.simulated_run import metric_row, start_running_job  # noqa: E402


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# --- the writer process ---------------------------------------------------------------------------


def work(n: int) -> int:
    """A fixed amount of CPU work: the Python side of a training step."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def calibrate(step_ms: float) -> int:
    n = 100_000
    t0 = time.perf_counter()
    work(n)
    return max(1, int(n * step_ms / 1000 / (time.perf_counter() - t0)))


def run_writer(url: str, job_id: int, attempt: int, first: int, seconds: float, work_n: int):
    from app import queue

    db = Database(url)
    claim = Claim(job_id=job_id, attempt=attempt, config={})
    writes: list[float] = []
    computes: list[float] = []
    step = first
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        work(work_n)
        computes.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        queue.record_metrics(db, claim.job_id, claim.attempt, [metric_row(step)])
        queue.update_progress(db, claim.job_id, claim.attempt, progress_step=step)
        writes.append(time.perf_counter() - t0)
        step += 1
    elapsed = time.perf_counter() - started
    print(
        json.dumps(
            {
                "steps": len(writes),
                "elapsed": elapsed,
                "writes": writes,
                "computes": computes,
                "next": step,
            }
        )
    )


def writer_phase(server: LiveServer, claim: Claim, first: int, args) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--writer",
            server.database_url,
            str(claim.job_id),
            str(claim.attempt),
            str(first),
            str(args.seconds),
            str(args.work_n),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        preexec_fn=(lambda: os.sched_setaffinity(0, args.writer_cpus)) if args.pin else None,
    )
    return json.loads(out.stdout)


# --- clients ----------------------------------------------------------------------------------


def received_at_latency(data: str, now: float) -> tuple[int, float]:
    row = json.loads(data)
    created = datetime.fromisoformat(row["created_at"])
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return row["id"], now - created.timestamp()


async def sse_client(client, url, header_url, after, ready, stop, out):
    """One open job page: the stream, plus the header fetch htmx makes on each `status` event."""
    fetches: set[asyncio.Task] = set()
    ids: list[int] = []
    latencies: list[float] = []
    async with client.stream("GET", url, headers={"last-event-id": str(after)}) as response:
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "metric":
                row_id, latency = received_at_latency(line[5:].strip(), time.time())
                ids.append(row_id)
                latencies.append(latency)
            elif line.startswith("data:") and event == "status":
                if not ready.done():
                    ready.set_result(True)
                else:
                    task = asyncio.create_task(client.get(header_url))
                    fetches.add(task)
                    task.add_done_callback(fetches.discard)
            elif line == "" and stop.is_set():
                break
    for task in list(fetches):
        task.cancel()
    await asyncio.gather(*fetches, return_exceptions=True)
    out.append((ids, latencies))


async def page_getter(client, url, stop, out):
    while not stop.is_set():
        t0 = time.perf_counter()
        response = await client.get(url, headers={"accept": "text/html"})
        out.append(time.perf_counter() - t0)
        assert response.status_code == 200
        await asyncio.sleep(0.1)


async def loaded_phase(server: LiveServer, claim: Claim, first: int, after: int, args) -> dict:
    url = f"{server.url}/api/jobs/{claim.job_id}/events"
    header_url = f"{server.url}/partials/jobs/{claim.job_id}/header"
    limits = httpx.Limits(max_connections=args.clients * 2 + 10)
    results: list[tuple[list[int], list[float]]] = []
    page_times: list[float] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        loop = asyncio.get_running_loop()
        readies = [loop.create_future() for _ in range(args.clients)]
        tasks = [
            asyncio.create_task(sse_client(client, url, header_url, after, r, stop, results))
            for r in readies
        ]
        await asyncio.wait_for(asyncio.gather(*readies), 60)
        async with httpx.AsyncClient(timeout=60) as pages:
            getter = asyncio.create_task(
                page_getter(pages, f"{server.url}/jobs/{claim.job_id}", stop, page_times)
            )
            writer = await asyncio.to_thread(writer_phase, server, claim, first, args)
            await asyncio.sleep(2)  # let the last rows reach everyone
            stop.set()
            await getter
        await asyncio.sleep(args.keepalive + 1)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"writer": writer, "clients": results, "pages": page_times}


def merge(runs: list[dict]) -> dict:
    return {
        "steps": sum(r["steps"] for r in runs),
        "elapsed": sum(r["elapsed"] for r in runs),
        "writes": [x for r in runs for x in r["writes"]],
        "computes": [x for r in runs for x in r["computes"]],
    }


def nxt_id(db: Database) -> int:
    from sqlalchemy import func, select

    from app.models import Metric

    with db.read() as s:
        return s.execute(select(func.max(Metric.id))).scalar() or 0


def baseline_pages(server: LiveServer, claim: Claim, n: int = 100) -> list[float]:
    times = []
    with httpx.Client(timeout=30) as client:
        for _ in range(n):
            t0 = time.perf_counter()
            client.get(f"{server.url}/jobs/{claim.job_id}", headers={"accept": "text/html"})
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--step-ms", type=float, default=20.0)
    parser.add_argument("--keepalive", type=float, default=1.0, help="server keepalive (s)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating no-clients/clients runs")
    parser.add_argument("--pin", action="store_true", help="the writer on a core of its own")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) < 2:
        parser.error("--pin needs at least 2 CPU cores")
    args.writer_cpus, others = {cpus[-1]}, set(cpus[:-1])
    if args.pin:
        os.sched_setaffinity(0, others)  # the clients, and the server started below
    args.work_n = calibrate(args.step_ms)

    with tempfile.TemporaryDirectory() as tmp:
        server = LiveServer(
            Path(tmp) / "data", TUNEBOARD_SSE_KEEPALIVE_SECONDS=str(args.keepalive)
        ).start()
        try:
            db = Database(server.database_url)
            claim = start_running_job(db, "bench", total=1_000_000)
            idle_pages = baseline_pages(server, claim)
            bases, loadeds, nxt = [], [], 1
            for _ in range(args.rounds):  # alternate, so disk and machine noise hit both arms
                bases.append(writer_phase(server, claim, nxt, args))
                nxt = bases[-1]["next"]
                loadeds.append(asyncio.run(loaded_phase(server, claim, nxt, nxt_id(db), args)))
                nxt = loadeds[-1]["writer"]["next"]
            streams_left = server.live_streams()
        finally:
            server.stop()

    base = merge([b for b in bases])
    writer = merge([r["writer"] for r in loadeds])
    latencies = [x for r in loadeds for _, lat in r["clients"] for x in lat]
    complete = sum(
        1
        for r in loadeds
        for ids, _ in r["clients"]
        if len(ids) == r["writer"]["steps"] and len(set(ids)) == len(ids) and ids == sorted(ids)
    )
    loaded = {"pages": [x for r in loadeds for x in r["pages"]]}
    expected = writer["steps"]
    base_rate = base["steps"] / base["elapsed"]
    loaded_rate = writer["steps"] / writer["elapsed"]
    rows = [
        ("open streams (clients)", "0", str(args.clients)),
        ("writer steps/s", f"{base_rate:.1f}", f"{loaded_rate:.1f}"),
        (
            "writer slowdown",
            "-",
            f"{(1 - loaded_rate / base_rate) * 100:+.2f}% fewer steps/s",
        ),
        (
            "record_metrics+update_progress ms (mean / p95)",
            f"{statistics.mean(base['writes']) * 1e3:.2f} / {pct(base['writes'], 95) * 1e3:.2f}",
            f"{statistics.mean(writer['writes']) * 1e3:.2f} / {pct(writer['writes'], 95) * 1e3:.2f}",
        ),
        (
            "insert -> client latency ms (p50 / p95 / max)",
            "-",
            f"{pct(latencies, 50) * 1e3:.0f} / {pct(latencies, 95) * 1e3:.0f} / "
            f"{max(latencies) * 1e3:.0f}",
        ),
        (
            "simulated step compute ms (mean)",
            f"{statistics.mean(base['computes']) * 1e3:.2f}",
            f"{statistics.mean(writer['computes']) * 1e3:.2f}",
        ),
        ("rows delivered", "-", f"{len(latencies)} ({expected} rows x {args.clients})"),
        (
            "clients with every row once, in order",
            "-",
            f"{complete} / {args.clients * args.rounds}",
        ),
        (
            "job page GET ms (p50 / p99)",
            f"{pct(idle_pages, 50) * 1e3:.1f} / {pct(idle_pages, 99) * 1e3:.1f}",
            f"{pct(loaded['pages'], 50) * 1e3:.1f} / {pct(loaded['pages'], 99) * 1e3:.1f} "
            f"({len(loaded['pages'])} GETs)",
        ),
        ("server streams after clients left", "-", json.dumps(streams_left)),
    ]
    print(
        f"\nbench/web.py: {args.clients} clients, {args.seconds:.0f} s per phase, "
        f"{args.step_ms:.0f} ms CPU per simulated step, {args.rounds} rounds"
        + (f", writer pinned to CPU {cpus[-1]}, the rest to {sorted(others)}" if args.pin else "")
        + "\n"
    )
    print("| measure | no clients | with clients |\n|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a} | {b} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--writer":
        url, job, attempt, first, seconds, step_ms = sys.argv[2:8]
        run_writer(url, int(job), int(attempt), int(first), float(seconds), int(step_ms))
    else:
        main()
