"""The Adapters page, and an adapter's export page: download, Ollama Modelfile, merge into
the base (with progress)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from app.models import MergeRequest
from app.services import exports
from app.web.deps import DbDep, RowId, SettingsDep
from app.web.templating import render

router = APIRouter()


def _zip_response(name: str, body) -> StreamingResponse:  # type: ignore[no-untyped-def]
    return StreamingResponse(
        body,
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.get("/api/adapters/{adapter_id}/download")
def download_adapter(adapter_id: str, db: DbDep, settings: SettingsDep) -> StreamingResponse:
    name, body = exports.adapter_zip(db, settings, adapter_id)
    return _zip_response(name, body)


@router.get("/api/adapters/{adapter_id}/modelfile")
def modelfile(adapter_id: str, db: DbDep, settings: SettingsDep) -> dict[str, str]:
    adapter = exports.get_adapter(db, adapter_id)
    m = exports.ollama_modelfile(db, settings, adapter)
    return {"modelfile": m.text, "template": m.template_kind, "note": m.note}


@router.post("/api/adapters/{adapter_id}/merge", status_code=202)
def request_merge(adapter_id: str, db: DbDep) -> MergeRequest:
    return exports.request_merge(db, adapter_id)


@router.get("/api/adapters/{adapter_id}/merge")
def merge_status(adapter_id: str, db: DbDep) -> MergeRequest | None:
    exports.get_adapter(db, adapter_id)
    return exports.latest_merge(db, adapter_id)


@router.get("/api/merges/{merge_id}/download")
def download_merged(merge_id: RowId, db: DbDep, settings: SettingsDep) -> StreamingResponse:
    name, body = exports.merged_zip(db, settings, merge_id)
    return _zip_response(name, body)


@router.get("/adapters", response_class=HTMLResponse, include_in_schema=False)
def adapters_page(request: Request, db: DbDep) -> HTMLResponse:
    return render(request, "adapters/list.html", adapters=exports.list_adapters(db))


@router.get("/adapters/{adapter_id}", response_class=HTMLResponse, include_in_schema=False)
def adapter_page(
    request: Request, adapter_id: str, db: DbDep, settings: SettingsDep
) -> HTMLResponse:
    adapter = exports.get_adapter(db, adapter_id)
    return render(
        request,
        "adapters/detail.html",
        adapter=adapter,
        modelfile=exports.ollama_modelfile(db, settings, adapter),
        merge=exports.latest_merge(db, adapter_id),
    )


@router.get(
    "/partials/adapters/{adapter_id}/merge", response_class=HTMLResponse, include_in_schema=False
)
def merge_partial(request: Request, adapter_id: str, db: DbDep) -> HTMLResponse:
    adapter = exports.get_adapter(db, adapter_id)
    return render(
        request, "adapters/_merge.html", adapter=adapter, merge=exports.latest_merge(db, adapter_id)
    )


@router.post(
    "/partials/adapters/{adapter_id}/merge", response_class=HTMLResponse, include_in_schema=False
)
def merge_from_page(request: Request, adapter_id: str, db: DbDep) -> HTMLResponse:
    adapter = exports.get_adapter(db, adapter_id)
    merge = exports.request_merge(db, adapter_id)
    return render(request, "adapters/_merge.html", adapter=adapter, merge=merge)
