"""Why a training attempt failed, in the user's words: one table of hints, one OOM retry rule.

The child process reports a typed error (`kind`, `message`, `hint`); when it could not (it was
killed, or crashed before writing its result), the worker loop classifies the exit here.
"""

from __future__ import annotations

import signal

from pydantic import ValidationError

from app.attempt_result import AttemptResult
from app.train_config import TrainConfig

# kind -> what to do about it. The message says what happened; the hint says what to try.
HINTS: dict[str, str] = {
    "oom": (
        "The GPU ran out of memory. Lower the micro-batch size or the max sequence length, turn "
        "gradient checkpointing on (or offload), or use a smaller model."
    ),
    "killed": (
        "The operating system killed the training process, most often because the machine ran "
        "out of RAM (check `dmesg` for the OOM killer). Close other programs, lower the "
        "micro-batch or sequence length, or add swap; then retry the job."
    ),
    "dataset": ("Open the dataset's report, fix or drop the rows it lists, and upload it again."),
    "model_not_found": (
        "Check the model's name on the Models page. For a hub model, check the network (or the "
        "offline setting) and that the model id exists; for a local model, that the folder exists."
    ),
    "cuda_missing": (
        "Install a CUDA build of PyTorch and bitsandbytes for this GPU (see the README), or choose "
        'quantization "none" to train without 4-bit weights.'
    ),
    "non_finite_loss": (
        "The loss became NaN or infinite. Lower the learning rate, raise warm-up, and check the "
        "dataset for empty or extremely long rows; then retry from scratch."
    ),
    "disk_full": (
        "The data disk is full. Delete old runs or checkpoints, or move the data dir to a bigger "
        "disk; the previous checkpoint was kept."
    ),
    "chat_template_missing": (
        "This model has no chat template. Choose a chat/instruct model, or train on plain text."
    ),
    "unknown": (
        "Something unexpected went wrong. The job's log has the full error; retry the job, and "
        "report it with the log if it happens again."
    ),
}


def hint_for(kind: str | None) -> str:
    return HINTS.get(kind or "unknown", HINTS["unknown"])


def classify_exit(returncode: int, log_tail: list[str]) -> AttemptResult:
    """A result for a child that exited without writing one (killed, or died before it could)."""
    if returncode == -signal.SIGKILL:
        return AttemptResult(
            status="failed",
            error_kind="killed",
            error_message="The training process was killed by the host (SIGKILL), most likely "
            "because the machine ran out of RAM.",
            error_hint=HINTS["killed"],
        )
    how = f"was stopped by signal {-returncode}" if returncode < 0 else f"exited with {returncode}"
    message = f"The training process {how} without reporting a result."
    if log_tail:
        message += " Last lines of its log:\n" + "\n".join(log_tail)
    return AttemptResult(
        status="failed", error_kind="unknown", error_message=message, error_hint=HINTS["unknown"]
    )


def oom_retry(
    config: TrainConfig, *, step: int | None, seq_len: int | None
) -> tuple[TrainConfig, str] | None:
    """The retry config (half the micro-batch, twice the accumulation) and its notice, or None.

    None when the micro-batch is already 1 (nothing left to halve) or the accumulation would pass
    TrainConfig's bound on it.
    """
    micro, accum = config.micro_batch_size, config.grad_accum_steps
    if micro <= 1:
        return None
    new_micro = micro // 2
    # Same effective batch when micro is even; for odd micro keep it at least as large.
    new_accum = -(-micro * accum // new_micro)
    # model_copy does not validate: validating its dump applies TrainConfig's own bounds.
    retry = config.model_copy(update={"micro_batch_size": new_micro, "grad_accum_steps": new_accum})
    try:
        retry = TrainConfig.model_validate(retry.model_dump())
    except ValidationError:
        return None
    where = f"at step {step}" if step is not None else "before the first step"
    sequence = seq_len if seq_len is not None else config.max_seq_len
    notice = (
        f"Ran out of GPU memory {where} (micro-batch {micro}, sequence {sequence}); retrying "
        f"with micro-batch {new_micro} and accumulation {new_accum} (same effective batch)."
    )
    return retry, notice
