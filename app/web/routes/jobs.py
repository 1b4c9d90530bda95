"""Jobs: the queue page, the New Job form, the job page, and /api/jobs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Body, Header, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from app import queue
from app.errors import NotFound, whole_number
from app.models import Dataset, Job
from app.services import evaluations, job_events, job_views, jobs, model_registry
from app.services.demo import DEMO_MODEL
from app.train_config import MAX_DATASETS, PRESETS, TrainConfig
from app.web.deps import SQL_INT_MAX, DbDep, JobStreamsDep, RowId, SettingsDep
from app.web.templating import render

router = APIRouter()

# Ids are 64-bit database integers: a larger number is a 422, not an OverflowError in the driver.
JobId = RowId


class MoveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    where: Literal["top", "up", "down"]


class RetryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    from_scratch: bool = False


# --- JSON API -------------------------------------------------------------------------------------


@router.post("/api/jobs", status_code=201)
def create_job(config: TrainConfig, db: DbDep, settings: SettingsDep) -> Job:
    return jobs.create_job(db, settings, config)


@router.get("/api/jobs/compare")
def compare_jobs(db: DbDep, ids: Annotated[list[str], Query()]) -> dict[str, Any]:
    """Loss and eval-loss curves and configs of several jobs (`?ids=1,2,3`)."""
    chosen = job_views.parse_ids(ids)
    # each run's adapter's latest complete evaluation report, by job id
    return {
        "jobs": job_views.compare(db, chosen),
        "evaluations": evaluations.figures_by_job(db, chosen),
    }


@router.get("/api/jobs")
def list_jobs(db: DbDep) -> dict[str, list[dict[str, Any]]]:
    """Every job; a running one whose worker no longer renews its lease reads "lost_contact"."""
    return {"jobs": [job_views.api_view(job) for job in queue.list_jobs(db)]}


@router.get("/api/jobs/{job_id}")
def get_job(job_id: JobId, db: DbDep) -> dict[str, Any]:
    """The job; status "lost_contact" (not "running") when its worker no longer renews its lease."""
    return job_views.api_view(queue.get_job(db, job_id))


@router.post("/api/jobs/{job_id}/cancel")
def cancel_job(job_id: JobId, db: DbDep) -> Job:
    return queue.request_cancel(db, job_id)


@router.post("/api/jobs/{job_id}/move")
def move_job(job_id: JobId, body: MoveRequest, db: DbDep) -> Job:
    return queue.move(db, job_id, body.where)


@router.post("/api/jobs/{job_id}/retry")
def retry_job(
    job_id: JobId,
    db: DbDep,
    settings: SettingsDep,
    body: Annotated[RetryRequest | None, Body()] = None,
) -> Job:
    return jobs.retry_job(db, settings, job_id, from_scratch=bool(body and body.from_scratch))


@router.delete("/api/jobs/{job_id}", status_code=204)
def delete_job(job_id: JobId, db: DbDep, settings: SettingsDep) -> Response:
    jobs.delete_job(db, settings, job_id)
    return Response(status_code=204)


@router.get("/api/jobs/{job_id}/metrics")
def job_metrics(
    job_id: JobId, db: DbDep, after: Annotated[int, Query(ge=0, le=SQL_INT_MAX)] = 0
) -> dict[str, Any]:
    """The job's metric rows after `after` (the live stream sends the same rows as events):
    every attempt's, each naming its `attempt`; a resumed attempt logs again from its
    checkpoint's step, and its rows are the ones that count for those steps."""
    return job_events.metrics_page(db, job_id, after)


@router.get("/api/jobs/{job_id}/adapter", response_class=RedirectResponse)
def job_adapter(job_id: JobId, db: DbDep) -> RedirectResponse:
    """The job's trained adapter as a zip (PEFT files, chat template, config, Modelfile)."""
    adapter = job_views.adapter_for(db, job_id)
    if adapter is None:
        raise NotFound(
            f"Job {job_id} has no adapter yet.", "An adapter is saved when a job succeeds."
        )
    return RedirectResponse(f"/api/adapters/{adapter.id}/download", status_code=307)


