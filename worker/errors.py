"""Errors a user can meet during a training run. Each carries a `kind` (stored on the failed job),
a `message` (what happened) and a `hint` (what to do about it)."""

from __future__ import annotations

# The web app's and the worker's dataset problems are one class: kind "dataset", message, hint.
from app.dataset_errors import DatasetError as DatasetError


class TrainingError(Exception):
    kind = "training"

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class OutOfMemory(TrainingError):
    kind = "oom"

    def __init__(self, *, step: int, micro_batch_size: int, seq_len: int, detail: str = "") -> None:
        self.step, self.micro_batch_size, self.seq_len = step, micro_batch_size, seq_len
        super().__init__(
            f"The GPU ran out of memory at step {step} "
            f"(micro batch {micro_batch_size}, sequence of {seq_len} tokens). {detail}".strip(),
            "Lower the micro batch size (raise gradient accumulation to keep the effective batch), "
            "lower max_seq_len, or set gradient checkpointing to 'offload' or, for the longest "
            "sequences, 'tiled'.",
        )


class ModelNotFound(TrainingError):
    kind = "model_not_found"


class NonFiniteLoss(TrainingError):
    kind = "non_finite_loss"

    def __init__(self, *, step: int, consecutive: int) -> None:
        self.step, self.consecutive = step, consecutive
        super().__init__(
            f"The loss was NaN or infinite for {consecutive} steps in a row (up to step {step}); "
            "training stopped. No checkpoint was written after the first bad step.",
            "Lower the learning rate, check the dataset for empty or broken rows, or resume from "
            "the last checkpoint with a smaller learning rate.",
        )


class DiskFull(TrainingError):
    kind = "disk_full"


class ChatTemplateMissing(TrainingError):
    kind = "chat_template_missing"

    def __init__(self, model: str = "this model") -> None:
        super().__init__(
            f"The tokenizer of {model} has no chat template, so conversations cannot be formatted.",
            "Pick an instruct/chat model, train on plain-text rows, or choose the ChatML fallback "
            "template (you will then need the same template when chatting with the adapter).",
        )
