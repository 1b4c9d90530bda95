"""A side task's child that works as a test says, for the stall watchdog's tests.

The side loop runs it in place of a kind's module (the test puts it in
`worker.side_work.CHILDREN`) as `python -m tests.fakes.side_child --task-id N --attempt A`, with
the settings in `TUNEBOARD_*`. It works on the task the loop claimed through the real
`child_main` and `side_queue`, as `FAKE_SIDE_CHILD` says:

- `steps:N:SECONDS`: N steps of progress (`progress_done` of N), one every SECONDS, then the task
  succeeds;
- `stall:N`: N steps at once, then it starts a grandchild (`sleep`, as an export starts llama.cpp's
  converter), writes its pid to `<data dir>/grandchild.pid` and hangs without a word more.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from app import side_queue
from app.db import Database
from app.models import SideWorkStatus
from app.settings import Settings
from worker.side_work import child_main

GRANDCHILD_PID = "grandchild.pid"


def work(settings: Settings, db: Database, claim: side_queue.SideClaim) -> bool:
    how, steps, *rest = os.environ["FAKE_SIDE_CHILD"].split(":")
    total = int(steps)
    for done in range(1, total + 1):
        side_queue.update_progress(db, claim, progress_done=done, progress_total=total)
        if how == "steps":
            time.sleep(float(rest[0]))
    if how == "stall":
        grandchild = subprocess.Popen(["sleep", "600"])
        (settings.layout.root / GRANDCHILD_PID).write_text(str(grandchild.pid))
        time.sleep(600)
    return side_queue.finish(db, claim, SideWorkStatus.succeeded, result={"rows": total})


if __name__ == "__main__":
    sys.exit(child_main("dataset_report", work, None, "A side task for the watchdog's tests."))
