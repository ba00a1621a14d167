"""A small synchronous client of the Weaver's control entry point, for the CLI and scripts."""

from __future__ import annotations

import asyncio
import getpass
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchloom.errors import NotReachableError, TorchloomError, from_wire
from torchloom.paths import read_endpoint, resolve_nats_url
from torchloom.protocol import (
    CHANGE_OPS,
    ControlReply,
    ControlRequest,
    HistoryEvent,
    decode,
    encode,
    names,
)
from torchloom.protocol.messages import ControlOp
from torchloom.protocol.names import ALL_JOBS
from torchloom.transport import (
    Credentials,
    History,
    connect,
    credentials_from_env,
    load_credentials,
)


def resolve_creds(state_dir: Path | None = None) -> Credentials | None:
    """``$TORCHLOOM_CREDS``, else the operator credentials of the ``torchloom up`` whose state
    dir this is (when it runs secure), else None.

    Raises:
        TorchloomError: a credentials file that cannot be read.
    """
    creds = credentials_from_env()
    if creds is not None:
        return creds
    endpoint = read_endpoint(state_dir) or {}
    path = endpoint.get("operator_creds")
    return load_credentials(Path(path)) if isinstance(path, str) else None


def who(role: str = "cli") -> str:
    """Who asks: ``<role>:<user>@<host>`` (``role`` alone when those are unknown)."""
    try:
        return f"{role}:{getpass.getuser()}@{socket.gethostname()}"
    except Exception:
        return role


class WeaverClient:
    """Talks to the Weaver through NATS request/reply.

    Args:
        nats_url: explicit URL; else ``$TORCHLOOM_NATS_URL``, then the state dir's endpoint.
        state_dir: the state dir of a ``torchloom up`` to find.
        creds: credentials on a secure NATS; None: ``$TORCHLOOM_CREDS``, then the operator
            credentials named in the state dir's endpoint (the machine of ``torchloom up``).
        timeout_s: how long one request waits for its reply, in seconds.

    Raises:
        NotReachableError: (from every call) no NATS URL is known, NATS is down, or no Weaver answers.
    """

    def __init__(
        self,
        *,
        nats_url: str | None = None,
        state_dir: Path | None = None,
        timeout_s: float = 5.0,
        creds: Credentials | None = None,
    ) -> None:
        url = resolve_nats_url(nats_url, state_dir)
        self.creds = creds or resolve_creds(state_dir)
        if not url:
            raise NotReachableError(
                "no torchloom is running here: start one with `torchloom up`, "
                "or point to one with --nats-url / TORCHLOOM_NATS_URL"
            )
        self.nats_url = url
        self.timeout_s = timeout_s

    def request(self, req: ControlRequest) -> ControlReply:
        """Send one control request; an error reply raises the :class:`TorchloomError` subclass
        its code names (``InvalidKnobError``, ``UnknownJobError``, …, with ``remote`` set:
        :func:`torchloom.errors.from_wire`).

        A request with a ``request_id`` (every change :meth:`control` sends) is sent again
        while no reply comes, until ``timeout_s`` has passed: across a Weaver's failover the
        standby answers it, and the id makes sure a change that did land the first time is
        not made twice. So is one the Weaver refused because its write did not reach JetStream
        (a cluster electing a new leader for the config bucket after a server loss).
        """
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                reply = asyncio.run(self._request(req, timeout_s=deadline - time.monotonic()))
            except NotReachableError:
                if not req.request_id or time.monotonic() > deadline - 0.25:
                    raise
                time.sleep(0.25)
                continue
            unwritten = reply.error is not None and reply.error.code == NotReachableError.code
            if not (unwritten and req.request_id and time.monotonic() < deadline - 0.25):
                break
            time.sleep(0.25)
        if not reply.ok:
            err = reply.error
            if err is None:
                raise from_wire("error", "refused")
            raise from_wire(err.code, err.message, knob=err.knob)
        return reply

    async def _request(self, req: ControlRequest, *, timeout_s: float) -> ControlReply:
        timeout_s = max(timeout_s, 0.1)
        conn = await connect(
            self.nats_url,
            name="torchloom-cli",
            connect_timeout_s=min(timeout_s, 2.0),
            creds=self.creds,
        )
        try:
            # a retried request waits for less than the whole timeout each time
            per_try_s = timeout_s if not req.request_id else min(timeout_s, 2.0)
            raw = await conn.request(
                names.control_subject(req.job_id), encode(req), timeout_s=per_try_s
            )
        finally:
            await conn.close()
        return decode(raw, ControlReply, kind="control reply")

    def status(
        self,
        job_id: str | None = None,
        *,
        states: list[str] | None = None,
        replica_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
        sort: str = "attention",
    ) -> dict[str, Any]:
        """A summary of the job (every job when None) and a page of its ranks, filtered by
        state (``live``/``dead`` stand for those groups) and replica group; see
        :class:`torchloom.weaver.views.StatusQuery`."""
        values: dict[str, Any] = {"limit": limit, "offset": offset, "sort": sort}
        if states:
            values["state"] = list(states)
        data = self.request(
            ControlRequest(
                op="status",
                job_id=job_id or ALL_JOBS,
                replica_id=replica_id,
                values=values,
                requested_by=who(),
            )
        ).data
        return data if isinstance(data, dict) else {}

    def control(
        self,
        op: ControlOp,
        job_id: str,
        *,
        values: dict[str, Any] | None = None,
        replica_id: str | None = None,
        reason: str = "",
    ) -> ControlReply:
        return self.request(
            ControlRequest(
                op=op,
                job_id=job_id,
                values=values or {},
                replica_id=replica_id,
                reason=reason,
                requested_by=who(),
                request_id=uuid.uuid4().hex if op in CHANGE_OPS else "",
            )
        )

    def history(
        self, job_id: str | None, *, follow: bool, on_event: Callable[[HistoryEvent], None]
    ) -> None:
        """Call ``on_event`` with every stored event of ``job_id`` (all jobs if None), oldest
        first; with ``follow``, keep going with new ones until interrupted."""

        async def _run() -> None:
            conn = await connect(
                self.nats_url,
                name="torchloom-cli-events",
                retry_forever=follow,
                creds=self.creds,
            )
            try:
                async for raw in History(conn).read(names.history_filter(job_id), follow=follow):
                    try:
                        on_event(decode(raw, HistoryEvent, kind="history event"))
                    except TorchloomError:
                        continue
            finally:
                await conn.close()

        asyncio.run(_run())
