"""Failure detection on real processes: kill -9 → failed within the bound; a stuck loop → hung."""

import os
import re
import signal
import time

import pytest

from tests.helpers import history, kill_tree, launch_mnist, ranks, wait_for

pytestmark = pytest.mark.integration


def test_kill_9_of_a_rank_is_failed_when_its_connection_closes_and_a_frozen_one_by_heartbeat(
    tmp_path, up
):
    """A killed rank is failed because its NATS connection closed (the server's disconnect
    advisory), not before it was killed; a frozen rank (SIGSTOP: its connection stays open) is
    failed once its heartbeat is overdue, and is back when it thaws. How fast is bench/scale.py's
    detection section, not a schedule a slower machine could miss."""
    client = up.client()
    proc = launch_mnist(up.url, tmp_path, "--max-steps", "100000", "--eval-every", "0")
    try:
        rs = wait_for(
            lambda: (
                len(ranks(client, "mnist")) == 2
                and all(r["step"] > 5 for r in ranks(client, "mnist"))
                and ranks(client, "mnist")
            ),
            timeout_s=60,
            what="two ranks training",
        )
        frozen = next(r for r in rs if r["rank"] == 0)
        os.kill(frozen["pid"], signal.SIGSTOP)  # alive, its socket open, but silent
        try:
            event = wait_for(
                lambda: next(
                    (
                        e
                        for e in history(client, "mnist")
                        if e.kind == "rank_failed" and e.rank == 0
                    ),
                    None,
                ),
                timeout_s=60,
                interval_s=0.1,
                what="the frozen rank failed",
            )
            silent = float(re.search(r"no heartbeat for ([0-9.]+) s", event.message).group(1))
            assert silent >= 0.8  # the failure timeout of `up`
        finally:
            os.kill(frozen["pid"], signal.SIGCONT)
        failed_ts = event.ts
        wait_for(
            lambda: any(
                e.kind == "rank_training" and e.rank == 0 and e.ts > failed_ts
                for e in history(client, "mnist")
            ),
            timeout_s=60,
            what="the thawed rank back",
        )

        victim = next(r for r in rs if r["rank"] == 1)
        killed_at = time.time()
        os.kill(victim["pid"], signal.SIGKILL)
        event = wait_for(
            lambda: next(
                (e for e in history(client, "mnist") if e.kind == "rank_failed" and e.rank == 1),
                None,
            ),
            timeout_s=60,
            interval_s=0.1,
            what="a rank_failed event",
        )
        delay = event.ts - killed_at
        print(f"kill -9 -> failed in {delay:.3f} s")
        assert delay > 0
        assert "its connection closed (Client Closed)" in event.message
        st = {r["rank"]: r["state"] for r in ranks(client, "mnist")}
        assert st[1] == "failed"
    finally:
        kill_tree(proc)


def test_a_loop_that_stops_stepping_is_hung_while_heartbeats_go_on(tmp_path, up):
    client = up.client()
    proc = launch_mnist(
        up.url,
        tmp_path,
        "--max-steps",
        "1000",
        "--eval-every",
        "0",
        "--hang-at-step",
        "30",
        torchrun=False,
    )
    try:
        event = wait_for(
            lambda: next((e for e in history(client, "mnist") if e.kind == "rank_hung"), None),
            timeout_s=60,
            interval_s=0.2,
            what="a rank_hung event",
        )
        assert event.step == 30 and "has not moved" in event.message
        r = ranks(client, "mnist")[0]
        assert r["state"] == "hung" and r["heartbeat_age_s"] < 1.0  # alive, just stuck
        assert not [e for e in history(client, "mnist") if e.kind == "rank_failed"]
    finally:
        kill_tree(proc)
