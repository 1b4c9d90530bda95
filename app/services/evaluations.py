"""Evaluation reports of adapters, the web side: read the latest one, ask for a new one, cancel.

A report is computed by a worker (`worker/evaluation.py`, shapes there); here it is read and
shaped for the API, the report page and the run-compare page. Only a `succeeded` evaluation is a
report: while one is queued or running its figures are empty and its rows are the ones answered
so far, and a failed or cancelled one has neither. So while a re-run is queued or running, or
after it failed, the API and the page show the latest succeeded report (`report_evaluation_id`
names it) beside the newer evaluation's status, progress or error.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, HttpUrl
from sqlmodel import col, select

from app import side_queue
from app.db import Database
from app.errors import NotFound
from app.models import Adapter, Evaluation, SideWorkStatus
from app.services.exports import get_adapter, newest, unfinished

FIGURES = ("eval_loss", "perplexity", "exact_match", "token_f1", "rouge_l")
PREFERENCE_FIGURES = ("reward_accuracy", "reward_margin")
# figure -> (what the page calls it, True when lower is better)
FIGURE_NAMES = {
    "eval_loss": ("Eval loss", True),
    "perplexity": ("Perplexity", True),
    "exact_match": ("Exact match", False),
    "token_f1": ("Token F1", False),
    "rouge_l": ("ROUGE-L", False),
    "reward_accuracy": ("Reward accuracy", False),
    "reward_margin": ("Reward margin", False),
}
SORTS = ("difference", "order")


class JudgeRequest(BaseModel):
    """The optional judge of a re-run: an OpenAI-compatible endpoint, its model, a rubric. Its
    key is the worker's setting TUNEBOARD_JUDGE_API_KEY, never part of a request or a report."""

    url: HttpUrl = Field(description="Base URL of an OpenAI-compatible API, e.g. http://host/v1")
    model: str = Field(min_length=1, max_length=200)
    rubric: str = Field(default="", max_length=4000)


class EvaluationRequest(BaseModel):
    """`POST /api/adapters/{id}/evaluation`: run the report again, optionally with a judge."""

    model_config = {"extra": "forbid"}

    max_prompts: int | None = Field(
        default=None,
        ge=0,
        le=1000,
        description="Held-out prompts both models answer (default: the eval_max_prompts setting)",
    )
    judge: JudgeRequest | None = None


def latest(db: Database, adapter_id: str) -> Evaluation | None:
    with db.read() as s:
        return newest(s, Evaluation, adapter_id)


def latest_complete(db: Database, adapter_id: str) -> Evaluation | None:
    """The adapter's newest succeeded evaluation: the report shown while a newer one runs."""
    with db.read() as s:
        return newest(s, Evaluation, adapter_id, Evaluation.status == SideWorkStatus.succeeded)


def shown_report(evaluation: Evaluation, complete: Evaluation | None) -> Evaluation:
    """The evaluation whose figures and rows are shown: the latest if it succeeded (or none
    did: its rows so far), else the latest succeeded one."""
    if evaluation.status == SideWorkStatus.succeeded or complete is None:
        return evaluation
    return complete


def request_evaluation(
    db: Database, adapter_id: str, request: EvaluationRequest | None = None
) -> Evaluation:
    """Queue a new evaluation of the adapter; an unfinished one is returned instead.

    A request whose worker died is requeued (or failed after its last attempt) first."""
    adapter = get_adapter(db, adapter_id)
    request = request or EvaluationRequest()
    side_queue.requeue_expired(db)
    with db.write() as s:
        existing = unfinished(s, Evaluation, adapter_id)
        if existing is not None:
            return existing
        previous = newest(s, Evaluation, adapter_id)
        judge = request.judge.model_dump(mode="json") if request.judge else {}
        evaluation = Evaluation(
            adapter_id=adapter.id,
            max_prompts=request.max_prompts,
            judge=judge,
            method=previous.method if previous else "",
        )
        s.add(evaluation)
        s.flush()
        s.refresh(evaluation)
        return evaluation


def cancel(db: Database, adapter_id: str) -> Evaluation:
    get_adapter(db, adapter_id)
    evaluation = latest(db, adapter_id)
    if evaluation is None:
        raise NotFound(
            f"Adapter {adapter_id} has no evaluation to cancel.",
            "Start one with POST /api/adapters/{id}/evaluation.",
        )
    cancelled = side_queue.cancel_evaluation(db, int(evaluation.id or 0))
    assert cancelled is not None
    return cancelled


