"""A lease renewed by a thread while its holder works in this process: a side task a worker runs
by hand (`worker/side_work.py` `lease_kept`) and a Hub import the web ingests
(`app/services/datasets/hub.py`). What a renewal writes, and what fences it, is the caller's."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def renewing(
    renew: Callable[[], bool], every_seconds: float, name: str
) -> Iterator[threading.Event]:
    """Call `renew` every `every_seconds` while the block runs. `renew` returning False means the
    claim is lost: renewal stops and the yielded event is set (the holder may stop early; its
    writes must be fenced anyway). A database error is logged and the next renewal tries again."""
    done, lost = threading.Event(), threading.Event()

    def renewals() -> None:
        while not done.wait(every_seconds):
            try:
                if not renew():
                    lost.set()
                    return
            except SQLAlchemyError:
                log.exception("could not renew the lease of %s; will try again", name)

    renewer = threading.Thread(target=renewals, name=f"lease-{name}", daemon=True)
    renewer.start()
    try:
        yield lost
    finally:
        done.set()
        renewer.join()
