"""Database tables: the contract between the web process and the workers.

Only `app/queue.py` changes a job's status, and only `app/side_queue.py` a side task's. Times are
UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


FINISHED_STATUSES = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class DatasetStatus(StrEnum):
    ready = "ready"  # every row valid (or bad rows dropped): usable by a job
    invalid = "invalid"  # has unresolved errors: fix the file or drop bad rows


class SideWorkStatus(StrEnum):
    """A side task's status: the training job's words (side work cannot be cancelled)."""

    queued = "queued"  # waiting for a worker to claim it
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


class SideWork(SQLModel):
    """What every kind of side work (dataset reports, merges...) has: a place in the side-work
    queue (`app/side_queue.py`), a lease while a worker runs it, and the job's error columns.
    `attempt` counts claims and fences every write of a claimed task, as a job's does."""

    status: SideWorkStatus = Field(default=SideWorkStatus.queued, index=True)
    attempt: int = 0
    max_attempts: int = 3
    worker_id: str | None = Field(default=None, max_length=200)
    lease_expires_at: datetime | None = None
    notice: str | None = None  # e.g. "attempt 1 was killed; requeued"
    error_kind: str | None = Field(default=None, max_length=50)  # e.g. chat_template_missing
    error_message: str | None = None
    error_hint: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class BaseModelEntry(SQLModel, table=True):
    """A registered base model: a hub id or a local directory, read from its config."""

    __tablename__ = "base_models"

    name: str = Field(primary_key=True, max_length=200)
    source: str = Field(max_length=2000)  # hub id or absolute local path
    is_local: bool = False
    architecture: str = ""
    family: str = ""  # config.model_type, e.g. "llama"
    parameters: int = 0
    vocab_size: int = 0
    context_length: int = 0
    has_chat_template: bool = False
    # Its chat template takes `tools` (app/tool_calls.py): it can train and serve tool calls.
    supports_tools: bool = False
    trust_remote_code: bool = False
    is_demo: bool = False
    created_at: datetime = Field(default_factory=utcnow)


class Dataset(SQLModel, table=True):
    """An uploaded file, validated and normalised to conversations."""

    __tablename__ = "datasets"

    id: str = Field(primary_key=True, max_length=32)  # server-made uuid hex; also its folder name
    name: str = Field(max_length=200)  # display text only
    original_filename: str = Field(default="", max_length=255)  # display text only
    file_type: str = ""  # jsonl, json, csv, parquet
    format: str = ""  # alpaca, sharegpt, openai, prompt_completion, text
    status: DatasetStatus = DatasetStatus.invalid
    size_bytes: int = 0
    rows: int = 0
    valid_rows: int = 0
    dropped_rows: int = 0
    error_count: int = 0
    errors: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
    column_mapping: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON))
    eval_rows: int = 0
    split_seed: int = 42
    report: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    is_demo: bool = False
    created_at: datetime = Field(default_factory=utcnow)


