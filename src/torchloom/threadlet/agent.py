"""The Threadlet's I/O thread: one daemon thread running an asyncio loop with a NATS session.

It finds the NATS server, joins the Weaver, follows the job's desired config
(a core-NATS subscription on the KV subject plus a direct get on every
(re)connect), and flushes telemetry every ``interval_ms``. The training thread
never waits on it: they share one :class:`~torchloom.threadlet.shared.Shared` (a few
single-writer attributes and two bounded buffers), and this thread touches nothing else. Every failure here is logged and retried; none reaches
the training loop. As a daemon thread it dies with the training process, so a
``kill -9`` stops the heartbeat at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import selectors
import threading
import time
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from torchloom.errors import DecodeError, NotReachableError, TorchloomError
from torchloom.paths import resolve_nats_url
from torchloom.protocol import (
    ControlReply,
    ControlRequest,
    DesiredConfig,
    JoinInfo,
    MetricPoint,
    RankEvent,
    Telemetry,
    decode,
    encode,
    from_builtins,
    names,
)
from torchloom.threadlet.device import DeviceSampler, trace_from_env
from torchloom.threadlet.shared import Shared
from torchloom.transport import (
    Connection,
    Credentials,
    KeyValue,
    Message,
    connect,
    credentials_from_env,
)

log = logging.getLogger("torchloom.threadlet")


class _GuardedSelector(selectors.DefaultSelector):
    """The I/O thread's selector: it holds ``busy`` except while it waits in ``select``.

    A fork made while this thread is inside OpenSSL (a TLS handshake's one-time library
    initialisation, in secure mode) leaves the child with a lock nobody will release: the
    child's next hash or TLS call hangs for good — seen as a DataLoader worker that never
    delivered its first batch (its fd-passing thread stuck in ``hmac.new``), one process in
    six. :func:`_before_fork` takes every live ``busy`` lock, so a fork happens only while
    each I/O thread waits in ``select`` (no OpenSSL call in progress).
    """

    def __init__(self, busy: threading.Lock) -> None:
        super().__init__()
        self._busy = busy

    def select(self, timeout: float | None = None) -> Any:
        self._busy.release()
        try:
            return super().select(timeout)
        finally:
            self._busy.acquire()


_GUARDS: weakref.WeakSet[Any] = weakref.WeakSet()
_HELD = threading.local()
FORK_WAIT_S = 1.0
"""How long a fork waits for the I/O threads to be idle before it goes ahead anyway."""


class _Guard:
    """A lock in a weak set (plain locks cannot be weakly referenced)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()


def _before_fork() -> None:
    _HELD.guards = [g for g in list(_GUARDS) if g.lock.acquire(timeout=FORK_WAIT_S)]


def _after_fork() -> None:
    for g in getattr(_HELD, "guards", ()):
        g.lock.release()
    _HELD.guards = []


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork
    )


