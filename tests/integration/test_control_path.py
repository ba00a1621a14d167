"""The control path's latency contract (issue 16.8), checked as behaviour, not time: a change
is answered once its config is on disk, without waiting for its history entry (which the
config's journal keeps safe meanwhile); the control plane runs at a raised priority where
it may. Real nats-server; the Weaver in this process."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.helpers import Up, wait_for
from torchloom.client import WeaverClient
from torchloom.protocol import ControlRequest, HistoryEvent, JoinInfo, decode, names
from torchloom.transport import History, connect
from torchloom.weaver import Weaver

pytestmark = pytest.mark.integration


async def _last(url: str, job: str, kind: str) -> HistoryEvent | None:
    conn = await connect(url, name="reader")
    try:
        raw = await History(conn).last(names.history_subject(job, kind))
        return decode(raw, HistoryEvent) if raw else None
    finally:
        await conn.close()


async def _until(pred, *, timeout_s: float = 30.0) -> None:
    async def poll() -> None:
        while not await pred():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout_s)


async def test_a_change_is_answered_before_its_history_entry_is_appended(nats):
    weaver = Weaver(nats_url=nats.url, lease=None)
    serving = asyncio.create_task(weaver.run())
    gate, entered = asyncio.Event(), asyncio.Event()
    try:
        await asyncio.wait_for(weaver.ready.wait(), 30)
        join = ControlRequest(
            op="join", job_id="fast", join=JoinInfo(replica_id="0", rank=0, pid=os.getpid())
        )
        assert (await weaver.submit(join)).ok
        await _until(lambda: _last(nats.url, "fast", "job_started"))
        # the history takes nothing until the test says so
        history = weaver.recorder.history
        real = history.append_many

        async def held(items):
            entered.set()
            await gate.wait()
            return await real(items)

        history.append_many = held
        reply = await asyncio.wait_for(
            weaver.submit(ControlRequest(op="set", job_id="fast", values={"lr": 0.5})), 30
        )
        assert reply.ok and reply.version == 2  # answered while the history append waits
        assert await _last(nats.url, "fast", "config_set") is None
        await asyncio.wait_for(entered.wait(), 30)
        gate.set()
        await _until(lambda: _last(nats.url, "fast", "config_set"))
        assert (await _last(nats.url, "fast", "config_set")).version == 2
    finally:
        gate.set()  # the Weaver flushes its history as it stops
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


def _nice(pid: int, tid: int | None = None) -> int:
    stat = Path(f"/proc/{pid}" + (f"/task/{tid}" if tid else "") + "/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def test_the_control_plane_runs_at_a_raised_priority_where_permitted(tmp_path):
    import psutil

    up = Up(tmp_path / "state")
    try:
        banner = wait_for(
            lambda: "priority" in up.log_path.read_text() and up.log_path.read_text(), timeout_s=10
        )
        (nats_proc,) = [
            p for p in psutil.Process(up.proc.pid).children() if "nats-server" in p.name()
        ]
        threads = {
            int(t.name): _nice(up.proc.pid, int(t.name))
            for t in Path(f"/proc/{up.proc.pid}/task").iterdir()
        }
        if os.geteuid() == 0:  # permitted: NATS and the Weaver's thread at -5, the rest as started
            assert _nice(nats_proc.pid) == -5
            assert -5 in threads.values() and threads[up.proc.pid] == 0
            assert "nice -5 for NATS and the Weaver" in banner
        else:
            assert _nice(nats_proc.pid) == 0 and set(threads.values()) == {0}
            assert "needs root or CAP_SYS_NICE" in banner
    finally:
        up.stop()


def test_a_stack_is_serving_when_start_returns(tmp_path, monkeypatch):
    """Issue 16.7 (goodput bench: "no Weaver is listening on loom.goodput-ckpt.control"): start()
    returned while the only Weaver was still taking its lease and loading its state."""
    from torchloom.stack import LighthouseConfig, StackConfig
    from torchloom.weaver.lease import Lease

    real = Lease.try_acquire

    async def slow_try(self):
        await asyncio.sleep(0.5)  # a slow JetStream answer while taking the lease
        return await real(self)

    monkeypatch.setattr(Lease, "try_acquire", slow_try)
    stack = StackConfig(state_dir=tmp_path / "state", lighthouse=LighthouseConfig(url=None)).build()
    stack.start()
    try:
        assert stack.weaver.ready.is_set() and stack.weaver.role == "leader"
        assert WeaverClient(nats_url=stack.nats_url).status()["jobs"] == []
    finally:
        stack.stop()


async def test_reads_are_answered_while_a_change_waits_for_its_write(nats):
    """status and knobs do not take the write path: a change stuck in its KV write (NATS slow
    to acknowledge) does not hold them up."""
    weaver = Weaver(nats_url=nats.url, lease=None)
    serving = asyncio.create_task(weaver.run())
    gate = asyncio.Event()
    try:
        await asyncio.wait_for(weaver.ready.wait(), 30)
        join = ControlRequest(
            op="join", job_id="reads", join=JoinInfo(replica_id="0", rank=0, pid=os.getpid())
        )
        assert (await weaver.submit(join)).ok
        store = weaver._configs
        real = store.write

        async def slow(doc, **kw):
            await gate.wait()
            return await real(doc, **kw)

        store.write = slow
        change = asyncio.create_task(
            weaver.submit(ControlRequest(op="set", job_id="reads", values={"lr": 0.5}))
        )
        await asyncio.sleep(0)  # the change holds the control lock now
        status = await asyncio.wait_for(
            weaver.submit(ControlRequest(op="status", job_id="reads")), 30
        )
        knobs = await asyncio.wait_for(
            weaver.submit(ControlRequest(op="knobs", job_id="reads")), 30
        )
        assert status.ok and knobs.ok and not change.done()
        gate.set()
        assert (await asyncio.wait_for(change, 30)).version == 2
    finally:
        gate.set()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


def test_a_taken_dashboard_port_is_an_error_or_a_free_one(tmp_path):
    """DashboardConfig.port_fallback: without it a taken port fails the start with
    PortInUseError (and nothing is left running); with it the dashboard serves elsewhere."""
    import socket

    from torchloom.errors import PortInUseError
    from torchloom.stack import DashboardConfig, LighthouseConfig, StackConfig

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        for fallback in (False, True):
            config = StackConfig(
                state_dir=tmp_path / f"state-{fallback}",
                lighthouse=LighthouseConfig(url=None),
                dashboard=DashboardConfig(port=port, port_fallback=fallback),
            )
            stack = config.build()
            if not fallback:
                with pytest.raises(PortInUseError):
                    stack.start()
                assert stack.nats is None or stack.nats.proc.poll() is not None
                continue
            stack.start()
            try:
                assert stack.dashboard is not None
                assert f":{port}/" not in stack.dashboard.url
            finally:
                stack.stop()
    finally:
        taken.close()
