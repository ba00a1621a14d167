"""The reference MNIST job (2 DDP ranks under torchrun) steered through the CLI while it trains."""

import json

import pytest

from tests.helpers import (
    TelemetryTap,
    cli,
    history,
    kill_tree,
    launch_mnist,
    ranks,
    summaries,
    wait_for,
)

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


def test_batch_size_and_transforms_change_exactly_at_the_effective_step_with_loader_workers(
    tmp_path, up
):
    tap = TelemetryTap(up.url, "mnist")
    client = up.client()
    proc = launch_mnist(
        up.url,
        tmp_path,
        *("--max-steps", "400", "--eval-every", "0", "--step-delay-ms", "5"),
        *("--num-workers", "2"),
    )
    try:
        wait_for(lambda: training_at(client, "mnist", 20), timeout_s=60, what="both ranks training")
        r = cli("set", "batch_size=96", "noise_std=0.3", "augment=on", "--wait", url=up.url)
        assert r.returncode == 0, r.stderr
        eff = int(r.stdout.split("effective at step ")[1].split()[0])
        bad = cli("set", "noise_std=5", url=up.url)  # a transform knob keeps its bounds
        assert bad.returncode == 2 and "noise_std" in bad.stderr
        r = cli("set", "noise_std=off", "--wait", url=up.url)
        assert r.returncode == 0, r.stderr
        eff2 = int(r.stdout.split("effective at step ")[1].split()[0])
        assert proc.wait(120) == 0
        tap.wait_final_flush(("0", 0), ("0", 1))
    finally:
        kill_tree(proc)

    by_step: dict[int, dict[int, dict]] = {}
    for m in list(tap.messages):
        for p in m.points:
            if "batch" in p.values:
                by_step.setdefault(p.step, {})[m.rank] = p.values
    assert sorted(by_step) == list(range(400)) and all(len(v) == 2 for v in by_step.values())
    for step, per_rank in by_step.items():
        want = (64, 0.0, 0.0) if step < eff else (96, 0.3, 1.0) if step < eff2 else (96, 0.0, 1.0)
        for v in per_rank.values():  # exactly at the effective step, on both ranks
            assert (v["batch"], v["data_noise_std"], v["data_augment"]) == want, (step, v)
        # both ranks cut the step's global batch from one cursor, which moves by that batch
        assert per_rank[0]["cursor"] == per_rank[1]["cursor"]
        if step + 1 in by_step:
            assert by_step[step + 1][0]["cursor"] - per_rank[0]["cursor"] == 2 * want[0]
    from_workers = [v["from_workers"] for per_rank in by_step.values() for v in per_rank.values()]
    assert sum(from_workers) >= 0.9 * len(from_workers), sum(from_workers)  # prefetched, mostly
    out = summaries(tmp_path)
    assert out[0]["params_sha256"] == out[1]["params_sha256"]
    assert all(s["batch_size"] == 96 and s["test_acc"] > 0.9 for s in out)