def is_preference(evaluation: Evaluation) -> bool:
    return evaluation.method in ("dpo", "orpo") or any(
        evaluation.adapter_figures.get(name) is not None for name in PREFERENCE_FIGURES
    )


def figure_names(evaluation: Evaluation) -> tuple[str, ...]:
    return FIGURES + (PREFERENCE_FIGURES if is_preference(evaluation) else ())


def _figures(evaluation: Evaluation, side: Literal["base", "adapter"]) -> dict[str, Any]:
    stored = evaluation.base_figures if side == "base" else evaluation.adapter_figures
    if evaluation.status != SideWorkStatus.succeeded:
        return {}
    return {name: stored.get(name) for name in figure_names(evaluation)} | {
        k: stored[k] for k in ("rows", "prompts", "pairs", "compute_mode") if k in stored
    }


def sorted_rows(evaluation: Evaluation, sort: str = "difference") -> list[dict[str, Any]]:
    """The answered prompts: in held-out order, or where base and adapter differ most first."""
    if sort not in SORTS:
        raise NotFound(f"Unknown sort {sort!r}.", f"Sort by one of: {', '.join(SORTS)}.")
    rows = [dict(row, index=i + 1) for i, row in enumerate(evaluation.rows or [])]
    if sort == "difference":
        rows.sort(key=lambda row: -abs(float(row.get("difference") or 0.0)))
    return rows


def report(db: Database, adapter_id: str) -> dict[str, Any]:
    """`GET /api/adapters/{id}/evaluation`: the latest evaluation as the API shows it."""
    adapter = get_adapter(db, adapter_id)
    evaluation = latest(db, adapter_id)
    if evaluation is None:
        raise NotFound(
            f"Adapter {adapter_id} has not been evaluated.",
            "Adapters are evaluated when their job succeeds; start one with POST "
            f"/api/adapters/{adapter_id}/evaluation.",
        )
    return as_dict(adapter, evaluation, latest_complete(db, adapter_id))


def as_dict(
    adapter: Adapter, evaluation: Evaluation, complete_report: Evaluation | None = None
) -> dict[str, Any]:
    """The latest evaluation's status, progress and error, with the figures and rows of
    `shown_report` (`report_evaluation_id` says which evaluation they come from)."""
    complete = evaluation.status == SideWorkStatus.succeeded
    shown = shown_report(evaluation, complete_report)
    return {
        "id": evaluation.id,
        "adapter_id": adapter.id,
        "status": evaluation.status.value,
        "complete": complete,
        "method": evaluation.method,
        "stage": evaluation.stage,
        "progress": {
            "done": evaluation.progress_done,
            "total": evaluation.progress_total,
            "eta_seconds": evaluation.eta_seconds,
        },
        "notice": evaluation.notice,
        "error": side_queue.error_of(evaluation),
        "report_evaluation_id": shown.id,
        "base": _figures(shown, "base"),
        "adapter": _figures(shown, "adapter"),
        "judge": shown.judge_figures if shown.status == SideWorkStatus.succeeded else {},
        "rows": shown.rows or [],
        "created_at": evaluation.created_at,
        "finished_at": evaluation.finished_at,
    }


def figures_by_job(db: Database, job_ids: list[int]) -> dict[int, dict[str, Any]]:
    """The run-compare page's figures: per job, the latest complete report of its adapter."""
    found: dict[int, dict[str, Any]] = {}
    with db.read() as s:
        adapters = s.exec(select(Adapter).where(col(Adapter.job_id).in_(job_ids))).all()
        for adapter in adapters:
            evaluation = newest(
                s, Evaluation, adapter.id, Evaluation.status == SideWorkStatus.succeeded
            )
            if evaluation is not None:
                found[adapter.job_id] = {
                    "adapter_id": adapter.id,
                    "base": _figures(evaluation, "base"),
                    "adapter": _figures(evaluation, "adapter"),
                    "judge": evaluation.judge_figures,
                }
    return found


def compare_rows(figures: dict[int, dict[str, Any]], job_ids: list[int]) -> list[dict[str, Any]]:
    """Rows of the run-compare page's report table: one a figure any compared run has."""
    rows = []
    for name, (label, lower_is_better) in FIGURE_NAMES.items():
        values = [figures.get(job_id, {}).get("adapter", {}).get(name) for job_id in job_ids]
        bases = [figures.get(job_id, {}).get("base", {}).get(name) for job_id in job_ids]
        if any(v is not None for v in values):
            rows.append(
                {
                    "label": label,
                    "lower_is_better": lower_is_better,
                    "values": values,
                    "bases": bases,
                }
            )
    return rows
