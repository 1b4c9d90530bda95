"""What the job pages show beyond the job row: ETA, loss sparklines, the adapter, the charts,
run comparison, the mix of a job of several datasets."""

from __future__ import annotations

import contextlib
import json
import shlex
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlmodel import col, func, select

from app.db import Database
from app.errors import UserError, whole_number
from app.layout import DataLayout
from app.models import FINISHED_STATUSES, Adapter, BaseModelEntry, Dataset, Job, JobStatus, Metric
from app.services.replayed_steps import latest_rows
from app.settings import Settings
from app.train_config import PREFERENCE_METHODS, TrainConfig
from app.verified_versions import LIGER_INSTALL, LIGER_MISSING

SPARKLINE_POINTS = 60
LOGIT_BYTES = 2 + 4  # a logit in bf16, and its fp32 copy for the cross-entropy
_finished_sparklines: dict[tuple[int, datetime | None], list[float | None]] = {}


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def lost_contact(job: Job) -> bool:
    """A running job whose lease ran out and that no worker has requeued: its worker stopped, or
    could not write to the database, so how the attempt ended was never recorded. Shown as "lost
    contact", not "running" (any live worker requeues or fails such a job within a poll)."""
    return (
        job.status == JobStatus.running
        and job.lease_expires_at is not None
        and _aware(job.lease_expires_at) < datetime.now(UTC)
    )


LOST_CONTACT = "lost_contact"
LOST_CONTACT_HINT = (
    "A running worker requeues the job (or fails it after its last attempt) as soon as it can "
    "write to the database; the System page shows the workers and whether the database can be "
    "written."
)


def api_view(job: Job) -> dict[str, Any]:
    """A job as /api/jobs shows it: its row, with status "lost_contact" instead of "running"
    (and why, in error_message and error_hint) when `lost_contact`, as the pages show it."""
    shown = job.model_dump(mode="json")
    if lost_contact(job):
        assert job.lease_expires_at is not None
        since = _aware(job.lease_expires_at).isoformat(timespec="seconds")
        shown["status"] = LOST_CONTACT
        shown["error_kind"] = shown["error_kind"] or LOST_CONTACT
        shown["error_message"] = shown["error_message"] or (
            f"No worker has renewed this job's lease since {since}: its worker stopped, or could "
            "not write to the database, so how attempt "
            f"{job.attempt} ended was not recorded."
        )
        shown["error_hint"] = shown["error_hint"] or LOST_CONTACT_HINT
    return shown


@dataclass
class MissingKernel:
    """A kernel the benchmarked GPU recipe uses that the job's run went without: what it costs
    (`message`) and how to get it (`hint`)."""

    message: str
    hint: str


def missing_kernel(db: Database, job: Job) -> MissingKernel | None:
    """Liger's kernels, when the job ran on a GPU without them (its compute mode says so). The
    memory figure is the logits its fused loss never holds: a packed micro-batch's tokens x the
    model's vocabulary, in bf16 and again in fp32 for the loss."""
    if LIGER_MISSING not in (job.compute_mode or ""):
        return None
    with db.read() as s:
        model = s.get(BaseModelEntry, job.base_model)
    config = TrainConfig.model_validate(job.config)
    tokens = config.micro_batch_size * config.max_seq_len
    cost = "the loss holds each micro-batch's logits"
    if model is not None and model.vocab_size:
        gib = tokens * model.vocab_size * LOGIT_BYTES / 1024**3
        cost += (
            f": about {gib:.1f} GiB here ({tokens:,} tokens x {model.vocab_size:,} vocabulary "
            "entries, in bf16 and again in fp32)"
        )
    return MissingKernel(
        f"This run trained without Liger's kernels, which the benchmarked GPU recipe uses "
        f"(liger-kernel is not installed where the worker runs). Without its fused "
        f"cross-entropy {cost}, memory the auto policy then saves by checkpointing more "
        "activations, which is slower; without its fused RMSNorm, RoPE and SwiGLU each step also "
        "runs slower than bench/RESULTS.md measures.",
        f"Install it where the worker runs ({LIGER_INSTALL}; `make run` installs it on a machine "
        "with an NVIDIA GPU) and restart the worker: the next job uses it.",
    )


def eta_seconds(db: Database, job: Job) -> float | None:
    """Seconds left for a running job, from the step rate of its current attempt (None: unknown)."""
    if job.status != JobStatus.running:
        return None
    return eta_of_attempt(db, job.id or 0, job.attempt, job.progress_step, job.progress_total)


