"""A real worker loop whose child is the training stand-in: `python -m tests.fakes.fake_worker`."""

from __future__ import annotations

import logging
import sys

from app.settings import Settings
from worker.loop import run_worker

if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stdout,
    )
    run_worker(
        Settings(),
        gpus="",
        child_command=[sys.executable, "-m", "tests.fakes.fake_training"],
        inference=False,  # the playground's server is not what these tests are about
    )
