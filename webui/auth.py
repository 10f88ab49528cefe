"""One gate in front of the whole server, so --gradio-auth / --api-auth leave nothing open by accident.

Gradio's own ``auth=`` guards only some of its routes (``/config``, the queue), while ``/``, ``/gradio_api/reset``,
``/gradio_api/heartbeat/*`` and FastAPI's ``/docs`` + ``/openapi.json`` answer anybody. :class:`AuthGate` (ASGI
middleware) decides per request instead:

- the REST routers (``/sdapi/v1/...``, extension routes) pass: they check ``--api-auth`` themselves;
- ``/docs`` and ``/openapi.json`` need HTTP basic auth (``--api-auth``) or a UI login (``--gradio-auth``) when
  either is set; with ``--nowebui`` + ``--api-auth`` so does everything else;
- with ``--gradio-auth`` the UI answers without gradio's session cookie only for the login page and the static
  files it loads; ``GET /`` is then served without the embedded API description (it names every checkpoint).
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from typing import Any, Callable, Iterable

DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/openapi.json")
# what gradio's login page loads before anyone is logged in (seen in a browser: the page, its JS/CSS/fonts, theme)
LOGIN_PREFIXES = ("/assets/", "/static/", "/svelte/")
LOGIN_PATHS = {("GET", "/"), ("HEAD", "/"), ("POST", "/login"), ("POST", "/login/"), ("GET", "/logout"),
               ("GET", "/theme.css"), ("GET", "/favicon.ico"), ("GET", "/manifest.json"), ("GET", "/robots.txt")}
_API_INFO = re.compile(rb"window\.gradio_api_info = .*?;</script>", re.S)


def check_basic(header: str | None, credentials: list[tuple[str, str]]) -> bool:
    """``Authorization: Basic ...`` against every account (constant time per account)."""
    if not header or not credentials or not header.lower().startswith("basic "):
        return False
    try:
        user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    ok = False
    for u, p in credentials:
        ok |= secrets.compare_digest(user.encode(), u.encode()) & secrets.compare_digest(password.encode(), p.encode())
    return bool(sep) and ok


def gradio_user(gradio_app: Any) -> Callable[[dict], str | None]:
    """The logged-in UI user of a request, read the way gradio reads it (its session cookie -> ``app.tokens``)."""
    def user(cookies: dict) -> str | None:
        token = cookies.get(f"access-token-{gradio_app.cookie_id}") or \
            cookies.get(f"access-token-unsecure-{gradio_app.cookie_id}")
        return gradio_app.tokens.get(token) if token else None
    return user


def _cookies(scope: dict) -> dict:
    from starlette.requests import cookie_parser
    for name, value in scope.get("headers", ()):
        if name == b"cookie":
            return cookie_parser(value.decode("latin-1"))
    return {}


def _header(scope: dict, wanted: bytes) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == wanted:
            return value.decode("latin-1")
    return None


async def _answer(send: Callable, status: int, body: dict, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class AuthGate:
    """ASGI middleware; see the module docstring for the rules.

    ``api_routes``: the REST routes (they do their own basic auth). ``ui_user``: cookies -> user (None: not
    logged in), given when the UI has a login. ``api_credentials``: the ``--api-auth`` accounts.
    ``everything_basic``: ``--nowebui`` with ``--api-auth`` - every path needs basic auth.
    """

    def __init__(self, app: Any, *, api_routes: list, ui_user: Callable[[dict], str | None] | None,
                 api_credentials: list[tuple[str, str]], everything_basic: bool = False):
        self.app = app
        self.api_routes = api_routes
        self.ui_user = ui_user
        self.credentials = api_credentials
        self.everything_basic = everything_basic

    def _is_api(self, scope: dict) -> bool:
        from starlette.routing import Match
        return any(route.matches(scope)[0] != Match.NONE for route in self.api_routes)

    def _logged_in(self, scope: dict) -> bool:
        return self.ui_user is not None and self.ui_user(_cookies(scope)) is not None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket") or (not self.ui_user and not self.credentials):
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope.get("method", "GET")
        if self._is_api(scope):
            return await self.app(scope, receive, send)
        basic_ok = check_basic(_header(scope, b"authorization"), self.credentials)
        if self.everything_basic or path in DOCS_PATHS:
            if basic_ok or self._logged_in(scope):
                return await self.app(scope, receive, send)
            return await self._refuse(scope, send, basic=bool(self.credentials))
        if self.ui_user is None or self._logged_in(scope):  # a UI without login, or a logged-in user
            return await self.app(scope, receive, send)
        if (method, path) in LOGIN_PATHS or (method in ("GET", "HEAD") and path.startswith(LOGIN_PREFIXES)):
            if path == "/" and method == "GET":
                return await self._login_page(scope, receive, send)
            return await self.app(scope, receive, send)
        return await self._refuse(scope, send, basic=False)

    async def _refuse(self, scope: dict, send: Callable, *, basic: bool) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        ways = (["log in at / (--gradio-auth)"] if self.ui_user else []) + \
            (["send HTTP basic auth (--api-auth user:password)"] if basic else [])
        headers = [(b"www-authenticate", b'Basic realm="studio"')] if basic else []
        detail = f"Not authenticated: {' or '.join(ways)}."
        await _answer(send, 401, {"error": "Unauthorized", "detail": detail}, headers)

    async def _login_page(self, scope: dict, receive: Callable, send: Callable) -> None:
        """Gradio's page in its logged-out form, minus the API description it embeds anyway."""
        start: dict = {}
        chunks: list[bytes] = []

        async def keep(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]}
        await self.app(scope, receive, keep)
        body = b"".join(chunks)
        if start.get("status") == 200:
            body, found = _API_INFO.subn(b"window.gradio_api_info = {};</script>", body)
            if found != 1:  # gradio changed its page: refuse rather than leak what the login protects
                return await self._refuse(scope, send, basic=False)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
