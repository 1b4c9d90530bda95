"""A real worker loop whose child is the real training entry: `python -m tests.fakes.real_worker`.

The child is `python -m worker.run` (the real recipe), or the module named by
`TUNEBOARD_TEST_CHILD` (e.g. `tests.fakes.hooked_training`: the real recipe with a fault hook).
The worker's GPUs are `TUNEBOARD_TEST_GPUS` (e.g. "0"); unset, none (the child trains on the
CPU). No inference server unless `TUNEBOARD_TEST_INFERENCE=1` (the worker's own, as in production:
its URL and secret go into the worker row, where the web server finds them).
"""

from __future__ import annotations

import logging
import os
import sys

from app.settings import Settings
from worker.loop import run_worker

if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stdout,
    )
    child = os.environ.get("TUNEBOARD_TEST_CHILD", "worker.run")
    run_worker(
        Settings(),
        gpus=os.environ.get("TUNEBOARD_TEST_GPUS", ""),
        child_command=[sys.executable, "-m", child],
        inference=os.environ.get("TUNEBOARD_TEST_INFERENCE") == "1",
    )