@router.get("/api/jobs/{job_id}/events", response_class=StreamingResponse)
async def job_event_stream(
    request: Request,
    job_id: JobId,
    db: DbDep,
    streams: JobStreamsDep,
    after: Annotated[int, Query(ge=0, le=SQL_INT_MAX)] = 0,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Server-Sent Events: `metric` rows after Last-Event-ID (else `after`), `status`, `done`."""
    await to_thread.run_sync(queue.get_job, db, job_id)  # 404 before the stream starts
    if last_event_id and last_event_id.strip():
        after = whole_number(
            last_event_id,
            "Last-Event-ID",
            "Send the id of the last event received (EventSource does), or leave it out.",
        )
    return StreamingResponse(
        streams.stream(request, job_id, after),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


# --- pages ----------------------------------------------------------------------------------------


def _queue_context(db: DbDep) -> dict[str, Any]:
    rows = job_views.job_rows(db, queue.list_jobs(db))
    return {
        "running": [r for r in rows if r.job.status == "running"],
        "queued": [r for r in rows if r.job.status == "queued"],
        "finished": [r for r in rows if r.job.status not in ("running", "queued")],
    }


def _header_context(db: DbDep, job_id: int) -> dict[str, Any]:
    job = queue.get_job(db, job_id)
    return {
        "job": job,
        "eta_seconds": job_views.eta_seconds(db, job),
        "adapter": job_views.adapter_for(db, job_id),
        "missing_kernel": job_views.missing_kernel(db, job),
    }


@router.get("/jobs", response_class=HTMLResponse, include_in_schema=False)
def jobs_page(request: Request, db: DbDep) -> HTMLResponse:
    return render(request, "jobs/list.html", **_queue_context(db))


@router.get("/partials/jobs", response_class=HTMLResponse, include_in_schema=False)
def jobs_partial(request: Request, db: DbDep) -> HTMLResponse:
    return render(request, "jobs/_queue.html", **_queue_context(db))


@router.post("/jobs/{job_id}/{action}", response_class=HTMLResponse, include_in_schema=False)
def job_action(
    request: Request,
    job_id: JobId,
    action: Literal["cancel", "top", "up", "down", "retry", "restart", "delete"],
    db: DbDep,
    settings: SettingsDep,
) -> HTMLResponse:
    """Queue-page buttons (htmx): do the action and return the refreshed queue partial."""
    if action == "cancel":
        queue.request_cancel(db, job_id)
    elif action in ("top", "up", "down"):
        queue.move(db, job_id, action)
    elif action in ("retry", "restart"):
        jobs.retry_job(db, settings, job_id, from_scratch=action == "restart")
    else:
        jobs.delete_job(db, settings, job_id)
    if request.headers.get("hx-target") == "job-header":
        return render(request, "jobs/_header.html", **_header_context(db, job_id))
    return render(request, "jobs/_queue.html", **_queue_context(db))


def _form_context(db: DbDep, values: dict[str, Any], preset: str | None) -> dict[str, Any]:
    first_weight, mix_rows = jobs.mix_rows(values)
    return {
        "fields": jobs.form_fields(values),
        "first_weight": first_weight,
        "mix_rows": mix_rows,
        "max_mix_rows": MAX_DATASETS - 1,
        "models": model_registry.list_models(db),
        "datasets": jobs.ready_datasets(db),
        "presets": list(PRESETS),
        "preset": preset,
        "preset_query": {},
        "preset_forms": jobs.preset_forms(),
        "demo_model": DEMO_MODEL,
    }


@router.get("/jobs/new", response_class=HTMLResponse, include_in_schema=False)
def new_job_page(
    request: Request,
    db: DbDep,
    preset: str | None = None,
    dataset_id: str | None = None,
    base_model: str | None = None,
) -> HTMLResponse:
    preset = jobs.suggested_preset(db, preset, dataset_id, base_model)
    values = jobs.preset_values(preset)
    chosen = {k: v for k, v in (("dataset_id", dataset_id), ("base_model", base_model)) if v}
    values.update(chosen)
    context = _form_context(db, values, preset)
    context["preset_query"] = chosen  # a preset button keeps the chosen model and dataset
    return render(request, "jobs/new.html", errors={}, **context)


@router.post("/jobs/new", include_in_schema=False, response_model=None)
async def create_job_from_form(
    request: Request, db: DbDep, settings: SettingsDep
) -> HTMLResponse | RedirectResponse:
    form = {k: str(v) for k, v in (await request.form()).items()}
    try:
        job = jobs.create_job(db, settings, jobs.config_from_form(form))
    except jobs.InvalidConfig as exc:
        return render(
            request,
            "jobs/new.html",
            status_code=422,
            errors=exc.field_errors,
            error=exc,
            **_form_context(db, form, None),
        )
    except jobs.UserError as exc:
        return render(
            request,
            "jobs/new.html",
            status_code=exc.status_code,
            errors={},
            error=exc,
            **_form_context(db, form, None),
        )
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


@router.get("/jobs/compare", response_class=HTMLResponse, include_in_schema=False)
def compare_page(
    request: Request, db: DbDep, ids: Annotated[list[str] | None, Query()] = None
) -> HTMLResponse:
    chosen = job_views.parse_ids(ids or [])
    compared = job_views.compare(db, chosen) if len(chosen) >= 2 else []
    compared_ids = [int(c["id"]) for c in compared]
    report_figures = evaluations.figures_by_job(db, compared_ids)
    return render(
        request,
        "jobs/compare.html",
        ids=",".join(str(i) for i in chosen),
        chosen=chosen,
        compared=compared,
        columns=job_views.compare_columns(compared),
        config_rows=job_views.config_table([c["config"] for c in compared]),
        report_figures=report_figures,
        report_rows=evaluations.compare_rows(report_figures, compared_ids),
        jobs=queue.list_jobs(db),
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
def job_page(request: Request, job_id: JobId, db: DbDep, settings: SettingsDep) -> HTMLResponse:
    context = _header_context(db, job_id)
    job = context["job"]
    with db.read() as s:
        dataset = s.get(Dataset, job.dataset_id)
    return render(
        request,
        "jobs/detail.html",
        dataset=dataset,
        mix=job_views.dataset_mix(db, settings.layout, job),
        run=job_views.run_facts(db, job),
        tensorboard=job_views.tensorboard_logs(settings, job),
        log_lines=jobs.log_tail(settings, job),
        config=TrainConfig.model_validate(job.config),
        charts=job_views.charts_for(db, job),
        # The charts' one source: the stream sends the rows so far, then each new one.
        events_url=f"/api/jobs/{job_id}/events",
        **context,
    )


@router.get("/partials/jobs/{job_id}/header", response_class=HTMLResponse, include_in_schema=False)
def job_header_partial(request: Request, job_id: JobId, db: DbDep) -> HTMLResponse:
    return render(request, "jobs/_header.html", **_header_context(db, job_id))


@router.get("/partials/jobs/{job_id}/log", response_class=HTMLResponse, include_in_schema=False)
def job_log_partial(
    request: Request, job_id: JobId, db: DbDep, settings: SettingsDep
) -> HTMLResponse:
    job = queue.get_job(db, job_id)
    return render(request, "jobs/_log.html", log_lines=jobs.log_tail(settings, job))
