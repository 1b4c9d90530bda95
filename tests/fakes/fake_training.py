"""A training stand-in: the real child entry (worker.run) with a recipe that only sleeps.

Run as `python -m tests.fakes.fake_training --job-id N --attempt A`. The job's config name picks
the behaviour:

- anything else: 5 quick steps, then an adapter file;
- "fake slow": 60 steps of 0.1 s (checkpoints each step; resumes from its checkpoint);
- "fake oom": CUDA-OOM-shaped error at step 2 while the micro-batch is above 2;
- "fake oom always": that error at step 2 whatever the micro-batch;
- "fake crash": an unexpected exception;
- "fake exit": the process dies with exit code 3 without a result file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from app.train_config import TrainConfig
from worker import run

CHECKPOINT = "fake-checkpoint.json"
# Under torchrun every rank runs the stand-in; each keeps its own checkpoint.
RANK = int(os.environ.get("RANK", "0"))


class FakeOutOfMemory(Exception):
    """Shaped like the recipe's typed OOM error."""

    kind = "oom"

    def __init__(self, step: int, micro_batch_size: int, seq_len: int) -> None:
        self.message = f"CUDA out of memory at step {step}."
        self.hint = "Lower the micro-batch size."
        self.step, self.micro_batch_size, self.seq_len = step, micro_batch_size, seq_len
        super().__init__(self.message)


class FakeRecipe:
    def __init__(
        self,
        config: TrainConfig,
        model_path: Path,
        output_dir: Path,
        sink: Any,
        control: Any,
        *,
        rows_path: Path,
        **_: Any,
    ) -> None:
        self.config, self.output_dir = config, output_dir
        self.sink, self.control, self.rows_path = sink, control, rows_path
        self.behaviour = config.name
        self.steps, self.pause = (60, 0.1) if self.behaviour == "fake slow" else (5, 0.05)

    def setup(self) -> None:
        assert self.rows_path.is_file()
        self.control.update(compute_mode="fake on CPU", progress_total=self.steps)

    def train(self) -> None:
        checkpoint = self.output_dir / (CHECKPOINT if RANK == 0 else f"rank{RANK}-{CHECKPOINT}")
        start = json.loads(checkpoint.read_text())["step"] if checkpoint.exists() else 0
        started = time.monotonic()
        for step in range(start + 1, self.steps + 1):
            if self.control.should_stop() is not None:
                return
            if self.behaviour == "fake crash" and step == 2:
                raise RuntimeError("the stand-in crashed on purpose")
            if self.behaviour == "fake exit" and step == 2:
                print("the stand-in exits without a result", flush=True)
                os._exit(3)
            oom_always = self.behaviour == "fake oom always"
            if step == 2 and (
                oom_always or (self.behaviour == "fake oom" and self.config.micro_batch_size > 2)
            ):
                raise FakeOutOfMemory(step, self.config.micro_batch_size, self.config.max_seq_len)
            time.sleep(self.pause)
            row = {"step": step, "loss": 1.0 / step, "elapsed_seconds": time.monotonic() - started}
            if step == self.steps:
                row["eval_loss"] = 0.5
            self.sink.write(row)
            self.control.update(progress_step=step)
            checkpoint.write_text(json.dumps({"step": step}))

    def save(self) -> Path:
        adapter = self.output_dir / "adapter"
        adapter.mkdir(exist_ok=True)
        (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 128)
        return adapter

    def cleanup(self) -> None:
        pass

    def shared_stop_reason(self, reason: str | None) -> str | None:
        return reason  # the stand-in's ranks share nothing


if __name__ == "__main__":
    sys.exit(run.main(recipe_class=FakeRecipe))