class Agent:
    """Background NATS session of one rank.

    Args:
        shared: what it shares with the training thread: it reports its figures and feeds
            it the desired config (:class:`~torchloom.threadlet.shared.Shared`).
        nats_url: explicit URL; else ``$TORCHLOOM_NATS_URL`` or the state dir's endpoint,
            looked up again every ``retry_s`` until one is found.
        interval_s: telemetry flush period (the heartbeat), in seconds.
        join_timeout_s: how long one join request waits for the Weaver, in seconds.
        device_interval_s: period of device health samples (NVML or host), in seconds.
    """

    def __init__(
        self,
        shared: Shared,
        *,
        nats_url: str | None,
        state_dir: Path | None,
        interval_s: float,
        join_timeout_s: float = 2.0,
        retry_s: float = 1.0,
        device_interval_s: float = 1.0,
    ) -> None:
        self._shared = shared
        self._explicit_url = nats_url
        self._state_dir = state_dir
        self.interval_s = interval_s
        self.join_timeout_s = join_timeout_s
        self.retry_s = retry_s
        self._thread = threading.Thread(
            target=self._thread_main, name="torchloom-threadlet", daemon=True
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._conn: Connection | None = None
        self._need_sync = True
        self._sync_backoff_s = 0.25
        self._next_sync = 0.0
        self._seq = 0
        self._last_flush: tuple[float, int, int] | None = None
        self._last_phases: dict[str, float] = {}
        self._last_comm: dict[str, float] = {}
        self.device_interval_s = device_interval_s
        self._sampler: DeviceSampler | None = None
        self._next_sample = 0.0
        self.joined = threading.Event()
        self._asking: set[asyncio.Future[None]] = set()
        self.nats_url: str | None = None
        self._creds: Credentials | None = None
        self.flush_errors = 0
        self._refused = ""
        """The Weaver's reason for refusing the last join (empty: not refused)."""

    def start(self) -> None:
        self._thread.start()

    def stop(self, *, timeout_s: float = 2.0) -> None:
        """Ask the thread to send what is left (the exit event included) and end; wait up to ``timeout_s``."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                return
        if self._thread.ident is not None:
            self._thread.join(timeout_s)

    # ---- thread ------------------------------------------------------------------

    def _thread_main(self) -> None:
        guard = _Guard()
        guard.lock.acquire()  # held while this thread works; free while it waits for I/O
        _GUARDS.add(guard)
        loop = asyncio.SelectorEventLoop(_GuardedSelector(guard.lock))
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except Exception:
            log.exception("torchloom threadlet stopped; training goes on without control")
        finally:
            loop.close()
            _GUARDS.discard(guard)
            guard.lock.release()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        url = await self._find_url()
        if url is None:
            return
        self.nats_url = url
        try:
            self._creds = credentials_from_env()
        except TorchloomError as exc:
            log.error("torchloom: %s; connecting without credentials", exc)
        shared = self._shared
        connecting = asyncio.ensure_future(
            connect(
                url,
                name=f"threadlet-{shared.identity.job_id}-{shared.identity.replica_id}-{shared.identity.rank}",
                retry_forever=True,
                on_reconnect=self._on_reconnect,
                creds=self._creds,
            )
        )
        stop_wait = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([connecting, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():
            connecting.cancel()
            return
        stop_wait.cancel()
        self._conn = conn = connecting.result()
        try:
            await conn.subscribe(
                names.config_watch_subject(shared.identity.job_id), self._on_config
            )
            sync_task: asyncio.Task[None] | None = None
            while not self._stop.is_set():
                # joining waits for the Weaver; it must never hold up the heartbeat
                if (
                    self._need_sync
                    and time.monotonic() >= self._next_sync
                    and (sync_task is None or sync_task.done())
                ):
                    sync_task = asyncio.ensure_future(self._sync())
                await self._guarded_flush()
                self._answer_asks()
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=self.interval_s)
                except TimeoutError:
                    pass
            if sync_task is not None:
                sync_task.cancel()
            await self._guarded_flush()
            await conn.flush(timeout_s=1.0)
        except NotReachableError:
            pass
        finally:
            await conn.close()

    async def _find_url(self) -> str | None:
        assert self._stop is not None
        warned = False
        while not self._stop.is_set():
            url = resolve_nats_url(self._explicit_url, self._state_dir)
            if url:
                return url
            if not warned:
                log.warning(
                    "torchloom: no NATS URL (set TORCHLOOM_NATS_URL or run `torchloom up`); "
                    "training goes on with its own config and keeps looking"
                )
                warned = True
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=self.retry_s)
            except TimeoutError:
                pass
        return None

    async def _on_reconnect(self) -> None:
        self._need_sync = True
        self._next_sync = 0.0

    # ---- config ------------------------------------------------------------------

    async def _on_config(self, msg: Message) -> None:
        if not msg.data:
            return  # a KV delete or purge marker
        try:
            doc = decode(msg.data, DesiredConfig, kind="desired config")
        except DecodeError as exc:
            log.warning("ignoring a desired config: %s", exc)
            return
        self._shared.offer(doc, time.time())

    async def _sync(self) -> None:
        """Join the Weaver and read the latest desired config; back off on failure."""
        assert self._conn is not None
        shared = self._shared
        ident = shared.identity
        req = ControlRequest(
            op="join",
            job_id=ident.job_id,
            requested_by=f"rank {ident.replica_id}/{ident.rank}",
            join=JoinInfo(
                replica_id=ident.replica_id,
                rank=ident.rank,
                group_world_size=ident.group_world_size,
                host=ident.host,
                pid=ident.pid,
                device=ident.device,
                initial_values=shared.initial_values,
                resuming=ident.resuming,
                custom_knobs=list(shared.custom_knobs),
            ),
        )
        try:
            raw = await self._conn.request(
                names.join_subject(ident.job_id), encode(req), timeout_s=self.join_timeout_s
            )
            reply = decode(raw, ControlReply, kind="join reply")
            if not reply.ok:
                msg = reply.error.message if reply.error else "refused"
                if msg != self._refused:  # one line per reason, not one per retry
                    log.error("torchloom: the Weaver refused this rank's join: %s", msg)
                    self._refused = msg
                raise NotReachableError(msg)
            doc = from_builtins(reply.data, DesiredConfig)
            if not self.joined.is_set() and doc.snapshots:
                shared.join_version = max(s.version for s in doc.snapshots)
            shared.offer(doc, None)
            if self._refused:
                log.warning("torchloom: joined as rank %s/%d", ident.replica_id, ident.rank)
                self._refused = ""
            self._need_sync = False
            self._sync_backoff_s = 0.25
            self.joined.set()
        except (NotReachableError, DecodeError):
            await self._read_config_kv()
            self._next_sync = time.monotonic() + self._sync_backoff_s
            self._sync_backoff_s = min(self._sync_backoff_s * 2, 5.0)

    async def _read_config_kv(self) -> None:
        assert self._conn is not None
        try:
            kv = await KeyValue.open(self._conn, names.CONFIG_BUCKET, timeout_s=1.0)
            raw = await kv.get(names.config_key(self._shared.identity.job_id))
        except NotReachableError:
            return
        if raw:
            try:
                self._shared.offer(decode(raw, DesiredConfig, kind="desired config"), None)
            except DecodeError as exc:
                log.warning("ignoring the stored desired config: %s", exc)

    # ---- telemetry ---------------------------------------------------------------

    def _device_sample(self) -> dict[str, float] | None:
        """A device health sample every ``device_interval_s`` (None between two)."""
        mono = time.monotonic()
        if self.device_interval_s <= 0 or mono < self._next_sample:
            return None
        self._next_sample = mono + self.device_interval_s
        ident = self._shared.identity
        try:
            if self._sampler is None:
                overlay = trace_from_env(ident.replica_id)
                self._sampler = DeviceSampler(device=ident.device, overlay=overlay)
            return self._sampler.sample(time.time())
        except Exception as exc:  # a broken sensor must not end the heartbeat
            log.warning("torchloom: device sample failed (%s); trying again later", exc)
            return None

    def _answer_asks(self) -> None:
        """Send the questions the training side asked (:meth:`Shared.ask`), each on its own."""
        asks = self._shared.asks
        while asks:
            req, fut = asks.popleft()
            if fut.set_running_or_notify_cancel():
                task = asyncio.ensure_future(self._ask(req, fut))
                self._asking.add(task)  # held until done (the loop keeps weak references)
                task.add_done_callback(self._asking.discard)

    async def _ask(self, req: ControlRequest, fut: Future[ControlReply]) -> None:
        assert self._conn is not None
        try:
            raw = await self._conn.request(
                names.join_subject(req.job_id), encode(req), timeout_s=self.join_timeout_s
            )
            fut.set_result(decode(raw, ControlReply, kind="reply"))
        except Exception as exc:  # no answer, or a reply that does not decode
            fut.set_exception(exc)

    async def _guarded_flush(self) -> None:
        """One flush; a bug in it is logged (once) and the loop goes on: a failed flush must
        not end the heartbeat of a healthy training process."""
        try:
            await self._flush()
        except NotReachableError:
            pass
        except Exception:
            self.flush_errors += 1
            if self.flush_errors == 1:
                log.exception("torchloom: a telemetry flush failed; the Threadlet goes on")

    async def _flush(self) -> None:
        conn = self._conn
        if conn is None or not conn.is_connected:
            return  # points stay in the bounded buffer (oldest dropped, counted)
        shared = self._shared
        ident = shared.identity
        events = shared.events.drain()
        try:
            for ev in events:
                ev_msg = RankEvent(
                    kind=ev.kind,  # type: ignore[arg-type]
                    job_id=ident.job_id,
                    replica_id=ident.replica_id,
                    rank=ident.rank,
                    ts=ev.ts,
                    step=ev.step,
                    version=ev.version,
                    reason=ev.reason,
                    data=ev.data,
                    host=ident.host,
                    pid=ident.pid,
                )
                await conn.publish(
                    names.events_subject(ident.job_id, ident.replica_id, ident.rank), encode(ev_msg)
                )
                events = events[1:]
        except NotReachableError:
            shared.events.push_front(events)
            return
        # read step before applied_version: the hot path writes them in the other order
        step = shared.step
        applied = shared.applied_version
        samples = shared.samples
        ran = shared.steps_run
        phases = dict(shared.phase_totals)  # one C-level copy under the GIL
        comm = dict(shared.comm_totals)
        now_mono = time.monotonic()
        step_time = samples_per_s = phases_s = comm_bytes = None
        if self._last_flush is not None:
            t0, ran0, samples0 = self._last_flush
            dt = now_mono - t0
            if ran > ran0 and dt > 0:  # steps run, not the index (it jumps on a heal or load)
                step_time = dt / (ran - ran0)
                phases_s = _per_step(phases, self._last_phases, ran - ran0)
                comm_bytes = _comm_per_step(comm, self._last_comm, ran - ran0)
            if dt > 0:
                samples_per_s = (samples - samples0) / dt
        self._last_flush = (now_mono, ran, samples)
        self._last_phases = phases
        self._last_comm = comm
        raw_points = shared.points.drain(512)
        points = [
            MetricPoint(step=s, ts=ts, values=_to_floats(values)) for s, ts, values in raw_points
        ]
        self._seq += 1
        tel = Telemetry(
            job_id=ident.job_id,
            replica_id=ident.replica_id,
            rank=ident.rank,
            group_world_size=ident.group_world_size,
            seq=self._seq,
            ts=time.time(),
            step=step,
            state=shared.state,
            applied_version=applied,
            step_time_s=step_time,
            samples_per_s=samples_per_s,
            points=points,
            dropped_points=shared.points.dropped,
            config_lag_s=shared.config_lag_s,
            quorum=shared.quorum,
            phases_s=phases_s,
            comm_bytes=comm_bytes,
            device_stats=self._device_sample(),
            host=ident.host,
            pid=ident.pid,
            device=ident.device,
            conn=conn.identity,
        )
        try:
            await conn.publish(
                names.telemetry_subject(ident.job_id, ident.replica_id, ident.rank), encode(tel)
            )
        except NotReachableError:
            shared.points.push_front(raw_points)  # sent with the next flush, not lost


def _per_step(now: dict[str, float], before: dict[str, float], steps: int) -> dict[str, float]:
    return {k: round((v - before.get(k, 0.0)) / steps, 6) for k, v in now.items()}


def _comm_per_step(
    now: dict[str, float], before: dict[str, float], steps: int
) -> dict[str, float] | None:
    """Bytes per step handed to gradient collectives since the last flush; None when none
    were counted in it (a step is counted as it begins and its gradients go out later in it:
    a flush between the two saw a step and no bytes, which is no measurement, not zero)."""
    return _per_step(now, before, steps) if now and now != before else None


def _to_floats(values: dict[str, object]) -> dict[str, float | None]:
    """Turn logged numbers and 0-d tensors into floats, off the training thread.

    ``.item()`` on a CUDA tensor waits for the kernels that produce it, here on
    this thread; the training thread never waits.
    """
    out: dict[str, float | None] = {}
    for name, value in values.items():
        try:
            item = getattr(value, "item", None)
            x = float(item() if item is not None else value)  # type: ignore[arg-type]
            out[name] = x if math.isfinite(x) else None
        except (TypeError, ValueError, RuntimeError):
            continue
    return out
