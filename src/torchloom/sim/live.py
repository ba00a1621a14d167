"""The simulator on real NATS: every simulated rank joins the real Weaver, follows the
desired config from the KV bucket's subject, and publishes telemetry and rank events on the
real subjects, from one asyncio loop and one connection (many ranks per process). The
Weaver cannot tell it from a training job, so its policies act on it for real.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from torchloom.errors import DecodeError, NotReachableError
from torchloom.protocol import (
    ControlReply,
    DesiredConfig,
    HistoryEvent,
    decode,
    encode,
    from_builtins,
    names,
)
from torchloom.sim.model import SimJob, SimSpec
from torchloom.transport import Connection, Message, connect, credentials_from_env


async def _join(conn: Connection, job: SimJob, rid: str, *, resuming: bool) -> None:
    """Join each rank of group ``rid``; joins held back by the Weaver's per-connection limit
    (many simulated ranks share one connection) are sent again after a pause."""
    for req in job.join_requests(rid, resuming=resuming):
        for _ in range(100):
            raw = await conn.request(
                names.join_subject(job.spec.job_id), encode(req), timeout_s=5.0
            )
            reply = decode(raw, ControlReply, kind="join reply")
            if reply.ok or reply.error is None or reply.error.code != "rate_limited":
                break
            await asyncio.sleep(0.1)
        if not reply.ok:
            raise NotReachableError(reply.error.message if reply.error else "join refused")
        job.apply(from_builtins(reply.data, DesiredConfig))


async def run_live(
    spec: SimSpec,
    *,
    nats_url: str,
    duration_s: float,
    on_event: Callable[[HistoryEvent], None] | None = None,
    tick_s: float = 0.05,
) -> SimJob:
    """Run ``spec``'s job for ``duration_s`` seconds of wall time against the Weaver on ``nats_url``.

    Args:
        on_event: called with each of the job's history events as the Weaver records them.
        tick_s: how often the simulation catches up with the wall clock, in seconds.

    Raises:
        NotReachableError: NATS or the Weaver did not answer a join.
    """
    job = SimJob(spec)
    conn = await connect(
        nats_url, name=f"torchloom-sim-{spec.job_id}", creds=credentials_from_env()
    )
    try:

        async def on_config(msg: Message) -> None:
            if msg.data:
                try:
                    job.apply(decode(msg.data, DesiredConfig, kind="desired config"))
                except DecodeError:
                    pass

        async def on_history(msg: Message) -> None:
            try:
                ev = decode(msg.data, HistoryEvent, kind="history event")
            except DecodeError:
                return
            job.on_history(ev)
            if on_event is not None:
                on_event(ev)

        await conn.subscribe(names.config_watch_subject(spec.job_id), on_config)
        await conn.subscribe(f"{names.PREFIX}.{spec.job_id}.history.>", on_history)
        for rid in list(job.groups):
            await _join(conn, job, rid, resuming=False)
        wall0, t0 = time.time(), time.monotonic()
        while (elapsed := time.monotonic() - t0) < duration_s:
            tel, events, joined = job.advance(elapsed)
            for m in tel:
                m.ts += wall0
                subject = names.telemetry_subject(spec.job_id, m.replica_id, m.rank)
                await conn.publish(subject, encode(m))
            for e in events:
                e.ts += wall0
                await conn.publish(
                    names.events_subject(spec.job_id, e.replica_id, e.rank), encode(e)
                )
            for rid in joined:
                await _join(conn, job, rid, resuming=True)
            await asyncio.sleep(tick_s)
        for g in job.groups.values():
            if g.alive:
                for e in [
                    job.event(g.replica_id, r, "exited", reason="finished") for r in job.ranks()
                ]:
                    e.ts += wall0
                    await conn.publish(
                        names.events_subject(spec.job_id, e.replica_id, e.rank), encode(e)
                    )
        await conn.flush()
    finally:
        await conn.close()
    return job
