"""The transport against a real nats-server: a connection that outlives a timed-out flush,
and batched history and KV writes that store every item once, in order."""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import time

import pytest

from torchloom.errors import NotReachableError
from torchloom.nats_server import NatsServer
from torchloom.protocol import names
from torchloom.transport import History, KeyValue, Message, connect, ensure_jetstream


def _stop(pid: int, *, timeout_s: float = 5.0) -> None:
    """SIGSTOP ``pid`` and wait until the kernel shows it stopped (state T, every thread): the signal is
    asynchronous, and a server still running for a moment would answer the next PING."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(_state(stat) == "T" for stat in glob.glob(f"/proc/{pid}/task/*/stat")):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop within {timeout_s:g} s")


def _state(stat_path: str) -> str:
    with open(stat_path) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_flush_that_times_out_does_not_make_the_connection_deaf(nats: NatsServer) -> None:
    """nats-py 2.16 ended its read loop on the late PONG of a timed-out flush: the connection
    said it was connected and delivered nothing more (a 10k-rank Weaver went deaf)."""

    async def main() -> list[bytes]:
        conn = await connect(nats.url, name="t")
        got: list[bytes] = []

        async def on_msg(msg: Message) -> None:
            got.append(msg.data)

        await conn.subscribe("t.x", on_msg)
        await conn.flush()
        assert nats.proc is not None
        _stop(nats.proc.pid)  # the server answers nothing for a while
        try:
            with pytest.raises(NotReachableError):
                await conn.flush(timeout_s=0.1)
        finally:
            os.kill(nats.proc.pid, signal.SIGCONT)
        await asyncio.sleep(0.2)  # the late PONG arrives
        for i in range(3):
            await conn.publish("t.x", b"%d" % i)
        await conn.flush(timeout_s=2.0)
        await asyncio.sleep(0.2)
        assert conn.is_connected
        await conn.close()
        return got

    assert asyncio.run(main()) == [b"0", b"1", b"2"]


def test_batched_history_and_registry_writes_store_each_item_once(nats: NatsServer) -> None:
    async def main() -> tuple[list[bytes], dict[str, bytes], int]:
        conn = await connect(nats.url, name="t")
        await ensure_jetstream(conn)
        history = History(conn)
        items = [(names.history_subject("j", "k"), b"%d" % i, f"id-{i}") for i in range(600)]
        assert await history.append_many(items[:400]) == 400
        again = await history.append_many(items[300:])  # a retry that overlaps: deduplicated
        stored = [raw async for raw in history.read(names.history_filter("j"))]
        kv = await KeyValue.open(conn, names.REGISTRY_BUCKET)
        written = await kv.write_many({f"j.0.{i}": b"%d" % i for i in range(300)})
        assert written == {f"j.0.{i}" for i in range(300)}
        deleted = await kv.write_many({f"j.0.{i}": None for i in range(100)})
        assert len(deleted) == 100
        left = await kv.items()
        await conn.close()
        return stored, left, again

    stored, left, again = asyncio.run(main())
    assert again == 300
    assert stored == [b"%d" % i for i in range(600)]
    assert left == {f"j.0.{i}": b"%d" % i for i in range(100, 300)}


def test_a_fenced_writer_is_refused_once_someone_else_appended_and_stores_each_item_once(
    nats: NatsServer,
) -> None:
    """The leader Weaver's history writes: a write that assumes a stream nobody else moved is
    refused when another writer (a new leader) appended meanwhile; a retry after reading the
    stream again is stored, and resends are still deduplicated."""

    async def main() -> tuple[list[bytes], list[int]]:
        conn = await connect(nats.url, name="t")
        await ensure_jetstream(conn)
        old, new = History(conn, fenced=True), History(conn, fenced=True)
        subject = names.history_subject("j", "k")
        counts = [await old.append_many([(subject, b"a0", "a0"), (subject, b"a1", "a1")])]
        counts.append(await new.append_many([(subject, b"b0", "b0")]))  # the stream moved on
        counts.append(await old.append_many([(subject, b"stale", "a2")]))  # refused
        counts.append(await old.append_many([(subject, b"a2", "a2")]))  # read again: stored
        # a resend overlapping what is stored: refused while its view is stale (the sequence is
        # checked first), then the duplicate is acknowledged and the rest sent again
        resend = [(subject, b"b0", "b0"), (subject, b"b1", "b1")]
        counts.append(await new.append_many(resend))
        counts.append(await new.append_many(resend))
        counts.append(await new.append_many(resend[1:]))
        stored = [raw async for raw in old.read(names.history_filter("j"))]
        await conn.close()
        return stored, counts

    stored, counts = asyncio.run(main())
    assert counts == [2, 1, 0, 1, 0, 1, 1]
    assert stored == [b"a0", b"a1", b"b0", b"a2", b"b1"]


def test_an_inline_subscription_gets_every_message_in_order_and_survives_a_failing_handler(
    nats: NatsServer,
) -> None:
    async def main() -> tuple[list[tuple[str, bytes]], int]:
        conn = await connect(nats.url, name="t")
        got: list[tuple[str, bytes]] = []

        def on_msg(msg: Message) -> None:
            if msg.data == b"boom":
                raise ValueError("a handler's bug")
            got.append((msg.subject, msg.data))

        await conn.subscribe_inline("t.*", on_msg)
        await conn.flush()
        for i in range(2000):
            await conn.publish(f"t.{i % 3}", b"boom" if i == 5 else b"%d" % i)
        await conn.flush(timeout_s=5.0)
        await asyncio.sleep(0.2)
        fast = conn.client.stats["in_msgs"]
        await conn.close()
        return got, fast

    got, received = asyncio.run(main())
    assert got == [(f"t.{i % 3}", b"%d" % i) for i in range(2000) if i != 5]
    assert received == 2000
