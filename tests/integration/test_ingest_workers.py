"""`torchloom up --ingest-workers 2`: telemetry taken in by worker processes (a NATS queue
group) and folded by the Weaver in batches — the job is seen and steered as with the Weaver's
own intake, a malformed flush is counted, and a worker killed is started again without a
rank being taken for dead."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import psutil
import pytest

from tests.helpers import Up, cli, history, kill_tree, launch_mnist, ranks, wait_for
from torchloom.transport import connect

pytestmark = pytest.mark.integration


def workers(up: Up) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(up.proc.pid).children(recursive=True)
        if "torchloom.weaver.ingest_worker" in " ".join(p.cmdline())
    ]


def test_two_ingest_workers_feed_the_weaver_and_one_killed_is_replaced(tmp_path):
    up = Up(tmp_path / "state", "--ingest-workers", "2", "--lighthouse", "none")
    client = up.client(10.0)
    proc = launch_mnist(up.url, tmp_path, "--max-steps", "100000", "--eval-every", "0",
                        "--step-delay-ms", "10")  # fmt: skip
    try:
        wait_for(lambda: len(workers(up)) == 2, timeout_s=30, what="two ingest workers")
        wait_for(
            lambda: len([r for r in ranks(client, "mnist") if r["state"] == "training"]) == 2,
            timeout_s=90,
            what="two ranks training, seen through the workers",
        )
        r = cli("set", "lr=0.02", "--wait", "--job", "mnist", url=up.url)
        assert r.returncode == 0 and "applied by 2 rank(s)" in r.stdout, r.stdout + r.stderr

        async def bad_flush() -> None:  # a flush that names another rank's subject
            conn = await connect(up.url, name="test")
            await conn.publish("loom.mnist.telemetry.0.9", b'{"v":1,"job_id":"x"}')
            await conn.flush()
            await conn.close()

        asyncio.run(bad_flush())
        wait_for(
            lambda: up.client().status().get("jobs") is not None
            and _dropped(up) >= 1,
            timeout_s=30,
            what="the bad flush counted as dropped",
        )  # fmt: skip

        victim = workers(up)[0]
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(
            lambda: len(ws := workers(up)) == 2 and victim.pid not in [w.pid for w in ws],
            timeout_s=30,
            what="the killed worker started again",
        )
        r = cli("set", "lr=0.01", "--wait", "--job", "mnist", url=up.url)
        assert r.returncode == 0 and "applied by 2 rank(s)" in r.stdout, r.stdout + r.stderr
        assert not [e for e in history(client, "mnist") if e.kind == "rank_failed"]
        pids = [w.pid for w in workers(up)]
    finally:
        kill_tree(proc)
        up.stop()
    wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), timeout_s=30,
             what="the workers gone with their Weaver")  # fmt: skip


def _dropped(up: Up) -> int:
    assert up.ui_url is not None
    health = httpx.get(f"{up.ui_url}api/health", timeout=5).json()
    return int(health["dropped_messages"].get("telemetry", 0))
