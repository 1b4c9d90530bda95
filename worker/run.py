"""The training child: `python -m worker.run --job-id N --attempt A`.

Started by the worker loop in a fresh process for each attempt, so a crash, an OOM or a leak dies
with it and the GPU memory is returned. It reads the job, resolves the model and the dataset
files (mixed by `worker/mix.py` for a job of several datasets), runs the recipe with a
`DatabaseControl` and a `DatabaseSink`, and writes an `AttemptResult` (app/attempt_result.py) to `DataLayout.attempt_result(job, attempt)` before it
exits.

Under torchrun (a job with `gpus: N > 1`) every rank runs this module. Rank 0 alone talks to the
queue and writes the result file; the other ranks get a control and a sink that stay silent
(`OtherRankControl`, `OtherRankSink`), and the recipe shares rank 0's stop decision with them.
A rank that fails writes its failure (first one wins) and exits 1, so torchrun stops the others.

"released" means "put the job back in the queue" (SIGTERM, the worker died, or the lease was lost:
the loop's release is fenced, so a stale release is refused). Full tracebacks go to the log (this
process's stderr), never into the message users see.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from datetime import UTC
from pathlib import Path
from typing import Any

from app import queue
from app.attempt_result import AdapterOutcome, AttemptResult, OomDetails
from app.dataset_store import iter_rows
from app.db import Database
from app.layout import DataLayout
from app.models import BaseModelEntry, Dataset
from app.settings import Settings
from app.train_config import TrainConfig
from worker import layer_graphs, mix
from worker.failures import hint_for
from worker.job_io import (
    DatabaseControl,
    DatabaseSink,
    OtherRankControl,
    OtherRankSink,
    write_result,
)
from worker.recipes import recipe_for
from worker.training.start_timing import StartTiming

log = logging.getLogger("worker.run")


class ChildError(Exception):
    """A failure this module detects itself, in the recipe's typed-error shape."""

    def __init__(self, kind: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.hint = kind, message, hint or hint_for(kind)


def dataset_files(
    layout: DataLayout, dataset_id: str, job_id: int, eval_fraction: float
) -> tuple[Path, Path | None]:
    """The dataset's train and eval rows as two files in the job's run folder.

    The job's `eval_fraction` of the rows is held out, chosen by the dataset's split seed
    (`app.dataset_store`), so every job on a dataset with the same fraction evaluates
    on the same rows. With eval_fraction 0 every row trains.
    """
    train, evaluation = layout.run_rows(job_id)
    written = {}
    for path, rows in (
        (train, iter_rows(layout.datasets_dir, dataset_id, "train", eval_fraction=eval_fraction)),
        (
            evaluation,
            iter_rows(layout.datasets_dir, dataset_id, "eval", eval_fraction=eval_fraction),
        ),
    ):
        with path.open("w", encoding="utf-8") as out:
            written[path] = sum(
                out.write(json.dumps(row, ensure_ascii=False) + "\n") for row in rows
            )
    return train, (evaluation if written[evaluation] else None)


def download_progress(control: Any) -> type:
    """A progress-bar class for the hub download that reports bytes to the job page (at most once
    a second). huggingface_hub creates its byte bars with this class; counting happens here even
    when the bars themselves are disabled."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class JobDownloadProgress(hub_tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # A disabled bar keeps none of its arguments: keep what the report needs here.
            self.counts_bytes = kwargs.get("unit") == "B"
            self.total = kwargs.get("total")  # the hub client grows it as files are found
            self.done = int(kwargs.get("initial") or 0)
            self.reported_at = 0.0

        def update(self, n: float | None = 1) -> bool | None:
            self.done += int(n or 0)
            now = time.monotonic()
            if self.counts_bytes and self.total and now - self.reported_at >= 1.0:
                self.reported_at = now
                control.update(download_done_bytes=self.done, download_total_bytes=int(self.total))
            return super().update(n)

    return JobDownloadProgress


def model_location(db: Database, settings: Settings, name: str, control: Any = None) -> Path:
    """A local folder holding the base model: its registered path, or a hub download (with its
    bytes shown on the job page)."""
    with db.read() as s:
        entry = s.get(BaseModelEntry, name)
    if entry is None:
        raise ChildError("model_not_found", f"The base model {name!r} is not registered.")
    if entry.is_local or entry.is_demo:
        path = Path(entry.source)
        if not path.is_dir():
            raise ChildError("model_not_found", f"The folder of model {name!r} is missing: {path}")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                entry.source,
                cache_dir=settings.hf_hub_cache,
                local_files_only=settings.hf_offline,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
                tqdm_class=download_progress(control) if control is not None else None,
            )
        )
    except Exception as exc:
        raise ChildError(
            "model_not_found",
            f"Could not get model {entry.source!r} from the hub: {type(exc).__name__}: {exc}",
        ) from exc


def directory_size(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def train(
    db: Database, settings: Settings, job_id: int, attempt: int, recipe_class: Any = None
) -> AttemptResult:
    """Run one attempt to its end and say how it ended (the result file's content). The recipe
    is the job's method's (worker.recipes.RECIPES) unless `recipe_class` names another."""
    control: Any
    sink: Any
    if rank() == 0:
        control = DatabaseControl(db, job_id, attempt)
        sink = DatabaseSink(db, job_id, attempt, on_stale=control.lose_lease)
    else:
        control, sink = OtherRankControl(), OtherRankSink()
    control.install_signal_handlers()
    if world_size() == 1 and control.should_stop() == "lease_lost":
        return AttemptResult(
            status="released", error_message="The attempt was stale when it started."
        )

    job = queue.get_job(db, job_id)
    config = TrainConfig.model_validate(job.config)
    recipe_class = recipe_class or recipe_for(config.method)
    with db.read() as s:
        if any(s.get(Dataset, share.id) is None for share in config.dataset_shares):
            raise ChildError("dataset", "A dataset of the job was deleted.")
    output_dir = settings.layout.run_dir(job_id)
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.datasets is None:
        rows_path, eval_rows_path = dataset_files(
            settings.layout, job.dataset_id, job_id, config.eval_fraction
        )
    else:
        rows_path, eval_rows_path = mix.write_mixed_rows(
            settings.layout, config.datasets, job_id, config.eval_fraction, config.seed
        )
    model_path = model_location(db, settings, job.base_model, control)
    recipe = recipe_class(
        config,
        model_path,
        output_dir,
        sink,
        control,
        rows_path=rows_path,
        eval_rows_path=eval_rows_path,
    )
    if job.started_at is not None:  # the claim: the job page's start timing counts from it
        claimed = job.started_at
        claimed = claimed if claimed.tzinfo else claimed.replace(tzinfo=UTC)
        recipe.start_timing = StartTiming(began=claimed.timestamp())
    layer_graphs.ENABLED = settings.cuda_graphs  # this process trains this one job
    try:
        recipe.setup()
        if config.datasets is not None and rank() == 0:
            mix.record_tokens(
                settings.layout.run_mix(job_id), recipe.train_examples, recipe.eval_examples
            )
        recipe.train()
        sink.flush()
        control.flush()
        reason = control.should_stop()
        if world_size() > 1:
            reason = recipe.shared_stop_reason(reason)  # every rank saves, or none does
        if reason is not None:
            log.info("attempt %s of job %s stopped early: %s", attempt, job_id, reason)
        if reason == "cancel":
            return AttemptResult(status="cancelled")
        if reason is not None:
            return AttemptResult(status="released")
        saved = recipe.save()
        adapter_dir = (
            Path(saved) if isinstance(saved, str | Path) else settings.layout.adapter_dir(job_id)
        )
        return AttemptResult(
            status="succeeded",
            adapter=AdapterOutcome(
                size_bytes=directory_size(adapter_dir), eval_loss=sink.last_eval_loss
            ),
        )
    finally:
        sink.flush()
        control.flush()
        recipe.cleanup()


def rank() -> int:
    """This process's rank under torchrun; 0 when it runs alone."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def failure_result(exc: BaseException) -> AttemptResult:
    """A typed error (`kind`, `message`, `hint`) as it is; anything else as "unknown"."""
    kind = getattr(exc, "kind", None)
    if isinstance(kind, str):
        oom = None
        if kind == "oom":
            oom = OomDetails(
                step=getattr(exc, "step", None),
                micro_batch_size=getattr(exc, "micro_batch_size", None),
                seq_len=getattr(exc, "seq_len", None),
            )
        return AttemptResult(
            status="failed",
            error_kind=kind,
            error_message=getattr(exc, "message", None) or str(exc),
            error_hint=getattr(exc, "hint", None) or hint_for(kind),
            oom=oom,
        )
    last_line = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return AttemptResult(
        status="failed",
        error_kind="unknown",
        error_message=f"Training stopped with an unexpected error: {last_line[:500]}",
        error_hint=hint_for("unknown"),
    )


def main(argv: list[str] | None = None, *, recipe_class: Any = None) -> int:
    """Run one attempt and write its result file. `recipe_class` defaults to the job's method's."""
    parser = argparse.ArgumentParser(prog="python -m worker.run")
    parser.add_argument("--job-id", type=int, required=True)
    parser.add_argument("--attempt", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    settings = Settings()
    db = Database(settings.resolved_database_url)
    path = settings.layout.attempt_result(args.job_id, args.attempt)
    try:
        result = train(db, settings, args.job_id, args.attempt, recipe_class)
    except Exception as exc:
        traceback.print_exc()
        result = failure_result(exc)
    log.info("attempt %s of job %s: %s", args.attempt, args.job_id, result.status)
    if world_size() == 1:
        write_result(path, result)
        db.dispose()
        return 0
    # Several ranks: rank 0 reports; a failing rank reports too when nobody has yet (its OOM is
    # the job's), and a non-zero exit makes torchrun stop ranks that wait for it in a collective.
    if rank() == 0 or (result.status == "failed" and not path.exists()):
        write_result(path, result)
    db.dispose()
    return 0 if result.status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
