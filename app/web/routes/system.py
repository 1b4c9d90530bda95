"""The System page (GPUs, workers, disk) and /healthz."""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.services import system
from app.web.deps import DbDep, JobStreamsDep, SettingsDep
from app.web.templating import render

router = APIRouter()


@router.get("/healthz")
def healthz(db: DbDep, settings: SettingsDep) -> dict[str, object]:
    return system.health(db, settings)


@router.get("/api/system")
def system_facts(db: DbDep, settings: SettingsDep, streams: JobStreamsDep) -> dict[str, object]:
    return {
        "live_streams": streams.stats(),
        "health": system.health(db, settings),
        "disk": system.disk(settings),
        "facts": system.facts(settings),
        "workers": [
            {
                **w.worker.model_dump(mode="json"),
                "heartbeat_age_seconds": w.heartbeat_age_seconds,
                "alive": w.alive,
            }
            for w in system.workers(db, settings)
        ],
    }


def _context(db: DbDep, settings: SettingsDep) -> dict[str, Any]:
    return {
        "workers": system.workers(db, settings),
        "disk": system.disk(settings),
        "facts": system.facts(settings),
        "health": system.health(db, settings),
    }


@router.get("/system", response_class=HTMLResponse, include_in_schema=False)
def system_page(request: Request, db: DbDep, settings: SettingsDep) -> HTMLResponse:
    return render(request, "system/index.html", **_context(db, settings))


@router.get("/partials/system", response_class=HTMLResponse, include_in_schema=False)
def system_partial(request: Request, db: DbDep, settings: SettingsDep) -> HTMLResponse:
    return render(request, "system/_status.html", **_context(db, settings))
