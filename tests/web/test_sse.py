"""The job event stream through a real HTTP server (uvicorn subprocess, SQLite file, httpx client)."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app import queue
from app.db import Database
from devkit.live_server import LiveServer
from devkit.simulated_run import finish, start_running_job, write_metrics


@dataclass
class Event:
    event: str = "message"
    data: str = ""
    id: str | None = None
    comments: list[str] = field(default_factory=list)


def events(response: httpx.Response) -> Iterator[Event]:
    """Parse text/event-stream lines; yields each event (comments ride on an Event too)."""
    current = Event()
    for line in response.iter_lines():
        if line == "":
            if current.data or current.event != "message":
                yield current
            current = Event()
        elif line.startswith(":"):
            yield Event(event="comment", comments=[line[1:].strip()])
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                current.event = value
            elif name == "data":
                current.data += value
            elif name == "id":
                current.id = value


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    live = LiveServer(
        tmp_path / "data",
        TUNEBOARD_SSE_POLL_SECONDS="0.1",
        TUNEBOARD_SSE_KEEPALIVE_SECONDS="0.5",
    ).start()
    yield live
    live.stop()


@pytest.fixture
def sim_db(server: LiveServer) -> Iterator[Database]:
    database = Database(server.database_url)
    yield database
    database.dispose()


def db_ids(db: Database, job_id: int) -> list[int]:
    return [m.id or 0 for m in queue.metrics_after(db, job_id, 0, limit=1_000_000)]


def test_rows_written_while_connected_arrive_in_order(server, sim_db):
    claim = start_running_job(sim_db)
    write_metrics(sim_db, claim, 1, 5)
    got: list[dict] = []
    statuses: list[dict] = []
    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{server.url}/api/jobs/{claim.job_id}/events") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        writer = threading.Thread(target=write_metrics, args=(sim_db, claim, 6, 20, 0.01))
        writer.start()
        for e in events(response):
            if e.event == "metric":
                row = json.loads(e.data)
                assert e.id == str(row["id"])
                got.append(row)
            elif e.event == "status":
                statuses.append(json.loads(e.data))
            if len(got) == 25:
                break
        writer.join()
    assert [r["step"] for r in got] == list(range(1, 26))
    assert [r["id"] for r in got] == db_ids(sim_db, claim.job_id)
    api_row = httpx.get(f"{server.url}/api/jobs/{claim.job_id}/metrics").json()["metrics"][0]
    assert got[0] == api_row  # same fields as the metrics API
    assert statuses[0]["status"] == "running" and statuses[0]["progress_total"] == 1000


def test_reconnects_with_last_event_id_get_exactly_the_missing_rows(server, sim_db):
    claim = start_running_job(sim_db)
    write_metrics(sim_db, claim, 1, 10)

    def run() -> None:
        write_metrics(sim_db, claim, 11, 300, 0.003)
        finish(sim_db, claim)

    writer = threading.Thread(target=run)
    writer.start()
    received: list[int] = []
    last: str | None = None
    done = False
    connections = 0
    with httpx.Client(timeout=10) as client:
        while not done:
            connections += 1
            headers = {"last-event-id": last} if last else {}
            url = f"{server.url}/api/jobs/{claim.job_id}/events"
            with client.stream("GET", url, headers=headers) as response:
                taken = 0
                for e in events(response):
                    if e.event == "metric":
                        received.append(int(e.id or 0))
                        last = e.id
                        taken += 1
                        if taken == 37:  # drop the connection mid-run, while rows keep coming
                            break
                    elif e.event == "done":
                        done = True
                        break
    writer.join()
    assert connections > 3
    assert received == db_ids(sim_db, claim.job_id)  # every row once, in order
    assert len(received) == 310


def test_keepalive_comment_when_nothing_happens(server, sim_db):
    claim = start_running_job(sim_db)
    started = time.monotonic()
    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{server.url}/api/jobs/{claim.job_id}/events") as response,
    ):
        for e in events(response):
            if e.event == "comment" and "keepalive" in e.comments:
                break
    assert time.monotonic() - started < 3


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_server_stops_streaming_when_clients_leave(server, sim_db):
    claim = start_running_job(sim_db)
    url = f"{server.url}/api/jobs/{claim.job_id}/events"
    clients = [httpx.Client(timeout=10) for _ in range(3)]
    streams = [c.stream("GET", url) for c in clients]
    readers = [events(s.__enter__()) for s in streams]  # kept: dropping one closes it
    for reader in readers:
        assert next(reader).event == "status"  # connected and served
    assert server.live_streams() == {"feeds": 1, "subscribers": 3}
    for s, c in zip(streams, clients, strict=True):
        s.__exit__(None, None, None)
        c.close()
    assert wait_for(lambda: server.live_streams() == {"feeds": 0, "subscribers": 0}), (
        server.live_streams()
    )


def test_stream_ends_after_the_job_finishes(server, sim_db):
    claim = start_running_job(sim_db)
    write_metrics(sim_db, claim, 1, 3)
    seen: list[str] = []
    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{server.url}/api/jobs/{claim.job_id}/events") as response,
    ):
        threading.Timer(
            0.3, lambda: (write_metrics(sim_db, claim, 4, 2), finish(sim_db, claim))
        ).start()
        seen = [e.event for e in events(response) if e.event != "comment"]  # ends by itself
    assert seen.count("metric") == 5
    assert seen[-2:] == ["status", "done"]
    assert wait_for(lambda: server.live_streams()["subscribers"] == 0)


def test_events_of_an_unknown_job_is_a_json_404(server):
    response = httpx.get(f"{server.url}/api/jobs/999/events")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_a_moving_step_is_a_progress_event_and_other_changes_a_status_event(server, sim_db):
    """Only `status` makes an open page refetch its header (htmx); a step that moved is a
    `progress` event the page applies itself, carrying the header's ETA text."""
    claim = start_running_job(sim_db)
    write_metrics(sim_db, claim, 1, 3)
    seen: list[Event] = []
    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{server.url}/api/jobs/{claim.job_id}/events") as response,
    ):
        reader = events(response)
        assert next(e for e in reader if e.event == "status")  # the state on connect
        threading.Timer(0.2, write_metrics, args=(sim_db, claim, 4, 5, 0.05)).start()
        for e in reader:
            if e.event != "comment":
                seen.append(e)
            if e.event == "progress":
                break
        threading.Timer(0.2, queue.request_cancel, args=(sim_db, claim.job_id)).start()
        for e in reader:
            if e.event not in ("comment", "metric", "progress"):
                seen.append(e)
                break
    kinds = [e.event for e in seen]
    assert "status" not in kinds[:-1]  # moving steps alone never made a status event
    progress = json.loads(next(e for e in seen if e.event == "progress").data)
    assert set(progress) == {"progress_step", "progress_total", "epoch", "eta"}
    assert 4 <= progress["progress_step"] <= 8 and progress["progress_total"] == 1000
    assert progress["eta"].startswith("ETA ")
    assert seen[-1].event == "status"
    assert json.loads(seen[-1].data)["cancel_requested"] is True


