"""/api/docs: the interactive API reference, from vendored Swagger UI (no CDN, no inline script)."""

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.web.templating import render

router = APIRouter()


@router.get("/api/docs", response_class=HTMLResponse, include_in_schema=False)
def api_docs(request: Request) -> HTMLResponse:
    return render(request, "api_docs.html")
