"""The `transformers.Trainer` as every recipe uses it: the Trainer does the loop, gradient
accumulation, the scheduler, eval and checkpoint/resume (optimizer, scheduler, RNG, data
position); `RecipeTrainer` asks the recipe for the loss and counts what a step reports (real
tokens, finiteness, length); `RecipeCallback` does what is ours: metric rows, stop requests, the
non-finite-loss guard and atomic checkpoints."""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerCallback

from worker import checkpoints, lora_projection
from worker.batch_shape import REAL_TOKENS
from worker.errors import NonFiniteLoss
from worker.metrics import process_rss_mib, vram_readings
from worker.training import distributed

if TYPE_CHECKING:
    from worker.training.recipe import LoRARecipe

NON_FINITE_STEPS_BEFORE_STOP = 3
KEEP_LAST_CHECKPOINTS = 2


@dataclass
class TrainResult:
    global_step: int
    stop_reason: str | None  # None: ran to the end; else "cancel", "lease_lost" or "shutdown"
    resumed_from_step: int | None


class CheckpointDiskFull(Exception):
    """Raised out of the Trainer when a checkpoint could not be written for lack of space."""

    def __init__(self, step: int) -> None:
        super().__init__(f"disk full while writing the checkpoint at step {step}")
        self.step = step


def oom_phase(error: BaseException) -> str:
    """Where in the Trainer's loop an out-of-memory error was raised, in the job page's words
    (read from its traceback's function names; the frames themselves are not kept)."""
    names = {frame.name for frame in traceback.extract_tb(error.__traceback__)}
    if names & {"evaluate", "evaluation_loop", "prediction_step"}:
        return "in the evaluation on the held-out rows"
    if names & {"_save_checkpoint", "save_model"}:
        return "while writing a checkpoint"
    return "in a training step"


