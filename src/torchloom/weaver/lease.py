"""Leader election of Weavers through a JetStream KV lease (compare-and-set with a TTL).

Any number of Weavers may run against one NATS; one of them, the *leader*, holds the
key ``weaver`` of the bucket ``loom_leader`` and is the only one that subscribes to
telemetry, events and control. The others are *standbys*: they try to create the key
every ``poll_s`` and take over when it is gone. The leader renews its key every
``renew_every_s`` with a compare-and-set on the revision it last wrote; the bucket's max
age (``ttl_s``) removes a key nobody renews, so a leader that dies (``kill -9``, a lost
host) is replaced within ``ttl_s + poll_s`` seconds. A holder on this same host whose
process is gone is replaced at once.

This is the pattern of Kubernetes' ``leaderelection`` (client-go) over a KV store with
CAS and TTL, as in etcd's election API. Like controller-runtime, a leader that finds its
lease taken by another stops serving (:class:`LeadershipLostError`): the caller exits,
and a supervisor may start it again as a standby. A config write made by a deposed
leader cannot land either: config versions are compare-and-set too
(:class:`~torchloom.errors.ConflictError`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass

import msgspec

from torchloom.errors import ConflictError, LeadershipLostError, NotReachableError
from torchloom.protocol import names
from torchloom.transport import KeyValue

log = logging.getLogger("torchloom.weaver.lease")


class Holder(msgspec.Struct, kw_only=True):
    """The value of the lease key: who holds it."""

    instance: str
    host: str
    pid: int
    since_ts: float = 0.0


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """Timing of the leader lease.

    Attributes:
        ttl_s: a lease not renewed for this long expires (the bucket's max age), in seconds.
            Fixed when the bucket is first created.
        renew_every_s: the leader renews this often, in seconds (well under ``ttl_s``).
        poll_s: a standby tries to take the lease this often, in seconds.
    """

    ttl_s: float = 3.0
    renew_every_s: float = 0.75
    poll_s: float = 0.25


def holder_is_gone(holder: Holder, *, host: str, pid_alive: bool) -> bool:
    """Whether a lease's holder is known dead without waiting for the TTL: it ran on this
    host and its process no longer exists."""
    return holder.host == host and not pid_alive


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """This Weaver's side of the leader lease.

    Args:
        kv: the ``loom_leader`` bucket.
        instance: this Weaver's id (random, per process).
        settings: TTL and periods.
    """

    def __init__(self, kv: KeyValue, *, instance: str, settings: LeaseSettings) -> None:
        self.kv = kv
        self.settings = settings
        self.me = Holder(
            instance=instance, host=socket.gethostname(), pid=os.getpid(), since_ts=0.0
        )
        self.revision = 0
        self.holder: Holder | None = None
        """The current holder as last seen (this Weaver once it leads)."""
        self.renewed_mono = time.monotonic()
        """When this Weaver last took or renewed the lease (``time.monotonic()``, seconds)."""

    def confirmed(self, now_mono: float) -> bool:
        """Whether the lease was taken or renewed within its TTL, as of ``now_mono``: a leader
        that cannot renew it (NATS away, or its server cut off from the cluster's majority)
        may have been replaced meanwhile, and acts on nothing until it knows."""
        return now_mono - self.renewed_mono < self.settings.ttl_s

    async def try_acquire(self) -> bool:
        """One attempt to take the lease; True if this Weaver holds it now.

        Raises:
            NotReachableError: NATS did not answer.
        """
        raw, revision = await self.kv.get_entry(names.LEADER_KEY, consistent=True)
        if raw is not None:
            try:
                current = msgspec.json.decode(raw, type=Holder)
            except msgspec.DecodeError:
                current = None
            if current is not None and current.instance == self.me.instance:
                self.revision = revision
                self.renewed_mono = time.monotonic()
                return True
            self.holder = current
            if current is not None and not holder_is_gone(
                current, host=self.me.host, pid_alive=_pid_alive(current.pid)
            ):
                return False
        me = msgspec.structs.replace(self.me, since_ts=time.time())
        try:
            self.revision = await self.kv.update(
                names.LEADER_KEY, msgspec.json.encode(me), revision=revision
            )
        except ConflictError:
            return False
        self.me = self.holder = me
        self.renewed_mono = time.monotonic()
        return True

    async def acquire(self) -> None:
        """Wait until this Weaver holds the lease (forever; cancel to give up)."""
        said = False
        while True:
            try:
                if await self.try_acquire():
                    log.info("weaver %s is the leader", self.me.instance)
                    return
            except NotReachableError as exc:
                log.debug("lease: %s", exc)
            if not said and self.holder is not None:
                log.info(
                    "standing by: weaver %s (pid %d on %s) leads",
                    self.holder.instance,
                    self.holder.pid,
                    self.holder.host,
                )
                said = True
            await asyncio.sleep(self.settings.poll_s)

    async def renew(self) -> None:
        """Renew once (compare-and-set on the revision this Weaver last wrote).

        A lease that expired while NATS was away and that nobody else took is taken again.

        Raises:
            LeadershipLostError: another Weaver holds the lease.
            NotReachableError: NATS did not answer (the lease may still be held).
        """
        value = msgspec.json.encode(self.me)
        try:
            self.revision = await self.kv.update(names.LEADER_KEY, value, revision=self.revision)
            self.renewed_mono = time.monotonic()
            return
        except ConflictError:
            pass
        if not await self.try_acquire():
            who = self.holder.instance if self.holder else "another weaver"
            raise LeadershipLostError(f"the leader lease is held by {who} now")
        log.warning(
            "lease had expired (NATS away for over %.1f s); taken again", self.settings.ttl_s
        )

    async def still_held(self) -> bool:
        """Whether this Weaver still holds the lease, as the bucket says now.

        Raises:
            NotReachableError: NATS did not answer.
        """
        raw, _ = await self.kv.get_entry(names.LEADER_KEY, consistent=True)
        try:
            current = msgspec.json.decode(raw, type=Holder) if raw else None
        except msgspec.DecodeError:
            return False
        return current is not None and current.instance == self.me.instance

    async def hold(self) -> None:
        """Renew every ``renew_every_s`` until cancelled.

        Raises:
            LeadershipLostError: another Weaver took the lease.
        """
        while True:
            await asyncio.sleep(self.settings.renew_every_s)
            try:
                await self.renew()
            except NotReachableError as exc:
                log.debug("lease renewal: %s", exc)

    async def release(self) -> None:
        """Give the lease up (on a clean stop), so a standby takes over at once."""
        raw, revision = await self.kv.get_entry(names.LEADER_KEY, consistent=True)
        if raw is not None and revision == self.revision:
            await self.kv.delete(names.LEADER_KEY)
