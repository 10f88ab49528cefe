"""Error answers and HTTP basic auth for the API routers.

The error handling lives in the routes themselves (a custom ``APIRoute`` class) rather than in app-level exception
handlers, so the routers behave the same in whichever app they are included (the UI server, a test app).
Every error answer has one shape (:class:`~studio.api.models.ErrorResponse`)::

    {"error": "RequestValidationError" | "StudioError" | "HTTPException" | ..., "detail": "<message>",
     "field": "<field at fault or null>", "errors": [{"loc": ["body", "steps"], "msg": "...", "type": "..."}]}
"""
from __future__ import annotations

import logging
import secrets
from typing import Any, Callable, Iterable

from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import StudioError

log = logging.getLogger(__name__)

_LOC_ROOTS = ("body", "query", "path", "header", "cookie")


def field_from_loc(loc: Iterable[Any]) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] in _LOC_ROOTS:
        parts = parts[1:]
    return ".".join(parts) if parts else (str(next(iter(loc), "")) or None)


def error_body(error: str, detail: str, field: str | None = None, errors: list[dict] | None = None) -> dict:
    return {"error": error, "detail": detail, "field": field, "errors": errors or []}


def validation_response(exc: RequestValidationError) -> JSONResponse:
    items = []
    for err in exc.errors():
        loc = [p if isinstance(p, (str, int)) else str(p) for p in err.get("loc", ())]
        items.append({"loc": loc, "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))})
    field = field_from_loc(items[0]["loc"]) if items else None
    detail = "; ".join(f"{field_from_loc(i['loc']) or 'body'}: {i['msg']}" for i in items) or "Invalid request."
    return JSONResponse(status_code=422, content=error_body("RequestValidationError", detail, field, items))


def studio_error_response(exc: StudioError) -> JSONResponse:
    status = exc.status if isinstance(exc.status, int) and 400 <= exc.status < 600 else 422
    loc = ["body", *exc.field.split(".")] if exc.field else ["body"]
    kind = "not_found" if status == 404 else "value_error"
    return JSONResponse(status_code=status, content=error_body(
        type(exc).__name__, str(exc), exc.field, [{"loc": loc, "msg": str(exc), "type": kind}]))


def http_error_response(exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return JSONResponse(status_code=exc.status_code, content=error_body("HTTPException", detail),
                        headers=getattr(exc, "headers", None))


class StudioRoute(APIRoute):
    """Turns every exception of a route (validation, StudioError, auth, bugs) into the one error shape.

    A StudioError keeps its status (422 bad value, 404 unknown name, 409 conflict, ...); anything else is a bug:
    logged with its traceback and answered 500, the server keeps running.
    """

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Any:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return validation_response(exc)
            except StudioError as exc:
                return studio_error_response(exc)
            except StarletteHTTPException as exc:  # FastAPI's own (e.g. 400 on a body json cannot parse) too
                return http_error_response(exc)
            except Exception as exc:  # noqa: BLE001 - a bug: log it, answer 500, keep serving
                log.exception("API %s %s failed", request.method, request.url.path)
                return JSONResponse(status_code=500, content=error_body(
                    type(exc).__name__, f"Internal error: {exc}. This is a bug in the studio; the log has the "
                                        "details."))

        return route_handler


def normalise_credentials(auth: Any) -> list[tuple[str, str]]:
    """``[(user, pass), ...]``, ``"user:pass,user2:pass2"`` or None -> list of pairs."""
    if not auth:
        return []
    if isinstance(auth, str):
        pairs = []
        for item in auth.split(","):
            user, sep, password = item.strip().partition(":")
            if not sep or not user:
                raise ValueError(f"API auth entry {item!r} is not user:password")
            pairs.append((user, password))
        return pairs
    return [(str(u), str(p)) for u, p in auth]


def auth_dependency(credentials: list[tuple[str, str]]) -> Callable:
    """A FastAPI dependency: HTTP basic auth against ``credentials`` (401 + WWW-Authenticate otherwise)."""
    basic = HTTPBasic(auto_error=False, description="--api-auth user:password")
    encoded = [(u.encode(), p.encode()) for u, p in credentials]

    def check_api_auth(creds: HTTPBasicCredentials | None = Depends(basic)) -> None:
        if creds is not None:
            user, password = creds.username.encode(), creds.password.encode()
            ok = False
            for u, p in encoded:  # compare against every account so timing does not reveal which user exists
                ok |= secrets.compare_digest(user, u) & secrets.compare_digest(password, p)
            if ok:
                return
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return check_api_auth