class DatasetReport(SideWork, table=True):
    """A token report of one dataset for one (model, max length, train on, chat template).

    Computed by a worker (`worker/dataset_report.py`), never by the web process: it needs the
    model's tokenizer. `result` holds the numbers the dataset page shows (shape in that module).
    """

    __tablename__ = "dataset_reports"
    __table_args__ = (Index("ix_dataset_reports_dataset_id_id", "dataset_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    dataset_id: str = Field(foreign_key="datasets.id", max_length=32, ondelete="CASCADE")
    base_model: str = Field(max_length=200)
    max_seq_len: int
    train_on: str = Field(default="assistant", max_length=20)  # assistant | all
    chat_template: str | None = Field(default=None, max_length=20)  # None: the model's; "chatml"
    progress_done: int = 0  # training rows tokenised so far
    progress_total: int = 0  # training rows to tokenise
    result: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class Job(SQLModel, table=True):
    """A fine-tuning job and its place in the queue."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_position", "status", "position"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200)
    base_model: str = Field(max_length=200)
    dataset_id: str = Field(foreign_key="datasets.id", max_length=32)
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    status: JobStatus = Field(default=JobStatus.queued, index=True)
    position: float = 0.0  # queue order: lower runs first
    attempt: int = 0  # number of claims so far; writes are fenced by it
    max_attempts: int = 3
    worker_id: str | None = Field(default=None, max_length=200)
    lease_expires_at: datetime | None = None
    cancel_requested: bool = False
    error_kind: str | None = Field(default=None, max_length=50)
    error_message: str | None = None
    error_hint: str | None = None
    notice: str | None = None  # e.g. "retried with half the micro-batch after OOM"
    oom_retries: int = 0  # automatic out-of-memory retries so far (at most one; reset by retry)
    progress_step: int = 0
    progress_total: int = 0
    epoch: float = 0.0
    memory_policy: str | None = None
    memory_policy_reason: str | None = None
    compute_mode: str | None = None  # e.g. "NF4 QLoRA on CUDA", "fp32 LoRA on CPU"
    # claim to the first optimizer step, in parts (worker/training/start_timing.py)
    start_timing: str | None = None
    download_done_bytes: int = 0
    download_total_bytes: int = 0
    vram_before_mib: int | None = None
    vram_after_mib: int | None = None
    resume_from_scratch: bool = False
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class Metric(SQLModel, table=True):
    """One logging step of one job attempt. Its id is the SSE event id."""

    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_job_id_id", "job_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="jobs.id", ondelete="CASCADE")
    attempt: int
    step: int
    epoch: float = 0.0
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    vram_allocated_mib: float | None = None
    vram_reserved_mib: float | None = None
    device_used_mib: float | None = None
    device_total_mib: float | None = None
    # The training process's resident memory: the memory chart of a job that runs on the CPU.
    rss_mib: float | None = None
    # Real (non-padding) tokens trained since the previous row: the Run card sums them.
    tokens: int | None = Field(default=None, sa_type=BigInteger)
    elapsed_seconds: float = 0.0
    # Preference methods (dpo, orpo): the implicit rewards of the chosen and rejected answers, their
    # mean margin and the share of pairs where chosen wins; eval_* on the held-out pairs.
    rewards_chosen: float | None = None
    rewards_rejected: float | None = None
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    eval_rewards_chosen: float | None = None
    eval_rewards_rejected: float | None = None
    eval_reward_margin: float | None = None
    eval_reward_accuracy: float | None = None
    created_at: datetime = Field(default_factory=utcnow)


METRIC_IDENTITY = ("id", "job_id", "attempt", "created_at")


def metric_columns() -> tuple[str, ...]:
    """The values of one logging step: every `Metric` column but the row's identity and time.

    The one list of metric fields: the worker's sink writes these (and drops other keys), the API
    and the live stream send them, and the job page's charts name them."""
    return tuple(name for name in Metric.model_fields if name not in METRIC_IDENTITY)


class Adapter(SQLModel, table=True):
    """A trained LoRA adapter (PEFT files + chat template + config) under the job's run folder."""

    __tablename__ = "adapters"

    id: str = Field(primary_key=True, max_length=64)  # e.g. "job-12"
    job_id: int = Field(foreign_key="jobs.id", index=True)
    name: str = Field(max_length=200)
    base_model: str = Field(max_length=200)
    size_bytes: int = 0
    eval_loss: float | None = None
    created_at: datetime = Field(default_factory=utcnow)


class Worker(SQLModel, table=True):
    """A worker process and the GPU(s) it owns, with its last heartbeat."""

    __tablename__ = "workers"

    id: str = Field(primary_key=True, max_length=200)
    host: str = Field(max_length=255)
    pid: int
    gpus: str = ""  # e.g. "0" or "0,1"; "" = CPU
    gpu_name: str = ""
    vram_total_mib: int = 0
    vram_used_mib: int = 0
    gpu_utilization: int | None = None
    gpu_temperature: int | None = None
    current_job_id: int | None = None
    started_at: datetime = Field(default_factory=utcnow)
    heartbeat_at: datetime = Field(default_factory=utcnow)
    stopped: bool = False
    # Where this worker's inference server (`python -m worker.inference`) listens, written by
    # the worker once the server is up; None: no playground on this worker.
    inference_url: str | None = Field(default=None, max_length=500)
    # What the web server sends the inference server to be let in; never dumped (exclude).
    inference_secret: str | None = Field(default=None, max_length=200, exclude=True)


class ChatSession(SQLModel, table=True):
    """A playground conversation: one model, or two side by side (compare mode)."""

    __tablename__ = "chat_sessions"

    id: int | None = Field(default=None, primary_key=True)
    title: str = Field(default="", max_length=200)
    model_a: str = Field(max_length=200)  # a base model name or an adapter id
    model_b: str | None = Field(default=None, max_length=200)  # compare mode: the other pane
    system_prompt: str = ""
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class ChatMessage(SQLModel, table=True):
    """One turn of one pane of a chat session, with its generation statistics."""

    __tablename__ = "chat_messages"
    __table_args__ = (Index("ix_chat_messages_session_id_id", "session_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    session_id: int = Field(foreign_key="chat_sessions.id", ondelete="CASCADE")
    pane: int = 0  # 0 = model_a, 1 = model_b
    model: str = Field(max_length=200)
    role: str = Field(max_length=20)  # user | assistant
    content: str = ""
    finish_reason: str | None = Field(default=None, max_length=20)  # stop|length|disconnect|error
    completion_tokens: int | None = None
    first_token_ms: float | None = None
    tokens_per_second: float | None = None
    created_at: datetime = Field(default_factory=utcnow)


class MergeRequest(SideWork, table=True):
    """A request to merge an adapter into its bf16 base; a worker claims and runs it."""

    __tablename__ = "merge_requests"

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: str = Field(foreign_key="adapters.id", index=True, max_length=64)
    stage: str = ""  # e.g. "loading the base in bf16", "merging", "saving"
    # bytes written so far while saving, of those expected (a merged model passes 2 GiB: bigint)
    progress_done: int = Field(default=0, sa_type=BigInteger)
    progress_total: int = Field(default=0, sa_type=BigInteger)
    output_dir: str | None = Field(default=None, max_length=500)  # relative to the data dir
    size_bytes: int = Field(default=0, sa_type=BigInteger)


class HubImport(SideWork, table=True):
    """A dataset to import from the Hugging Face Hub; a worker claims it and runs it
    (`worker/hub_import.py`: `datasets.load_dataset`, which the web process never imports).

    The worker writes the split's rows to `rows_file` (a JSON Lines file, as an upload leaves
    one) and succeeds; the web then ingests that file exactly as an upload
    (`app/services/datasets/hub.py`, under a lease it renews, fenced by `ingest_attempt`) and
    records `dataset_id`, or `ingest_error` when the file as a whole cannot be used."""

    __tablename__ = "hub_imports"

    id: int | None = Field(default=None, primary_key=True)
    hub_id: str = Field(max_length=200)  # "owner/name" or "name"
    config_name: str | None = Field(default=None, max_length=200)  # the API's "config"
    split: str = Field(default="train", max_length=200)
    column_mapping: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON))
    name: str = Field(default="", max_length=200)  # the dataset's display name
    drop_bad_rows: bool = False
    stage: str = Field(default="", max_length=50)  # loading, writing rows, downloaded, ...
    progress_done: int = 0  # rows written so far
    progress_total: int = 0  # rows in the split
    rows_file: str | None = Field(default=None, max_length=500)  # relative to the data dir
    dataset_id: str | None = Field(
        default=None, foreign_key="datasets.id", max_length=32, ondelete="SET NULL"
    )
    ingest_error: str | None = None
    ingest_hint: str | None = None
    # Counts the web's claims on the ingest; fences its writes, as `attempt` does a worker's.
    ingest_attempt: int = 0


class ModelExport(SideWork, table=True):
    """An export of an adapter that runs elsewhere: a GGUF of the merged model (f16, q8_0,
    q4_K_M), a LoRA GGUF for llama.cpp's `--lora`, or the merged safetensors model. A worker
    claims and builds it (worker/export.py); a GGUF is then checked against the adapter's own
    answers (`check_status`: "match", "differs" or "not run")."""

    __tablename__ = "model_exports"

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: str = Field(foreign_key="adapters.id", index=True, max_length=64)
    kind: str = Field(max_length=20)  # gguf | gguf-lora | merged
    quantization: str | None = Field(default=None, max_length=20)  # f16 | q8_0 | q4_K_M
    stage: str = ""  # e.g. "merging the adapter", "converting to GGUF", "checking the answers"
    progress_done: int = 0  # steps of the build done
    progress_total: int = 0
    # the size expected, checked against the free disk before a start (GGUFs pass 2 GiB: bigint)
    estimate_bytes: int = Field(default=0, sa_type=BigInteger)
    output_path: str | None = Field(default=None, max_length=500)  # relative to the data dir
    size_bytes: int = Field(default=0, sa_type=BigInteger)
    sha256: str | None = Field(default=None, max_length=64)
    check_status: str = Field(default="not run", max_length=20)  # match | differs | not run
    check_details: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))


class Evaluation(SideWork, table=True):
    """The evaluation report of one adapter against its base on the job's held-out rows, queued
    when the job succeeds (`app/queue.py`) or again on request; a worker computes it
    (`worker/evaluation.py`). The figures and rows are shapes of that module; while it runs
    they hold what is done so far, and only a `succeeded` evaluation is a complete report."""

    __tablename__ = "evaluations"
    __table_args__ = (Index("ix_evaluations_adapter_id_id", "adapter_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter_id: str = Field(foreign_key="adapters.id", max_length=64, ondelete="CASCADE")
    max_prompts: int | None = None  # held-out prompts answered by both; None: the setting
    # The optional judge: {"url", "model", "rubric"}; never its key (a setting of the worker).
    judge: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    cancel_requested: bool = False
    stage: str = ""  # e.g. "waiting for the GPU", "loss on held-out rows", "answering prompts"
    progress_done: int = 0  # steps done of progress_total (rows scored, prompts answered)
    progress_total: int = 0
    eta_seconds: float | None = None
    method: str = Field(default="", max_length=20)  # the job's method: sft, dpo, orpo
    base_figures: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    adapter_figures: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    judge_figures: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    rows: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON))
