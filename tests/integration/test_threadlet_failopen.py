"""Fail open: a training loop never waits for NATS or the Weaver."""

import socket
import threading
import time

import pytest

import torchloom
from tests.helpers import Up, wait_for

pytestmark = pytest.mark.integration


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_training_runs_without_nats_and_joins_when_it_comes_up(tmp_path):
    port = free_port()
    run = torchloom.init(
        job_id="late",
        knobs={"lr": 0.1, "batch_size": 4},
        max_steps=10**9,
        nats_url=f"nats://127.0.0.1:{port}",
        rank=0,
        replica_id="0",
        buffer_points=100,
    )
    stop = threading.Event()
    steps = []

    def loop():
        for step in run.steps():
            steps.append(step)
            run.log(loss=1.0)
            time.sleep(0.002)
            if stop.is_set():
                break

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        wait_for(lambda: len(steps) > 300, timeout_s=20, what="steps with no NATS at all")
        assert run["lr"] == 0.1 and not run.agent.joined.is_set()
        assert (
            run.shared.points.dropped > 0
        )  # the bounded buffer dropped the oldest points, and counted them
        up = Up(tmp_path / "state", "--nats-port", str(port))
        try:
            wait_for(lambda: run.agent.joined.is_set(), timeout_s=20, what="late join")
            client = up.client()
            r = wait_for(
                lambda: (rs := client.status("late")["jobs"]) and rs[0]["ranks"][0],
                timeout_s=10,
                what="rank in DR map",
            )
            assert r["state"] == "training" and r["dropped_points"] > 0
        finally:
            up.stop()
    finally:
        stop.set()
        t.join(5)
