"""Jobs: creating them from a TrainConfig (after checking the model and dataset), and the form
that the New Job page renders from the same schema."""

from __future__ import annotations

import shutil
import types
from dataclasses import dataclass
from enum import Enum
from typing import Any, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from app import faults, queue
from app.db import Database
from app.errors import Conflict, NotFound, UserError
from app.models import FINISHED_STATUSES, BaseModelEntry, Dataset, DatasetStatus, Job
from app.services import datasets, log_noise, model_registry, trackers
from app.services.demo import DEMO_MODEL
from app.settings import Settings
from app.train_config import (
    MAX_DATASETS,
    METHOD_DEFAULTS,
    METHOD_FIELDS,
    PRESETS,
    Method,
    TrainConfig,
)


def create_job(db: Database, settings: Settings, config: TrainConfig) -> Job:
    """Queue a job after checking that its model is registered, its datasets are usable and of
    one shape, and its experiment tracker is installed."""
    model = model_registry.get_model(db, config.base_model)
    trackers.check_installed(config.report_to)
    chosen = _job_datasets(db, config)
    for dataset in chosen:
        if dataset.status != DatasetStatus.ready:
            raise Conflict(
                f"Dataset {dataset.name} has {dataset.error_count} unresolved errors and cannot "
                "be used for training.",
                "Fix the file and upload it again, or re-import it with 'drop bad rows'.",
            )
    _check_one_shape(chosen)
    _check_method_suits(config, chosen[0])
    for dataset in chosen:
        _check_template_takes_tools(db, model, dataset)
    return queue.enqueue(db, config, max_attempts=settings.max_attempts)


def _job_datasets(db: Database, config: TrainConfig) -> list[Dataset]:
    """The job's datasets, in its order; an unknown one is refused (its dataset_id with a 404,
    one of its `datasets` with a 422 naming the field)."""
    with db.read() as s:
        found = {share.id: s.get(Dataset, share.id) for share in config.dataset_shares}
    if config.datasets is None and found[config.dataset_id] is None:
        raise NotFound(
            f"There is no dataset {config.dataset_id}.",
            "Upload a dataset on the Datasets page and use its id.",
        )
    unknown = [dataset_id for dataset_id, dataset in found.items() if dataset is None]
    if unknown:
        raise InvalidDatasets(
            f"datasets: there is no dataset {', '.join(unknown)}.",
            "Use the ids of datasets on the Datasets page (GET /api/datasets lists them).",
        )
    return [dataset for dataset in found.values() if dataset is not None]


def _check_one_shape(chosen: list[Dataset]) -> None:
    """Datasets trained together hold one shape: SFT examples, or preference pairs."""
    shapes = {tuple(datasets.suited_methods(d)): d for d in chosen}
    if len(shapes) > 1:
        sft = next(d for methods, d in shapes.items() if "sft" in methods)
        pairs = next(d for methods, d in shapes.items() if "sft" not in methods)
        raise InvalidDatasets(
            f"datasets: {sft.name} holds SFT examples and {pairs.name} holds preference pairs; "
            "one job trains on one shape.",
            "Mix SFT datasets in an sft job, or preference datasets in a dpo or orpo job.",
        )


class InvalidDatasets(UserError):
    status_code = 422
    code = "invalid"


def _check_template_takes_tools(db: Database, model: BaseModelEntry, dataset: Dataset) -> None:
    """Tool-call rows train only with a chat template that renders tools and calls; any other
    would drop them and teach the model answers to calls it never sees."""
    rows = datasets.tool_rows(dataset)
    if not rows or model.supports_tools:
        return
    names = ", ".join(model_registry.tool_models(db))
    hint = (
        f"Choose a model whose chat template takes tools: {names}."
        if names
        else "Register a model whose chat template takes tools (e.g. Qwen2.5 or Llama 3.1 "
        "Instruct), or remove the tools from the dataset."
    )
    raise Conflict(
        f"Dataset {dataset.name} has tool calls ({rows} rows define tools), but the chat "
        f"template of model {model.name} has no tool support: it would drop the tool "
        "definitions and the calls.",
        hint,
    )


def _check_method_suits(config: TrainConfig, dataset: Dataset) -> None:
    """A preference dataset trains with a preference method only, an SFT dataset with sft only."""
    suited = datasets.suited_methods(dataset)
    method = config.method.value
    if method in suited:
        return
    if method == "sft":
        raise Conflict(
            f"Dataset {dataset.name} holds preference pairs (a chosen and a rejected answer to "
            "each prompt); method sft trains on one answer per example and cannot use them.",
            f"Choose method {' or '.join(suited)} for this dataset, or upload SFT data "
            "(e.g. prompt/completion or messages rows) to train with sft.",
        )
    raise Conflict(
        f"Dataset {dataset.name} holds SFT examples (one answer each); method {method} needs "
        "preference pairs: a chosen and a rejected answer to each prompt.",
        "Upload a preference dataset (e.g. prompt/chosen/rejected rows) for "
        f"{method}, or choose method sft for this dataset.",
    )


