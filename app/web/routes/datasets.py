"""Datasets: the list and dataset pages, their partials and form actions, and /api/datasets
(upload, Hub import, list, show, delete, token reports). Thin: parse, call `app.services`,
render."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.dataset_errors import DatasetError
from app.errors import UserError, whole_number
from app.models import Dataset, DatasetReport, DatasetStatus, SideWorkStatus
from app.services import datasets, model_registry, system
from app.services.datasets import DatasetServiceError, hub
from app.services.datasets import reports as dataset_reports
from app.services.datasets.formats import MAPPABLE_FIELDS
from app.services.datasets.formats.tools import check_tool_definitions
from app.services.datasets.ingest import check_substitutions
from app.train_config import TokenReportSettings
from app.web.deps import DbDep, RowId, SettingsDep
from app.web.templating import render

router = APIRouter(tags=["datasets"])

# The upload form's column fields (MAPPABLE_FIELDS): `column_<field>` names the file's column.
PREVIEW_ROWS = 20


def _error(error: DatasetServiceError | DatasetError) -> JSONResponse:
    return JSONResponse(datasets.error_body(error), status_code=error.status_code)


def _bad_request(message: str, hint: str = "") -> JSONResponse:
    return _error(DatasetServiceError(message, hint))


# --- JSON API -------------------------------------------------------------------------------------


class ReportRequest(TokenReportSettings):
    """POST /api/datasets/{id}/report: the model, and the job settings that decide the tokens."""

    base_model: str = Field(max_length=200)


@router.post("/api/datasets", status_code=201)
async def upload_dataset(request: Request) -> Any:
    settings = request.app.state.settings
    # The body's size is capped while it is read (app/web/body_limit.py), the file's just below.
    form = await request.form(max_files=1, max_fields=10 + len(MAPPABLE_FIELDS))
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            return _bad_request('No file in the upload; send it as the multipart field "file"')
        try:
            datasets.file_type_of(upload.filename or "")  # 415 before copying anything
            column_mapping = _column_mapping(form.get("column_mapping")) or _mapping_fields(form)
        except DatasetServiceError as exc:
            return _error(exc)
        except ValueError as exc:
            return _bad_request(str(exc), 'Send it as JSON, e.g. {"prompt": "question"}.')
        try:
            substitutions = _substitutions(form.get("substitutions"))
        except ValueError as exc:
            return _bad_request(
                str(exc),
                "Write one substitution a line, e.g. name = Kettlebot, or send a JSON object "
                'such as {"name": "Kettlebot", "author": "Acme"}.',
            )
        try:
            tools = _tools(form.get("tools"))
        except ValueError as exc:
            return _bad_request(
                str(exc),
                'Send the tools as OpenAI takes them: [{"type": "function", "function": '
                '{"name": "get_weather", "description": ..., "parameters": {...}}}].',
            )
        drop_bad_rows = str(form.get("drop_bad_rows") or "").lower() in ("1", "true", "on", "yes")
        name = form.get("name")
        try:
            temporary, size = await datasets.receive_upload(upload, settings)
            dataset = await run_in_threadpool(
                datasets.create_dataset,
                request.app.state.db,
                settings,
                upload_path=temporary,
                size_bytes=size,
                filename=upload.filename or "",
                name=name if isinstance(name, str) and name.strip() else None,
                column_mapping=column_mapping,
                drop_bad_rows=drop_bad_rows,
                substitutions=substitutions,
                tools=tools,
            )
        except (DatasetServiceError, DatasetError) as exc:
            return _error(exc)
    finally:
        await form.close()
    # So the dataset page has token numbers without a click (once a worker computes them).
    await run_in_threadpool(dataset_reports.request_default_report, request.app.state.db, dataset)
    body = {**_dataset_public(request, dataset), "url": f"/datasets/{dataset.id}"}
    return JSONResponse(body, status_code=201)


def _mapping_fields(form: Any) -> dict[str, str] | None:
    """`column_prompt=question` etc. from the upload page's mapping fields."""
    mapping = {}
    for field in MAPPABLE_FIELDS:
        value = form.get(f"column_{field}")
        if isinstance(value, str) and value.strip():
            mapping[field] = value.strip()
    return mapping or None


