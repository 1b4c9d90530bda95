"""Operator settings: one table of (name, default, help), read from `TUNEBOARD_*` variables.

The README's configuration table is generated from this class (`tuneboard settings --markdown`) and a
test fails when the two differ.
"""

from __future__ import annotations

import ipaddress
from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.layout import DataLayout

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
# What the evaluation report's judge weighs when TUNEBOARD_JUDGE_RUBRIC (or a re-run) names nothing.
DEFAULT_JUDGE_RUBRIC = (
    "Prefer the answer that is correct, helpful and closest in meaning to the reference answer."
)


def chat_completions_url(base_url: str) -> str:
    """Where an OpenAI-compatible API (TUNEBOARD_JUDGE_URL: its base URL, or the full one) takes
    chat completions: the worker's judge and the System page's check ask there."""
    url = base_url.rstrip("/")
    return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


def host_name(host_header: str) -> str:
    """The name part of a Host header, lower-cased: `[::1]:8000` -> `[::1]`, `a:80` -> `a`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[: host.index("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class InsecureSettingsError(ValueError):
    """A setting combination that would expose the dashboard without protection."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TUNEBOARD_", use_attribute_docstrings=True, extra="ignore", frozen=True
    )

    data_dir: Path = Path("data")
    """Where datasets, runs, models and the SQLite database live. Must be a local disk for SQLite."""

    database_url: str = Field(
        default="", validation_alias=AliasChoices("TUNEBOARD_DATABASE_URL", "DATABASE_URL")
    )
    """SQLAlchemy URL. Empty: a SQLite file in the data dir. PostgreSQL for workers on several hosts."""

    host: str = "127.0.0.1"
    """Address the web server binds. Anything but loopback requires a token."""

    port: int = Field(default=8000, ge=1, le=65535)
    """Port the web server listens on."""

    token: SecretStr | None = None
    """Access token. Required when binding beyond loopback; sent as a bearer header or login cookie."""

    allowed_hosts: list[str] = []
    """Extra host names accepted in the Host header (loopback names are always accepted)."""

    upload_max_bytes: int = Field(default=2 * 1024**3, ge=1)
    """Largest dataset upload in bytes (default 2 GiB)."""

    lease_seconds: float = Field(default=60.0, gt=0)
    """A running job whose worker has not heartbeated for this long is requeued."""

    heartbeat_seconds: float = Field(default=10.0, gt=0)
    """How often a worker renews its lease and its liveness row."""

    max_attempts: int = Field(default=3, ge=1, le=100)
    """Attempts a job gets (first run plus requeues after a lost worker) before it fails."""

    poll_seconds: float = Field(default=1.0, gt=0)
    """How often an idle worker looks for queued work."""

    hub_import_settle_seconds: float = Field(default=3.0, gt=0, le=3600)
    """How often the web server ingests the Hub imports a worker has downloaded."""

    hub_import_ingest_lease_seconds: float = Field(default=30.0, gt=0, le=3600)
    """A web server ingesting a Hub import renews its claim every third of this; one not renewed for this long (its web server died) is taken back, ingested again."""

    side_task_stall_seconds: float = Field(default=900.0, gt=0, le=7 * 86400)
    """A worker stops a side task (export, merge, evaluation, Hub import, token report) that reports no progress for this long (default 15 minutes) and fails it, saying where it stopped. Raise it for a step that is legitimately slow."""

    sse_poll_seconds: float = Field(default=0.25, gt=0, le=10)
    """How often the web server looks for new metric rows of a job someone is watching."""

    sse_keepalive_seconds: float = Field(default=15.0, gt=0, le=300)
    """Idle time after which a live stream sends a keepalive comment (keeps proxies from closing it)."""

    trust_remote_code_models: list[str] = []
    """Hub ids or paths allowed to run their own Python code (`trust_remote_code`). Empty: none."""

    hf_offline: bool = False
    """Never reach the Hugging Face Hub: use only cached or local models, import only cached datasets."""

    gpu_lock_dir: Path | None = None
    """Folder of the per-GPU lock files that keep two workers on one host off one GPU. Empty: the system temp folder."""

    request_body_max_bytes: int = Field(default=1024**2, ge=1024)
    """Largest request body in bytes (JSON API, OpenAI API, forms); uploads have their own cap."""

    dataset_row_max_bytes: int = Field(default=32 * 1024**2, ge=1024)
    """Largest dataset row, in bytes once decoded; bigger rows are reported as bad rows, by line."""

    dataset_expansion_max: float = Field(default=4.0, gt=0)
    """Normalised dataset rows may take at most this multiple of the upload cap (413 beyond it)."""

    dataset_max_nesting: int = Field(default=64, ge=4, le=1000)
    """Deepest nesting of arrays and objects in a dataset row; deeper rows are reported as bad rows."""

    database_busy_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    """How long a SQLite write waits for another process's write lock before it fails as "locked"."""

    cuda_graphs: bool = True
    """Replay the decoder layers as CUDA graphs where every micro-batch of a job has, or can be padded to, one shape (off: every step runs eagerly, unpadded)."""

    evaluate_after_training: bool = True
    """Queue an adapter's evaluation report (base vs adapter on the held-out rows) when its job succeeds."""

    eval_max_prompts: int = Field(default=50, ge=0, le=1000)
    """Held-out prompts that base and adapter both answer in an adapter's evaluation report (0: loss only)."""

    eval_max_new_tokens: int = Field(default=128, ge=1, le=4096)
    """Longest answer, in tokens, that base and adapter write for an evaluation report (greedy)."""

    judge_url: str = ""
    """OpenAI-compatible endpoint (base URL ending in /v1) of the evaluation report's judge. Empty: no judge."""

    judge_model: str = ""
    """Model name the judge endpoint is asked for."""

    judge_rubric: str = ""
    """What the judge weighs when it picks the better answer. Empty: helpful, correct, matches the reference."""

    judge_api_key: SecretStr | None = None
    """Bearer key of the judge endpoint, sent by the worker's judge and the System page's check; it never goes into a job, a log, a report or a page."""

    judge_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    """How long the judge gets for one verdict before that row is marked as a judge error."""

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if not self.binds_loopback and self.token is None:
            raise InsecureSettingsError(
                f"Refusing to bind {self.host} without a token: anyone on the network could start "
                "jobs. Set TUNEBOARD_TOKEN to a long random string (e.g. `export TUNEBOARD_TOKEN="
                "$(python -c 'import secrets; print(secrets.token_urlsafe(32))')`), or bind 127.0.0.1."
            )
        if self.token is not None and len(self.token.get_secret_value()) < 16:
            raise InsecureSettingsError("TUNEBOARD_TOKEN must be at least 16 characters long.")
        return self

    @property
    def binds_loopback(self) -> bool:
        if self.host in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False

    @cached_property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @cached_property
    def layout(self) -> DataLayout:
        """Every path under the data dir (app/layout.py)."""
        return DataLayout(self.resolved_data_dir)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.layout.database_file}"

    @property
    def datasets_dir(self) -> Path:
        return self.layout.datasets_dir

    @property
    def runs_dir(self) -> Path:
        return self.layout.runs_dir

    @property
    def models_dir(self) -> Path:
        return self.layout.models_dir

    @property
    def hf_hub_cache(self) -> Path:
        """Where hub models are downloaded (HF_HUB_CACHE). Only the cache: the user's own HF_HOME,
        and the token `hf auth login` saved there, stay where they are."""
        return self.layout.hf_hub_cache

    @property
    def tmp_dir(self) -> Path:
        return self.layout.tmp_dir

    def ensure_dirs(self) -> None:
        for path in (
            self.datasets_dir,
            self.runs_dir,
            self.models_dir,
            self.hf_hub_cache,
            self.tmp_dir,
        ):
            path.mkdir(parents=True, exist_ok=True)


def settings_table_markdown() -> str:
    """The README's configuration table, generated from the Settings fields."""
    lines = ["| variable | default | what it does |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "(none)" if default in (None, "", []) else f"`{default}`"
        if name == "upload_max_bytes":
            shown = "`2147483648` (2 GiB)"
        if name == "request_body_max_bytes":
            shown = "`1048576` (1 MiB)"
        lines.append(f"| `TUNEBOARD_{name.upper()}` | {shown} | {field.description or ''} |")
    return "\n".join(lines)
