"""The login page that turns the access token into a cookie (only used when a token is set)."""

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.web.deps import SettingsDep
from app.web.security import COOKIE_NAME, safe_next, same_secret, session_value
from app.web.templating import render

router = APIRouter()


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_page(request: Request, next: str = "/") -> HTMLResponse:
    return render(request, "login.html", next=safe_next(next), error=None)


@router.post("/login", include_in_schema=False, response_model=None)
def login(
    request: Request,
    settings: SettingsDep,
    token: Annotated[str, Form(max_length=500)],
    next: Annotated[str, Form(max_length=2000)] = "/",
) -> Response:
    expected = settings.token.get_secret_value() if settings.token else None
    if expected is None or not same_secret(token, expected):
        return render(
            request,
            "login.html",
            status_code=401,
            next=safe_next(next),
            error="That token is not right.",
        )
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        session_value(expected),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=30 * 86400,
    )
    return response