def _form_text(raw: object, field: str) -> str | None:
    """A text field of the upload form, stripped; None when left empty."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if not isinstance(raw, str):
        raise ValueError(f"The {field} field must be text")
    return raw.strip()


def _flat_json_object(text: str, field: str, shape: str) -> dict[str, str]:
    """`text` as one flat JSON object of strings (`shape` says what it maps)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"The {field} field is not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise ValueError(f"The {field} field is nested too deeply; it is one flat object") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"The {field} field must be a JSON object of {shape}")
    return value


def _column_mapping(raw: object) -> dict[str, str] | None:
    text = _form_text(raw, "column_mapping")
    if text is None:
        return None
    value = _flat_json_object(text, "column_mapping", "field -> column name")
    if not all(isinstance(v, str) for v in value.values()):
        raise ValueError("The column_mapping field must be a JSON object of field -> column name")
    return value or None


def _substitutions(raw: object) -> dict[str, str] | None:
    """The upload's `substitutions`: a JSON object of placeholder name -> value, or (the upload
    page's text box) one `name = value` a line; a line with nothing after `=` is skipped."""
    text = _form_text(raw, "substitutions")
    if text is None:
        return None
    if text.startswith(("{", "[")):
        pairs = _flat_json_object(text, "substitutions", "name -> value")
    else:
        pairs = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            name, equals, replacement = line.partition("=")
            if not equals:
                raise ValueError(f"Line {number} of substitutions has no '=': {line.strip()!r}")
            if replacement.strip():  # "author =" with nothing after it: not given yet
                pairs[name.strip()] = replacement.strip()
    return check_substitutions(pairs) or None


def _tools(raw: object) -> list[dict[str, Any]] | None:
    """The upload's `tools` for every row: a JSON list of OpenAI tool definitions."""
    text = _form_text(raw, "tools")
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"The tools field is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise ValueError("The tools field is nested too deeply") from None
    return check_tool_definitions(value) or None


def _dataset_public(request: Request, dataset: Dataset) -> dict[str, Any]:
    """A dataset as the API shows it: its record, `valid` and the latest done token report."""
    report = dataset_reports.latest_done_report(request.app.state.db, dataset.id)
    return {
        **datasets.dataset_public(dataset),
        "valid": dataset.status == "ready",
        "token_stats": dataset_reports.token_stats(report),
    }


@router.post("/api/datasets/import", status_code=202)
def import_from_hub(body: hub.HubImportRequest, db: DbDep) -> Any:
    """Import a dataset from the Hugging Face Hub: a worker fetches the split (202: queued);
    GET /api/datasets/imports/{id} follows it to the dataset it becomes."""
    return JSONResponse(hub.import_public(hub.request_import(db, body)), status_code=202)


@router.get("/api/datasets/imports/{import_id}")
def get_import(import_id: RowId, db: DbDep, settings: SettingsDep) -> Any:
    return hub.import_public(hub.settled(db, settings, import_id))


@router.get("/api/datasets")
def list_datasets(request: Request) -> Any:
    return [datasets.dataset_public(d) for d in datasets.list_datasets(request.app.state.db)]


@router.get("/api/datasets/{dataset_id}")
def get_dataset(request: Request, dataset_id: str) -> Any:
    try:
        dataset = datasets.get_dataset(request.app.state.db, dataset_id)
    except DatasetServiceError as exc:
        return _error(exc)
    return _dataset_public(request, dataset)


@router.post("/api/datasets/{dataset_id}/report")
def request_report(request: Request, dataset_id: str, body: ReportRequest, db: DbDep) -> Any:
    """Ask for a token report; a worker computes it. 202 while queued, 200 when already done."""
    try:
        dataset = datasets.get_dataset(db, dataset_id)
    except DatasetServiceError as exc:
        return _error(exc)
    report = dataset_reports.request_report(db, dataset, **body.model_dump())
    status = 200 if report.status == SideWorkStatus.succeeded else 202
    return JSONResponse(dataset_reports.report_public(report), status_code=status)


@router.get("/api/datasets/{dataset_id}/reports/{report_id}")
def get_report(dataset_id: str, report_id: RowId, db: DbDep) -> Any:
    return dataset_reports.report_public(dataset_reports.get_report(db, dataset_id, report_id))


