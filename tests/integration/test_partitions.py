"""Partitions between real hosts: network namespaces on one machine (torchloom.sim.hosts),
each with its own address and a link the test cuts. Each scenario counts its losses — config
versions lost or made twice, ranks left behind — and prints one row of the table in
docs/cluster.md; every loss must be 0."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.helpers import Up, cli, history, kill_tree, launch_mnist, ranks, wait_for
from torchloom.client import WeaverClient
from torchloom.nats_server import NatsCluster
from torchloom.protocol import HistoryEvent, decode, names
from torchloom.sim.hosts import Network, available
from torchloom.transport import connect

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(available() is not None, reason=f"{available()}"),
]

RUN = ("--max-steps", "100000", "--eval-every", "0", "--step-delay-ms", "20")


@pytest.fixture
def network() -> Iterator[Network]:
    with Network(net=70 + os.getpid() % 100) as net:
        yield net


def versions(client: WeaverClient, job: str) -> list[int | None]:
    return [e.version for e in history(client, job) if e.kind in ("job_started", "config_set")]


def rank_of(client: WeaverClient, job: str) -> dict | None:
    rs = ranks(client, job)
    return rs[0] if rs else None


def row(scenario: str, **figures: object) -> None:
    print(f"| {scenario} | " + " | ".join(f"{k}={v}" for k, v in figures.items()) + " |")


def test_a_rank_host_cut_off_for_10_s_trains_on_and_catches_up(tmp_path, network):
    """The rank's host loses its link for 10 s: it trains on with its config, the Weaver marks
    it failed within a second (heartbeat: a cut link closes no connection), two changes are
    made meanwhile, and after the link is back the rank rejoins with the newest version."""
    rank_host = network.add_host("rank")
    up = Up(tmp_path / "state", "--nats-host", network.gateway, "--no-secure", "--no-ui",
            "--lighthouse", "none")  # fmt: skip
    client = WeaverClient(nats_url=up.url, timeout_s=10.0)
    proc = launch_mnist(up.url, tmp_path, *RUN, torchrun=False, job="cut", wrap=rank_host.wrap)
    try:
        wait_for(lambda: (r := rank_of(client, "cut")) and r["step"] > 20, timeout_s=90,
                 what="the rank training")  # fmt: skip
        step_at_cut = rank_of(client, "cut")["step"]
        cut_at = time.time()
        rank_host.cut()
        failed = wait_for(
            lambda: next((e for e in history(client, "cut") if e.kind == "rank_failed"), None),
            timeout_s=30,
            what="the cut rank failed",
        )
        for lr in ("0.02", "0.01"):  # v2, v3: made while the rank cannot hear them
            r = cli("set", f"lr={lr}", "--job", "cut", url=up.url)
            assert r.returncode == 0, r.stdout + r.stderr
        time.sleep(max(0.0, cut_at + 10.0 - time.time()))  # the scenario: 10 s without a link
        rank_host.heal()
        healed_at = time.time()
        back = wait_for(
            lambda: (r := rank_of(client, "cut")) and r["state"] == "training"
            and r["applied_version"] == 3 and r,
            timeout_s=60,
            what="the rank back with v3",
        )  # fmt: skip
        rejoin_s = time.time() - healed_at
        wait_for(lambda: len(versions(client, "cut")) >= 3, timeout_s=30, what="v3's entry")
        assert versions(client, "cut") == [1, 2, 3]
    finally:
        kill_tree(proc)
        up.stop()
    assert back["step"] > step_at_cut + 100  # it trained on while cut off (20 ms steps)
    assert "no heartbeat" in failed.message
    row("rank host cut 10 s", failed_after_s=f"{failed.ts - cut_at:.2f}",
        caught_up_after_heal_s=f"{rejoin_s:.1f}", steps_while_cut=back["step"] - step_at_cut,
        versions_lost=0, versions_doubled=0)  # fmt: skip


def test_leader_weaver_cut_from_the_majority_and_a_nats_server_cut_off(tmp_path, network):
    """Three NATS servers on hosts of their own. (1) The server a rank is connected to is cut
    off: the rank moves to another and applies a change made meanwhile. (2) The leader Weaver,
    on the same host as one server, is cut off with it: that server is a minority, so the old
    leader can write nothing; the standby takes over; after the link is back the old leader
    steps down. No version lost, none made twice, in either."""
    hosts = [network.add_host(f"n{i}") for i in (1, 2, 3)]
    cluster = NatsCluster(store_dir=tmp_path / "cluster", size=3,
                          hosts=[(h.address, h.wrap) for h in hosts])  # fmt: skip
    cluster.start()
    leader = Up(tmp_path / "a", "--no-secure", "--no-ui", "--lighthouse", "none",
                nats_url=cluster.servers[0].url, wrap=hosts[0].wrap)  # fmt: skip
    client = WeaverClient(nats_url=",".join(s.url for s in cluster.servers[1:]), timeout_s=15.0)
    wait_for(lambda: client.status().get("jobs") is not None, timeout_s=60, what="the leader")
    standby = Up(tmp_path / "b", "--no-secure", "--no-ui", "--lighthouse", "none",
                 nats_url=cluster.servers[1].url, wrap=hosts[1].wrap)  # fmt: skip
    # the rank knows only n3 at first (it learns the others from the cluster)
    proc = launch_mnist(cluster.servers[2].url, tmp_path, *RUN, torchrun=False, job="part")
    try:
        wait_for(lambda: (r := rank_of(client, "part")) and r["step"] > 20, timeout_s=90,
                 what="the rank training")  # fmt: skip
        assert "STANDBY" in standby.log_path.read_text()

        # (1) the rank's server is cut off
        cut_at = time.time()
        hosts[2].cut()
        r = cli("set", "lr=0.02", "--job", "part", "--timeout-s", "20", url=client.nats_url)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: (r := rank_of(client, "part")) and r["applied_version"] == 2,
                 timeout_s=60, what="the moved rank applying v2")  # fmt: skip
        moved_s = time.time() - cut_at
        hosts[2].heal()
        wait_for(lambda: cluster_current(cluster), timeout_s=60, what="n3 current again")
        row("NATS server cut off", rank_moved_and_applied_after_s=f"{moved_s:.1f}",
            versions_lost=0, versions_doubled=0)  # fmt: skip

        # (2) the leader Weaver and its server are cut off from the majority; "from the cut on"
        # starts once the link is down (an event stamped while `ip` runs can still get out)
        hosts[0].cut()
        cut_at = time.time()
        r = cli("set", "lr=0.01", "--job", "part", "--timeout-s", "30", url=client.nats_url)
        took_s = time.time() - cut_at
        assert r.returncode == 0 and "v3" in r.stdout, (
            r.stdout + r.stderr + "\n".join(e.message for e in history(client, "part"))
        )
        hosts[0].heal()
        wait_for(lambda: leader.proc.poll() is not None, timeout_s=60,
                 what="the old leader to step down")  # fmt: skip
        assert "stepped down" in leader.log_path.read_text()
        r = cli("set", "lr=0.005", "--job", "part", "--wait", "--timeout-s", "20",
                url=client.nats_url)  # fmt: skip
        assert r.returncode == 0 and "v4 applied by 1 rank(s)" in r.stdout, r.stdout + r.stderr
        # a change's history entry is appended right after its reply, off the reply's path:
        # wait for the whole list; a version made twice would never match it. (A read served
        # by the healed server while it caught up came back [1, 2] once; reads now wait for
        # every event the stream's leader holds: test_cluster's lagging-replica test.)
        seen: list[list[int]] = []
        try:
            wait_for(
                lambda: seen.append(versions(client, "part")) or seen[-1] == [1, 2, 3, 4],
                timeout_s=30,
                what="the history's versions to be [1, 2, 3, 4]",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the last reads: {seen[-3:]}") from None
        # the cut-off leader wrote nothing from the cut on (its events carry its instance id)
        old = re.search(r"weaver ([0-9a-f]+) stops serving", leader.log_path.read_text())
        assert old is not None
        # (read back once the healed cluster answers: a consumer made mid-election times out)
        stored = wait_for(lambda: event_ids(cluster.url), timeout_s=60, what="the history")
        stale = [(m, why) for m, ts, why in stored if m.startswith(old[1]) and ts > cut_at]
        assert stale == [], f"cut at {cut_at}"
    finally:
        kill_tree(proc)
        leader.stop()
        standby.stop()
        cluster.stop()
    row("leader Weaver cut from the majority", standby_answered_after_s=f"{took_s:.1f}",
        old_leader_events=len(stale), versions_lost=0, versions_doubled=0)  # fmt: skip


def event_ids(url: str) -> list[tuple[str, float, str]]:
    """Every stored history event's de-duplication id (a Weaver's are ``<instance>-<n>``),
    its time and its message."""

    async def read() -> list[tuple[str, float, str]]:
        conn = await connect(url, name="test-ids")
        out = []
        try:
            js = conn.client.jetstream(timeout=5.0)
            sub = await js.subscribe(names.EVENTS_STREAM_SUBJECTS, ordered_consumer=True)
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except Exception:
                    return out
                ev = decode(msg.data, HistoryEvent)
                out.append(
                    ((msg.headers or {}).get("Nats-Msg-Id", ""), ev.ts, f"{ev.ts}: {ev.message}")
                )
        finally:
            await conn.close()

    return asyncio.run(read())


def cluster_current(cluster: NatsCluster) -> bool:
    async def check() -> bool:
        conn = await connect(cluster.url, name="test-current")
        try:
            js = conn.client.jetstream(timeout=2.0)
            for stream in ("KV_loom_config", "LOOM_EVENTS"):
                info = await js.stream_info(stream)
                peers = info.cluster.replicas or [] if info.cluster else []
                if len(peers) != 2 or not all(p.current and not p.offline for p in peers):
                    return False
            return True
        finally:
            await conn.close()

    return asyncio.run(check())


def test_a_hosts_link_can_be_slowed_and_freed(network):
    """The harness's other knob: a token-bucket limit on a host's link, and its removal."""
    host = network.add_host("slow")
    host.limit(rate_mbit=8)
    shown = subprocess.run(["tc", "qdisc", "show", "dev", host.link], capture_output=True,
                           text=True).stdout  # fmt: skip
    assert "tbf" in shown and "rate 8Mbit" in shown, shown
    host.limit(rate_mbit=None)
    shown = subprocess.run(["tc", "qdisc", "show", "dev", host.link], capture_output=True,
                           text=True).stdout  # fmt: skip
    assert "tbf" not in shown, shown
