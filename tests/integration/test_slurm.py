"""`torchloom run --scheduler slurm` against a real slurmctld and two slurmd on this machine:
each replica group one job step, a killed group restarted as a new step, a drained group's
node set DRAIN and its replacement started on the other node."""

from __future__ import annotations

import os
import signal

import pytest

from tests.helpers import cli, history, kill_tree, ranks, start_two_groups, summaries, wait_for
from tests.slurm import sinfo, slurm_cluster, unavailable

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(bool(unavailable()), reason=f"{unavailable()}"),
]


def test_mnist_as_two_slurm_job_steps_restarted_and_replaced(tmp_path, up):
    client = up.client()
    with slurm_cluster(tmp_path / "slurm") as conf:
        env = {"SLURM_CONF": str(conf)}
        sup, log = start_two_groups(
            up, tmp_path, 500, env=env, run_args=("--scheduler", "slurm"), job="sl"
        )
        try:
            rs = wait_for(
                lambda: (
                    len(rs := [r for r in ranks(client, "sl") if r["state"] == "training"]) == 2
                    and all((r["quorum"] or {}).get("participants") == 2 for r in rs)
                    and rs
                ),
                timeout_s=120,
                interval_s=0.2,
                what="two groups (job steps) in one quorum",
            )
            run_log = lambda: (tmp_path / "run.log").read_text()  # noqa: E731
            assert run_log().count("as a slurm job step") == 2
            # a group killed: its step ends, the supervisor starts it again as a new step
            victim = next(r for r in rs if r["replica_id"] == "0")
            os.kill(victim["pid"], signal.SIGKILL)
            wait_for(
                lambda: any(
                    r["replica_id"] == "0"
                    and r["state"] == "training"
                    and r["pid"] != victim["pid"]
                    for r in ranks(client, "sl")
                ),
                timeout_s=120,
                interval_s=0.2,
                what="replica group 0 back as a new job step",
            )
            assert "[replica 0] restarted as a slurm job step" in run_log()
            # a drain with replacement: the node is set DRAIN, the newcomer runs elsewhere
            r = cli("drain", "--replica", "1", "--replace", "--job", "sl", url=up.url)
            assert r.returncode == 0, r.stderr
            wait_for(
                lambda: any(
                    x["replica_id"] == "2" and x["state"] == "training" for x in ranks(client, "sl")
                ),
                timeout_s=120,
                interval_s=0.2,
                what="replica group 2 training",
            )
            drained = [n for n, st in sinfo(conf).items() if st.startswith("drain") or st == "drng"]
            assert len(drained) == 1, sinfo(conf)
            assert f"node {drained[0]} set DRAIN in Slurm" in run_log()
            assert sup.wait(300) == 0, run_log()[-3000:]
        finally:
            kill_tree(sup)
            log.close()
    s = {x["replica_id"]: x for x in summaries(tmp_path)}
    assert s["1"]["stop_reason"] == "drained"
    assert s["0"]["step"] == s["2"]["step"] == 499
    assert s["0"]["params_sha256"] == s["2"]["params_sha256"]
    kinds = [(e.kind, e.replica_id) for e in history(client, "sl")]
    assert ("replica_drained", "1") in kinds