@router.post("/api/datasets/{dataset_id}/reimport")
def reimport_dataset(request: Request, dataset_id: str, db: DbDep, settings: SettingsDep) -> Any:
    """Ingest the stored upload again, dropping bad rows."""
    try:
        previous = dataset_reports.latest_report(db, datasets.get_dataset(db, dataset_id).id)
        dataset = datasets.reimport_dataset(db, settings, dataset_id, drop_bad_rows=True)
    except (DatasetServiceError, DatasetError) as exc:
        return _error(exc)
    dataset_reports.request_again(db, dataset, previous)
    return _dataset_public(request, dataset)


@router.delete("/api/datasets/{dataset_id}", status_code=204)
def delete_dataset(request: Request, dataset_id: str) -> Response:
    try:
        datasets.delete_dataset(request.app.state.db, request.app.state.settings, dataset_id)
    except DatasetServiceError as exc:
        return _error(exc)
    return Response(status_code=204)


# --- pages ----------------------------------------------------------------------------------------


def _list_context(db: DbDep, settings: SettingsDep) -> dict[str, Any]:
    return {
        "imports": hub.recent_imports(db, settings),  # settled first: a new dataset is listed
        "datasets": datasets.list_datasets(db),
        "max_bytes": settings.upload_max_bytes,
        "mappable_fields": MAPPABLE_FIELDS,
        "hf_offline": settings.hf_offline,
    }


@router.get("/datasets", response_class=HTMLResponse, include_in_schema=False)
def datasets_page(request: Request, db: DbDep, settings: SettingsDep) -> HTMLResponse:
    return render(request, "datasets/list.html", **_list_context(db, settings))


@router.post("/datasets/import", include_in_schema=False, response_model=None)
async def import_from_page(
    request: Request, db: DbDep, settings: SettingsDep
) -> HTMLResponse | RedirectResponse:
    """The Hub import form: queue it and go back to the list, where its progress shows."""
    form = {k: str(v) for k, v in (await request.form()).items()}
    try:
        task = hub.request_import(db, hub.request_from_form(form))
    except UserError as exc:
        context = _list_context(db, settings)
        return render(
            request,
            "datasets/list.html",
            status_code=exc.status_code,
            error=exc,
            import_form=form,
            **context,
        )
    return RedirectResponse(f"/datasets#import-{task.id}", status_code=303)


@router.get(
    "/partials/datasets/imports/{import_id}",
    response_class=HTMLResponse,
    include_in_schema=False,
)
def import_partial(
    request: Request, import_id: RowId, db: DbDep, settings: SettingsDep
) -> HTMLResponse:
    return render(request, "datasets/_import.html", task=hub.settled(db, settings, import_id))


def _report_context(db: DbDep, settings: SettingsDep, dataset: Dataset) -> dict[str, Any]:
    report = dataset_reports.latest_report(db, dataset.id)
    return {
        "dataset": dataset,
        "report": report,
        "choices": _report_choices(report),
        "models": model_registry.list_models(db),
        "workers_alive": sum(1 for w in system.workers(db, settings) if w.alive),
    }


def _report_choices(report: DatasetReport | None) -> dict[str, Any]:
    if report is None:
        return {"base_model": None, "max_seq_len": dataset_reports.DEFAULT_MAX_SEQ_LEN}
    return {"base_model": report.base_model, "max_seq_len": report.max_seq_len}


def _detail_context(db: DbDep, settings: SettingsDep, dataset: Dataset) -> dict[str, Any]:
    using = datasets.jobs_using(db, dataset.id)
    return {
        **_report_context(db, settings, dataset),
        "preview": datasets.preview_rows(settings, dataset, PREVIEW_ROWS),
        "methods": datasets.suited_methods(dataset),
        "tool_rows": datasets.tool_rows(dataset),
        "tool_models": model_registry.tool_models(db) if datasets.tool_rows(dataset) else [],
        "jobs": using,
        "delete_refusal": datasets.delete_refusal(using),
    }


def _dataset_or_404(db: DbDep, dataset_id: str) -> Dataset:
    try:
        return datasets.get_dataset(db, dataset_id)
    except DatasetServiceError as exc:
        raise UserError(exc.message, exc.hint or "", code=exc.code, status_code=404) from exc


@router.get("/datasets/{dataset_id}", response_class=HTMLResponse, include_in_schema=False)
def dataset_page(
    request: Request, dataset_id: str, db: DbDep, settings: SettingsDep
) -> HTMLResponse:
    dataset = _dataset_or_404(db, dataset_id)
    return render(request, "datasets/detail.html", **_detail_context(db, settings, dataset))


