"""The control plane dies under a training job: training never stops, nothing is lost."""

import signal

import pytest

from tests.helpers import Up, cli, history, kill_tree, launch_mnist, ranks, summaries, wait_for
from torchloom.nats_server import NatsServer

pytestmark = pytest.mark.integration


# a run long enough to outlive an outage, printing its step every 5 steps
SLOW_RUN = ("--max-steps", "500", "--eval-every", "0", "--log-every", "5", "--step-delay-ms", "5")


def both_training(client, min_step=0):
    rs = ranks(client, "mnist")
    return (
        len(rs) == 2 and all(r["state"] == "training" and r["step"] >= min_step for r in rs) and rs
    )


def step_log(tmp_path):
    """Steps printed by rank 0 (eval lines) – evidence that training went on meanwhile."""
    return [
        int(line.split()[1].rstrip(":"))
        for line in (tmp_path / "train.log").read_text().splitlines()
        if line.startswith("step ")
    ]


def test_weaver_killed_and_restarted_mid_run(tmp_path, nats):
    weaver = Up(tmp_path / "state", nats_url=nats.url)
    client = weaver.client()
    proc = launch_mnist(nats.url, tmp_path, *SLOW_RUN)
    try:
        before = wait_for(lambda: both_training(client, 30), timeout_s=60, what="training")
        assert cli("set", "lr=0.02", "--wait", url=nats.url).returncode == 0
        joined = {(r["replica_id"], r["rank"]): r["pid"] for r in before}
        events_before = history(client, "mnist")

        weaver.stop(signal.SIGKILL)
        step_at_kill = max(step_log(tmp_path) or [0])
        wait_for(  # training goes on without the Weaver
            lambda: max(step_log(tmp_path)) > step_at_kill, timeout_s=60, what="steps go on"
        )
        assert proc.poll() is None

        weaver = Up(tmp_path / "state", nats_url=nats.url)
        client = weaver.client()
        after = wait_for(lambda: both_training(client, 1), timeout_s=20, what="DR map restored")
        assert {(r["replica_id"], r["rank"]): r["pid"] for r in after} == joined
        # the registry saves a rank's progress at most every 30 s: the restored entry may still
        # say v1 until the rank's next heartbeat, which must say v2
        wait_for(
            lambda: (rs := both_training(client, 1)) and all(r["applied_version"] == 2 for r in rs),
            timeout_s=20,
            what="both ranks on v2 after the restart",
        )

        def restarted_history():
            events = history(client, "mnist")
            return events if any(e.kind == "weaver_started" for e in events) else None

        # weaver_started is appended off the start's path: read until it is there
        events_after = wait_for(
            restarted_history, timeout_s=30, what="weaver_started in the history"
        )
        assert [e.kind for e in events_after[: len(events_before)]] == [
            e.kind for e in events_before
        ]

        r = cli("set", "lr=0.005", "--wait", url=nats.url)
        assert r.returncode == 0 and "v3 applied by 2 rank(s)" in r.stdout, r.stdout + r.stderr
        assert proc.wait(120) == 0
    finally:
        kill_tree(proc)
        weaver.stop()
    assert [s["lr"] for s in summaries(tmp_path)] == [0.005, 0.005]
    assert not [
        e for e in history_of(nats.url) if e.kind in ("rank_failed", "rank_hung", "apply_missing")
    ]


def history_of(url):
    from torchloom.client import WeaverClient

    return history(WeaverClient(nats_url=url), "mnist")


def test_nats_killed_and_restarted_mid_run(tmp_path):
    store = tmp_path / "nats"
    server = NatsServer(store_dir=store)
    url = server.start()
    weaver = Up(tmp_path / "state", nats_url=url)
    client = weaver.client()
    proc = launch_mnist(url, tmp_path, *SLOW_RUN)
    try:
        wait_for(lambda: both_training(client, 30), timeout_s=60, what="training")
        events_before = history(client, "mnist")
        server.kill()
        step_at_kill = max(step_log(tmp_path) or [0])
        wait_for(  # training goes on without NATS
            lambda: max(step_log(tmp_path)) > step_at_kill, timeout_s=60, what="steps go on"
        )
        assert proc.poll() is None

        server = NatsServer(store_dir=store, port=server.port)  # same port, same JetStream storage
        server.start()
        wait_for(
            lambda: both_training(client, 1),
            timeout_s=30,
            what="Threadlets back after the NATS restart",
        )
        r = cli("set", "lr=0.003", "batch_size=48", "--wait", url=url)
        assert r.returncode == 0 and "v2 applied by 2 rank(s)" in r.stdout, r.stdout + r.stderr
        assert proc.wait(120) == 0
        events_after = history(client, "mnist")  # the history from before the outage survived
        assert events_after[: len(events_before)] == events_before
        assert not [e for e in events_after if e.kind in ("rank_failed", "rank_hung")]
    finally:
        kill_tree(proc)
        weaver.stop()
        server.stop()
    out = summaries(tmp_path)
    assert [s["lr"] for s in out] == [0.003, 0.003] and out[0]["params_sha256"] == out[1][
        "params_sha256"
    ]
