"""Live job streams (Server-Sent Events): one database poller per watched job, shared by every page.

Wire format of `GET /api/jobs/{id}/events` (text/event-stream):

    retry: 1000                          once, first: reconnect after 1 s
    event: metric / id: <row id> / data: <the row as JSON, same fields as /api/jobs/{id}/metrics>
    event: status / data: {"status", "progress_step", "progress_total", "epoch", ...}
    event: progress / data: {"progress_step", "progress_total", "epoch", "eta"}   only the step moved
    event: done / data: {"status": "succeeded"}   the job finished and everything was sent
    : keepalive                          after `sse_keepalive_seconds` without an event

On connect the stream first sends the rows after `Last-Event-ID` (else `?after=`, else 0), then the
job's current status, then live events. No row is skipped or sent twice: a subscriber joins its
job's feed before it reads the backlog, and drops live rows whose id it already sent.

The feed polls while anyone watches (`JobFeed`): one state query and one metrics query per
`sse_poll_seconds`, however many pages are open, and encodes each row once. A `status` event makes
every open page fetch its header partial (htmx), so it is sent only when something besides the
step moved; a step that moved is a `progress` event (at most one a second, with the ETA computed
once for all readers), which the page applies itself without a request. Each reader writes what
queued up since its last wakeup as one chunk: one send per poll, not one per row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from anyio import to_thread
from fastapi import Request

from app.db import Database
from app.services import job_events, job_views
from app.web.templating import duration

log = logging.getLogger("tuneboard.sse")

BATCH = 1000
PROGRESS_EVENT_INTERVAL = 1.0  # seconds between `progress` events (the step moved, nothing else)
PROGRESS_FIELDS = ("progress_step", "epoch")
MAX_QUEUED = 20_000  # a reader this far behind is cut off; it reconnects with Last-Event-ID
RECONNECT_MS = 1000
# Starlette's is_disconnected() costs about a millisecond (anyio formats the task's repr on each
# cancel): once a second per reader, not once per event. StreamingResponse also ends the stream
# as soon as the server reports the disconnect.
DISCONNECT_CHECK_SECONDS = 1.0

Item = tuple[str, int, str]  # (event, id or 0, data)


def encode(event: str, data: str, event_id: int | None = None) -> bytes:
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    return (head + f"data: {data}\n\n").encode()


KEEPALIVE = b": keepalive\n\n"


class JobFeed:
    """Polls one job for new metric rows and state changes, and hands them to its subscribers."""

    def __init__(self, db: Database, job_id: int, poll_seconds: float) -> None:
        self.db = db
        self.job_id = job_id
        self.poll_seconds = poll_seconds
        self.subscribers: set[asyncio.Queue[Item]] = set()
        self.last_id = 0
        self.state: dict[str, Any] | None = None
        self.finished = False
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._last_progress_event = 0.0

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"job-feed-{self.job_id}")

    async def _run(self) -> None:
        while not self.ready.is_set():
            try:
                self.state = await to_thread.run_sync(job_events.job_state, self.db, self.job_id)
                self.last_id = await to_thread.run_sync(
                    job_events.last_metric_id, self.db, self.job_id
                )
                self.finished = self.state is None or bool(self.state["finished"])
                self.ready.set()
            except Exception:
                log.exception("job %s: could not start its feed", self.job_id)
                await asyncio.sleep(self.poll_seconds)
        while not self.finished:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self._poll_once()
            except Exception:
                log.exception("job %s: poll failed; trying again", self.job_id)

    async def _poll_once(self) -> None:
        state, rows = await to_thread.run_sync(
            job_events.poll, self.db, self.job_id, self.last_id, BATCH
        )
        while rows:
            for row_id, data in rows:
                self._broadcast(("metric", row_id, data))
                self.last_id = row_id
            if len(rows) < BATCH:
                break
            rows = await to_thread.run_sync(
                job_events.metric_events_after, self.db, self.job_id, self.last_id, BATCH
            )
        if state is None:  # deleted
            self.finished = True
            self._broadcast(("done", 0, json.dumps({"status": "deleted"})))
            return
        if state != self.state:
            now = time.monotonic()
            moved_only = self.state is not None and all(
                state[k] == self.state[k] for k in state if k not in PROGRESS_FIELDS
            )
            if not moved_only:
                self.state = state
                self._broadcast(("status", 0, status_data(state)))
            elif now - self._last_progress_event >= PROGRESS_EVENT_INTERVAL:
                self.state = state
                self._last_progress_event = now
                eta = await to_thread.run_sync(
                    job_views.eta_of_attempt,
                    self.db,
                    self.job_id,
                    state["attempt"],
                    state["progress_step"],
                    state["progress_total"],
                )
                self._broadcast(("progress", 0, progress_data(state, eta)))
        if state["finished"]:
            self.finished = True
            self._broadcast(("done", 0, json.dumps({"status": state["status"]})))

    def _broadcast(self, item: Item) -> None:
        for queue in list(self.subscribers):
            if queue.qsize() >= MAX_QUEUED:
                queue.put_nowait(("cutoff", 0, ""))
                self.subscribers.discard(queue)
            else:
                queue.put_nowait(item)


def status_data(state: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in state.items() if k != "finished"}, separators=(",", ":"))


def progress_data(state: dict[str, Any], eta_seconds: float | None) -> str:
    """What the page's header needs when only the step moved (`eta` as the header shows it)."""
    eta = f"ETA {duration(eta_seconds)}" if eta_seconds is not None else "ETA estimating…"
    data = {k: state[k] for k in ("progress_step", "progress_total", "epoch")}
    return json.dumps({**data, "eta": eta}, separators=(",", ":"), ensure_ascii=False)


