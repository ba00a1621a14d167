"""The dashboard server: bind, then serve the app and the feed on the Weaver's loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from pathlib import Path
from typing import Any

import uvicorn

from torchloom.errors import PortInUseError, TorchloomError
from torchloom.paths import DEFAULT_UI_PORT, is_loopback
from torchloom.weaver.service import Weaver
from torchloom.weaver.web.app import create_app
from torchloom.weaver.web.auth import Access
from torchloom.weaver.web.feed import Feed
from torchloom.weaver.web.playground import Playground

log = logging.getLogger("torchloom.web")


class Dashboard:
    """The live dashboard, HTTP API and ``/metrics`` of one Weaver.

    Args:
        weaver: the Weaver whose state is shown; actions go to its control entry point.
        host: interface to bind; loopback by default.
        port: TCP port; 0 picks a free one.
        token: bearer token for page and API; None (only allowed on loopback) turns auth off.
        push_interval_ms: period of live updates to each page, in milliseconds.
        tls_cert: certificate (PEM) to serve HTTPS with; None: plain HTTP.
        tls_key: its private key (PEM).
        playground: the samplers by job and where imported weights go (the playground page).

    Raises:
        TorchloomError: ``host`` is not loopback and no ``token`` is given (anyone on the
            network could steer the run), or the address cannot be bound.
    """

    def __init__(
        self,
        weaver: Weaver,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_UI_PORT,
        token: str | None = None,
        push_interval_ms: float = 500.0,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        playground: Playground | None = None,
    ) -> None:
        self.tls = (tls_cert, tls_key) if tls_cert and tls_key else None
        loopback = is_loopback(host)
        if not loopback and not token:
            raise TorchloomError(
                f"refusing to serve the dashboard on {host} without a token: anyone who can "
                "reach it could steer the run; pass --ui-token (or TORCHLOOM_UI_TOKEN)"
            )
        try:
            self.access = Access(token=token or None, loopback=loopback)
        except ValueError as exc:
            raise TorchloomError(str(exc)) from None
        self.weaver = weaver
        self.feed = Feed(weaver, push_interval_ms=push_interval_ms)
        self.playground = playground or Playground()
        self.app = create_app(weaver, self.feed, self.access, self.playground)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            error = PortInUseError if exc.errno == errno.EADDRINUSE else TorchloomError
            raise error(
                f"cannot serve the dashboard on {host}:{port}: {exc.strerror}; "
                "choose another --ui-port (0 picks a free one) or --no-ui"
            ) from None
        self._sock.listen(128)
        self._sock.setblocking(False)
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self.server: uvicorn.Server | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{self.port}/"

    async def serve(self) -> None:
        """Serve until cancelled (on the Weaver's loop)."""
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
            ssl_certfile=str(self.tls[0]) if self.tls else None,
            ssl_keyfile=str(self.tls[1]) if self.tls else None,
        )
        self.server = uvicorn.Server(config)
        feed = asyncio.ensure_future(self.feed.run())
        try:
            await self.server.serve(sockets=[self._sock])
        finally:
            feed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feed
            await self.playground.worker.close()
            self._sock.close()

    def info(self) -> dict[str, Any]:
        return {"url": self.url, "auth": self.access.required}