class ListDataset(torch.utils.data.Dataset):
    """A list as a map-style dataset (the Trainer wants `__len__` and `__getitem__`)."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


class RecipeTrainer(Trainer):
    """The stock Trainer, the loss from the recipe, and what a step needs to report: real tokens,
    finiteness, length; the recipe's own figures join each logged row."""

    recipe: LoRARecipe

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_tokens: Any = 0
        self.step_finite: Any = True
        self.last_seq_len = 0

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None):
        real = inputs.pop(REAL_TOKENS, None)  # a packed row padded to one shape says its own
        if real is None:
            mask = inputs.get("attention_mask")
            # Real tokens only: padding (attention_mask 0) does not count. A tensor sum, no sync.
            real = mask.sum() if mask is not None else inputs["input_ids"].numel()
        self.step_tokens = self.step_tokens + real
        self.last_seq_len = int(inputs["input_ids"].shape[-1])
        with lora_projection.casts_kept():  # forward and backward: the LoRA weights stay put
            loss = super().training_step(model, inputs, num_items_in_batch)
        finite = loss.detach().isfinite()  # on the loss's device: no sync until the step ends
        self.step_finite = (
            finite if self.step_finite is True else torch.logical_and(self.step_finite, finite)
        )
        return loss

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        inputs.pop(REAL_TOKENS, None)  # an evaluation batch's (the training step took its own)
        # The forward pass only: a checkpointed layer's rerun in the backward pass saves for
        # itself and frees it layer by layer, in GPU memory.
        with self.recipe.activation_offload():
            return self.recipe.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """The Trainer's evaluation; where it runs out of memory beside the layers' CUDA graphs
        (it runs the layers eagerly, on memory of its own while their pool stays held), the
        graphs go for the rest of the run and it runs again: the job goes on, a little slower,
        and its page says why."""
        try:
            return super().evaluate(*args, **kwargs)
        except torch.OutOfMemoryError:
            if self.recipe.layer_graphs is None:
                raise
        # Outside the handler: the error's frames, which hold the activations, are gone.
        self.recipe.drop_graphs("an evaluation ran out of memory beside their pool")
        return super().evaluate(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        evaluating = any(key.startswith("eval_") for key in logs)
        logs.update(self.recipe.logged_figures("eval" if evaluating else "train"))
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Under FSDP the callback's on_save writes a checkpoint's adapter (save_sharded_adapter);
        # the Trainer's own save would gather the whole model to write an empty adapter.
        if not self.recipe.distributed:
            super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:
            if checkpoints.is_disk_full(error, Path(self.args.output_dir or ".")):
                raise CheckpointDiskFull(self.state.global_step) from error
            raise

    def take_step_counters(self) -> tuple[int, bool]:
        if self.recipe.distributed:
            return self._take_step_counters_of_all_ranks()
        tokens, finite = int(self.step_tokens), bool(self.step_finite)
        self.step_tokens, self.step_finite = 0, True
        return tokens, finite

    def _take_step_counters_of_all_ranks(self) -> tuple[int, bool]:
        """Tokens summed over ranks, finite only if finite on every rank (one all-reduce)."""
        device = self.recipe.device
        counts = torch.stack(
            [
                torch.as_tensor(self.step_tokens, device=device, dtype=torch.float64),
                (~torch.as_tensor(self.step_finite, device=device)).to(torch.float64),
            ]
        )
        torch.distributed.all_reduce(counts)
        self.step_tokens, self.step_finite = 0, True
        return int(counts[0].item()), bool(counts[1].item() == 0)


class RecipeCallback(TrainerCallback):
    """Metric rows, stop requests, the non-finite guard, and completion markers on checkpoints."""

    def __init__(self, recipe: LoRARecipe) -> None:
        self.recipe = recipe
        self.stop_reason: str | None = None
        self.bad_steps = 0
        self.saw_non_finite = False
        self.started = time.perf_counter()
        self.step_started = self.started
        self.tokens_since_log = 0
        self.seconds_since_log = 0.0
        self.steps_since_log = 0
        self.last_eval: tuple[int, float] | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        recipe, trainer = self.recipe, self.recipe.trainer
        assert trainer is not None
        tokens, finite = trainer.take_step_counters()  # int(): waits for the GPU, honest timing
        self.tokens_since_log += tokens
        self.seconds_since_log += time.perf_counter() - self.step_started
        self.steps_since_log += 1

        if not finite:
            # Weights touched by a NaN/inf gradient are poisoned: never checkpoint them.
            self.saw_non_finite = True
            self.bad_steps += 1
            if self.bad_steps >= NON_FINITE_STEPS_BEFORE_STOP:
                raise NonFiniteLoss(step=state.global_step, consecutive=self.bad_steps)
        else:
            self.bad_steps = 0
        if self.saw_non_finite:
            control.should_save = False

        fields: dict[str, Any] = {}
        if recipe.start_timing.total_s is None:  # this attempt's first step: how long it took
            recipe.start_timing.first_step_done(time.perf_counter() - self.step_started)
            fields["start_timing"] = recipe.start_timing.summary()
        recipe.control.update(
            progress_step=state.global_step,
            progress_total=state.max_steps,
            epoch=state.epoch,
            **fields,
        )
        reason = recipe.control.should_stop()
        if recipe.distributed:
            reason = distributed.agreed_stop_reason(reason, recipe.device)
        if reason:
            self.stop_reason = reason
            control.should_training_stop = True
            control.should_save = not self.saw_non_finite
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.last_eval = (state.global_step, float(metrics["eval_loss"]))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs and "eval_loss" not in logs:
            return  # the end-of-training summary
        row: dict[str, Any] = {
            "step": state.global_step,
            "epoch": float(state.epoch or 0.0),
            "loss": finite_or_none(logs.get("loss")),
            "eval_loss": finite_or_none(logs.get("eval_loss")),
            "learning_rate": finite_or_none(logs.get("learning_rate")),
            "grad_norm": finite_or_none(logs.get("grad_norm")),
            "tokens_per_second": None,
            "elapsed_seconds": time.perf_counter() - self.started,
        }
        row.update(
            {name: finite_or_none(logs[name]) for name in self.recipe.FIGURES if name in logs}
        )
        if "loss" in logs:
            seconds = self.seconds_since_log
            row.update(
                tokens=self.tokens_since_log,
                step_seconds=seconds,
                steps=self.steps_since_log,
                tokens_per_second=self.tokens_since_log / seconds if seconds > 0 else None,
            )
            self.tokens_since_log, self.seconds_since_log, self.steps_since_log = 0, 0.0, 0
        row.update(vram_readings(), rss_mib=process_rss_mib())
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.recipe.sink.write(row)
        self.recipe.sink.flush()

    def on_save(self, args, state, control, **kwargs):
        folder = self.recipe.checkpoint_dir / f"checkpoint-{state.global_step}"
        if self.recipe.distributed:
            self.recipe.save_sharded_adapter(folder)
            self.recipe._barrier()  # every rank's part of the checkpoint is written
            if not state.is_world_process_zero:
                return
        eval_loss = None
        if self.last_eval is not None and self.last_eval[0] == state.global_step:
            eval_loss = self.last_eval[1]
        checkpoints.mark_complete(folder, state.global_step, eval_loss)
        checkpoints.prune_checkpoints(self.recipe.checkpoint_dir, KEEP_LAST_CHECKPOINTS)


def finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
