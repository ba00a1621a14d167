"""Replica groups under torchft with a real lighthouse: a kill -9 mid-run, a restart, a heal."""

import os
import signal
import subprocess

import pytest

from tests.helpers import BIN, TRAIN, history, kill_tree, mnist_dir, ranks, summaries, wait_for

pytest.importorskip("torchft")
pytestmark = pytest.mark.integration


def test_kill_9_of_a_replica_group_restarts_heals_and_ends_with_identical_weights(tmp_path, up):
    client = up.client()
    cmd = [
        str(BIN / "torchloom"),
        "run",
        "--replicas",
        "2",
        "--job",
        "ft",
        "--state-dir",
        str(up.state_dir),
        "--",
        "python",
        str(TRAIN),
        "--ft",
        "--max-steps",
        "300",
        "--eval-every",
        "0",
        "--log-every",
        "50",
        "--data-dir",
        str(mnist_dir()),
        "--out-dir",
        str(tmp_path / "out"),
    ]
    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115
    sup = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:

        def both_in_quorum():
            rs = ranks(client, "ft")
            return (
                len(rs) == 2
                and all(
                    r["state"] == "training"
                    and r["step"] >= 40
                    and r["quorum"]
                    and r["quorum"]["participants"] == 2
                    for r in rs
                )
                and rs
            )

        rs = wait_for(
            both_in_quorum, timeout_s=120, interval_s=0.2, what="two replica groups in one quorum"
        )
        victim = next(r for r in rs if r["replica_id"] == "1")
        os.kill(victim["pid"], signal.SIGKILL)

        assert sup.wait(240) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        kill_tree(sup)
        log.close()

    out = (tmp_path / "run.log").read_text()
    assert "[replica 1] exited with code" in out and "[replica 1] restarted" in out
    assert (
        "[replica 0] finished" in out
        and "[replica 1] finished" in out
        and "[replica 0] restarted" not in out
    )

    events = history(client, "ft")
    kinds = [(e.kind, e.replica_id) for e in events]
    assert ("rank_failed", "1") in kinds
    assert ("rank_joined", "1") in kinds[kinds.index(("rank_failed", "1")) :]  # it came back …
    healed = [e for e in events if e.kind == "healed" and e.replica_id == "1"]
    assert (
        healed and healed[-1].data["to_step"] > victim["step"]
    )  # … and healed from its peer, ahead
    assert ("commit_failed", "0") in kinds or ("quorum_changed", "0") in kinds

    s = summaries(tmp_path)
    assert [x["step"] for x in s] == [299, 299]
    assert s[0]["params_sha256"] == s[1]["params_sha256"]  # identical weights on both groups
    survivor = next(x for x in s if x["replica_id"] == "0")
    assert survivor["longest_step_s"] <= 1.0 + 1.0  # the lighthouse's heartbeat timeout + 1 s
    assert min(x["test_acc"] for x in s) > 0.9