@router.get(
    "/partials/datasets/{dataset_id}/report", response_class=HTMLResponse, include_in_schema=False
)
def report_partial(
    request: Request, dataset_id: str, db: DbDep, settings: SettingsDep
) -> HTMLResponse:
    dataset = _dataset_or_404(db, dataset_id)
    return render(request, "datasets/_report.html", **_report_context(db, settings, dataset))


@router.post("/datasets/{dataset_id}/report", include_in_schema=False, response_model=None)
async def request_report_from_form(
    request: Request, dataset_id: str, db: DbDep, settings: SettingsDep
) -> HTMLResponse | RedirectResponse:
    """The report form: htmx swaps in the report partial; a plain post goes back to the page."""
    dataset = _dataset_or_404(db, dataset_id)
    form = await request.form()
    try:
        dataset_reports.request_report(
            db,
            dataset,
            base_model=str(form.get("base_model") or ""),
            max_seq_len=whole_number(
                str(form.get("max_seq_len") or ""),
                "max_seq_len",
                "Use the max length you will train with, e.g. 2048.",
            ),
            train_on=str(form.get("train_on") or "assistant"),
            chat_template=str(form.get("chat_template") or "") or None,
        )
    except UserError as exc:
        context = _report_context(db, settings, dataset)
        # htmx swaps only a 2xx: the form shows the error in place; a plain post gets the 4xx.
        status = 200 if request.headers.get("hx-request") == "true" else exc.status_code
        return render(
            request, "datasets/_report.html", status_code=status, report_error=exc, **context
        )
    if request.headers.get("hx-request") == "true":
        return render(request, "datasets/_report.html", **_report_context(db, settings, dataset))
    return RedirectResponse(f"/datasets/{dataset.id}#report", status_code=303)


@router.post("/datasets/{dataset_id}/reimport", include_in_schema=False, response_model=None)
async def reimport_from_page(
    request: Request, dataset_id: str, db: DbDep, settings: SettingsDep
) -> HTMLResponse | RedirectResponse:
    """Re-import, dropping the bad rows; or, from the placeholders notice (its `substitutions`
    box), with those substitutions and the rows kept or dropped as they were."""
    dataset = await run_in_threadpool(_dataset_or_404, db, dataset_id)
    form = await request.form(max_files=0, max_fields=5)
    try:
        substitutions = _substitutions(form.get("substitutions"))
    except ValueError as exc:
        error = DatasetServiceError(
            str(exc), "Write one substitution a line, e.g. name = Kettlebot."
        )
        context = await run_in_threadpool(_detail_context, db, settings, dataset)
        return render(request, "datasets/detail.html", status_code=400, error=error, **context)
    finally:
        await form.close()
    return await run_in_threadpool(
        _reimport_page, request, db, settings, dataset, substitutions, "substitutions" in form
    )


def _reimport_page(
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    dataset: Dataset,
    substitutions: dict[str, str] | None,
    substituting: bool,
) -> HTMLResponse | RedirectResponse:
    previous = dataset_reports.latest_report(db, dataset.id)
    try:
        dataset = datasets.reimport_dataset(
            db,
            settings,
            dataset.id,
            drop_bad_rows=not substituting or dataset.status == DatasetStatus.ready,
            substitutions=substitutions if substituting else None,
        )
    except (DatasetServiceError, DatasetError) as exc:
        status = exc.status_code
        context = _detail_context(db, settings, dataset)
        return render(request, "datasets/detail.html", status_code=status, error=exc, **context)
    dataset_reports.request_again(db, dataset, previous)
    return RedirectResponse(f"/datasets/{dataset.id}", status_code=303)


@router.post("/datasets/{dataset_id}/delete", include_in_schema=False, response_model=None)
def delete_from_page(
    request: Request, dataset_id: str, db: DbDep, settings: SettingsDep
) -> HTMLResponse | RedirectResponse:
    dataset = _dataset_or_404(db, dataset_id)
    try:
        datasets.delete_dataset(db, settings, dataset.id)
    except DatasetServiceError as exc:
        context = _detail_context(db, settings, dataset)
        return render(
            request, "datasets/detail.html", status_code=exc.status_code, error=exc, **context
        )
    return RedirectResponse("/datasets", status_code=303)
