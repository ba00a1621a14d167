"""The reference MNIST job (2 DDP ranks under torchrun) steered through the CLI while it trains."""

import json

import pytest

from tests.helpers import cli, history, kill_tree, launch_mnist, ranks, summaries, wait_for

pytestmark = pytest.mark.integration


def training_at(client, job, min_step):
    rs = ranks(client, job)
    return (
        len(rs) == 2 and all(r["state"] == "training" and r["step"] >= min_step for r in rs) and rs
    )


def test_set_pause_resume_apply_on_both_ranks_at_the_same_step(tmp_path, up):
    client = up.client()
    proc = launch_mnist(
        up.url, tmp_path, "--max-steps", "500", "--eval-every", "0", "--step-delay-ms", "5"
    )
    try:
        wait_for(lambda: training_at(client, "mnist", 20), timeout_s=60, what="both ranks training")

        r = cli("set", "lr=0.01", "batch_size=32", "--reason", "test", "--wait", url=up.url)
        assert r.returncode == 0, r.stderr
        assert "v2 accepted" in r.stdout and "v2 applied by 2 rank(s)" in r.stdout

        bad = cli("set", "lr=-1", "batch_size=16", url=up.url)
        assert bad.returncode == 2 and "knob 'lr'" in bad.stderr
        status = json.loads(cli("status", "--json", "--job", "mnist", url=up.url).stdout)["jobs"][0]
        assert status["desired"]["version"] == 2 and status["desired"]["values"]["batch_size"] == 32

        p = cli("pause", url=up.url)
        assert p.returncode == 0, p.stderr
        paused = wait_for(
            lambda: (
                all(x["state"] == "paused" for x in ranks(client, "mnist"))
                and ranks(client, "mnist")
            ),
            timeout_s=30,
            what="both ranks paused",
        )
        assert len({x["step"] for x in paused}) == 1  # the same step boundary
        assert cli("resume", url=up.url).returncode == 0
        wait_for(
            lambda: training_at(client, "mnist", paused[0]["step"] + 5),
            timeout_s=30,
            what="training again",
        )

        assert proc.wait(120) == 0
    finally:
        kill_tree(proc)

    out = summaries(tmp_path)
    assert len(out) == 2
    assert out[0]["params_sha256"] == out[1]["params_sha256"]  # DDP replicas stayed identical
    assert all(s["lr"] == 0.01 and s["batch_size"] == 32 and s["step"] == 499 for s in out)

    events = history(client, "mnist")
    applied = [e for e in events if e.kind == "config_applied"]
    assert [e.version for e in applied] == [2, 3, 4]
    for e in applied:
        assert e.data["consistent"] is True
        assert set(e.data["ranks"].values()) == {e.step}
        assert set(e.data["ranks"]) == {"0/0", "0/1"}
    assert not [
        e for e in events if e.kind in ("apply_late", "apply_missing", "rank_failed", "rank_hung")
    ]
    assert [e.kind for e in events if e.kind == "rank_exited"] == ["rank_exited"] * 2


def test_stop_ends_every_rank_at_the_same_step(tmp_path, up):
    client = up.client()
    proc = launch_mnist(up.url, tmp_path, "--max-steps", "100000", "--eval-every", "0")
    try:
        wait_for(lambda: training_at(client, "mnist", 10), timeout_s=60, what="both ranks training")
        r = cli("stop", url=up.url)
        assert r.returncode == 0, r.stderr
        eff = int(r.stdout.split("effective at step ")[1].split()[0])
        assert proc.wait(60) == 0
    finally:
        kill_tree(proc)
    out = summaries(tmp_path)
    assert [s["step"] for s in out] == [eff - 1, eff - 1]
    assert all(s["stop_reason"] == "stopped" for s in out)
