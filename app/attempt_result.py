"""How a training attempt ended: what the child (`worker.run`) tells the worker loop.

The child writes it as JSON to `DataLayout.attempt_result(job, attempt)` before it exits; the loop
reads it and records it with the fenced queue operations. When the child died without writing
one, the loop builds one from the exit code. Only pydantic here: both processes import it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

AttemptStatus = Literal["succeeded", "failed", "cancelled", "released"]


class OomDetails(BaseModel):
    """Where the GPU ran out of memory; each value may be unknown. The OOM retry reads it."""

    step: int | None = None
    micro_batch_size: int | None = None
    seq_len: int | None = None


class AdapterOutcome(BaseModel):
    """The trained adapter, registered in the same transaction as the job's success."""

    size_bytes: int
    eval_loss: float | None = None


class AttemptResult(BaseModel):
    """One attempt's end.

    "released" means "put the job back in the queue" (SIGTERM, the worker died, the lease was
    lost). The error fields are set when the status is "failed"; `oom` only for error kind
    "oom"; `adapter` only on success.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: AttemptStatus
    error_kind: str | None = None
    error_message: str | None = None
    error_hint: str | None = None
    oom: OomDetails | None = None
    adapter: AdapterOutcome | None = None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)
