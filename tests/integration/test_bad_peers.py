"""A buggy, stale or hostile peer must not stall, reset or stop the job (issue 16.1-16.3):
real `torchloom up`, real training processes (tests/integration/rank_loop.py), real NATS."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from tests.helpers import history, job_status, wait_for
from torchloom.protocol import ConfigSnapshot, DesiredConfig, decode, encode, names
from torchloom.transport import KeyValue, connect

pytestmark = pytest.mark.integration

LOOP = Path(__file__).with_name("rank_loop.py")
BOGUS = 10**15


class Proc:
    """A rank_loop.py process; its stdout lines collected in a file."""

    def __init__(self, tmp: Path, url: str, job: str, replica: str, rank: int, start: int = 0):
        self.out = tmp / f"{job}-{replica}-{rank}-{os.urandom(3).hex()}.out"
        self.file = open(self.out, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(LOOP), url, job, replica, str(rank), str(start)],
            stdout=self.file,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid

    def text(self) -> str:
        return self.out.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.file.close()


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


def rank_of(client, job: str, replica: str, rank: int) -> dict | None:
    js = job_status(client, job)
    for r in js["ranks"] if js else []:
        if r["replica_id"] == replica and r["rank"] == rank:
            return r
    return None


def training(client, job: str, replica: str, rank: int) -> dict | None:
    r = rank_of(client, job, replica, rank)
    return r if r and r["state"] == "training" and r["step"] >= 0 else None


def applied(client, job: str, version: int, *ids: tuple[str, int]) -> bool:
    return all((rank_of(client, job, *i) or {}).get("applied_version", 0) >= version for i in ids)


def kinds(client, job: str) -> list[str]:
    return [e.kind for e in history(client, job)]


def test_a_rank_with_a_bogus_step_does_not_decide_the_effective_step(tmp_path, up, procs):
    """16.1 as seen: a rank at step 10^15 made every later change effective at 10^15 + 2."""
    client = up.client()
    honest = [("0", 0), ("0", 1)]
    procs += [Proc(tmp_path, up.url, "poison", r, k) for r, k in honest]
    for r, k in honest:
        wait_for(lambda r=r, k=k: training(client, "poison", r, k), timeout_s=60, what="honest")
    procs.append(Proc(tmp_path, up.url, "poison", "1", 0, start=BOGUS))
    wait_for(lambda: training(client, "poison", "1", 0), timeout_s=60, what="the bogus rank")
    reply = client.control("set", "poison", values={"lr": 0.01})
    assert reply.effective_step < 10**6, reply
    wait_for(lambda: applied(client, "poison", reply.version, *honest), timeout_s=30, what="v2")
    events = history(client, "poison")
    outliers = [e for e in events if e.kind == "step_outlier"]
    assert [(e.replica_id, e.rank) for e in outliers] == [("1", 0)], outliers
    # the bogus rank goes silent (kill -9) and is failed; later changes still apply
    procs[-1].kill()
    wait_for(lambda: "rank_failed" in kinds(client, "poison"), timeout_s=30, what="failed")
    reply = client.control("set", "poison", values={"lr": 0.02})
    assert reply.effective_step < 10**6, reply
    wait_for(lambda: applied(client, "poison", reply.version, *honest), timeout_s=30, what="v3")
    assert "applied v3" in procs[0].text() and "lr=0.02" in procs[1].text()


def test_a_version_out_of_reach_is_re_planned(tmp_path, up, procs):
    """A stale process with another step counter is the job's only rank when a change is
    made (effective at ~10^15, its own step); the real ranks start; the version is re-planned
    within their reach instead of blocking every later one."""
    client = up.client()
    procs.append(Proc(tmp_path, up.url, "replan", "1", 0, start=BOGUS))
    wait_for(lambda: training(client, "replan", "1", 0), timeout_s=60, what="the stale rank")
    reply = client.control("set", "replan", values={"lr": 0.01})
    assert reply.effective_step > BOGUS
    honest = [("0", 0), ("0", 1)]
    procs += [Proc(tmp_path, up.url, "replan", r, k) for r, k in honest]
    # the real ranks outnumber the stale one: its version is out of their reach, re-planned
    wait_for(lambda: applied(client, "replan", 3, *honest), timeout_s=60, what="re-planned v3")
    events = history(client, "replan")
    replans = [e for e in events if e.kind == "config_set" and e.data.get("op") == "replan"]
    assert len(replans) == 1 and replans[0].step < 10**6, replans
    assert "supersedes v2" in replans[0].message
    assert "lr=0.01" in procs[1].text()
    procs[0].kill()
    reply = client.control("set", "replan", values={"lr": 0.02})
    wait_for(lambda: applied(client, "replan", reply.version, *honest), timeout_s=30, what="v4")


def test_a_second_process_with_a_live_identity_is_refused_and_changes_nothing(tmp_path, up, procs):
    """16.2 as seen: a stale process and a new one as rank 0/0 made the Weaver flap between
    them (hundreds of rejoins per second), start new epochs and reset the config."""
    client = up.client()
    first = Proc(tmp_path, up.url, "dup", "0", 0)
    other = Proc(tmp_path, up.url, "dup", "1", 0)
    procs += [first, other]
    for r in ("0", "1"):
        wait_for(lambda r=r: training(client, "dup", r, 0), timeout_s=60, what="the ranks")
    reply = client.control("set", "dup", values={"lr": 0.01})
    wait_for(lambda: applied(client, "dup", reply.version, ("0", 0), ("1", 0)), timeout_s=30)
    second = Proc(tmp_path, up.url, "dup", "0", 0)
    procs.append(second)
    wait_for(lambda: "refused this rank's join" in second.text(), timeout_s=60, what="the refusal")
    assert f"held by pid {first.pid}" in second.text()
    # its telemetry keeps coming and is dropped: wait until a few seconds' worth was
    wait_for(
        lambda: client.status("dup")["dropped_messages"].get("duplicate_rank", 0) >= 20,
        timeout_s=60,
        what="the second process's messages dropped",
    )
    events = history(client, "dup")
    dups = [e for e in events if e.kind == "duplicate_rank"]
    assert len(dups) == 1, dups
    assert dups[0].data["holder"]["pid"] == first.pid
    assert dups[0].data["claimant"]["pid"] == second.pid
    joins = [e for e in events if e.kind == "rank_joined" and e.replica_id == "0"]
    assert len(joins) == 1 and "rejoined" not in joins[0].message
    assert [e.kind for e in events].count("job_started") == 1
    js = job_status(client, "dup")
    assert js["epoch"] == 1 and js["desired"]["values"]["lr"] == 0.01
    assert rank_of(client, "dup", "0", 0)["pid"] == first.pid
    # the second trains on (fail open) and takes over once the first is gone
    first.kill()
    wait_for(
        lambda: (rank_of(client, "dup", "0", 0) or {}).get("pid") == second.pid,
        timeout_s=60,
        what="the second process to take over",
    )
    wait_for(lambda: "joined as rank 0/0" in second.text(), timeout_s=30, what="its join")
    assert second.proc.poll() is None


async def _kv_put(url: str, job: str, data: bytes) -> None:
    conn = await connect(url, name="foreign-writer")
    try:
        kv = await KeyValue.open(conn, names.CONFIG_BUCKET)
        await kv.put(names.config_key(job), data)
    finally:
        await conn.close()


async def _kv_get(url: str, job: str) -> bytes | None:
    conn = await connect(url, name="reader")
    try:
        return await (await KeyValue.open(conn, names.CONFIG_BUCKET)).get(names.config_key(job))
    finally:
        await conn.close()


def test_a_foreign_write_of_a_jobs_config_is_undone_and_the_weaver_keeps_serving(
    tmp_path, up, procs
):
    """16.3 as seen: bytes written into loom_config/<job> made the leader stop serving and
    `torchloom up` exit ("unhandled errors in a TaskGroup"), taking NATS and every job along."""
    client = up.client()
    procs += [Proc(tmp_path, up.url, "fw", "0", 0), Proc(tmp_path, up.url, "other", "0", 0)]
    for job in ("fw", "other"):
        wait_for(lambda job=job: training(client, job, "0", 0), timeout_s=60, what=job)
    reply = client.control("set", "fw", values={"lr": 0.01})
    wait_for(lambda: applied(client, "fw", reply.version, ("0", 0)), timeout_s=30)

    asyncio.run(_kv_put(up.url, "fw", b"not a config at all"))
    wait_for(lambda: "config_restored" in kinds(client, "fw"), timeout_s=30, what="restored")
    doc = decode(asyncio.run(_kv_get(up.url, "fw")), DesiredConfig)
    assert doc.latest().version == reply.version and doc.latest().values["lr"] == 0.01
    assert up.proc.poll() is None
    # written again, and a change made at once: whichever comes first (the Weaver noticing the
    # write, or the change's compare-and-set failing), the change lands
    asyncio.run(_kv_put(up.url, "fw", b"{}"))
    reply = client.control("set", "fw", values={"lr": 0.02})
    wait_for(lambda: applied(client, "fw", reply.version, ("0", 0)), timeout_s=30)
    wait_for(lambda: kinds(client, "fw").count("config_restored") == 2, timeout_s=30)

    # a hostile document the ranks would take (a valid one, at a high version)
    hostile = msgspec.structs.replace(
        doc,
        snapshots=[ConfigSnapshot(version=999, effective_step=0, values={"lr": 5.0})],
        journal=[],
    )
    asyncio.run(_kv_put(up.url, "fw", encode(hostile)))
    wait_for(
        lambda: (rank_of(client, "fw", "0", 0) or {}).get("applied_version", 0) >= 1000,
        timeout_s=30,
        what="the rank back on the Weaver's values, as v1000",
    )
    assert rank_of(client, "fw", "0", 0)["config"]["lr"] == 0.02
    restored = [e for e in history(client, "fw") if e.kind == "config_restored"]
    assert len(restored) == 3 and "at v999" in restored[2].message
    # the other job never noticed, and `up` is still serving both
    reply = client.control("set", "other", values={"lr": 0.03})
    wait_for(lambda: applied(client, "other", reply.version, ("0", 0)), timeout_s=30)
    assert up.proc.poll() is None
