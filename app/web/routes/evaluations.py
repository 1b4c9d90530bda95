"""An adapter's evaluation report: the API (read, re-run, cancel) and the report page, whose
live part polls itself while the evaluation runs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import HTMLResponse

from app.models import Evaluation
from app.services import evaluations
from app.services.exports import get_adapter
from app.web.deps import DbDep
from app.web.templating import render

router = APIRouter()


@router.get("/api/adapters/{adapter_id}/evaluation")
def evaluation_report(adapter_id: str, db: DbDep) -> dict[str, Any]:
    return evaluations.report(db, adapter_id)


@router.post("/api/adapters/{adapter_id}/evaluation", status_code=202)
def rerun_evaluation(
    adapter_id: str,
    db: DbDep,
    body: Annotated[evaluations.EvaluationRequest | None, Body()] = None,
) -> dict[str, Any]:
    evaluation = evaluations.request_evaluation(db, adapter_id, body)
    complete = evaluations.latest_complete(db, adapter_id)
    return evaluations.as_dict(get_adapter(db, adapter_id), evaluation, complete)


@router.delete("/api/adapters/{adapter_id}/evaluation")
def cancel_evaluation(adapter_id: str, db: DbDep) -> dict[str, Any]:
    evaluation = evaluations.cancel(db, adapter_id)
    complete = evaluations.latest_complete(db, adapter_id)
    return evaluations.as_dict(get_adapter(db, adapter_id), evaluation, complete)


def _report_context(db: DbDep, adapter_id: str, sort: str) -> dict[str, Any]:
    adapter = get_adapter(db, adapter_id)
    evaluation: Evaluation | None = evaluations.latest(db, adapter_id)
    shown = None
    if evaluation is not None:
        complete = evaluations.latest_complete(db, adapter_id)
        shown = evaluations.shown_report(evaluation, complete)
    return {
        "adapter": adapter,
        "evaluation": evaluation,  # the latest: its status, progress or error
        "report": shown,  # whose figures and rows are shown (an earlier one while it runs)
        "sort": sort,
        "figures": [] if shown is None else evaluations.figure_names(shown),
        "figure_names": evaluations.FIGURE_NAMES,
        "rows": [] if shown is None else evaluations.sorted_rows(shown, sort),
    }


@router.get(
    "/adapters/{adapter_id}/evaluation", response_class=HTMLResponse, include_in_schema=False
)
def report_page(
    request: Request, adapter_id: str, db: DbDep, sort: Annotated[str, Query()] = "difference"
) -> HTMLResponse:
    return render(request, "adapters/evaluation.html", **_report_context(db, adapter_id, sort))


@router.get(
    "/partials/adapters/{adapter_id}/evaluation",
    response_class=HTMLResponse,
    include_in_schema=False,
)
def report_partial(
    request: Request, adapter_id: str, db: DbDep, sort: Annotated[str, Query()] = "difference"
) -> HTMLResponse:
    return render(request, "adapters/_evaluation.html", **_report_context(db, adapter_id, sort))


@router.post(
    "/partials/adapters/{adapter_id}/evaluation",
    response_class=HTMLResponse,
    include_in_schema=False,
)
def rerun_from_page(request: Request, adapter_id: str, db: DbDep) -> HTMLResponse:
    evaluations.request_evaluation(db, adapter_id)
    return render(
        request, "adapters/_evaluation.html", **_report_context(db, adapter_id, "difference")
    )