def eta_of_attempt(
    db: Database, job_id: int, attempt: int, progress_step: int, progress_total: int
) -> float | None:
    """Seconds left at `progress_step` of `progress_total`, from the step rate of the attempt's
    metric rows so far (None: unknown). Two indexed reads; the job page's header and the live
    stream's `progress` events both use it."""
    if not progress_total:
        return None
    with db.read() as s:
        base = select(Metric.step, Metric.created_at).where(
            Metric.job_id == job_id, Metric.attempt == attempt
        )
        first = s.exec(base.order_by(col(Metric.id)).limit(1)).first()
        last = s.exec(base.order_by(col(Metric.id).desc()).limit(1)).first()
    if first is None or last is None or last[0] <= first[0]:
        return None
    seconds = (_aware(last[1]) - _aware(first[1])).total_seconds()
    if seconds <= 0:
        return None
    rate = (last[0] - first[0]) / seconds
    remaining = max(0, progress_total - max(progress_step, last[0]))
    return remaining / rate


def loss_sparkline(db: Database, job: Job) -> list[float | None]:
    """Up to 60 loss values across the job's whole run, evenly sampled, one per step: the latest
    attempt's where a resume trained a step again (cached once finished)."""
    key = (job.id or 0, job.finished_at)
    if job.status in FINISHED_STATUSES and key in _finished_sparklines:
        return _finished_sparklines[key]
    with db.read() as s:
        losses = list(
            s.exec(
                select(Metric.loss)
                .where(latest_rows(s, job.id or 0), col(Metric.loss).is_not(None))
                .order_by(col(Metric.step), col(Metric.id))
            )
        )
    if len(losses) > SPARKLINE_POINTS:
        stride = len(losses) / SPARKLINE_POINTS
        losses = [losses[int(i * stride)] for i in range(SPARKLINE_POINTS - 1)] + [losses[-1]]
    values = [round(v, 4) if v is not None else None for v in losses]
    if job.status in FINISHED_STATUSES:
        _finished_sparklines[key] = values
    return values


def adapter_for(db: Database, job_id: int) -> Adapter | None:
    with db.read() as s:
        return s.exec(
            select(Adapter).where(Adapter.job_id == job_id).order_by(col(Adapter.created_at).desc())
        ).first()


# --- charts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One line of a chart: a `Metric` column, as static/app.js draws it (sent as JSON)."""

    label: str
    column: str
    color: str = "--chart-1"  # a CSS variable of static/app.css
    width: float = 1.5
    digits: int = 4  # in the legend; -1: exponent notation
    scale: float = 1.0  # multiplies each value (MiB -> GiB)
    points: bool = False  # dots only: sparse rows such as evaluations
    smooth: bool = False  # an exponential moving average (0.9) of the column
    dash: list[int] | None = None


@dataclass(frozen=True)
class Chart:
    name: str
    title: str
    series: list[Series]
    exponent_axis: bool = False
    preference: bool = False  # drawn for jobs of a preference method (dpo, orpo) only

    @property
    def spec(self) -> dict[str, Any]:
        """What the page hands app.js in `data-series`."""
        return {"exponent_axis": self.exponent_axis, "series": [asdict(s) for s in self.series]}


GIB = 1 / 1024
TRAIN, EVAL = "--chart-1", "--chart-2"
CHARTS = [
    Chart(
        "loss",
        "Loss",
        [
            Series("loss", "loss", "--chart-faint", width=1),
            Series("loss (smoothed)", "loss", TRAIN, width=2, smooth=True),
            Series("eval loss", "eval_loss", EVAL, points=True),
        ],
    ),
    Chart(
        "vram",
        "VRAM (GiB)",
        [
            Series("allocated", "vram_allocated_mib", TRAIN, width=2, digits=2, scale=GIB),
            Series("reserved", "vram_reserved_mib", EVAL, digits=2, scale=GIB),
            Series("device used", "device_used_mib", "--chart-4", digits=2, scale=GIB),
            Series("card total", "device_total_mib", "--chart-limit", 1, 2, GIB, dash=[6, 4]),
        ],
    ),
    Chart(
        "reward_margin",
        "Reward margin",
        [
            Series("margin", "reward_margin", TRAIN, width=2, digits=3),
            Series("eval margin", "eval_reward_margin", EVAL, digits=3, points=True),
        ],
        preference=True,
    ),
    Chart(
        "rewards",
        "Rewards: chosen vs rejected",
        [
            Series("chosen", "rewards_chosen", TRAIN, width=2, digits=3),
            Series("rejected", "rewards_rejected", "--chart-3", width=2, digits=3),
            Series("eval chosen", "eval_rewards_chosen", TRAIN, digits=3, points=True),
            Series("eval rejected", "eval_rewards_rejected", "--chart-3", digits=3, points=True),
        ],
        preference=True,
    ),
    Chart(
        "reward_accuracy",
        "Reward accuracy",
        [
            Series("accuracy", "reward_accuracy", TRAIN, width=2, digits=3),
            Series("eval accuracy", "eval_reward_accuracy", EVAL, digits=3, points=True),
        ],
        preference=True,
    ),
    Chart(
        "lr",
        "Learning rate",
        [Series("learning rate", "learning_rate", width=2, digits=-1)],
        exponent_axis=True,
    ),
    Chart("grad_norm", "Grad norm", [Series("grad norm", "grad_norm", digits=3)]),
    Chart("tokens_per_second", "Tokens / s", [Series("tokens/s", "tokens_per_second", digits=0)]),
]
PREFERENCE_COLUMNS = tuple(s.column for c in CHARTS if c.preference for s in c.series)


