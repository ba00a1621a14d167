"""Ingest workers: the Weaver's telemetry intake on more cores than its own.

Each worker is a process of its own with its own NATS connection, a member of the queue
group ``torchloom-ingest`` on every rank's telemetry subject: NATS spreads the ranks'
flushes over the workers (its queue groups are the engine; nothing here balances load). A
worker checks each flush — it decodes, and came on its own rank's subject — and forwards the
good ones, unchanged, in batches (every ``batch_ms``, or sooner at ``max_batch_bytes``) to its
Weaver's own subject (:func:`torchloom.protocol.names.ingest_subject`), where the deciding
core folds a batch with one decode and no per-message protocol work. What the workers take
off the core is nats-py's parsing and the check of every message, most of the core's cost
per message (see docs/benchmarks.md).

A worker dies with its Weaver (``PR_SET_PDEATHSIG``, and it checks its parent): an orphan
would keep taking a share of the telemetry for a Weaver that is gone. Only a leading Weaver
starts workers; they feed that instance only.

Run by :class:`IngestWorkers`; ``python -m torchloom.weaver.ingest_worker --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys

import msgspec

from torchloom import _proc
from torchloom.errors import DecodeError
from torchloom.protocol import Telemetry, decode, names
from torchloom.protocol.messages import SCHEMA_VERSION
from torchloom.transport import Connection, Credentials, Message, connect

log = logging.getLogger("torchloom.weaver.ingest")

QUEUE = "torchloom-ingest"


class _Batcher:
    def __init__(self, conn: Connection, *, subject: str, worker: int, max_bytes: int) -> None:
        self.conn = conn
        self.subject = subject
        self.worker = worker
        self.max_bytes = max_bytes
        self.items: list[bytes] = []
        self.size = 0
        self.dropped = 0
        self.full = asyncio.Event()

    def take(self, msg: Message) -> None:
        """The subscription's handler (in the read loop): check one flush, keep it."""
        try:
            tel = decode(msg.data, Telemetry, kind="telemetry")
            names.check_rank_subject(msg.subject, tel.job_id, tel.replica_id, tel.rank)
        except DecodeError:
            self.dropped += 1
            return
        self.items.append(msg.data)
        self.size += len(msg.data)
        if self.size >= self.max_bytes:
            self.full.set()

    async def send(self) -> None:
        if not self.items and not self.dropped:
            return
        items, dropped = self.items, self.dropped
        self.items, self.size, self.dropped = [], 0, 0
        self.full.clear()
        head = b'{"v":%d,"worker":%d,"dropped":%d,"telemetry":[' % (
            SCHEMA_VERSION,
            self.worker,
            dropped,
        )
        await self.conn.publish(self.subject, head + b",".join(items) + b"]}")


async def serve(
    *,
    nats_url: str,
    subject: str,
    worker: int,
    batch_ms: float,
    max_batch_bytes: int,
    creds: Credentials | None,
    parent_pid: int,
) -> None:
    """Take telemetry in and forward it in batches until the parent process is gone."""
    conn = await connect(
        nats_url, name=f"torchloom-ingest-{worker}", retry_forever=True, creds=creds
    )
    batcher = _Batcher(conn, subject=subject, worker=worker, max_bytes=max_batch_bytes)
    await conn.subscribe_inline(names.ALL_TELEMETRY, batcher.take, queue=QUEUE)
    try:
        while os.getppid() == parent_pid:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(batcher.full.wait(), timeout=batch_ms / 1000.0)
            try:
                await batcher.send()
            except Exception as exc:  # NATS away: the batch is lost, like a flush would be
                log.debug("ingest worker %d: %s", worker, exc)
    finally:
        await conn.close()


class IngestWorkers:
    """``count`` ingest worker processes for one Weaver instance.

    Args:
        nats_url: the NATS server or cluster.
        instance: the Weaver's instance id (its batches' subject).
        count: how many workers.
        creds: the Weaver's credentials (handed to each worker on its stdin), or None.
        batch_ms: the longest a flush waits in a worker, in ms.
        max_batch_bytes: a batch is sent at this size at the latest (under NATS' 1 MB
            payload limit).
    """

    def __init__(
        self,
        *,
        nats_url: str,
        instance: str,
        count: int,
        creds: Credentials | None = None,
        batch_ms: float = 10.0,
        max_batch_bytes: int = 512 * 1024,
    ) -> None:
        self.nats_url = nats_url
        self.subject = names.ingest_subject(instance)
        self.count = count
        self.creds = creds
        self.batch_ms = batch_ms
        self.max_batch_bytes = max_batch_bytes
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        """Start the workers (they connect on their own; a batch arrives once they have)."""
        self.procs = [self._spawn(i) for i in range(self.count)]

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        secret = msgspec.json.encode(self.creds) if self.creds is not None else b""
        proc = subprocess.Popen(
            [sys.executable, "-m", "torchloom.weaver.ingest_worker",
             "--nats-url", self.nats_url, "--subject", self.subject, "--worker", str(i),
             "--batch-ms", str(self.batch_ms), "--max-batch-bytes", str(self.max_batch_bytes),
             "--parent-pid", str(os.getpid())],
            stdin=subprocess.PIPE,
            preexec_fn=_proc.preexec(),
        )  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write(secret)
        proc.stdin.close()
        return proc

    def alive(self) -> int:
        """How many workers run."""
        return sum(1 for p in self.procs if p.poll() is None)

    def revive(self) -> int:
        """Start again the workers that died (meanwhile NATS gave their share to the
        others); how many were started."""
        dead = [i for i, p in enumerate(self.procs) if p.poll() is not None]
        for i in dead:
            self.procs[i] = self._spawn(i)
        if dead:
            log.warning("ingest worker(s) %s had died; started again", dead)
        return len(dead)

    def stop(self) -> None:
        for proc in self.procs:
            _proc.stop_child(proc, timeout_s=3.0)
        self.procs = []


def main() -> None:
    ap = argparse.ArgumentParser(description="A torchloom Weaver's telemetry ingest worker.")
    ap.add_argument("--nats-url", required=True)
    ap.add_argument("--subject", required=True, help="where the batches go")
    ap.add_argument("--worker", type=int, default=0)
    ap.add_argument("--batch-ms", type=float, default=10.0)
    ap.add_argument("--max-batch-bytes", type=int, default=512 * 1024)
    ap.add_argument("--parent-pid", type=int, default=os.getppid())
    args = ap.parse_args()
    _proc.signal_on_parent_death(signal.SIGTERM)
    secret = sys.stdin.buffer.read()
    creds = msgspec.json.decode(secret, type=Credentials) if secret.strip() else None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        asyncio.run(
            serve(
                nats_url=args.nats_url,
                subject=args.subject,
                worker=args.worker,
                batch_ms=args.batch_ms,
                max_batch_bytes=args.max_batch_bytes,
                creds=creds,
                parent_pid=args.parent_pid,
            )
        )


if __name__ == "__main__":
    main()
