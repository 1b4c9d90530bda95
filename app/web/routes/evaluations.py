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
    return evaluations.as_dict(get_adapter(db, adapter_id), evaluation)


@router.delete("/api/adapters/{adapter_id}/evaluation")
def cancel_evaluation(adapter_id: str, db: DbDep) -> dict[str, Any]:
    evaluation = evaluations.cancel(db, adapter_id)
    return evaluations.as_dict(get_adapter(db, adapter_id), evaluation)


def _report_context(db: DbDep, adapter_id: str, sort: str) -> dict[str, Any]:
    adapter = get_adapter(db, adapter_id)
    evaluation: Evaluation | None = evaluations.latest(db, adapter_id)
    return {
        "adapter": adapter,
        "evaluation": evaluation,
        "sort": sort,
        "figures": [] if evaluation is None else evaluations.figure_names(evaluation),
        "figure_names": evaluations.FIGURE_NAMES,
        "rows": [] if evaluation is None else evaluations.sorted_rows(evaluation, sort),
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
