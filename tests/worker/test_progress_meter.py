"""The progress a silent step reports (worker/progress_meter.py): a file a real process writes,
bytes this process reads, said in the stage as they grow; nothing more once the step hangs, so the
side loop's stall watchdog sees it. The writes go to a list, as a task's row would get them."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from worker.progress_meter import POLL_SECONDS, reading, writing

# A converter that writes 4 chunks of 64 KiB, a look of the meter or more apart, then hangs (until
# the test ends it).
WRITE_THEN_HANG = f"""
import sys, time
with open(sys.argv[1], "wb") as out:
    for _ in range(4):
        out.write(b"x" * 65536)
        out.flush()
        time.sleep({2 * POLL_SECONDS})
    print("hung", flush=True)
    time.sleep(600)
"""


def test_a_step_writing_a_file_reports_its_size_until_it_hangs(tmp_path: Path):
    target = tmp_path / "model-f16.gguf"
    said: list[dict[str, Any]] = []
    converter = subprocess.Popen(
        [sys.executable, "-c", WRITE_THEN_HANG, str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        with writing(
            lambda **fields: said.append(fields), "converting to GGUF", target, total=4 * 65536
        ):
            assert converter.stdout is not None and converter.stdout.readline() == "hung\n"
            time.sleep(3 * POLL_SECONDS)
            hung_at = len(said)
            time.sleep(3 * POLL_SECONDS)
    finally:
        converter.kill()
        converter.wait()
    stages = [fields["stage"] for fields in said]
    assert stages[-1] == "converting to GGUF: 256.0 KB of about 256.0 KB written"
    assert len(stages) >= 2 and len(set(stages)) == len(stages)  # each time a new size
    assert len(said) == hung_at  # the hung converter wrote nothing more, so nothing was said


def test_a_step_reading_reports_the_bytes_this_process_read(tmp_path: Path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w" * (4 * 1024 * 1024))
    said: list[dict[str, Any]] = []
    with (
        reading(lambda **fields: said.append(fields), "loading the base model"),
        weights.open("rb") as f,
    ):
        while f.read(1024 * 1024):
            time.sleep(1.5 * POLL_SECONDS)
    assert said, "nothing said while 4 MB were read"
    last = said[-1]["stage"]
    assert last.startswith("loading the base model: ") and last.endswith(" MB read")
    assert float(last.split(": ")[1].split()[0]) >= 3.0  # at least 3 of the 4 MB, read slowly


def test_a_progress_write_that_fails_ends_the_metering_not_the_step(tmp_path: Path):
    target = tmp_path / "out"
    calls = []

    def stale(**fields: Any) -> None:
        calls.append(fields)
        raise RuntimeError("the claim went stale")

    with writing(stale, "saving", target):
        for size in range(1, 5):
            target.write_bytes(b"x" * size * 1024)
            time.sleep(1.5 * POLL_SECONDS)
    assert target.stat().st_size == 4 * 1024  # the step ran to its end
    assert len(calls) == 1
