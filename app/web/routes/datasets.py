"""Dataset API: upload (multipart), list, show, delete. Thin: parse, call `app.services.datasets`."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.services import datasets
from app.services.dataset_errors import DatasetError
from app.services.datasets import DatasetServiceError

router = APIRouter(prefix="/api/datasets", tags=["datasets"])

# Multipart framing and the small form fields around the file.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


def _error(error: DatasetServiceError | DatasetError) -> JSONResponse:
    status = error.status_code if isinstance(error, DatasetServiceError) else 422
    return JSONResponse(datasets.error_body(error), status_code=status)


def _bad_request(message: str, hint: str | None = None) -> JSONResponse:
    return _error(DatasetServiceError(message, hint))


@router.post("", status_code=201)
async def upload_dataset(request: Request) -> Any:
    settings = request.app.state.settings
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.upload_max_bytes + MULTIPART_OVERHEAD_BYTES:
        return _error(datasets.too_large(settings))
    form = await request.form(max_files=1, max_fields=10)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            return _bad_request('no file in the upload; send it as the multipart field "file"')
        try:
            datasets.file_type_of(upload.filename or "")  # 415 before copying anything
            column_mapping = _column_mapping(form.get("column_mapping"))
        except DatasetServiceError as exc:
            return _error(exc)
        except ValueError as exc:
            return _bad_request(str(exc), 'Send it as JSON, e.g. {"prompt": "question"}.')
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
            )
        except (DatasetServiceError, DatasetError) as exc:
            return _error(exc)
    finally:
        await form.close()
    body = {**dataset.model_dump(mode="json"), "url": f"/datasets/{dataset.id}"}
    return JSONResponse(body, status_code=201)


def _column_mapping(raw: object) -> dict[str, str] | None:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if not isinstance(raw, str):
        raise ValueError("column_mapping must be a JSON object")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"column_mapping is not valid JSON: {exc.msg}") from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("column_mapping must be a JSON object of field -> column name")
    return value or None


@router.get("")
def list_datasets(request: Request) -> Any:
    return [d.model_dump(mode="json") for d in datasets.list_datasets(request.app.state.db)]


@router.get("/{dataset_id}")
def get_dataset(request: Request, dataset_id: str) -> Any:
    try:
        return datasets.get_dataset(request.app.state.db, dataset_id).model_dump(mode="json")
    except DatasetServiceError as exc:
        return _error(exc)


@router.delete("/{dataset_id}", status_code=204)
def delete_dataset(request: Request, dataset_id: str) -> Response:
    try:
        datasets.delete_dataset(request.app.state.db, request.app.state.settings, dataset_id)
    except DatasetServiceError as exc:
        return _error(exc)
    return Response(status_code=204)
