"""The Adapters page, and an adapter's export page: download, Ollama Modelfile, merge into
the base (with progress), and the exports a worker builds (GGUF, LoRA GGUF, merged; listed with
their size, quantisation, sha256 and check; downloadable, deletable)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, StreamingResponse
from pydantic import ValidationError

from app.errors import UserError
from app.models import Adapter, MergeRequest
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


@router.get("/api/adapters/{adapter_id}/exports")
def list_exports(adapter_id: str, db: DbDep) -> list[dict[str, Any]]:
    return [exports.export_json(e) for e in exports.list_exports(db, adapter_id)]


@router.post("/api/adapters/{adapter_id}/exports", status_code=202)
def request_export(
    adapter_id: str, body: exports.ExportRequest, db: DbDep, settings: SettingsDep
) -> dict[str, Any]:
    return exports.export_json(exports.request_export(db, settings, adapter_id, body))


@router.get("/api/exports/{export_id}")
def export_status(export_id: RowId, db: DbDep) -> dict[str, Any]:
    return exports.export_json(exports.get_export(db, export_id))


@router.get("/api/exports/{export_id}/download", response_model=None)
def download_export(
    export_id: RowId, db: DbDep, settings: SettingsDep
) -> FileResponse | StreamingResponse:
    name, body = exports.export_download(db, settings, export_id)
    if isinstance(body, Path):
        return FileResponse(body, filename=name, media_type="application/octet-stream")
    return _zip_response(name, body)


@router.get("/api/exports/{export_id}/ollama")
def download_ollama_bundle(export_id: RowId, db: DbDep, settings: SettingsDep) -> StreamingResponse:
    name, body = exports.ollama_bundle(db, settings, export_id)
    return _zip_response(name, body)


@router.delete("/api/exports/{export_id}", status_code=204)
def delete_export(export_id: RowId, db: DbDep, settings: SettingsDep) -> Response:
    exports.delete_export(db, settings, export_id)
    return Response(status_code=204)


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
        exports=exports.list_exports(db, adapter_id),
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


@router.get(
    "/partials/adapters/{adapter_id}/exports", response_class=HTMLResponse, include_in_schema=False
)
def exports_partial(request: Request, adapter_id: str, db: DbDep) -> HTMLResponse:
    return _exports_panel(request, db, exports.get_adapter(db, adapter_id))


@router.post(
    "/partials/adapters/{adapter_id}/exports", response_class=HTMLResponse, include_in_schema=False
)
def export_from_page(
    request: Request,
    adapter_id: str,
    db: DbDep,
    settings: SettingsDep,
    kind: str = Form(...),
    quantization: str = Form("f16"),
) -> HTMLResponse:
    adapter = exports.get_adapter(db, adapter_id)
    try:
        body = exports.ExportRequest.model_validate({"kind": kind, "quantization": quantization})
    except ValidationError as exc:
        raise UserError(
            f"Not an export Tuneboard builds: {kind} {quantization}.",
            "Choose a kind (gguf, gguf-lora, merged) and a quantization (f16, q8_0, q4_K_M).",
            status_code=422,
            code="invalid",
        ) from exc
    exports.request_export(db, settings, adapter_id, body)
    return _exports_panel(request, db, adapter)


@router.post(
    "/partials/exports/{export_id}/delete", response_class=HTMLResponse, include_in_schema=False
)
def delete_from_page(
    request: Request, export_id: RowId, db: DbDep, settings: SettingsDep
) -> HTMLResponse:
    export = exports.get_export(db, export_id)
    adapter = exports.get_adapter(db, export.adapter_id)
    exports.delete_export(db, settings, export_id)
    return _exports_panel(request, db, adapter)


def _exports_panel(request: Request, db: Any, adapter: Adapter) -> HTMLResponse:
    """The adapter page's exports panel, as its partial routes return it."""
    return render(
        request,
        "adapters/_exports.html",
        adapter=adapter,
        exports=exports.list_exports(db, adapter.id),
    )