class JobStreams:
    """The feeds of the jobs someone is watching right now (kept in `app.state.job_streams`)."""

    def __init__(self, db: Database, poll_seconds: float, keepalive_seconds: float) -> None:
        self.db = db
        self.poll_seconds = poll_seconds
        self.keepalive_seconds = keepalive_seconds
        self.feeds: dict[int, JobFeed] = {}

    def stats(self) -> dict[str, int]:
        feeds = list(self.feeds.values())  # read from a worker thread too
        return {"feeds": len(feeds), "subscribers": sum(len(f.subscribers) for f in feeds)}

    @contextlib.asynccontextmanager
    async def subscription(self, job_id: int) -> AsyncIterator[tuple[JobFeed, asyncio.Queue[Item]]]:
        """Join the job's feed (started if nobody watches it yet) once it has read the job.

        Left on every way out: a reader whose client disconnects while the feed makes its first
        poll is cancelled inside this block, and would otherwise keep the feed polling forever.
        """
        feed = self.feeds.get(job_id)
        if feed is None:
            feed = self.feeds[job_id] = JobFeed(self.db, job_id, self.poll_seconds)
            feed.start()
        queue: asyncio.Queue[Item] = asyncio.Queue()
        feed.subscribers.add(queue)  # before the backlog is read: nothing falls between
        try:
            await feed.ready.wait()
            yield feed, queue
        finally:
            self.unsubscribe(feed, queue)

    def unsubscribe(self, feed: JobFeed, queue: asyncio.Queue[Item]) -> None:
        feed.subscribers.discard(queue)
        if not feed.subscribers and self.feeds.get(feed.job_id) is feed:
            del self.feeds[feed.job_id]
            if feed.task is not None:
                feed.task.cancel()
        elif feed.finished and self.feeds.get(feed.job_id) is feed:
            del self.feeds[feed.job_id]  # the next reader gets a fresh feed that reads the end

    async def stream(self, request: Request, job_id: int, after: int) -> AsyncIterator[bytes]:
        """The event stream of one reader, from the row after `after` until the job is done."""
        async with self.subscription(job_id) as (feed, queue):
            yield f"retry: {RECONNECT_MS}\n\n".encode()
            sent = after
            while True:  # the backlog, in batches
                rows = await to_thread.run_sync(
                    job_events.metric_events_after, self.db, job_id, sent, BATCH
                )
                if rows:
                    yield b"".join(encode("metric", data, row_id) for row_id, data in rows)
                    sent = rows[-1][0]
                if len(rows) < BATCH:
                    break
            if feed.state is not None:
                yield encode("status", status_data(feed.state))
            if feed.finished and queue.empty():
                status = feed.state["status"] if feed.state else "deleted"
                yield encode("done", json.dumps({"status": status}))
                return
            idle_since = checked = time.monotonic()
            while True:
                wait = min(DISCONNECT_CHECK_SECONDS, self.keepalive_seconds)
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=wait)
                except TimeoutError:
                    item = None
                if item is not None:
                    chunk, sent, end = drain(queue, item, sent)
                    if chunk:
                        yield chunk
                    if end:
                        return
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= self.keepalive_seconds:
                    idle_since = time.monotonic()
                    yield KEEPALIVE
                if time.monotonic() - checked >= DISCONNECT_CHECK_SECONDS:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return

    async def close(self) -> None:
        for feed in list(self.feeds.values()):
            if feed.task is not None:
                feed.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await feed.task
        self.feeds.clear()


def drain(queue: asyncio.Queue[Item], item: Item, sent: int) -> tuple[bytes, int, bool]:
    """`item` and everything queued behind it as one chunk of events: (chunk, last row id sent,
    whether the stream ends). Rows at or below `sent` (already in the backlog) are dropped."""
    parts: list[bytes] = []
    while True:
        kind, row_id, data = item
        if kind == "cutoff":
            return b"".join(parts), sent, True
        if kind == "metric":
            if row_id > sent:
                sent = row_id
                parts.append(encode("metric", data, row_id))
        else:
            parts.append(encode(kind, data))
            if kind == "done":
                return b"".join(parts), sent, True
        if queue.empty():
            return b"".join(parts), sent, False
        item = queue.get_nowait()
