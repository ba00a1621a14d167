"""The control plane on a 3-server JetStream cluster: the loss of any one server (stream
leaders included) under a training job loses nothing and stops nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import nats.errors
import pytest

from tests.helpers import Up, cli, history, kill_tree, launch_mnist, ranks, wait_for
from torchloom.client import WeaverClient
from torchloom.nats_server import NatsCluster
from torchloom.protocol import names
from torchloom.transport import History, KeyValue, connect, ensure_jetstream

pytestmark = pytest.mark.integration

STREAMS = (
    f"KV_{names.CONFIG_BUCKET}",
    f"KV_{names.REGISTRY_BUCKET}",
    f"KV_{names.CHECKPOINTS_BUCKET}",
    f"KV_{names.LEADER_BUCKET}",
    names.EVENTS_STREAM,
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    c = NatsCluster(store_dir=tmp_path / "cluster", size=3)
    c.start()
    yield c
    c.stop()


def placement(url: str) -> dict[str, tuple[int, str | None, bool]]:
    """Each stream's replicas, leader (server name) and whether every replica is current."""

    async def read() -> dict[str, tuple[int, str | None, bool]]:
        conn = await connect(url, name="test-placement")
        try:
            js = conn.client.jetstream(timeout=2.0)
            out = {}
            for stream in STREAMS:
                info = await js.stream_info(stream)
                peers = info.cluster.replicas or [] if info.cluster else []
                out[stream] = (
                    int(info.config.num_replicas or 1),
                    info.cluster.leader if info.cluster else None,
                    all(p.current and not p.offline for p in peers),
                )
            return out
        finally:
            await conn.close()

    return asyncio.run(read())


def config_versions(client: WeaverClient, job: str) -> list[int | None]:
    return [e.version for e in history(client, job) if e.kind in ("job_started", "config_set")]


def test_any_one_server_killed_under_training_loses_and_doubles_nothing(tmp_path, cluster):
    up = Up(tmp_path / "state", "--lighthouse", "none", "--no-ui", nats_url=cluster.url)
    client = WeaverClient(nats_url=cluster.url, timeout_s=10.0)
    proc = launch_mnist(
        cluster.url, tmp_path, "--max-steps", "100000", "--eval-every", "0", "--step-delay-ms", "5"
    )
    try:
        wait_for(
            lambda: len([r for r in ranks(client, "mnist") if r["state"] == "training"]) == 2,
            timeout_s=90,
            what="two ranks training",
        )
        stored = wait_for(lambda: placement(cluster.url), timeout_s=30, what="stream info")
        assert {s: r for s, (r, _, _) in stored.items()} == dict.fromkeys(STREAMS, 3)
        led = {leader for _, leader, _ in stored.values()}
        took = []
        for i, server in enumerate(cluster.servers):  # each one, the leaders' among them
            server.kill()
            t0 = time.monotonic()
            lr = f"0.0{i + 1}"
            r = cli("set", f"lr={lr}", "--wait", "--timeout-s", "10", "--job", "mnist",
                    url=cluster.url, timeout_s=60)  # fmt: skip
            took.append(time.monotonic() - t0)
            assert r.returncode == 0 and "applied by 2 rank(s)" in r.stdout, r.stdout + r.stderr
            server.start()
            wait_for(
                lambda: all(ok for _, _, ok in placement(cluster.url).values()),
                timeout_s=60,
                interval_s=0.2,
                what="every replica current again",
            )
        print("set --wait after a server's kill -9 took", [f"{t:.2f} s" for t in took])
        print("stream leaders before:", sorted(led))
        cli("stop", "--job", "mnist", url=cluster.url)
        assert proc.wait(120) == 0
    finally:
        kill_tree(proc)
        up.stop()
    events = history(client, "mnist")
    assert config_versions(client, "mnist") == [1, 2, 3, 4, 5]  # none lost, none twice
    applied = sorted({e.version for e in events if e.kind == "config_applied"})
    assert applied[-4:] == [2, 3, 4, 5]
    assert not [e for e in events if e.kind in ("rank_failed", "apply_missing")]


