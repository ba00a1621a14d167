"""A thin, typed wrapper over a nats-py client.

:func:`connect` either fails fast (``retry_forever=False``, for the CLI) or
keeps trying in the background (``retry_forever=True``, for the Threadlet and
the Weaver), reconnecting after every outage with ``reconnect_wait_s`` between
attempts; subscriptions survive reconnects.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from torchloom.errors import NotReachableError, TorchloomError
from torchloom.transport.credentials import Credentials

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Message:
    """A received message: subject, payload and reply subject (empty when none)."""

    subject: str
    data: bytes
    reply: str


class _Client(Client):
    """nats-py's client with one fix and one fast path.

    The fix: the PONG of a flush that already timed out is skipped.

    nats-py (2.16) leaves a timed-out flush's cancelled future in its queue of PONG waiters;
    the late PONG then raises ``InvalidStateError`` inside the read loop, which ends it: the
    connection still says it is connected but delivers nothing more. Under load (a flush
    timing out on a busy loop) that made a Weaver with 10,000 ranks deaf for good. The same
    kind of bug as nats-io/nats.py#624 (the flusher's queue), fixed there the same way.

    The fast path: messages of an inline subscription (:meth:`Connection.subscribe_inline`)
    go straight from the parser to their handler, without nats-py's ``Msg``, the
    subscription's queue and a task switch per message.
    """

    def __init__(self) -> None:
        super().__init__()
        self._inline: dict[int, SyncHandler] = {}

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        handler = self._inline.get(sid)
        if handler is None or headers:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        _call(handler, Message(subject.decode(), data, reply.decode()))

    async def _process_pong(self) -> None:
        if self._pongs:
            future = self._pongs.pop(0)
            if not future.done():
                future.set_result(True)
            self._pongs_received += 1
            self._pings_outstanding = 0


Handler = Callable[[Message], Awaitable[None]]
SyncHandler = Callable[[Message], None]


def _call(handler: SyncHandler, msg: Message) -> None:
    try:
        handler(msg)
    except Exception:
        log.exception("handler for %s failed", msg.subject)


Hook = Callable[[], Awaitable[None]]


class Connection:
    """One NATS connection. Create it with :func:`connect`."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc

    @property
    def client(self) -> Client:
        """The nats-py client, for :mod:`torchloom.transport.jetstream`."""
        return self._nc

    @property
    def is_connected(self) -> bool:
        return bool(self._nc.is_connected)

    @property
    def identity(self) -> str:
        """This connection as the server knows it: ``<server id>/<client id>`` (empty while
        disconnected). It changes at every reconnect; the server's connect and disconnect
        advisories name the same pair (see :mod:`torchloom.transport.advisories`)."""
        info = self._nc._server_info or {}
        cid = self._nc.client_id
        if not self._nc.is_connected or cid is None or not info.get("server_id"):
            return ""
        return f"{info['server_id']}/{cid}"

    @property
    def servers_known(self) -> int:
        """How many servers this client knows of: those given, plus those the cluster
        announced (its ``connect_urls``). 1 for a single server."""
        urls = (self._nc._server_info or {}).get("connect_urls") or []
        return max(1, len(urls))

    @property
    def connected_url(self) -> str | None:
        url = self._nc.connected_url
        return url.geturl() if url is not None else None

    async def publish(self, subject: str, data: bytes) -> None:
        """Publish on core NATS. Buffered by the client while reconnecting.

        Raises:
            NotReachableError: the connection is closed or its reconnect buffer is full.
        """
        try:
            await self._nc.publish(subject, data)
        except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
            raise NotReachableError(f"cannot publish on {subject}: {exc}") from None

    async def subscribe(self, subject: str, handler: Handler, *, queue: str = "") -> None:
        """Call ``handler`` for every message on ``subject`` (wildcards allowed).

        An exception in ``handler`` is logged and the subscription keeps going.
        """

        async def _cb(msg: Msg) -> None:
            try:
                await handler(Message(msg.subject, msg.data, msg.reply or ""))
            except Exception:
                log.exception("handler for %s failed", msg.subject)

        await self._nc.subscribe(subject, queue=queue, cb=_cb)

    async def subscribe_inline(
        self, subject: str, handler: SyncHandler, *, queue: str = ""
    ) -> None:
        """Call the plain function ``handler`` for every message on ``subject``, in the
        connection's read loop as each message is parsed: no per-message queue, object
        or task switch (about a third of the Weaver's time per telemetry message at 10,000
        ranks went there). For handlers that do no I/O and return in microseconds — the read
        loop waits for them. An exception in ``handler`` is logged and the subscription
        keeps going.
        """

        async def _cb(msg: Msg) -> None:  # a message that came before the fast path was set
            _call(handler, Message(msg.subject, msg.data, msg.reply or ""))

        sub = await self._nc.subscribe(subject, queue=queue, cb=_cb)
        if isinstance(self._nc, _Client):
            self._nc._inline[sub._id] = handler

    async def request(self, subject: str, data: bytes, *, timeout_s: float) -> bytes:
        """Send a request and wait for the reply payload.

        Raises:
            NotReachableError: no responder, or no reply within ``timeout_s``.
        """
        try:
            msg = await self._nc.request(subject, data, timeout=timeout_s)
        except nats.errors.NoRespondersError:
            raise NotReachableError(f"no Weaver is listening on {subject}") from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise NotReachableError(f"no reply on {subject} within {timeout_s:g} s") from None
        except nats.errors.ConnectionClosedError:
            raise NotReachableError("the NATS connection is closed") from None
        return bytes(msg.data)

    async def flush(self, *, timeout_s: float = 2.0) -> None:
        try:
            await self._nc.flush(timeout=timeout_s)  # type: ignore[arg-type]
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.ConnectionClosedError):
            raise NotReachableError(f"NATS flush did not complete within {timeout_s:g} s") from None

    async def close(self) -> None:
        if not self._nc.is_closed:
            try:
                await self._nc.close()
            except Exception:  # closing a broken connection must not fail the caller
                log.debug("error while closing NATS connection", exc_info=True)


