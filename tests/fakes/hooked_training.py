"""The real training child (worker.run + SFTRecipe) with one fault injected, for the fault tests.

Run as `python -m tests.fakes.hooked_training --job-id N --attempt A` (the worker's child command
when `TUNEBOARD_TEST_CHILD` names this module). `TUNEBOARD_TEST_HOOK` picks the fault; everything
else is the unchanged recipe on the demo model:

- `stall_checkpoint:K` (attempt 1 only): while the Trainer writes checkpoint-K, after the adapter
  weights and half of `optimizer.pt` are on disk, write `runs/<job>/stalled` and sleep, so the
  test can SIGKILL the process mid-checkpoint.
- `fill_disk_after:K` (attempt 1 only): once checkpoint-K is complete, fill the file system that
  holds the run folder (a small tmpfs the test mounted) with `runs/<job>/filler`, leaving
  FILL_LEAVE_BYTES free: the next checkpoint meets a real ENOSPC from the kernel. The test frees
  the space by deleting the filler.
- `nan_from:S`: from optimizer step S on, the embedding output is multiplied by NaN in the forward
  pass: a real NaN loss and NaN gradients, as an overflowing layer produces.
- `pace:SECONDS`: every optimizer step takes at least SECONDS more, so a test that acts in the
  middle of a job finds it there however fast this machine trains the demo model.
"""

from __future__ import annotations

import io
import os
import sys
import time
from typing import Any

import torch

from worker import run
from worker.recipes.sft import SFTRecipe

HOOK = os.environ.get("TUNEBOARD_TEST_HOOK", "")
FILL_LEAVE_BYTES = 96 * 1024  # room for the log and the result file, not for a checkpoint


def _attempt(argv: list[str]) -> int:
    return int(argv[argv.index("--attempt") + 1]) if "--attempt" in argv else 0


class HookedRecipe(SFTRecipe):
    attempt = 0

    def _build_trainer(self) -> Any:
        trainer = super()._build_trainer()
        name, _, value = HOOK.partition(":")
        if name == "stall_checkpoint" and self.attempt == 1:
            self._stall_at(trainer, int(value))
        elif name == "fill_disk_after" and self.attempt == 1:
            self._fill_disk_after(int(value))
        elif name == "nan_from":
            self._nan_from(trainer, int(value))
        elif name == "pace":
            self._pace(float(value))
        return trainer

    def _pace(self, seconds: float) -> None:
        on_step_end = self.callback.on_step_end

        def pacing(args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            time.sleep(seconds)
            return on_step_end(args, state, control, **kwargs)

        self.callback.on_step_end = pacing

    def _stall_at(self, trainer: Any, step: int) -> None:
        save_optimizer = trainer._save_optimizer_and_scheduler

        def stalling(output_dir: str) -> None:
            if trainer.state.global_step != step:
                return save_optimizer(output_dir)
            buffer = io.BytesIO()
            torch.save(trainer.optimizer.state_dict(), buffer)
            data = buffer.getvalue()
            with open(os.path.join(output_dir, "optimizer.pt"), "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            (self.output_dir / "stalled").write_text(str(step))
            while True:  # the test SIGKILLs us here
                time.sleep(1)

        trainer._save_optimizer_and_scheduler = stalling

    def _fill_disk_after(self, step: int) -> None:
        on_save = self.callback.on_save

        def filling(args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            result = on_save(args, state, control, **kwargs)
            if state.global_step == step:
                stat = os.statvfs(self.output_dir)
                free = stat.f_bavail * stat.f_frsize
                with open(self.output_dir / "filler", "wb") as handle:
                    handle.truncate(0)
                    chunk = b"\0" * (1024 * 1024)
                    left = free - FILL_LEAVE_BYTES
                    while left > 0:
                        left -= handle.write(chunk[: min(len(chunk), left)])
                    handle.flush()
                    os.fsync(handle.fileno())
            return result

        self.callback.on_save = filling

    def _nan_from(self, trainer: Any, step: int) -> None:
        def poison(module: Any, inputs: Any, output: Any) -> Any:
            # global_step counts finished optimizer steps: step S is running when it is S - 1.
            if trainer.state.global_step >= step - 1:
                return output * float("nan")
            return None

        self.model.get_base_model().model.embed_tokens.register_forward_hook(poison)


if __name__ == "__main__":
    HookedRecipe.attempt = _attempt(sys.argv[1:])
    sys.exit(run.main(recipe_class=HookedRecipe))
