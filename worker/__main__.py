"""`python -m worker --gpus 0`: run one worker (settings from `TUNEBOARD_*` variables)."""

from __future__ import annotations

import argparse
import logging

from app.settings import Settings
from worker.loop import run_worker


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument(
        "--gpus", default="0", help='GPU indices this worker owns, e.g. "0" or "0,1"; "" for CPU'
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=0,
        help="stop (job checkpointed and requeued) when this process, the supervisor, is gone",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings()
    settings.ensure_dirs()
    run_worker(settings, gpus=args.gpus, parent_pid=args.parent_pid or None)


if __name__ == "__main__":
    main()
