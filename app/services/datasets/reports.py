"""Token reports of a dataset: ask for one, read the latest. A worker computes them.

The web process cannot tokenise (it never imports the ML stack), so a request is a `queued` row
in `dataset_reports`; `worker/dataset_report.py` claims it, loads only the model's tokenizer,
tokenises every training row with the function training uses, and stores the result. Until a
worker does, the page says it is waiting for one.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from sqlmodel import col, select

from app import side_queue
from app.db import Database
from app.errors import NotFound, UserError
from app.models import Dataset, DatasetReport, SideWorkStatus
from app.services import model_registry
from app.train_config import TokenReportSettings

DEFAULT_MAX_SEQ_LEN = TokenReportSettings.model_fields["max_seq_len"].default
# What to do about each setting a report refuses.
SETTING_HINTS = {
    "max_seq_len": "Use the max length you will train with, e.g. 2048.",
    "train_on": "assistant: loss on the replies only (the default); all: loss on every token.",
    "chat_template": "Leave it out to use the template that comes with the model.",
}


class ReportRequestError(UserError):
    code = "report_refused"


def request_report(
    db: Database,
    dataset: Dataset,
    *,
    base_model: str,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    train_on: str = "assistant",
    chat_template: str | None = None,
) -> DatasetReport:
    """A report for these choices: the existing one unless it failed, else a new queued one.
    A report whose worker died is requeued (or failed) first, never reused as "running"."""
    try:
        chosen = TokenReportSettings(
            max_seq_len=max_seq_len, train_on=train_on, chat_template=chat_template
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0])
        raise ReportRequestError(
            f"Setting {name}: {first['msg']}", SETTING_HINTS.get(name, ""), status_code=422
        ) from exc
    max_seq_len, train_on = chosen.max_seq_len, chosen.train_on.value
    chat_template = chosen.chat_template.value if chosen.chat_template is not None else None
    if dataset.valid_rows == 0:
        raise ReportRequestError(
            "The dataset has no valid rows to measure",
            "Fix the file and upload it again.",
            status_code=409,
        )
    model_registry.get_model(db, base_model)  # NotFound (404) for a model that is not registered
    side_queue.requeue_expired(db)
    with db.write() as session:
        existing = session.exec(
            select(DatasetReport)
            .where(
                DatasetReport.dataset_id == dataset.id,
                DatasetReport.base_model == base_model,
                DatasetReport.max_seq_len == max_seq_len,
                DatasetReport.train_on == train_on,
                DatasetReport.chat_template == chat_template
                if chat_template is not None
                else col(DatasetReport.chat_template).is_(None),
                DatasetReport.status != SideWorkStatus.failed,
            )
            .order_by(col(DatasetReport.id).desc())
        ).first()
        if existing is not None:
            return existing
        report = DatasetReport(
            dataset_id=dataset.id,
            base_model=base_model,
            max_seq_len=max_seq_len,
            train_on=train_on,
            chat_template=chat_template,
        )
        session.add(report)
        session.flush()
        session.refresh(report)
    return report


def request_default_report(db: Database, dataset: Dataset) -> DatasetReport | None:
    """After an upload: a report for the newest registered model at the default max length, so
    the dataset page has numbers without a click. None when no model is registered."""
    registered = model_registry.list_models(db)
    if not registered or dataset.valid_rows == 0:
        return None
    newest = max(registered, key=lambda m: m.created_at)
    return request_report(db, dataset, base_model=newest.name)


def request_again(
    db: Database, dataset: Dataset, previous: DatasetReport | None
) -> DatasetReport | None:
    """After the rows changed (re-import): the same report as before, else the default one."""
    if dataset.valid_rows == 0:
        return None
    if previous is None:
        return request_default_report(db, dataset)
    try:
        return request_report(
            db,
            dataset,
            base_model=previous.base_model,
            max_seq_len=previous.max_seq_len,
            train_on=previous.train_on,
            chat_template=previous.chat_template,
        )
    except NotFound:  # the model was removed meanwhile
        return request_default_report(db, dataset)


def get_report(db: Database, dataset_id: str, report_id: int) -> DatasetReport:
    with db.read() as session:
        report = session.get(DatasetReport, report_id)
    if report is None or report.dataset_id != dataset_id:
        raise NotFound(f"No report {report_id} for this dataset", "Check the address.")
    return report


def latest_report(db: Database, dataset_id: str) -> DatasetReport | None:
    """The newest report of any status (what the page shows)."""
    with db.read() as session:
        return session.exec(
            select(DatasetReport)
            .where(DatasetReport.dataset_id == dataset_id)
            .order_by(col(DatasetReport.id).desc())
        ).first()


def latest_done_report(db: Database, dataset_id: str) -> DatasetReport | None:
    with db.read() as session:
        return session.exec(
            select(DatasetReport)
            .where(
                DatasetReport.dataset_id == dataset_id,
                DatasetReport.status == SideWorkStatus.succeeded,
            )
            .order_by(col(DatasetReport.id).desc())
        ).first()


def token_stats(report: DatasetReport | None) -> dict[str, Any] | None:
    """The API's `token_stats`: the report's choices and result, or None."""
    if report is None:
        return None
    return {
        "report_id": report.id,
        "base_model": report.base_model,
        "max_seq_len": report.max_seq_len,
        "train_on": report.train_on,
        "chat_template": report.chat_template,
        "finished_at": report.finished_at.isoformat() if report.finished_at else None,
        **report.result,
    }


def report_public(report: DatasetReport) -> dict[str, Any]:
    """A report as the API returns it."""
    return report.model_dump(mode="json")
