"""The data dir's layout: the only module that builds a path inside it.

Both processes use it (the worker may import it), so a folder moves in one place:

    <data dir>/
      tuneboard.db                      the SQLite database (when DATABASE_URL is empty)
      datasets/<id>/                    one upload (id: uuid hex)
        original.<type>                 the file as sent
        normalized.jsonl                its rows in one conversation form ({"line", "messages"|"text"})
        split.json                      the eval rows' line numbers, fixed at upload (written last)
      runs/<job id>/                    one job
        attempt-<A>.log                 the training child's stdout and stderr
        attempt-<A>.result.json         how the attempt ended (app.attempt_result.AttemptResult)
        train.jsonl, eval.jsonl         the dataset's rows split for this job
        checkpoints/checkpoint-<step>/  resumable checkpoints (complete ones carry a marker)
        adapter/                        the trained LoRA adapter (PEFT safetensors)
        merged/                         the adapter merged into its base model (an export)
      models/<name>/                    local models (the demo model)
      hf/hub/                           the hub download cache (HF_HUB_CACHE)
      tmp/                              uploads in flight
      worker.log, worker-side.log, inference.log
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DATASET_ID = re.compile(r"[0-9a-f]{32}")

ORIGINAL_STEM = "original"
NORMALIZED_ROWS = "normalized.jsonl"
SPLIT = "split.json"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
MERGED = "merged"
TENSORBOARD = "tensorboard"


@dataclass(frozen=True)
class DataLayout:
    """Paths under one data dir. `Settings.layout` gives the configured one."""

    root: Path

    # --- top level ---------------------------------------------------------------------------

    @property
    def database_file(self) -> Path:
        return self.root / "tuneboard.db"

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def hf_hub_cache(self) -> Path:
        return self.root / "hf" / "hub"

    @property
    def hf_datasets_cache(self) -> Path:
        """Where Hub imports keep what `datasets.load_dataset` downloads and prepares; with
        TUNEBOARD_HF_OFFLINE an import reads only what is here."""
        return self.root / "hf" / "datasets"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def worker_log(self) -> Path:
        return self.root / "worker.log"

    @property
    def side_work_log(self) -> Path:
        return self.root / "worker-side.log"

    @property
    def inference_log(self) -> Path:
        return self.root / "inference.log"

    # --- a dataset ---------------------------------------------------------------------------

    def dataset_dir(self, dataset_id: str) -> Path:
        """A dataset's folder. The id must be one of ours (uuid hex): anything else could name a
        path outside datasets/, so it raises ValueError."""
        if not DATASET_ID.fullmatch(dataset_id):
            raise ValueError(f"not a dataset id: {dataset_id!r}")
        return self.datasets_dir / dataset_id

    def original_file(self, dataset_id: str, file_type: str) -> Path:
        return self.dataset_dir(dataset_id) / f"{ORIGINAL_STEM}.{file_type}"

    def normalized_rows(self, dataset_id: str) -> Path:
        return self.dataset_dir(dataset_id) / NORMALIZED_ROWS

    def split_file(self, dataset_id: str) -> Path:
        return self.dataset_dir(dataset_id) / SPLIT

    def hub_import_rows(self, import_id: int) -> Path:
        """The rows a Hub import's worker wrote, waiting for the web to ingest them as an upload."""
        return self.tmp_dir / f"hub-import-{int(import_id)}.jsonl"

    # --- a job's run folder ------------------------------------------------------------------

    def run_dir(self, job_id: int) -> Path:
        """A job's run folder; `int()` keeps it directly under runs/."""
        return self.runs_dir / str(int(job_id))

    def attempt_log(self, job_id: int, attempt: int) -> Path:
        return self.run_dir(job_id) / f"attempt-{int(attempt)}.log"

    def attempt_result(self, job_id: int, attempt: int) -> Path:
        return self.run_dir(job_id) / f"attempt-{int(attempt)}.result.json"

    def run_rows(self, job_id: int) -> tuple[Path, Path]:
        """The job's train and eval rows, cut from the dataset when an attempt starts."""
        run = self.run_dir(job_id)
        return run / "train.jsonl", run / "eval.jsonl"

    def run_mix(self, job_id: int) -> Path:
        """What a job of several datasets drew from each (rows, tokens): worker/mix.py writes it,
        the job page reads it."""
        return self.run_dir(job_id) / "mix.json"

    def checkpoints_dir(self, job_id: int) -> Path:
        return checkpoints_in(self.run_dir(job_id))

    def adapter_dir(self, job_id: int) -> Path:
        return adapter_in(self.run_dir(job_id))

    def tensorboard_dir(self, job_id: int) -> Path:
        """TensorBoard's event files of a job that reports to it (`report_to: tensorboard`)."""
        return tensorboard_in(self.run_dir(job_id))

    def merged_dir(self, job_id: int) -> Path:
        return self.run_dir(job_id) / MERGED

    def merge_staging_dir(self, job_id: int) -> Path:
        """Where a merge writes before it renames the folder to `merged_dir`."""
        return self.run_dir(job_id) / f".{MERGED}.partial"

    def exports_dir(self, job_id: int) -> Path:
        """A job's exports (GGUF files, merged models), each named after its export's id."""
        return self.run_dir(job_id) / "exports"

    def export_path(self, job_id: int, export_id: int, name: str) -> Path:
        """One export's file or folder; `name` is the worker's (e.g. "model-q4_K_M.gguf")."""
        return self.exports_dir(job_id) / f"{int(export_id)}-{Path(name).name}"

    def export_staging(self, job_id: int, export_id: int) -> Path:
        """Where an export is built; never offered for download, removed after a failure."""
        return self.exports_dir(job_id) / f".{int(export_id)}.partial"


# A recipe is handed its run folder, not the job: these name the same places from the folder.


def checkpoints_in(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def adapter_in(run_dir: Path) -> Path:
    return run_dir / ADAPTER


def tensorboard_in(run_dir: Path) -> Path:
    return run_dir / TENSORBOARD
