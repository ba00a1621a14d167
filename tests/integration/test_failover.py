"""Two Weavers on one NATS: one leads through the KV lease, the other takes over when it dies,
and no config version or history entry is lost or made twice (crashes around the KV write)."""

import asyncio
import signal
import socket
import time

import msgspec
import pytest

from tests.helpers import Up, cli, history, kill_tree, launch_mnist, ranks, summaries, wait_for
from torchloom.client import WeaverClient
from torchloom.errors import LeadershipLostError
from torchloom.protocol import (
    ControlRequest,
    DesiredConfig,
    JoinInfo,
    decode,
    names,
)
from torchloom.transport import KeyValue, connect, ensure_jetstream, ensure_lease_bucket
from torchloom.weaver.faults import ENV_CRASH_AT
from torchloom.weaver.lease import Holder, Lease, LeaseSettings

pytestmark = pytest.mark.integration

SLOW_RUN = ("--max-steps", "400", "--eval-every", "0", "--log-every", "5", "--step-delay-ms", "10")


def leader_answers(client: WeaverClient) -> bool:
    return bool(client.status().get("jobs") is not None)


def config_events(client: WeaverClient, job: str) -> list[tuple[str, int | None]]:
    return [
        (e.kind, e.version) for e in history(client, job) if e.kind in ("config_set", "job_started")
    ]


def stored_config(url: str, job: str) -> DesiredConfig:
    async def read() -> DesiredConfig:
        conn = await connect(url, name="test")
        try:
            raw = await (await KeyValue.open(conn, names.CONFIG_BUCKET)).get(job)
        finally:
            await conn.close()
        assert raw is not None
        return decode(raw, DesiredConfig)

    return asyncio.run(read())


def test_standby_takes_over_from_killed_leader_and_training_never_notices(tmp_path, nats):
    leader = Up(tmp_path / "a", "--lighthouse", "none", nats_url=nats.url)
    wait_for(lambda: leader_answers(leader.client(1.0)), timeout_s=20, what="the leader")
    standby = Up(tmp_path / "b", "--lighthouse", "none", nats_url=nats.url)
    proc = launch_mnist(nats.url, tmp_path, *SLOW_RUN)
    client = WeaverClient(nats_url=nats.url, timeout_s=10.0)
    try:
        wait_for(
            lambda: len([r for r in ranks(client, "mnist") if r["state"] == "training"]) == 2,
            timeout_s=60,
            what="two ranks training",
        )
        assert "STANDBY" in standby.log_path.read_text()
        assert client.control("set", "mnist", values={"lr": 0.02}).version == 2

        leader.stop(signal.SIGKILL)
        killed = time.monotonic()
        # the first request after the kill: retried by the client until the standby answers
        reply = client.control("set", "mnist", values={"lr": 0.01})
        took_s = time.monotonic() - killed
        assert took_s < 5.0, f"the standby answered {took_s:.1f} s after the leader's kill -9"
        assert reply.version == 3  # no version lost, none made twice

        r = cli("set", "lr=0.005", "--wait", url=nats.url)
        assert r.returncode == 0 and "v4 applied by 2 rank(s)" in r.stdout, r.stdout + r.stderr
        assert proc.wait(120) == 0  # training ran through the failover
    finally:
        kill_tree(proc)
        leader.stop()
        standby.stop()
    assert [s["lr"] for s in summaries(tmp_path)] == [0.005, 0.005]
    events = history(client, "mnist")
    assert [v for k, v in config_events(client, "mnist")] == [1, 2, 3, 4]
    assert not [e for e in events if e.kind in ("rank_failed", "rank_hung", "apply_missing")]
    print(f"takeover answered in {took_s:.2f} s")


def join(client: WeaverClient, job: str) -> None:
    """One rank joins: the job exists (config v1) without a training process."""
    info = JoinInfo(
        replica_id="0", rank=0, host=socket.gethostname(), pid=1, initial_values={"lr": 0.1}
    )
    client.request(ControlRequest(op="join", job_id=job, join=info))


@pytest.mark.parametrize("point", ["before_config_write", "after_config_write"])
def test_crash_around_the_config_write_loses_and_doubles_nothing(tmp_path, nats, point):
    crashing = Up(
        tmp_path / "a", "--lighthouse", "none", "--no-ui", nats_url=nats.url,
        env={ENV_CRASH_AT: f"{point}:set"},
    )  # fmt: skip
    client = WeaverClient(nats_url=nats.url, timeout_s=15.0)
    wait_for(lambda: leader_answers(client), timeout_s=20, what="the leader")
    standby = Up(tmp_path / "b", "--lighthouse", "none", "--no-ui", nats_url=nats.url)
    try:
        join(client, "j")
        # the leader dies inside this request; the client sends it again (same request id)
        # until the standby, now leading, answers
        reply = client.control("set", "j", values={"lr": 0.02})
        assert crashing.proc.wait(5) == -signal.SIGKILL
        assert reply.version == 2
        doc = stored_config(nats.url, "j")
        assert [s.version for s in doc.snapshots][-1] == 2
        assert doc.snapshots[-1].values["lr"] == 0.02
        wait_for(
            lambda: config_events(client, "j") == [("job_started", 1), ("config_set", 2)],
            timeout_s=30,
            what="exactly one history entry per version",
        )
        assert client.control("set", "j", values={"lr": 0.03}).version == 3
        wait_for(  # the history is appended right after the reply, not before it
            lambda: config_events(client, "j")[-1] == ("config_set", 3),
            timeout_s=30,
            what="v3's history entry",
        )
    finally:
        crashing.stop()
        standby.stop()


def test_same_request_id_is_answered_once(tmp_path, nats):
    up = Up(tmp_path / "a", "--lighthouse", "none", "--no-ui", nats_url=nats.url)
    client = WeaverClient(nats_url=nats.url)
    try:
        wait_for(lambda: leader_answers(client), timeout_s=20, what="the Weaver")
        join(client, "j")
        req = ControlRequest(op="set", job_id="j", values={"lr": 0.5}, request_id="r-1")
        first, again = client.request(req), client.request(req)
        assert first.version == again.version == 2
        wait_for(  # appended right after the reply; once, never twice
            lambda: config_events(client, "j") == [("job_started", 1), ("config_set", 2)],
            timeout_s=30,
            what="one history entry per version",
        )
    finally:
        up.stop()


def test_lease_of_a_holder_on_another_host_expires_within_5_s(nats):
    """The TTL path (a leader on a lost host: its pid cannot be checked): the standby waits
    for the lease to expire, then leads."""

    async def run() -> float:
        conn = await connect(nats.url, name="test")
        try:
            await ensure_jetstream(conn)
            settings = LeaseSettings()
            await ensure_lease_bucket(conn, ttl_s=settings.ttl_s)
            kv = await KeyValue.open(conn, names.LEADER_BUCKET)
            gone = Holder(instance="elsewhere", host="another-host", pid=1, since_ts=time.time())
            await kv.update(names.LEADER_KEY, msgspec.json.encode(gone), revision=0)
            t0 = time.monotonic()
            lease = Lease(kv, instance="me", settings=settings)
            assert not await lease.try_acquire()
            await asyncio.wait_for(lease.acquire(), timeout=10)
            took = time.monotonic() - t0
            # and the old holder, were it alive, could not renew over the new one
            old = Lease(kv, instance="elsewhere", settings=settings)
            old.revision = 1
            with pytest.raises(LeadershipLostError):
                await old.renew()
            return took
        finally:
            await conn.close()

    took = asyncio.run(run())
    assert 1.0 < took < 5.0, took
