"""Merge an adapter into its base model: the worker side of "Merge" on the adapter page.

The worker loop calls `run_pending_merges(settings)` from a side thread. Each merge reloads the
base in bf16 on the CPU (never into 4-bit weights, and never taking GPU memory a training job
needs), applies the adapter, `merge_and_unload`s it and saves a safetensors model folder with the
adapter's tokenizer (its chat template) under the run folder: `runs/<job>/merged/`.
Progress (stage, bytes written) is written to the `merge_requests` row the page polls.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

from app.db import Database
from app.models import Adapter, BaseModelEntry, MergeRequest, MergeStatus, utcnow
from app.settings import Settings

log = logging.getLogger("tuneboard.merge")

POLL_SECONDS = 0.5


def _claim_merge(db: Database, worker_id: str | None) -> MergeRequest | None:
    from sqlalchemy import update
    from sqlmodel import col, select

    while True:
        with db.write() as s:
            merge = s.exec(
                select(MergeRequest)
                .where(MergeRequest.status == MergeStatus.pending)
                .order_by(col(MergeRequest.id))
            ).first()
            if merge is None:
                return None
            taken = s.execute(
                update(MergeRequest)
                .where(col(MergeRequest.id) == merge.id)
                .where(col(MergeRequest.status) == MergeStatus.pending)
                .values(status=MergeStatus.running, worker_id=worker_id, started_at=utcnow())
            )
            if taken.rowcount == 1:  # type: ignore[attr-defined]
                s.refresh(merge)
                return merge


def _update(db: Database, merge_id: int, **fields: object) -> None:
    with db.write() as s:
        merge = s.get(MergeRequest, merge_id)
        if merge is not None:
            for name, value in fields.items():
                setattr(merge, name, value)
            s.add(merge)


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def merge_adapter(settings: Settings, db: Database, merge: MergeRequest) -> Path:
    """Run one claimed merge; returns the merged model folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert merge.id is not None
    with db.read() as s:
        adapter = s.get(Adapter, merge.adapter_id)
        base = s.get(BaseModelEntry, adapter.base_model) if adapter else None
    if adapter is None or base is None:
        raise FileNotFoundError(f"adapter {merge.adapter_id} or its base model is not registered")
    runs = settings.runs_dir.resolve()
    run = (runs / str(int(adapter.job_id))).resolve()
    adapter_dir = run / "adapter"
    if not run.is_relative_to(runs) or not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"the files of adapter {adapter.id} are missing")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        # PEFT would fall back to adapter_model.bin, a pickle: never load one.
        raise FileNotFoundError(
            f"adapter {adapter.id} has no adapter_model.safetensors; pickle weights are never loaded"
        )

    _update(db, merge.id, stage="loading the base model in bf16")
    merge_id = merge.id
    base_model: Any = AutoModelForCausalLM.from_pretrained(
        base.source,
        dtype=torch.bfloat16,
        trust_remote_code=base.trust_remote_code,
        use_safetensors=True,
    )
    _update(db, merge_id, stage="applying the adapter")
    model: Any = PeftModel.from_pretrained(base_model, adapter_dir).merge_and_unload()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    _update(db, merge_id, stage="saving", progress_total=total, progress_done=0)

    final, staging = run / "merged", run / ".merged.partial"
    shutil.rmtree(staging, ignore_errors=True)
    done = threading.Event()

    def report_bytes() -> None:
        while not done.wait(POLL_SECONDS):
            _update(db, merge_id, progress_done=min(_folder_bytes(staging), total))

    reporter = threading.Thread(target=report_bytes, daemon=True)
    reporter.start()
    try:
        model.save_pretrained(staging, safe_serialization=True)
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(staging)
        (staging / "train_config.json").write_bytes(
            (adapter_dir / "train_config.json").read_bytes()
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        done.set()
        reporter.join()
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


def run_pending_merges(settings: Settings, worker_id: str | None = None) -> int:
    """Run every pending merge, one at a time; returns how many ran. Safe to call from several
    workers at once: each merge is claimed by exactly one."""
    db = Database(settings.resolved_database_url)
    ran = 0
    try:
        while (merge := _claim_merge(db, worker_id)) is not None:
            assert merge.id is not None
            ran += 1
            try:
                final = merge_adapter(settings, db, merge)
            except Exception as exc:
                log.exception("merge %s failed", merge.id)
                hint = (
                    "The machine ran out of memory: merging needs the whole base model in bf16 "
                    "in RAM."
                    if isinstance(exc, MemoryError)
                    else "Look at the worker's log; the adapter's files and base model must exist."
                )
                _update(
                    db,
                    merge.id,
                    status=MergeStatus.failed,
                    stage="failed",
                    error_message=f"The merge failed: {exc}",
                    error_hint=hint,
                    finished_at=utcnow(),
                )
                continue
            size = _folder_bytes(final)
            _update(
                db,
                merge.id,
                status=MergeStatus.succeeded,
                stage="done",
                progress_done=size,
                progress_total=size,
                size_bytes=size,
                output_dir=str(final.relative_to(settings.resolved_data_dir)),
                finished_at=utcnow(),
            )
    finally:
        db.dispose()
    return ran


def main() -> int:
    """`python -m worker.merge --pending`: run every pending merge (settings from TUNEBOARD_*)."""
    import argparse

    parser = argparse.ArgumentParser(description="Merge adapters into their base models.")
    parser.add_argument("--pending", action="store_true", required=True)
    parser.parse_args()
    print(f"{run_pending_merges(Settings())} merge(s) done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