async def connect(
    url: str,
    *,
    name: str,
    retry_forever: bool = False,
    connect_timeout_s: float = 2.0,
    reconnect_wait_s: float = 0.5,
    on_reconnect: Hook | None = None,
    on_disconnect: Hook | None = None,
    creds: Credentials | None = None,
    ping_interval_s: float = 1.0,
    max_outstanding_pings: int = 2,
) -> Connection:
    """Connect to the NATS server(s) at ``url`` (comma-separated for a cluster).

    Args:
        url: ``nats://host:port[,nats://…]``.
        name: the connection name shown by the server's monitoring.
        retry_forever: keep trying until a server answers (never raises), and
            reconnect forever after outages. When False, fail after one round.
        connect_timeout_s: the timeout of one connection attempt, in seconds.
        reconnect_wait_s: the wait between attempts on the same server, in seconds.
        on_reconnect: awaited after every successful reconnect.
        on_disconnect: awaited when the connection drops.
        creds: sign in with this nkey over TLS (a server of ``torchloom up --secure``);
            None: anonymous, plain TCP.
        ping_interval_s: how often the client pings the server, in seconds; after
            ``max_outstanding_pings`` unanswered pings it takes the server for gone and moves
            to another one of the cluster (a cut link closes no connection: without this it
            would wait for TCP, minutes): about 3 s with the defaults. nats-py's is 120 s.
        max_outstanding_pings: see ``ping_interval_s``.

    Raises:
        NotReachableError: ``retry_forever`` is False and no server answered.
        TorchloomError: the server refused the credentials (or asked for some).
    """

    async def _error_cb(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():  # the server refused this role
            log.warning("NATS (%s): %s", name, exc)
        else:
            log.debug("NATS (%s): %s", name, exc)

    async def _reconnected() -> None:
        log.info("NATS (%s): reconnected", name)
        if on_reconnect is not None:
            await on_reconnect()

    async def _disconnected() -> None:
        log.debug("NATS (%s): disconnected", name)
        if on_disconnect is not None:
            await on_disconnect()

    servers = [u.strip() for u in url.split(",") if u.strip()]
    nc = _Client()
    secure: dict[str, Any] = {}
    if creds is not None:
        secure = {"nkeys_seed_str": creds.nkey_seed, "inbox_prefix": creds.inbox_prefix}
        if creds.tls:
            secure["tls"] = creds.tls_context()
    try:
        await nc.connect(
            servers=servers,
            name=name,
            connect_timeout=connect_timeout_s,  # type: ignore[arg-type]  # seconds, floats work
            reconnect_time_wait=reconnect_wait_s,  # type: ignore[arg-type]
            max_reconnect_attempts=-1 if retry_forever else 1,
            allow_reconnect=retry_forever,
            ping_interval=ping_interval_s,  # type: ignore[arg-type]  # seconds, floats work
            max_outstanding_pings=max_outstanding_pings,
            error_cb=_error_cb,
            reconnected_cb=_reconnected,
            disconnected_cb=_disconnected,
            **secure,
        )
    except nats.errors.Error as exc:
        if "authorization" in str(exc).lower() or "authentication" in str(exc).lower():
            raise TorchloomError(
                f"NATS at {url} refused {name}: {exc} (credentials: set $TORCHLOOM_CREDS, "
                "see `torchloom creds --help`)"
            ) from None
        raise NotReachableError(f"no NATS server reachable at {url} ({exc})") from None
    except (TimeoutError, OSError) as exc:
        raise NotReachableError(
            f"no NATS server reachable at {url} ({exc or type(exc).__name__})"
        ) from None
    return Connection(nc)