def test_up_cluster_3_keeps_serving_when_the_config_leader_is_killed(tmp_path):
    up = Up(tmp_path / "state", "--cluster", "3", "--lighthouse", "none", "--no-ui")
    try:
        assert up.url.count(",") == 2
        log = wait_for(lambda: "R3" in up.log_path.read_text() and up.log_path.read_text(),
                       timeout_s=30, what="the banner")  # fmt: skip
        assert "created R3" in log
        where = placement(up.url)
        leader = where[f"KV_{names.CONFIG_BUCKET}"][1]
        assert leader is not None
        endpoint = up._endpoint()
        assert endpoint is not None
        pid = endpoint["nats_pids"][int(leader.rsplit("s", 1)[1]) - 1]
        os.kill(pid, signal.SIGKILL)
        # the Weaver and the CLI move to the two others; the history is still readable
        r = cli("policy", "disable", "straggler", "--timeout-s", "40", url=up.url, timeout_s=60)
        assert r.returncode == 0, r.stdout + r.stderr
        r = cli("policy", "list", url=up.url, timeout_s=60)
        assert r.returncode == 0 and "straggler" in r.stdout, r.stdout + r.stderr
        r = cli("events", url=up.url, timeout_s=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert up.proc.poll() is None  # a majority is up: `up` serves on
    finally:
        up.stop()


def test_streams_made_with_one_replica_are_scaled_up_and_keep_their_data(cluster):
    async def scenario() -> tuple[dict[str, str], dict[str, str], int, bytes | None]:
        conn = await connect(cluster.url, name="test-scale")
        try:
            first = await ensure_jetstream(conn, replicas=1)  # as a single-server run made them
            kv = await KeyValue.open(conn, names.CONFIG_BUCKET)
            await kv.put("job", b"v1")
            again = await ensure_jetstream(conn)  # a Weaver on the cluster: min(3, servers)
            info = await conn.client.jetstream().stream_info(f"KV_{names.CONFIG_BUCKET}")
            return first, again, int(info.config.num_replicas or 1), await kv.get("job")
        finally:
            await conn.close()

    first, again, replicas, value = asyncio.run(scenario())
    assert set(first.values()) == {"created R1"}
    assert set(again.values()) == {"scaled R1 → R3"}
    assert replicas == 3 and value == b"v1"


def test_a_history_read_right_after_a_server_restarts_has_every_event(cluster):
    """A read's consumer may be placed on a replica still catching up after its restart, whose
    own count of events still to come says 0 (seen: 0 of 200 events, and [1, 2] of four
    versions after a healed partition). The read goes on until it has every event the
    stream's leader held when it began."""
    per_round, reads = 200, 8

    async def scenario() -> list[tuple[int, int]]:
        # (reconnects to another server when its own is killed)
        conn = await connect(cluster.url, name="test-lagging-read", retry_forever=True)
        short: list[tuple[int, int]] = []
        try:
            await ensure_jetstream(conn)
            js = conn.client.jetstream(timeout=5.0)
            writer = History(conn)
            subject = names.history_subject("lag", "x")
            n = 0
            for i, server in enumerate(cluster.servers, 1):  # each in turn misses 200 events
                server.kill()
                while n < i * per_round:
                    # (a killed leader: the cluster elects another, the append is resent)
                    if await writer.append_many([(subject, b"e%d" % n, f"lag-{n}")]) == 1:
                        n += 1
                    else:
                        await asyncio.sleep(0.2)
                server.start()
                for _ in range(reads):  # read at once, while it catches up
                    reader = await connect(cluster.url, name="test-lagging-reader")
                    try:
                        got = [m async for m in History(reader).read(names.history_filter("lag"))]
                    finally:
                        await reader.close()
                    if len(got) != n:
                        short.append((len(got), n))
                while True:  # every replica current before the next server is killed
                    try:
                        info = await js.stream_info(names.EVENTS_STREAM)
                    except nats.errors.Error:  # no leader for a moment (an election)
                        await asyncio.sleep(0.2)
                        continue
                    peers = info.cluster.replicas or [] if info.cluster else []
                    if len(peers) == 2 and all(p.current and not p.offline for p in peers):
                        break
                    await asyncio.sleep(0.2)
            return short
        finally:
            await conn.close()

    short = asyncio.run(asyncio.wait_for(scenario(), timeout=240))
    assert short == [], f"reads that came back short (got, stored): {short}"
