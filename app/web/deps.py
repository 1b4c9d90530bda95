"""FastAPI dependencies: the database and settings of the running app."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from app.db import Database
from app.errors import SQL_INT_MAX
from app.settings import Settings
from app.web.sse import JobStreams


def get_db(request: Request) -> Database:
    return request.app.state.db  # type: ignore[no-any-return]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_job_streams(request: Request) -> JobStreams:
    return request.app.state.job_streams  # type: ignore[no-any-return]


DbDep = Annotated[Database, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
JobStreamsDep = Annotated[JobStreams, Depends(get_job_streams)]


# A database row id in a path: bounded, so a huge number is a 422 and never overflows the driver.
RowId = Annotated[int, Path(ge=1, le=SQL_INT_MAX)]
