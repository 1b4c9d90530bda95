"""The System page (GPUs, workers, disk, the evaluation judge) and /healthz."""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.services import judge_check, system
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
    return render(
        request,
        "system/index.html",
        judge=judge_check.judge_setup(settings),
        judge_variables=judge_check.judge_variables(),
        **_context(db, settings),
    )


@router.post("/partials/system/judge-check", response_class=HTMLResponse, include_in_schema=False)
async def judge_check_partial(request: Request, settings: SettingsDep) -> HTMLResponse:
    check = await judge_check.check_judge(settings)
    return render(request, "system/_judge_check.html", check=check)


@router.get("/partials/system", response_class=HTMLResponse, include_in_schema=False)
def system_partial(request: Request, db: DbDep, settings: SettingsDep) -> HTMLResponse:
    return render(request, "system/_status.html", **_context(db, settings))
