"""`make security`: the security and fault suite on its own, and its totals in one line.

Runs the tests that attack Tuneboard or break it on purpose (the classes in README's "Security and
reliability": auth, Host and Origin, traversal, pickles, remote code, XSS, uploads and body limits,
expansion, malformed numbers, the inference server's secret, disk full, locked and read-only
databases, killed workers, servers, uploads and merges, hung side tasks, two workers on one GPU)
and prints:

    security and fault suite: 212 attacks and faults tried, 212 held, 0 broken, 3 skipped

Exit status: pytest's. `python -m tests.security_tally -x` passes options to pytest.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SUITE = [
    "tests/security",
    "tests/web/test_body_limits.py",
    "tests/web/test_malformed_numbers.py",
    "tests/web/test_faults.py",
    "tests/web/test_server_kill.py",
    "tests/web/test_sse.py",
    "tests/app/test_side_queue.py",
    "tests/app/test_cli.py::test_kill_9_of_serve_then_a_restart_leaves_one_worker_and_one_training_at_a_time",
    "tests/app/test_cli.py::test_a_sigkilled_worker_leaves_no_inference_server_behind",
    "tests/app/test_model_registry.py",
    "tests/services/test_dataset_ingest.py",
    "tests/worker/test_faults.py",
    "tests/worker/test_loop.py",
    "tests/playground/test_side_work.py",
    "tests/worker/test_side_stall.py",
    "tests/playground/test_inference_server.py::test_only_tuneboard_itself_may_call_the_inference_server",
]


def tally(junit: Path) -> dict[str, int]:
    counts = {"tried": 0, "held": 0, "broken": 0, "skipped": 0}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        counts["tried"] += 1
        if case.find("skipped") is not None:
            counts["skipped"] += 1
        elif case.find("failure") is not None or case.find("error") is not None:
            counts["broken"] += 1
        else:
            counts["held"] += 1
    return counts


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as folder:
        junit = Path(folder) / "suite.xml"
        command = [sys.executable, "-m", "pytest", "-q", f"--junitxml={junit}", *SUITE, *argv]
        status = subprocess.run(command, cwd=REPO, check=False).returncode
        if not junit.exists():
            print("security and fault suite: pytest wrote no results", file=sys.stderr)
            return status or 1
        counts = tally(junit)
    print(
        f"security and fault suite: {counts['tried'] - counts['skipped']} attacks and faults "
        f"tried, {counts['held']} held, {counts['broken']} broken, {counts['skipped']} skipped"
    )
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
