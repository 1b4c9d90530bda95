"""A real worker loop whose child is the training stand-in: `python -m tests.fakes.fake_worker`.

`--gpus 0,1` makes it a worker that owns those GPUs (as `tuneboard worker --gpus 0,1`): it claims
jobs that need that many, and runs them under torchrun like the real worker.
"""

from __future__ import annotations

import argparse
import logging
import sys

from app.settings import Settings
from worker.loop import run_worker

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", default="")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stdout,
    )
    run_worker(
        Settings(),
        gpus=args.gpus,
        child_command=[sys.executable, "-m", "tests.fakes.fake_training"],
        inference=False,  # the playground's server is not what these tests are about
    )