def delete_job(db: Database, settings: Settings, job_id: int) -> None:
    """Delete a finished job with its run folder (checkpoints, adapter, logs).

    On a full disk SQLite may have no room for the write-ahead log the delete needs: then the
    run folder goes first (which frees the room) and the delete is tried again."""
    try:
        queue.delete_finished(db, job_id)
    except SQLAlchemyError as error:
        if not faults.is_disk_full(error):
            raise
        if queue.get_job(db, job_id).status not in FINISHED_STATUSES:
            raise
        _remove_run_dir(settings, job_id)
        queue.delete_finished(db, job_id)
        return
    _remove_run_dir(settings, job_id)


def _remove_run_dir(settings: Settings, job_id: int) -> None:
    run_dir = settings.layout.run_dir(job_id).resolve()
    if run_dir.is_relative_to(settings.runs_dir.resolve()) and run_dir.exists():
        shutil.rmtree(run_dir)


def retry_job(db: Database, settings: Settings, job_id: int, *, from_scratch: bool) -> Job:
    """Queue a finished job again: from its last complete checkpoint, or from scratch (its
    checkpoints are removed first, so no later attempt can resume from them)."""
    job = queue.retry(db, job_id, from_scratch=from_scratch, attempts=settings.max_attempts)
    if from_scratch:
        checkpoints = settings.layout.checkpoints_dir(job_id).resolve()
        if checkpoints.is_relative_to(settings.runs_dir.resolve()):
            shutil.rmtree(checkpoints, ignore_errors=True)
    return job


def log_tail(settings: Settings, job: Job, lines: int = 40) -> list[str]:
    """The last lines of the job's newest attempt log, less library noise (`log_noise`)."""
    if job.id is None or job.attempt == 0:
        return []
    path = settings.layout.attempt_log(job.id, job.attempt)
    if not path.is_file():
        return []
    with path.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 64 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    return log_noise.without_noise(text.splitlines())[-lines:]


# --- the New Job form, rendered from TrainConfig -------------------------------------------------


@dataclass
class FormField:
    name: str
    label: str
    help: str
    kind: str  # "number", "integer", "select", "checkbox", "text", "list"
    value: Any
    options: list[str]
    minimum: float | None
    maximum: float | None
    step: str
    advanced: bool
    methods: list[str]  # the methods whose form shows it; [] for every method


def field_methods(name: str) -> list[str]:
    """The methods that read a field, when only some do ([]: every method)."""
    if name in SFT_ONLY_FIELDS:
        return [Method.sft.value]
    return [m.value for m in Method if name in METHOD_FIELDS[m]] if name in METHOD_OWNED else []


METHOD_OWNED = {name for names in METHOD_FIELDS.values() for name in names}
# Fields with a value for every method that only sft reads: TrainConfig refuses any but the
# default for a preference method, so the form leaves them out there.
SFT_ONLY_FIELDS = ("train_on", "long_text")


BASIC_FIELDS = {
    "name",
    "method",
    "beta",
    "loss_type",
    "base_model",
    "dataset_id",
    "max_seq_len",
    "num_epochs",
    "max_steps",
    "learning_rate",
    "micro_batch_size",
    "grad_accum_steps",
    "lora_r",
    "quantization",
    "train_on",
}


# Drawn by the form's own dataset mix rows (`mix_rows`), not as a field.
NOT_FORM_FIELDS = ("datasets",)


def form_fields(values: dict[str, Any]) -> list[FormField]:
    fields = []
    for name, info in TrainConfig.model_fields.items():
        if name in NOT_FORM_FIELDS:
            continue
        annotation = info.annotation
        if get_origin(annotation) in (Union, types.UnionType):
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        kind, options = "text", []
        if name == "report_to":
            kind, options = "select", trackers.offered()
        elif isinstance(annotation, type) and issubclass(annotation, Enum):
            kind, options = "select", [m.value for m in annotation]
        elif annotation is bool:
            kind = "checkbox"
        elif annotation is int:
            kind = "integer"
        elif annotation is float:
            kind = "number"
        elif get_origin(annotation) is list:
            kind = "list"
        minimum = maximum = None
        for meta in info.metadata:
            if isinstance(meta, Ge | Gt):
                minimum = float(meta.ge if isinstance(meta, Ge) else meta.gt)  # type: ignore[arg-type]
            if isinstance(meta, Le | Lt):
                maximum = float(meta.le if isinstance(meta, Le) else meta.lt)  # type: ignore[arg-type]
        methods = field_methods(name)
        value = values.get(name, None if info.is_required() else info.default)
        if value is None and methods and name in METHOD_OWNED:
            # Shown once its method is chosen: with that method's default in it.
            chosen = values.get("method") or Method.sft
            method = Method(chosen) if chosen in set(Method) else Method.sft
            owner = method if method.value in methods else Method(methods[0])
            value = METHOD_DEFAULTS[owner].get(name)
        if isinstance(value, Enum):
            value = value.value
        if isinstance(value, list):
            value = ", ".join(value)
        fields.append(
            FormField(
                name=name,
                label=name.replace("_", " ").capitalize(),
                help=info.description or "",
                kind=kind,
                value=value,
                options=options,
                minimum=minimum,
                maximum=maximum,
                step="1" if kind == "integer" else "any",
                advanced=name not in BASIC_FIELDS,
                methods=methods,
            )
        )
    return fields


