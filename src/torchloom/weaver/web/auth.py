"""Access to the dashboard and its API: bearer token, session cookie, host and CSRF checks.

Without a token, the dashboard serves loopback only (the default bind) and
anyone on the machine may use it. With a token:

* API clients send ``Authorization: Bearer <token>`` (curl, Prometheus'
  ``bearer_token``, scripts);
* a browser shows a login form, whose ``POST /api/session`` sets an HttpOnly,
  ``SameSite=Strict`` cookie holding an HMAC of the token (never the token);
* everything but the login form and its assets answers 401 without one of them.

Always: state changes are ``POST`` with a JSON body (:func:`require_json`; a
cross-site form cannot send one without a CORS preflight, which is never
granted), and when bound to loopback the ``Host`` header must name loopback (no
DNS rebinding).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from torchloom.paths import is_loopback

SESSION_COOKIE = "torchloom_session"
PUBLIC_PATHS = frozenset({"/", "/favicon.ico", "/static/login.js", "/static/app.css"})


class Access:
    """Who may use the dashboard.

    Args:
        token: the bearer token; None turns authentication off.
        loopback: the server is bound to loopback (``Host`` must then be loopback too).
    """

    def __init__(self, *, token: str | None, loopback: bool) -> None:
        if token is not None and len(token) < 8:
            raise ValueError("the dashboard token must have at least 8 characters")
        self.token = token
        self.loopback = loopback

    @property
    def required(self) -> bool:
        return self.token is not None

    def session_value(self) -> str:
        """The cookie value of a logged-in browser: HMAC-SHA256 of a fixed label under the token."""
        assert self.token is not None
        return hmac.new(self.token.encode(), b"torchloom-session-v1", hashlib.sha256).hexdigest()

    def check_token(self, candidate: str) -> bool:
        return self.token is not None and hmac.compare_digest(
            candidate.encode(), self.token.encode()
        )

    def allowed(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> bool:
        """True if the request carries the token (bearer) or a valid session cookie."""
        if self.token is None:
            return True
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and self.check_token(auth[7:].strip()):
            return True
        cookie = cookies.get(SESSION_COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie, self.session_value())


class AccessMiddleware:
    """ASGI middleware enforcing :class:`Access` on every HTTP request."""

    def __init__(self, app: ASGIApp, *, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method, path = scope["method"], scope["path"]
        host = _hostname(headers.get("host", ""))
        if self.access.loopback and not is_loopback(host):
            await _error(send, 421, "bad_host", f"host {host!r} is not served here")
            return
        if path in PUBLIC_PATHS or (path == "/api/session" and method == "POST"):
            await self.app(scope, receive, send)
            return
        if not self.access.allowed(headers, _cookies(headers.get("cookie", ""))):
            await _error(
                send,
                401,
                "unauthorized",
                "a dashboard token is required (Authorization: Bearer <token>, or log in)",
                extra=((b"www-authenticate", b'Bearer realm="torchloom"'),),
            )
            return
        await self.app(scope, receive, send)


def require_json(request: Request) -> None:
    """A dependency of every route: a POST (the only state-changing method) must carry JSON.

    Raises:
        HTTPException: 415 for a POST with any other content type.
    """
    if request.method != "POST":
        return
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise HTTPException(415, "send state changes as application/json")


def _hostname(host: str) -> str:
    if host.startswith("["):  # [::1]:8787
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _cookies(raw: str) -> dict[str, str]:
    out = {}
    for part in raw.split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            out[name] = value
    return out


async def _error(
    send: Send, status: int, code: str, message: str, *, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    body = json.dumps({"ok": False, "error": {"code": code, "message": message}}).encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