def has_preference_metrics(db: Database, job: Job) -> bool:
    """Whether the job's page shows the preference charts: it runs a preference method, or
    its rows carry rewards (a job stored before its config named the method)."""
    if job.config.get("method") in PREFERENCE_METHODS:
        return True
    with db.read() as s:
        query = select(Metric.id).where(
            Metric.job_id == job.id, col(Metric.reward_margin).is_not(None)
        )
        return s.exec(query.limit(1)).first() is not None


# A run on the CPU has no VRAM: its page draws the process's resident memory in the VRAM
# chart's place.
PROCESS_MEMORY_CHART = Chart(
    "rss",
    "Process memory (RSS, GiB)",
    [Series("RSS", "rss_mib", TRAIN, width=2, digits=2, scale=GIB)],
)


def ran_on_cpu(db: Database, job: Job) -> bool:
    """Whether the job's memory is the process's, not a card's: no row reads VRAM, and its
    compute mode says CPU or its rows carry RSS."""
    with db.read() as s:

        def any_row(column: Any) -> bool:
            query = select(Metric.id).where(Metric.job_id == job.id, col(column).is_not(None))
            return s.exec(query.limit(1)).first() is not None

        if any_row(Metric.vram_allocated_mib):
            return False
        return "CPU" in (job.compute_mode or "") or any_row(Metric.rss_mib)


def charts_for(db: Database, job: Job) -> list[Chart]:
    preference = has_preference_metrics(db, job)
    cpu = ran_on_cpu(db, job)
    return [
        PROCESS_MEMORY_CHART if cpu and chart.name == "vram" else chart
        for chart in CHARTS
        if preference or not chart.preference
    ]


@dataclass
class JobRow:
    """A job as the jobs list shows it."""

    job: Job
    eta_seconds: float | None
    losses: list[float | None]


def job_rows(db: Database, jobs: list[Job]) -> list[JobRow]:
    return [JobRow(job, eta_seconds(db, job), loss_sparkline(db, job)) for job in jobs]


# --- comparison -------------------------------------------------------------------------------


class InvalidComparison(UserError):
    status_code = 422
    code = "invalid"


def parse_ids(raw: list[str]) -> list[int]:
    """Job ids from `?ids=1,2,3` and/or repeated `?ids=1&ids=2`, in order, without repeats."""
    ids: list[int] = []
    for part in ",".join(raw).split(","):
        part = part.strip()
        if not part:
            continue
        job_id = whole_number(part, "ids", "Use ?ids=1,2,3.", ge=1)
        if job_id not in ids:
            ids.append(job_id)
    if len(ids) > 12:
        raise InvalidComparison("Compare at most 12 jobs at a time.", "Pick fewer jobs.")
    return ids


COMPARE_COLUMNS = ("loss", "eval_loss", *PREFERENCE_COLUMNS)


def compare(db: Database, ids: list[int]) -> list[dict[str, Any]]:
    """Each job's name, status, config and curves (loss, eval loss and, for preference jobs, the
    rewards): one value per step, the latest attempt's where a resumed attempt logged it again
    (`latest_rows`); a step's train and eval rows make one point."""
    out = []
    columns = [getattr(Metric, name) for name in COMPARE_COLUMNS]
    with db.read() as s:
        for job_id in ids:
            job = s.get(Job, job_id)
            if job is None:
                raise InvalidComparison(f"There is no job {job_id}.", "Check the job numbers.")
            rows = s.exec(
                select(Metric.step, *columns).where(latest_rows(s, job_id)).order_by(col(Metric.id))
            ).all()
            by_step: dict[int, list[float | None]] = {}
            for step, *values in rows:
                point = by_step.setdefault(step, [None] * len(COMPARE_COLUMNS))
                for i, value in enumerate(values):
                    if value is not None:
                        point[i] = value
            steps = sorted(by_step)
            metrics: dict[str, list[Any]] = {"step": steps}
            for i, name in enumerate(COMPARE_COLUMNS):
                metrics[name] = [by_step[k][i] for k in steps]
            out.append(
                {
                    "id": job.id,
                    "name": job.name,
                    "status": job.status.value,
                    "config": job.config,
                    "metrics": metrics,
                }
            )
    return out


