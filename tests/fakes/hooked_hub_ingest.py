"""A web process ingesting one Hub import, paused once inside the ingest, for the lease tests.

Run as `python -m tests.fakes.hooked_hub_ingest IMPORT_ID`, with the settings in `TUNEBOARD_*`
(data dir, database, ingest lease). It reads the import as a page does (`hub.settled`), which
ingests it; once the rows have gone into the new dataset's folder and the real ingest is about to
read them, it writes `<data dir>/ingest-paused` and waits until the test writes
`<data dir>/ingest-go`. Meanwhile the test lets leases run out, stops (SIGSTOP) or kills the
process. At the end it prints the import's stage and dataset id.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from app.db import Database
from app.services.datasets import hub, library
from app.settings import Settings

PAUSED = "ingest-paused"
GO = "ingest-go"


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings()
    db = Database(settings.resolved_database_url)
    ingest = library.ingest_dataset
    root = settings.layout.root

    def paused(*args: Any, **kwargs: Any) -> Any:
        (root / PAUSED).touch()
        while not (root / GO).exists():
            time.sleep(0.02)
        return ingest(*args, **kwargs)

    library.ingest_dataset = paused
    task = hub.settled(db, settings, int(argv[0]))
    print(task.stage, task.dataset_id, flush=True)
    db.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
