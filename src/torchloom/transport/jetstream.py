"""JetStream pieces torchloom uses: two KV buckets and the events stream.

* ``loom_config`` (KV): the desired config of each job, one key per job.
* ``loom_registry`` (KV): the DR map, one key per rank.
* ``LOOM_EVENTS`` (stream): the history, bounded by age and size.

All three are file-backed, so a restart of the NATS server (with the same
storage dir) or of the Weaver loses nothing. On a cluster each is kept on up to three servers
(:func:`replicas_for`), so the loss of any one server loses nothing either and stops nothing:
JetStream elects a new leader for each among the survivors within seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue as NatsKeyValue

from torchloom.errors import ConflictError, NotReachableError
from torchloom.protocol import names
from torchloom.transport.connection import Connection

log = logging.getLogger(__name__)
T = TypeVar("T")

_JS_ERRORS = (
    nats.errors.Error,
    nats.js.errors.Error,
    asyncio.TimeoutError,
)


async def _acknowledged(writes: Sequence[Awaitable[object]]) -> list[bool]:
    """Await ``writes`` concurrently; for each, whether the server acknowledged it. A
    JetStream or timeout error is a False; any other error is raised."""
    results = await asyncio.gather(*writes, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, _JS_ERRORS):
            raise result
    return [not isinstance(result, BaseException) for result in results]


async def _until_answered(
    op: Callable[[], Awaitable[T]], *, retry_s: float, wait_s: float, what: str
) -> T:
    """``await op()``, tried again every ``wait_s`` seconds while JetStream does not answer
    (a cluster electing a leader after a start or a server loss), for up to ``retry_s``
    seconds (0: once).

    Raises:
        NotReachableError: it still failed after ``retry_s`` (``what``: the message's start).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_s
    while True:
        try:
            return await op()
        except _JS_ERRORS as exc:
            if loop.time() >= deadline:
                raise NotReachableError(f"{what}: {exc or type(exc).__name__}") from None
            await asyncio.sleep(wait_s)


def replicas_for(conn: Connection, replicas: int | None) -> int:
    """How many copies torchloom's streams and buckets keep: ``replicas`` when given, else
    min(3, the servers of the cluster ``conn`` is on) — 1 on a single server, 3 on a cluster of
    3 or more (a majority of 3 survives the loss of any one server)."""
    return replicas if replicas else min(3, conn.servers_known)


async def ensure_jetstream(
    conn: Connection,
    *,
    replicas: int | None = None,
    history_max_age_s: float = 7 * 24 * 3600.0,
    history_max_bytes: int = 256 * 1024 * 1024,
    timeout_s: float = 30.0,
) -> dict[str, str]:
    """Create the KV buckets and the events stream if they do not exist (idempotent), each
    kept on ``replicas`` servers; scale up existing ones that keep fewer copies (JetStream
    moves the data to the new peers itself, nothing is lost).

    Args:
        replicas: copies of each (1–5); None: :func:`replicas_for`.
        history_max_age_s: events older than this are dropped by the server, in seconds.
        history_max_bytes: the stream keeps at most this many bytes (oldest dropped first).
        timeout_s: how long to wait for JetStream (a cluster elects its meta leader after
            a start or a server loss), in seconds.

    Returns:
        What was done to each, by stream name: ``"created R3"``, ``"kept R3"``,
        ``"scaled R1 → R3"``, or ``"kept R1 (cannot scale: …)"`` when the server refused.

    Raises:
        NotReachableError: JetStream is not enabled or did not answer in ``timeout_s``.
    """
    want = replicas_for(conn, replicas)

    async def ensure() -> dict[str, str]:
        js = conn.client.jetstream(timeout=5.0)
        done = {}
        for bucket, history in (
            (names.CONFIG_BUCKET, 8),
            (names.REGISTRY_BUCKET, 1),
            (names.CHECKPOINTS_BUCKET, 4),
        ):
            done[f"KV_{bucket}"] = await _ensure_bucket(js, bucket, history=history, replicas=want)
        done[names.EVENTS_STREAM] = await _ensure_stream(
            js,
            api.StreamConfig(
                name=names.EVENTS_STREAM,
                subjects=[names.EVENTS_STREAM_SUBJECTS],
                storage=api.StorageType.FILE,
                max_age=history_max_age_s,
                max_bytes=history_max_bytes,
                discard=api.DiscardPolicy.OLD,
                num_replicas=want,
            ),
        )
        return done

    return await _until_answered(
        ensure, retry_s=timeout_s, wait_s=0.5, what="JetStream is not available"
    )


async def ensure_lease_bucket(
    conn: Connection, *, ttl_s: float, replicas: int | None = None, timeout_s: float = 30.0
) -> str:
    """Create the leader-lease bucket (``loom_leader``) if it does not exist: one value per
    key, on disk, on ``replicas`` servers (see :func:`ensure_jetstream`), each entry removed
    by the server ``ttl_s`` seconds after it was written. Returns what was done.

    Raises:
        NotReachableError: JetStream did not answer in ``timeout_s``.
    """
    want = replicas_for(conn, replicas)

    async def ensure() -> str:
        js = conn.client.jetstream(timeout=5.0)
        return await _ensure_bucket(js, names.LEADER_BUCKET, history=1, ttl_s=ttl_s, replicas=want)

    return await _until_answered(
        ensure, retry_s=timeout_s, wait_s=0.5, what="JetStream is not available"
    )


async def _ensure_bucket(
    js: JetStreamContext,
    bucket: str,
    *,
    history: int,
    replicas: int,
    ttl_s: float | None = None,
) -> str:
    """Create a file-backed KV bucket with direct gets unless it exists; scale up an existing
    one kept on fewer servers (nats-py errors pass)."""
    try:
        await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        await js.create_key_value(
            api.KeyValueConfig(
                bucket=bucket,
                history=history,
                ttl=ttl_s,
                storage=api.StorageType.FILE,
                direct=True,
                replicas=replicas,
            )
        )
        return f"created R{replicas}"
    return await _scale(js, f"KV_{bucket}", replicas)


async def _ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> str:
    try:
        await js.stream_info(str(config.name))
    except nats.js.errors.NotFoundError:
        await js.add_stream(config)
        return f"created R{config.num_replicas}"
    return await _scale(js, str(config.name), int(config.num_replicas or 1))


async def _scale(js: JetStreamContext, stream: str, replicas: int) -> str:
    """Raise ``stream``'s replicas to ``replicas`` (never lowers them: a smaller setting is
    kept, copies are not thrown away)."""
    info = await js.stream_info(stream)
    have = int(info.config.num_replicas or 1)
    if have >= replicas:
        return f"kept R{have}"
    try:
        await js.update_stream(replace(info.config, num_replicas=replicas))
    except nats.js.errors.APIError as exc:
        log.warning(
            "stream %s stays at R%d: the server refused R%d (%s)", stream, have, replicas, exc
        )
        return f"kept R{have} (cannot scale: {exc.description or exc})"
    log.warning("stream %s scaled from R%d to R%d", stream, have, replicas)
    return f"scaled R{have} → R{replicas}"


class KeyValue:
    """One KV bucket, with torchloom's errors."""

    def __init__(self, kv: NatsKeyValue, bucket: str) -> None:
        self._kv = kv
        self.bucket = bucket

    @classmethod
    async def open(cls, conn: Connection, bucket: str, *, timeout_s: float = 5.0) -> KeyValue:
        """Bind to an existing bucket.

        Raises:
            NotReachableError: the bucket does not exist or JetStream did not answer.
        """
        js = conn.client.jetstream(timeout=timeout_s)
        try:
            return cls(await js.key_value(bucket), bucket)
        except _JS_ERRORS as exc:
            raise NotReachableError(
                f"KV bucket {bucket} is not available: {exc or type(exc).__name__}"
            ) from None

    async def get(self, key: str) -> bytes | None:
        """The latest value of ``key``, or None if it has none (or was deleted).

        Raises:
            NotReachableError: the server did not answer.
        """
        return (await self.get_entry(key))[0]

    async def get_entry(self, key: str, *, consistent: bool = False) -> tuple[bytes | None, int]:
        """The latest value of ``key`` and its revision; ``(None, revision)`` for a deleted
        key, ``(None, 0)`` for one never written (or expired).

        Args:
            consistent: ask the bucket's leader, not any replica. A direct get (the default:
                any replica answers, fast) may come from a replica that is behind — one just
                back from a partition — and name an old revision; a compare-and-set needs
                the leader's answer.

        Raises:
            NotReachableError: the server did not answer.
        """
        try:
            if consistent:
                return await self._leader_get(key)
            entry = await self._kv.get(key)
        except nats.js.errors.KeyDeletedError as exc:
            return None, int(exc.entry.revision or 0) if exc.entry else 0
        except nats.js.errors.KeyNotFoundError:
            return None, 0
        except _JS_ERRORS as exc:
            raise NotReachableError(
                f"KV get {self.bucket}/{key} failed: {exc or type(exc).__name__}"
            ) from None
        return entry.value, int(entry.revision or 0)

    async def _leader_get(self, key: str) -> tuple[bytes | None, int]:
        try:
            msg = await self._kv._js.get_msg(
                self._kv._stream, subject=f"{self._kv._pre}{key}", direct=False
            )
        except nats.js.errors.NotFoundError:
            return None, 0
        op = (msg.headers or {}).get("KV-Operation")
        if op in ("DEL", "PURGE"):
            return None, int(msg.seq or 0)
        return msg.data or b"", int(msg.seq or 0)

    async def update(self, key: str, value: bytes, *, revision: int) -> int:
        """Compare-and-set: store ``value`` only if ``key``'s latest revision is still
        ``revision`` (0: only if the key has no live value). Returns the new revision once
        the server has acknowledged the write (it is then on disk).

        Raises:
            ConflictError: someone else wrote ``key`` since ``revision``.
            NotReachableError: the write was not acknowledged.
        """
        try:
            if revision == 0:
                return int(await self._kv.create(key, value))
            return int(await self._kv.update(key, value, last=revision))
        except nats.js.errors.KeyWrongLastSequenceError:
            raise ConflictError(self.bucket, key, revision) from None
        except _JS_ERRORS as exc:
            raise NotReachableError(
                f"KV update {self.bucket}/{key} failed: {exc or type(exc).__name__}"
            ) from None

    async def put(self, key: str, value: bytes, *, retry_s: float = 0.0) -> int:
        """Store ``value`` under ``key``; returns the new revision.

        Args:
            retry_s: for how long to try again while the write is not acknowledged, in
                seconds (a cluster elects a new leader for the bucket within seconds of a
                server loss; putting the same value twice is harmless).

        Raises:
            NotReachableError: the write was not acknowledged within ``retry_s``.
        """
        revision = await _until_answered(
            lambda: self._kv.put(key, value),
            retry_s=retry_s,
            wait_s=0.25,
            what=f"KV put {self.bucket}/{key} failed",
        )
        return int(revision)

    async def delete(self, key: str) -> None:
        try:
            await self._kv.delete(key)
        except _JS_ERRORS as exc:
            raise NotReachableError(
                f"KV delete {self.bucket}/{key} failed: {exc or type(exc).__name__}"
            ) from None

    async def write_many(self, changes: dict[str, bytes | None]) -> set[str]:
        """Put (or, for None, delete) many keys at once, without waiting for each
        acknowledgement before sending the next.

        Returns:
            The keys whose write was acknowledged; the others are unchanged or may be
            written, and are to be tried again.
        """

        async def one(key: str, value: bytes | None) -> None:
            await (self._kv.delete(key) if value is None else self._kv.put(key, value))

        acked = await _acknowledged([one(k, v) for k, v in changes.items()])
        return {k for k, ok in zip(changes, acked, strict=True) if ok}

    async def items(self) -> dict[str, bytes]:
        """Every live key and its latest value; see :meth:`entries`.

        Raises:
            NotReachableError: the server did not answer.
        """
        return {key: value for key, (value, _) in (await self.entries()).items()}

    async def entries(self, *, consistent: bool = False) -> dict[str, tuple[bytes, int]]:
        """Every live key, its latest value and revision (read concurrently, in chunks of 256;
        ``consistent``: from the bucket's leader, see :meth:`get_entry`).

        The keys come from the bucket stream's subject list (``STREAM.INFO`` with a subject
        filter, paged), not nats-py's ``keys()``: its watcher can end before the first key
        when the server has pushed every entry before it reads the consumer's info (seen
        under load: an empty registry after a restart).

        Raises:
            NotReachableError: the server did not answer.
        """
        js, stream, prefix = self._kv._js, self._kv._stream, self._kv._pre
        keys: list[str] = []
        while True:
            request = {"subjects_filter": f"{prefix}>", "offset": len(keys)}
            try:
                info = await js._api_request(
                    f"{js._prefix}.STREAM.INFO.{stream}", json.dumps(request).encode(),
                    timeout=js._timeout,
                )  # fmt: skip
            except _JS_ERRORS as exc:
                raise NotReachableError(
                    f"KV list {self.bucket} failed: {exc or type(exc).__name__}"
                ) from None
            page = list((info.get("state") or {}).get("subjects") or {})
            keys += [subject[len(prefix) :] for subject in page]
            if not page or len(keys) >= int(info.get("total") or 0):
                break
        out: dict[str, tuple[bytes, int]] = {}
        for i in range(0, len(keys), 256):
            chunk = keys[i : i + 256]
            for key, (value, revision) in zip(
                chunk,
                await asyncio.gather(*(self.get_entry(k, consistent=consistent) for k in chunk)),
                strict=True,
            ):
                if value is not None:
                    out[key] = (value, revision)
        return out


class History:
    """The ``LOOM_EVENTS`` stream: append events, read them back, follow new ones.

    Args:
        conn: the NATS connection.
        timeout_s: how long one append or read waits for the stream, in seconds.
        fenced: appends are conditional on the stream's last sequence being the one this
            writer last saw (JetStream's ``Nats-Expected-Last-Sequence``), so a write held up
            in the network — a Weaver cut off from the cluster's majority, its append sitting
            in a server's route buffer — is refused if it arrives after anybody else appended.
            For the single writer of the stream (the leader Weaver).
    """

    def __init__(self, conn: Connection, *, timeout_s: float = 5.0, fenced: bool = False) -> None:
        self._js: JetStreamContext = conn.client.jetstream(timeout=timeout_s)
        self._fenced = fenced
        self._last_seq: int | None = None  # the stream's last sequence as this writer knows it

    async def last_sequence(self) -> int:
        """The sequence number of the stream's newest message (0 when it is empty).

        Raises:
            NotReachableError: the stream did not answer.
        """
        try:
            info = await self._js.stream_info(names.EVENTS_STREAM)
        except _JS_ERRORS as exc:
            raise NotReachableError(
                f"cannot read the history's state: {exc or type(exc).__name__}"
            ) from None
        return int(info.state.last_seq)

    async def append_many(self, items: Sequence[tuple[str, bytes, str]]) -> int:
        """Store ``(subject, data, msg_id)`` events, in order, without waiting for each
        acknowledgement before sending the next (one round trip for the lot).

        Each carries its ``msg_id`` as ``Nats-Msg-Id``, so the stream ignores a resend of an
        event it already holds (within its duplicate window, 2 min): retrying after a
        partial failure stores every event once. A fenced writer also sends the sequence each
        one must follow; a refusal (someone else appended, or a duplicate did not advance the
        stream) ends the batch there, and the next call starts from the stream's sequence.

        Returns:
            How many of the first items were acknowledged: ``len(items)``, or the index of the
            first that was not (it and the later ones are to be sent again).

        Raises:
            NotReachableError: a fenced writer could not read the stream's sequence.
        """
        headers: list[dict[str, str]] = [{"Nats-Msg-Id": msg_id} for _, _, msg_id in items]
        if self._fenced and items:
            if self._last_seq is None:
                self._last_seq = await self.last_sequence()
            for i, h in enumerate(headers):
                h["Nats-Expected-Last-Sequence"] = str(self._last_seq + i)
        results = await asyncio.gather(
            *(
                self._js.publish(subject, data, stream=names.EVENTS_STREAM, headers=h)
                for (subject, data, _), h in zip(items, headers, strict=True)
            ),
            return_exceptions=True,
        )
        done, chain_broken = 0, False
        for result in results:
            if isinstance(result, BaseException):
                if not isinstance(result, _JS_ERRORS):
                    raise result
                chain_broken = True
                break
            done += 1
            if result.duplicate:  # stored before: the stream did not move
                chain_broken = True
            elif self._fenced:
                self._last_seq = int(result.seq)
        if self._fenced and chain_broken:
            self._last_seq = None  # read the stream's sequence again before the next batch
        return done

    async def _count(self, filter_subject: str, *, retry_s: float) -> int:
        """How many events on ``filter_subject`` the stream's leader holds (it answers stream
        info), retried while the cluster elects one.

        Raises:
            NotReachableError: the stream does not exist or did not answer within ``retry_s``.
        """
        info = await _until_answered(
            lambda: self._js.stream_info(names.EVENTS_STREAM, subjects_filter=filter_subject),
            retry_s=retry_s,
            wait_s=0.5,
            what="cannot read history",
        )
        return sum((info.state.subjects or {}).values())

    async def last(self, subject: str) -> bytes | None:
        """The newest event stored on ``subject`` (no wildcards), or None.

        Raises:
            NotReachableError: the stream did not answer.
        """
        try:
            msg = await self._js.get_last_msg(names.EVENTS_STREAM, subject)
        except nats.js.errors.NotFoundError:
            return None
        except _JS_ERRORS as exc:
            raise NotReachableError(
                f"cannot read the history on {subject}: {exc or type(exc).__name__}"
            ) from None
        return bytes(msg.data) if msg.data else None

    async def read(
        self,
        filter_subject: str,
        *,
        follow: bool = False,
        idle_timeout_s: float = 1.0,
        retry_s: float = 10.0,
    ) -> AsyncIterator[bytes]:
        """Yield stored events on ``filter_subject``, oldest first.

        Args:
            follow: keep yielding new events as they come (until cancelled).
            idle_timeout_s: without ``follow``, how long to wait for the first
                message of an empty history, in seconds.
            retry_s: how long to keep trying to open the read, and to wait for events the
                stream said were still to come, in seconds (a cluster elects a new leader
                for the stream within seconds of a server loss).

        Without ``follow`` the read ends once it has every event the stream's leader held
        when it began: the consumer may be served by a replica still catching up after a
        restart or a healed partition, whose own count of events still to come is short
        (seen: 0 of 200 events, read from a server restarted a moment before).

        Raises:
            NotReachableError: the stream does not exist or did not answer within ``retry_s``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retry_s
        expected = 0 if follow else await self._count(filter_subject, retry_s=retry_s)
        sub = await _until_answered(
            lambda: self._js.subscribe(
                filter_subject,
                stream=names.EVENTS_STREAM,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.ALL,
            ),
            retry_s=retry_s,
            wait_s=0.5,
            what="cannot read history",
        )
        pending: int | None = None
        delivered = 0
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=None if follow else idle_timeout_s)
                except (TimeoutError, nats.errors.TimeoutError):
                    owed = pending or delivered < expected
                    if follow or (owed and loop.time() < deadline + retry_s):
                        continue  # more are due: a leader change or a lagging replica
                    return
                yield bytes(msg.data)
                delivered += 1
                pending = msg.metadata.num_pending
                if not follow and pending == 0 and delivered >= expected:
                    return
        finally:
            try:
                await sub.unsubscribe()
            except _JS_ERRORS:
                pass