def test_rows_queued_together_go_out_as_one_chunk_without_repeats() -> None:
    import asyncio

    from app.web.sse import drain

    async def run() -> list[tuple[bytes, int, bool]]:
        q: asyncio.Queue = asyncio.Queue()
        for item in [("metric", 5, "{}"), ("metric", 6, "{}"), ("progress", 0, "{}")]:
            q.put_nowait(item)
        first = drain(q, ("metric", 4, "{}"), 4)  # 4 came with the backlog: not again
        q.put_nowait(("metric", 8, "{}"))
        q.put_nowait(("done", 0, "{}"))
        q.put_nowait(("metric", 9, "{}"))  # never after done
        return [first, drain(q, ("metric", 7, "{}"), first[1])]

    (chunk, sent, end), (chunk2, sent2, end2) = asyncio.run(run())
    assert chunk == (
        b"event: metric\nid: 5\ndata: {}\n\nevent: metric\nid: 6\ndata: {}\n\n"
        b"event: progress\ndata: {}\n\n"
    )
    assert (sent, end) == (6, False)
    assert chunk2.count(b"event: metric") == 2 and chunk2.endswith(b"event: done\ndata: {}\n\n")
    assert (sent2, end2) == (8, True)


def test_streams_dropped_while_their_feed_starts_leave_nothing_behind(server, sim_db):
    """Hundreds of readers that leave before the first poll of their job's feed: every
    subscription is released and no feed keeps polling the database."""
    claims = [start_running_job(sim_db, f"run {n}") for n in range(10)]
    sockets = []
    for n in range(300):
        s = socket.create_connection(("127.0.0.1", server.port))
        request = (
            f"GET /api/jobs/{claims[n % 10].job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        s.sendall(request.encode())
        sockets.append(s)
    for s in sockets:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset
        s.close()
    assert wait_for(lambda: server.live_streams() == {"feeds": 0, "subscribers": 0}), (
        server.live_streams()
    )