def compare_columns(compared: list[dict[str, Any]]) -> list[str]:
    """The curves the compare page overlays: loss and eval loss always, a reward column when one
    of the runs has it."""
    return [
        name
        for name in COMPARE_COLUMNS
        if name in ("loss", "eval_loss")
        or any(v is not None for c in compared for v in c["metrics"][name])
    ]


@dataclass
class ConfigRow:
    key: str
    values: list[Any]
    differs: bool


def config_table(configs: list[dict[str, Any]]) -> list[ConfigRow]:
    """Configs side by side, one row per key (differing rows first)."""
    keys: list[str] = []
    for config in configs:
        keys += [k for k in config if k not in keys]
    rows = [
        ConfigRow(k, [c.get(k) for c in configs], len({repr(c.get(k)) for c in configs}) > 1)
        for k in keys
    ]
    return sorted(rows, key=lambda r: not r.differs)


@dataclass
class RunFacts:
    """The Run card's numbers: how long it trained, where the losses ended, how many tokens.
    Losses and tokens are those of the training the adapter carries (`latest_rows`)."""

    duration_seconds: float | None
    final_loss: float | None
    final_eval_loss: float | None
    steps: int
    tokens_trained: int | None  # real tokens, each step once; None: no rows
    tokens_trained_again: int = 0  # real tokens of steps a resume trained again (work done)


@dataclass
class TensorBoardLogs:
    """Where a job that reports to TensorBoard writes its event files, and how to open them."""

    folder: Path
    event_files: int

    @property
    def command(self) -> str:
        return f"tensorboard --logdir {shlex.quote(str(self.folder))}"


def tensorboard_logs(settings: Settings, job: Job) -> TensorBoardLogs | None:
    """The job's TensorBoard folder (in its run folder), or None for a job that does not report
    to TensorBoard."""
    if job.config.get("report_to") != "tensorboard":
        return None
    folder = settings.layout.tensorboard_dir(job.id or 0).resolve()
    events = sum(1 for _ in folder.rglob("events.out.tfevents.*")) if folder.is_dir() else 0
    return TensorBoardLogs(folder, events)


def run_facts(db: Database, job: Job) -> RunFacts:
    duration = None
    if job.started_at is not None:
        end = _aware(job.finished_at) if job.finished_at else datetime.now(UTC)
        duration = max(0.0, (end - _aware(job.started_at)).total_seconds())
    with db.read() as s:
        latest = latest_rows(s, job.id or 0)
        rows = select(Metric).where(latest).order_by(col(Metric.id).desc())
        loss = s.exec(rows.where(col(Metric.loss).is_not(None)).limit(1)).first()
        eval_loss = s.exec(rows.where(col(Metric.eval_loss).is_not(None)).limit(1)).first()
        tokens = s.exec(select(func.sum(Metric.tokens)).where(latest)).one()
        every_attempt = s.exec(select(func.sum(Metric.tokens)).where(Metric.job_id == job.id)).one()
    return RunFacts(
        duration_seconds=duration,
        final_loss=loss.loss if loss else None,
        final_eval_loss=eval_loss.eval_loss if eval_loss else None,
        steps=job.progress_step,
        tokens_trained=int(tokens) if tokens is not None else None,
        tokens_trained_again=int(every_attempt or 0) - int(tokens or 0),
    )


@dataclass
class MixRow:
    """One dataset of a job of several: its weight, and once an attempt has cut the rows (the
    worker's `runs/<job>/mix.json`), the rows and tokens it gave the training and eval splits."""

    dataset_id: str
    name: str | None  # None: the dataset was deleted
    weight: float
    share: float  # of the training rows, 0..1
    train_rows: int | None = None
    drawn_rows: int | None = None
    eval_rows: int | None = None
    drawn_tokens: int | None = None
    eval_tokens: int | None = None


def dataset_mix(db: Database, layout: DataLayout, job: Job) -> list[MixRow]:
    """The mix of a job of several datasets ([] for a job of one)."""
    config = TrainConfig.model_validate(job.config)
    if config.datasets is None or job.id is None:
        return []
    recorded: dict[str, dict[str, Any]] = {}
    path = layout.run_mix(job.id)
    if path.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            recorded = {
                d["id"]: d for d in json.loads(path.read_text(encoding="utf-8"))["datasets"]
            }
    whole = sum(share.weight for share in config.datasets)
    with db.read() as s:
        names = {
            share.id: getattr(s.get(Dataset, share.id), "name", None) for share in config.datasets
        }
    fields = ("train_rows", "drawn_rows", "eval_rows", "drawn_tokens", "eval_tokens")
    return [
        MixRow(
            dataset_id=share.id,
            name=names[share.id],
            weight=share.weight,
            share=share.weight / whole,
            **{name: recorded.get(share.id, {}).get(name) for name in fields},
        )
        for share in config.datasets
    ]
