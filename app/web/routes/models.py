"""Base models: the Models page and /api/model_registry."""

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field

from app.models import BaseModelEntry
from app.services import model_registry
from app.web.deps import DbDep, SettingsDep
from app.web.templating import render

router = APIRouter()


class ModelRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(
        min_length=1,
        max_length=2000,
        description="A hub id (org/name) or an absolute path to a local folder.",
    )
    name: str | None = Field(default=None, max_length=200)


@router.get("/api/models")
def list_models(db: DbDep) -> dict[str, list[BaseModelEntry]]:
    return {"models": model_registry.list_models(db)}


@router.post("/api/models", status_code=201)
def register_model(body: ModelRegistration, db: DbDep, settings: SettingsDep) -> BaseModelEntry:
    return model_registry.register_model(db, settings, body.source, body.name)


@router.get("/api/models/{name:path}")
def get_model(name: str, db: DbDep) -> BaseModelEntry:
    return model_registry.get_model(db, name)


@router.get("/models", response_class=HTMLResponse, include_in_schema=False)
def models_page(request: Request, db: DbDep) -> HTMLResponse:
    return render(request, "models/list.html", models=model_registry.list_models(db))


@router.post("/models", include_in_schema=False, response_model=None)
def register_from_form(
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    source: Annotated[str, Form(max_length=2000)],
    name: Annotated[str, Form(max_length=200)] = "",
) -> HTMLResponse | RedirectResponse:
    try:
        model_registry.register_model(db, settings, source, name or None)
    except model_registry.UserError as exc:
        return render(
            request,
            "models/list.html",
            status_code=exc.status_code,
            models=model_registry.list_models(db),
            error=exc,
            source=source,
            name=name,
        )
    return RedirectResponse("/models", status_code=303)
