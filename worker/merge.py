"""Merge an adapter into its base model: the worker side of "Merge" on the adapter page.

The worker's side-work thread (worker/side_work.py) claims a merge from `app.side_queue` and runs
`python -m worker.merge --task-id N --attempt A`. Each merge reloads the
base in bf16 on the CPU (never into 4-bit weights, and never taking GPU memory a training job
needs), applies the adapter, `merge_and_unload`s it and saves a safetensors model folder with the
adapter's tokenizer (its chat template) under the run folder: `runs/<job>/merged/`.
Progress (stage, bytes written) is written to the `merge_requests` row the page polls; every write
is fenced by the claim's attempt, so a merge that lost its lease changes nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from app import side_queue
from app.db import Database
from app.models import Adapter, BaseModelEntry, MergeRequest, SideWorkStatus
from app.settings import Settings
from worker.progress_meter import bytes_in, metered, reading
from worker.side_work import child_main, run_pending

log = logging.getLogger("tuneboard.merge")


def checked_adapter_dir(settings: Settings, adapter: Adapter) -> Path:
    """The adapter's folder under runs/, with its safetensors weights (never a pickle)."""
    runs = settings.runs_dir.resolve()
    run = settings.layout.run_dir(adapter.job_id).resolve()
    adapter_dir = settings.layout.adapter_dir(adapter.job_id)
    if not run.is_relative_to(runs) or not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"The files of adapter {adapter.id} are missing")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        # PEFT would fall back to adapter_model.bin, a pickle: never load one.
        raise FileNotFoundError(
            f"Adapter {adapter.id} has no adapter_model.safetensors; pickle weights are never loaded"
        )
    return adapter_dir


def merged_model(
    base: BaseModelEntry, adapter_dir: Path, dtype: Any, progress: Any, stage: str
) -> Any:
    """The base loaded on the CPU in `dtype` ("auto": its checkpoint's) with the adapter merged
    in by `merge_and_unload`. `progress(stage=...)` hears the load as `stage` with the bytes read
    so far (a download, then the weights), then "applying the adapter"."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with reading(progress, stage):
        base_model: Any = AutoModelForCausalLM.from_pretrained(
            base.source,
            dtype=dtype,
            trust_remote_code=base.trust_remote_code,
            use_safetensors=True,
        )
    progress(stage="applying the adapter")
    # Unmetered: a few small matrix products and sums a layer, a minute or two for a 70B on the
    # CPU, well inside the stall window.
    return PeftModel.from_pretrained(base_model, adapter_dir).merge_and_unload()


def registered_adapter(
    db: Database, table: Any, task_id: int
) -> tuple[Any, Adapter, BaseModelEntry]:
    """A claimed merge's or export's row, its adapter and the adapter's base model; a
    FileNotFoundError when any of them is gone."""
    with db.read() as s:
        task = s.get(table, task_id)
        if task is None:
            raise FileNotFoundError(f"There is no {table.__tablename__} row {task_id}")
        adapter = s.get(Adapter, task.adapter_id)
        base = s.get(BaseModelEntry, adapter.base_model) if adapter else None
    if adapter is None or base is None:
        raise FileNotFoundError(f"Adapter {task.adapter_id} or its base model is not registered")
    return task, adapter, base


def merge_adapter(settings: Settings, db: Database, claim: side_queue.SideClaim) -> Path:
    """Run one claimed merge; returns the merged model folder."""
    from transformers import AutoTokenizer

    _merge, adapter, base = registered_adapter(db, MergeRequest, claim.task_id)
    adapter_dir = checked_adapter_dir(settings, adapter)

    def progress(**fields: object) -> None:
        side_queue.update_progress(db, claim, **fields)

    loading = "loading the base model in bf16"
    progress(stage=loading)
    model = merged_model(base, adapter_dir, torch.bfloat16, progress, loading)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    progress(stage="saving", progress_total=total, progress_done=0)

    final = settings.layout.merged_dir(adapter.job_id)
    staging = settings.layout.merge_staging_dir(adapter.job_id)
    shutil.rmtree(staging, ignore_errors=True)

    def written() -> int:
        return min(bytes_in(staging), total)

    try:
        with metered(progress, written, lambda done: {"progress_done": done}):
            model.save_pretrained(staging, safe_serialization=True)
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(staging)
        (staging / "train_config.json").write_bytes(
            (adapter_dir / "train_config.json").read_bytes()
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


def run_claimed_merge(settings: Settings, db: Database, claim: side_queue.SideClaim) -> bool:
    """Run a claimed merge and record how it ended. False if the claim went stale meanwhile."""
    try:
        final = merge_adapter(settings, db, claim)
    except Exception as exc:
        log.exception("merge %s failed", claim.task_id)
        out_of_memory = isinstance(exc, MemoryError)
        return side_queue.finish(
            db,
            claim,
            SideWorkStatus.failed,
            stage="failed",
            error_kind="out_of_memory" if out_of_memory else "merge_failed",
            error_message=f"The merge failed: {exc}",
            error_hint="The machine ran out of memory: merging needs the whole base model in bf16 "
            "in RAM."
            if out_of_memory
            else "Look at the worker's log; the adapter's files and base model must exist.",
        )
    size = bytes_in(final)
    return side_queue.finish(
        db,
        claim,
        SideWorkStatus.succeeded,
        stage="done",
        progress_done=size,
        progress_total=size,
        size_bytes=size,
        output_dir=str(final.relative_to(settings.resolved_data_dir)),
    )


def run_pending_merges(settings: Settings, worker_id: str | None = None) -> int:
    """Claim and run every queued merge in this process; returns how many ran."""
    return run_pending(settings, "merge", run_claimed_merge, worker_id)


def main(argv: list[str] | None = None) -> int:
    """`python -m worker.merge --task-id N --attempt A`: run the merge the worker claimed;
    `--pending`: every queued merge."""
    return child_main(
        "merge",
        run_claimed_merge,
        argv,
        "Merge adapters into their base models.",
        pending=run_pending_merges,
    )


if __name__ == "__main__":
    raise SystemExit(main())