def preset_values(preset: str | None) -> dict[str, Any]:
    return dict(PRESETS.get(preset or "balanced", {}))


def preset_forms() -> dict[str, dict[str, str]]:
    """Each preset as the form values it sets: every field any preset touches (hyperparameters
    only), at the preset's value or the default, so a click sets them all and nothing else."""
    names = sorted({name for values in PRESETS.values() for name in values})
    fields = TrainConfig.model_fields
    return {
        preset: {
            name: "" if (v := values.get(name, fields[name].default)) is None else str(v)
            for name in names
        }
        for preset, values in PRESETS.items()
    }


def ready_datasets(db: Database) -> list[Dataset]:
    """The datasets a job can use, in the order the form lists them."""
    with db.read() as s:
        query = select(Dataset).where(Dataset.status == DatasetStatus.ready)
        return list(s.exec(query.order_by(col(Dataset.created_at), col(Dataset.id))))


def suggested_preset(
    db: Database, preset: str | None, dataset_id: str | None, base_model: str | None
) -> str | None:
    """The preset the New Job page starts from: the one asked for; else "demo" when the demo
    model (the form's default) and the demo dataset are chosen, so the newcomer's first job
    learns the demo in a couple of CPU minutes; else none (the defaults, "balanced")."""
    if preset in PRESETS:
        return preset
    if dataset_id is None:  # the form's dataset select starts on the first usable dataset
        ready = ready_datasets(db)
        dataset_id = ready[0].id if ready else None
    if dataset_id is None or (base_model or TrainConfig.model_fields["base_model"].default) != (
        DEMO_MODEL
    ):
        return None
    with db.read() as s:
        dataset = s.get(Dataset, dataset_id)
    return "demo" if dataset is not None and dataset.is_demo else None


@dataclass
class MixRow:
    """One more dataset of the form's mix: `datasets-N-id` and `datasets-N-weight`."""

    index: int
    dataset_id: str
    weight: str


def mix_rows(values: dict[str, Any]) -> tuple[str, list[MixRow]]:
    """The form's mix: the first dataset's weight, and the rows of more datasets (those sent
    back, then one blank row to add another; app.js adds more)."""
    rows = [
        MixRow(index, values[f"datasets-{index}-id"], values.get(f"datasets-{index}-weight", ""))
        for index in range(1, MAX_DATASETS)
        if str(values.get(f"datasets-{index}-id", "")).strip()
    ]
    rows = [MixRow(n, row.dataset_id, row.weight) for n, row in enumerate(rows, start=1)]
    if len(rows) < MAX_DATASETS - 1:
        rows.append(MixRow(len(rows) + 1, "", "1"))
    return str(values.get("dataset_weight") or "1"), rows


def _mix_from_form(form: dict[str, str]) -> list[dict[str, str]] | None:
    """`datasets` from the form's mix rows, the chosen dataset first; None when no more dataset
    is chosen (a job of one dataset)."""
    first_weight, rows = mix_rows(form)
    chosen = [row for row in rows if row.dataset_id.strip()]
    if not chosen:
        return None
    first = {"id": form.get("dataset_id", "").strip(), "weight": first_weight.strip() or "1"}
    return [first] + [
        {"id": row.dataset_id.strip(), "weight": row.weight.strip() or "1"} for row in chosen
    ]


def config_from_form(form: dict[str, str]) -> TrainConfig:
    """Turn submitted form fields into a TrainConfig (blank optional fields mean 'default').

    A field of another method than the chosen one is left unset: the form hides (and disables)
    it, and a browser without script sends what it had when the method changed."""
    data: dict[str, Any] = {}
    method = form.get("method", "").strip() or Method.sft.value
    for name, info in TrainConfig.model_fields.items():
        methods = field_methods(name)
        if methods and method in set(Method) and method not in methods:
            continue
        if name in NOT_FORM_FIELDS:
            continue
        if info.annotation is bool:
            data[name] = form.get(name) in ("on", "true", "1")
            continue
        raw = form.get(name, "").strip()
        if raw == "":
            continue
        if name == "lora_targets":
            data[name] = [part.strip() for part in raw.split(",") if part.strip()]
        else:
            data[name] = raw
    if (mix := _mix_from_form(form)) is not None:
        data["datasets"] = mix
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise InvalidConfig(exc) from exc


class InvalidConfig(UserError):
    status_code = 422
    code = "invalid"

    def __init__(self, exc: ValidationError) -> None:
        self.field_errors = {
            ".".join(str(p) for p in e["loc"]) or "config": e["msg"] for e in exc.errors()
        }
        super().__init__(
            "; ".join(f"{k}: {v}" for k, v in self.field_errors.items()),
            "Fix the fields named above.",
        )
