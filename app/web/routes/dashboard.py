"""The home page: what is training, what is queued, what is ready."""

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app import queue
from app.services import model_registry, system
from app.web.deps import DbDep, SettingsDep
from app.web.templating import render

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def home(request: Request, db: DbDep, settings: SettingsDep) -> HTMLResponse:
    return render(
        request,
        "dashboard.html",
        jobs=queue.list_jobs(db)[:10],
        models=model_registry.list_models(db),
        health=system.health(db, settings),
    )
