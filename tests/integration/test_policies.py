"""The policies acting on the real MNIST job: a straggler rebalanced, a NaN survived, a failing
device drained before it fails. Real nats-server, Weaver, torchft, torchrun and MNIST."""

import os

import pytest

from tests.helpers import (
    TelemetryTap,
    cli,
    history,
    kill_tree,
    launch_mnist,
    ranks,
    start_two_groups,
    summaries,
    wait_for,
)
from torchloom.chaos import FailurePlan
from torchloom.protocol.batching import parse_weights

pytestmark = pytest.mark.integration


def policy_events(client, job, policy):
    return [e for e in history(client, job) if e.kind == f"policy_{policy}"]


def steps_per_s(tap, replica, t0, t1):
    """Committed steps per second of one replica group between two wall-clock times."""
    seen = [
        (m.ts, m.step) for m in list(tap.messages) if m.replica_id == replica and t0 <= m.ts <= t1
    ]
    if len(seen) < 2:
        return None
    (ta, sa), (tb, sb) = seen[0], seen[-1]
    return (sb - sa) / (tb - ta)


def ts_at_step(tap, replica, step):
    return min(m.ts for m in list(tap.messages) if m.replica_id == replica and m.step >= step)


def test_a_slowed_replica_group_is_flagged_and_rebalanced(tmp_path, up):
    """Behaviour: the slowed group is flagged after its slowdown and gets the smaller share,
    applied at one step, the global batch held. How fast and how much throughput comes back
    are bench/policies.py's figures (printed here): on this 2-core machine the groups share
    the cores, and a ratio asserted here failed on a slower run (rebalanced 1.14× the slowed
    rate against 1.15× asked).

    The policy is set as docs/benchmarks.md advises for machines whose groups share cores (a
    10 s window, 80 % of it slow): with the 3 s default, a few seconds in which the scheduler
    favoured one group flagged the other before the slowdown (once in CI, once in 3 runs here
    on 2026-12-01); with this setting it is flagged 7.7–8.2 s after the slowdown (3 runs)."""
    pytest.importorskip("torchft")
    r = cli("policy", "set", "straggler", "window_s=10", "min_fraction=0.8", url=up.url)
    assert r.returncode == 0, r.stdout + r.stderr
    tap = TelemetryTap(up.url, "ft")
    client = up.client()
    slow_from = 250
    plan = FailurePlan().slow("1", from_step=slow_from, factor=4.0)
    sup, log = start_two_groups(
        up, tmp_path, 800, "--global-batch-size", "128", env=plan.env(), step_delay_ms=0
    )
    try:
        assert sup.wait(300) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        kill_tree(sup)
        log.close()
    events = history(client, "ft")
    decisions = [e for e in events if e.kind == "policy_straggler"]
    assert decisions, [e.message for e in events]
    first = decisions[0]
    assert first.data["action"] == "set" and first.data["outcome"]["done"], first.message
    assert "1/0" in first.data["features"]["flagged"]
    weights = parse_weights(first.data["values"]["batch_weights"])
    assert weights["1"] < weights["0"]  # the slow group gets the smaller share
    eff = first.data["outcome"]["effective_step"]
    applied = wait_for(  # recorded from the last telemetry: may land after the run ends
        lambda: [
            e
            for e in history(client, "ft")
            if e.kind == "config_applied" and e.version == first.version
        ],
        timeout_s=30,
        what=f"config_applied for v{first.version}",
    )
    assert applied[0].data["consistent"], applied[0].message

    t_slow = ts_at_step(tap, "0", slow_from)
    # a reaction to the slowdown, not to noise (or a group's warm-up) before it
    assert eff > slow_from and first.ts > t_slow, (first.ts - t_slow, first.message)
    before = steps_per_s(tap, "0", t_slow - 6, t_slow)
    during = steps_per_s(tap, "0", t_slow + 0.5, ts_at_step(tap, "0", eff))
    t_eff = ts_at_step(tap, "0", eff)
    after = steps_per_s(tap, "0", t_eff + 3, t_eff + 12)
    print(
        f"flagged {first.ts - t_slow:.2f} s after the slowdown; steps/s before {before}, "
        f"slowed {during}, rebalanced {after}"
    )

    # the global batch was held and every group ends with the same weights and data
    s = {x["replica_id"]: x for x in summaries(tmp_path)}
    assert s["0"]["params_sha256"] == s["1"]["params_sha256"]
    assert s["0"]["data_cursor"] == s["1"]["data_cursor"] == 800 * 128
    assert s["0"]["test_acc"] > 0.95


def test_a_nan_loss_lowers_lr_and_training_goes_on_to_a_good_accuracy(tmp_path, up):
    client = up.client()
    nan_step = 300
    env = FailurePlan().nan_at("0", nan_step).env()
    os.environ.update(env)  # launch_mnist passes the environment on
    try:
        proc = launch_mnist(up.url, tmp_path, "--max-steps", "1000", "--eval-every", "0")
    finally:
        for k in env:
            os.environ.pop(k)
    try:
        assert proc.wait(240) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        kill_tree(proc)
    decisions = policy_events(client, "mnist", "divergence")
    assert decisions, [e.message for e in history(client, "mnist")]
    d = decisions[0]
    assert d.data["action"] == "set" and d.data["features"]["trigger"] == "nonfinite", d.message
    assert d.data["values"]["lr"] == pytest.approx(0.025)
    assert d.data["outcome"]["done"]
    assert len(decisions) == 1  # one NaN, one action
    s = summaries(tmp_path)
    assert len(s) == 2 and all(x["lr"] == pytest.approx(0.025) for x in s)
    assert s[0]["params_sha256"] == s[1]["params_sha256"]
    print(f"test accuracy after the NaN at step {nan_step}: {[x['test_acc'] for x in s]}")
    assert all(x["test_acc"] > 0.97 for x in s), s


def test_a_degrading_device_is_drained_and_replaced_before_it_fails(tmp_path, up):
    pytest.importorskip("torchft")
    client = up.client()
    crash_step = 650
    plan = FailurePlan().degrade("1", after_s=2.0, rate=1.5).fail_at("1", crash_step)
    sup, log = start_two_groups(up, tmp_path, 800, env=plan.env(), step_delay_ms=10)
    try:
        wait_for(
            lambda: any(
                x["replica_id"] == "2" and x["state"] == "training" for x in ranks(client, "ft")
            ),
            timeout_s=150,
            interval_s=0.2,
            what="the replacement replica group 2 training",
        )
        assert sup.wait(300) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        kill_tree(sup)
        log.close()
    events = history(client, "ft")
    decisions = [e for e in events if e.kind == "policy_failure"]
    assert decisions, [e.message for e in events]
    d = decisions[0]
    assert d.data["action"] == "drain" and d.data["replace"] and d.replica_id == "1", d.message
    assert d.data["features"]["risk"] >= 0.8
    kinds = [(e.kind, e.replica_id) for e in events]
    assert ("replica_drained", "1") in kinds
    assert not [e for e in events if e.kind == "rank_failed"], "the device failed before the drain"
    s = {x["replica_id"]: x for x in summaries(tmp_path)}
    assert s["1"]["stop_reason"] == "drained" and s["1"]["step"] < crash_step
    print(f"drained at step {s['1']['step']}, crash was due at step {crash_step}")
    assert s["0"]["step"] == s["2"]["step"] == 799
    assert s["0"]["params_sha256"] == s["2"]["params_sha256"]
