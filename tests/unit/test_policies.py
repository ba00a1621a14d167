"""Every policy as a pure function of (now, state): when it must act, and when it must not."""

import math
import random
import sys
from pathlib import Path

import msgspec
import pytest

from torchloom.errors import InvalidRequestError
from torchloom.protocol import ConfigSnapshot, DesiredConfig, MetricPoint, RegistryEntry, Telemetry
from torchloom.protocol.batching import parse_weights
from torchloom.protocol.knobs import BUILTIN_KNOBS
from torchloom.weaver.policies import PolicyEngine
from torchloom.weaver.policies.divergence import DivergenceParams, DivergencePolicy, spike
from torchloom.weaver.policies.failure import (
    FailureParams,
    FailurePolicy,
    anomaly_risk,
    rule_risk,
)
from torchloom.weaver.policies.straggler import StragglerParams, StragglerPolicy, assess
from torchloom.weaver.policies.sync_period import SyncPeriodParams, SyncPeriodPolicy, proposal
from torchloom.weaver.state import Rank, WeaverState

JOB = "j"


def make_state(groups=2, *, values=None, run_state="running", knobs=None, effective_step=0):
    state = WeaverState()
    job = state.job(JOB)
    job.config = DesiredConfig(
        job_id=JOB,
        knobs=knobs or dict(BUILTIN_KNOBS),
        snapshots=[
            ConfigSnapshot(
                version=1,
                effective_step=effective_step,
                values={"lr": 0.1, **(values or {})},
                run_state=run_state,
            )
        ],
    )
    for g in range(groups):
        e = RegistryEntry(
            job_id=JOB, replica_id=str(g), rank=0, state="training", device=f"GPU-{g}"
        )
        job.ranks[(JOB, str(g), 0)] = Rank(e)
    return state


def tel(rid, step, *, step_s=0.05, busy=None, comm=None, points=(), device=None, seq=1):
    phases = None if busy is None else {"data": 0.0, "compute": busy, "comm": comm or 0.0}
    return Telemetry(
        job_id=JOB,
        replica_id=rid,
        rank=0,
        seq=seq,
        ts=0.0,
        step=step,
        step_time_s=step_s,
        phases_s=phases,
        points=list(points),
        device_stats=device,
    )


def feed(state, rid, msg, now):
    state.jobs[JOB].ranks[(JOB, rid, 0)].window.observe(msg, now)
    state.updates += 1  # as on_telemetry counts it: policies work a round out once per update


def run_timing(state, now0, seconds, busy_of, *, hz=5.0):
    """Feed every group a flush every 1/hz s for ``seconds``; ``busy_of(rid, t)`` gives busy s."""
    steps = [r.window.timing_step for r in state.jobs[JOB].ranks.values()]
    t, step = now0, max((s[-1] for s in steps if s), default=0)  # steps go on from the last call
    while t < now0 + seconds:
        step += 4
        for rid in [k[1] for k in state.jobs[JOB].ranks]:
            feed(state, rid, tel(rid, step, busy=busy_of(rid, t)), t)
        t += 1 / hz
    return t


# ---- straggler --------------------------------------------------------------------------------


def test_straggler_flags_a_30_percent_slower_rank_within_5_s_and_rebalances():
    state = make_state(3, values={"global_batch_size": 120})
    policy = StragglerPolicy(StragglerParams())
    rng = random.Random(0)

    def busy(rid, t):
        slow = 1.3 if rid == "2" and t >= 10 else 1.0
        return 0.02 * slow * rng.lognormvariate(0, 0.05)

    t = run_timing(state, 0.0, 10.0, busy)
    assert policy.decide(t, state) == []
    flagged_at = None
    while t < 20:
        t = run_timing(state, t, 0.5, busy)
        decisions = policy.decide(t, state)
        if decisions:
            flagged_at = t
            break
    assert flagged_at is not None and flagged_at - 10 <= 5.0
    (d,) = decisions
    assert d.action == "set" and d.key == f"straggler/{JOB}/rebalance"
    w = parse_weights(d.values["batch_weights"])
    assert w["2"] < w["0"] and w["2"] < w["1"]
    assert w["2"] / w["0"] == pytest.approx(1 / 1.3, rel=0.1)
    assert "2/0" in d.features["flagged"] and "2/0" in d.reason


def test_straggler_never_flags_ten_minutes_of_ordinary_noise():
    rng = random.Random(1)
    state = make_state(8, values={"global_batch_size": 256})
    policy = StragglerPolicy(StragglerParams())
    t = 0.0
    for _ in range(1200):  # 10 minutes, deciding every 0.5 s
        t = run_timing(state, t, 0.5, lambda rid, t: 0.02 * rng.lognormvariate(0, 0.1))
        assert policy.decide(t, state) == [], t


def test_straggler_does_not_act_on_one_slow_flush_a_small_slowdown_or_a_paused_job():
    policy = StragglerPolicy(StragglerParams())
    state = make_state(2, values={"global_batch_size": 128})
    t = run_timing(state, 0.0, 5.0, lambda rid, t: 0.02)
    feed(state, "1", tel("1", 999, busy=0.2), t)  # one checkpoint-like spike
    assert policy.decide(t, state) == []
    t = run_timing(state, t, 5.0, lambda rid, t: 0.02 * (1.15 if rid == "1" else 1.0))
    assert policy.decide(t, state) == []  # 15 % is below slow_ratio
    paused = make_state(2, values={"global_batch_size": 128}, run_state="paused")
    t = run_timing(paused, 0.0, 5.0, lambda rid, t: 0.02 * (3.0 if rid == "1" else 1.0))
    assert policy.decide(t, paused) == []


def test_straggler_judges_a_joining_group_only_after_a_whole_window_of_its_steps():
    """Its warm-up (first quorum, heal, DataLoader workers) is slow against a warmed-up peer."""
    state = make_state(2, values={"global_batch_size": 128})
    policy = StragglerPolicy(StragglerParams())  # window_s 3, min_samples 5
    job = state.jobs[JOB]
    job.ranks[(JOB, "1", 0)].entry.joined_ts = 5.0
    warm_up_until = 7.0  # group 1's first 2 s of steps are 1.5x slower

    def busy(rid, t):
        return 0.02 * (1.5 if rid == "1" and t < warm_up_until else 1.0)

    t = run_timing(state, 0.0, 5.1, lambda rid, t: 0.02)
    while t < warm_up_until:  # 10 slow flushes, all of the window since it joined
        t = run_timing(state, t, 0.2, busy)
        assert policy.decide(t, state) == [], t
    t = run_timing(state, t, 4.0, busy)
    assert policy.decide(t, state) == []
    # a group slow for a whole window after it joined is judged, and flagged
    t = run_timing(state, t, 3.2, lambda rid, t: 0.02 * (1.5 if rid == "1" else 1.0))
    (d,) = policy.decide(t, state)
    assert d.features["flagged"] == ["1/0"]


def test_straggler_alerts_without_a_global_batch_and_drains_when_it_stays_slow():
    slow = lambda rid, t: 0.02 * (2.0 if rid == "1" else 1.0)  # noqa: E731
    state = make_state(2)  # no global_batch_size: nothing to rebalance
    t = run_timing(state, 0.0, 4.0, slow)
    (d,) = StragglerPolicy(StragglerParams()).decide(t, state)
    assert d.action == "alert" and d.replica_id == "1" and "2.00×" in d.reason

    drain = StragglerPolicy(StragglerParams(mitigation="drain", drain_after_s=8.0))
    state = make_state(2, values={"global_batch_size": 128})
    t = run_timing(state, 0.0, 4.0, slow)
    assert [d.action for d in drain.decide(t, state)] == ["alert"]  # slow, not yet for long
    t = run_timing(state, t, 6.0, slow)
    (d,) = drain.decide(t, state)
    assert d.action == "drain" and d.replica_id == "1" and d.replace


def test_rebalanced_shares_hold_and_even_out_when_the_straggler_recovers():
    policy = StragglerPolicy(StragglerParams())
    state = make_state(2, values={"global_batch_size": 128, "batch_weights": "0:1.33,1:0.667"})
    # with the shares in force, the slow group's busy time matches its peer: nothing to do
    t = run_timing(state, 0.0, 5.0, lambda rid, t: 0.02)
    assert policy.decide(t, state) == []
    # its device recovered: with half the share it is now twice as fast → back toward even
    t = run_timing(state, t, 5.0, lambda rid, t: 0.02 if rid == "0" else 0.01)
    (d,) = policy.decide(t, state)
    w = parse_weights(d.values["batch_weights"])
    assert w["0"] == pytest.approx(w["1"], rel=0.05)


def test_straggler_scores_use_busy_time_not_step_time():
    """In synchronous training every rank's step time is the slowest one's."""
    state = make_state(2)
    t = 0.0
    for i in range(20):
        feed(state, "0", tel("0", i, step_s=0.06, busy=0.02, comm=0.04), t)
        feed(state, "1", tel("1", i, step_s=0.06, busy=0.05, comm=0.01), t)
        t += 0.2
    scores = assess(state.jobs[JOB], t, StragglerParams())
    assert scores[(JOB, "1", 0)].flagged and not scores[(JOB, "0", 0)].flagged
    assert scores[(JOB, "1", 0)].ratio == pytest.approx(2.5)


# ---- divergence -------------------------------------------------------------------------------


def losses(state, rid, values, start=0, now=0.0):
    pts = [MetricPoint(step=start + i, ts=0.0, values={"loss": v}) for i, v in enumerate(values)]
    feed(state, rid, tel(rid, start + len(values), points=pts), now)


def test_divergence_lowers_lr_on_nan_and_turns_on_skipping():
    state = make_state(2)
    rng = random.Random(2)
    losses(state, "0", [0.5 + 0.05 * rng.random() for _ in range(50)])
    policy = DivergencePolicy(DivergenceParams())
    assert policy.decide(1.0, state) == []
    losses(state, "1", [0.5, None, 0.5], start=50)
    (d,) = policy.decide(1.0, state)
    assert d.action == "set" and d.values == {"lr": 0.05, "skip_nonfinite": True}
    assert d.features["trigger"] == "nonfinite" and d.features["rank"] == "1/0"
    assert "step 51" in d.reason


def test_divergence_ignores_what_came_before_the_newest_config():
    """The NaN it acted on must not make it act again once the lowered lr is in force."""
    state = make_state(1, effective_step=60)
    losses(state, "0", [0.5, None, 0.5], start=40)
    assert DivergencePolicy(DivergenceParams()).decide(1.0, state) == []


def test_divergence_sees_a_sustained_spike_but_not_noise_or_one_bad_batch():
    p = DivergenceParams()
    rng = random.Random(3)
    calm = [(i, 0.3 + 0.05 * rng.gauss(0, 1)) for i in range(100)]
    assert spike(calm, p) is None
    assert spike([*calm, (100, 5.0)], p) is None  # one batch: the median of 5 is calm
    found = spike(calm + [(100 + i, 3.0) for i in range(5)], p)
    assert found is not None and found["z"] > p.spike_k
    state = make_state(1)
    losses(state, "0", [v for _, v in calm] + [3.0] * 5)
    (d,) = DivergencePolicy(p).decide(1.0, state)
    assert d.features["trigger"] == "spike" and d.values["lr"] == 0.05


def test_a_loss_jump_at_a_persons_config_change_is_not_a_spike():
    """More noise in the data (or a larger batch) moves the loss; the baseline starts afresh."""
    rng = random.Random(5)
    state = make_state(1, effective_step=100)
    losses(state, "0", [0.2 + 0.02 * rng.random() for _ in range(100)])  # before the change
    losses(state, "0", [0.9 + 0.05 * rng.random() for _ in range(10)], start=100)
    assert DivergencePolicy(DivergenceParams()).decide(1.0, state) == []
    # a real spike after the change is still one
    losses(state, "0", [0.9 + 0.05 * rng.random() for _ in range(40)], start=110)
    losses(state, "0", [9.0] * 5, start=150)
    (d,) = DivergencePolicy(DivergenceParams()).decide(1.0, state)
    assert d.features["trigger"] == "spike"


def test_divergence_pauses_after_repeated_lowerings_and_not_a_paused_job():
    state = make_state(1)
    losses(state, "0", [0.5, float("nan")])
    for t in (10.0, 20.0, 30.0):
        state.note_acted(f"divergence/{JOB}", t)
    (d,) = DivergencePolicy(DivergenceParams()).decide(40.0, state)
    assert d.action == "pause" and "a person" in d.reason
    # long ago: it lowers lr again instead
    (d,) = DivergencePolicy(DivergenceParams()).decide(1000.0, state)
    assert d.action == "set"
    paused = make_state(1, run_state="paused")
    losses(paused, "0", [math.nan])
    assert DivergencePolicy(DivergenceParams()).decide(1.0, paused) == []


# ---- failure prediction -----------------------------------------------------------------------


def test_failure_rules_score_documented_signals():
    p = FailureParams()
    assert rule_risk({"temp_c": 70.0}, None, 0.0, p).score == 0.0
    assert rule_risk({"temp_c": 85.0}, None, 0.0, p).score == 0.5
    assert rule_risk({"temp_c": 95.0}, None, 0.0, p).score == 0.9
    assert rule_risk({"ecc_uncorrected": 1.0}, None, 0.0, p).score == 1.0
    assert rule_risk({"xid": 79.0}, None, 0.0, p).score == 1.0
    assert rule_risk({"xid": 13.0}, None, 0.0, p).score == 0.0  # an application error
    rising = rule_risk({"ecc_corrected": 300.0}, (0.0, {"ecc_corrected": 100.0}), 60.0, p)
    assert rising.score == 0.7 and "+200/min" in rising.reasons[0]
    host = {"cpu_util": 0.9, "mem_used_frac": 0.99}
    assert rule_risk(host, None, 0.0, p).score == 0.8
    assert rule_risk({"cpu_util": 1.0, "mem_used_frac": 0.5}, None, 0.0, p).score == 0.0


def test_failure_anomaly_model_scores_a_signal_against_its_own_past():
    p = FailureParams()
    rng = random.Random(4)
    past = [{"power_w": 300 + rng.gauss(0, 5)} for _ in range(30)]
    assert anomaly_risk(past, {"power_w": 305.0}, p).score == 0.0
    r = anomaly_risk(past, {"power_w": 420.0}, p)
    assert r.score > 0.5 and "power_w" in r.reasons[0]
    assert anomaly_risk(past[:5], {"power_w": 420.0}, p).score == 0.0  # too little past


def test_failure_drains_with_replacement_only_after_sustained_risk():
    policy = FailurePolicy(FailureParams())
    state = make_state(2)
    for i in range(10):
        feed(state, "0", tel("0", i, device={"temp_c": 65.0}), float(i))
        feed(state, "1", tel("1", i, device={"temp_c": 65.0 + (30 if i >= 8 else 0)}), float(i))
    assert policy.decide(10.0, state) == []  # two hot samples: not yet
    feed(state, "1", tel("1", 10, device={"temp_c": 96.0}), 10.0)
    (d,) = policy.decide(10.0, state)
    assert d.action == "drain" and d.replica_id == "1" and d.replace
    assert d.features["device"] == "GPU-1" and d.features["risk"] == 0.9
    drained = make_state(2)
    drained.jobs[JOB].config.snapshots[-1].drained.append("1")
    for i in range(5):
        feed(drained, "1", tel("1", i, device={"ecc_uncorrected": 2.0}), float(i))
    assert policy.decide(5.0, drained) == []


# ---- network-aware sync_every -----------------------------------------------------------------


def test_sync_every_proposal_holds_the_comm_share_near_its_target():
    p = SyncPeriodParams(target_comm_frac=0.1)
    # H=10 inner steps of 10 ms, 50 ms allreduce: 33 % comm → ideal 45, at most ×2 → 20
    assert proposal(10, 0.1, 0.05, p) == 20
    # 1 % comm → ideal ~1: at most ÷2 → 5
    assert proposal(10, 0.1, 0.001, p) == 5
    assert proposal(10, 0.1, 0.011, p) is None  # within the band
    assert proposal(10, 0.1, 0.05, p, multiple_of=4) == 20
    assert proposal(10, 0.1, 0.05, SyncPeriodParams(max_sync_every=12)) == 12


def test_sync_every_policy_acts_only_on_jobs_with_the_knob_and_fresh_timings():
    knobs = dict(BUILTIN_KNOBS)
    state = make_state(2, values={"sync_every": 10}, knobs=knobs)
    policy = SyncPeriodPolicy(SyncPeriodParams())
    assert policy.decide(1.0, state) == []  # no timings yet
    for i in range(5):
        for rid in ("0", "1"):
            feed(state, rid, tel(rid, i, busy=0.1, comm=0.05), float(i))
    (d,) = policy.decide(5.0, state)
    assert d.values == {"sync_every": 20} and d.features["comm_frac"] == pytest.approx(
        1 / 3, rel=1e-3
    )
    no_knob = make_state(2)
    for i in range(5):
        feed(no_knob, "0", tel("0", i, busy=0.1, comm=0.05), float(i))
    assert policy.decide(5.0, no_knob) == []


# ---- engine -----------------------------------------------------------------------------------


def slow_state():
    state = make_state(2)
    run_timing(state, 0.0, 4.0, lambda rid, t: 0.02 * (2.0 if rid == "1" else 1.0))
    return state


def test_engine_runs_enabled_policies_and_holds_back_a_key_in_its_cooldown():
    engine = PolicyEngine()
    assert {n for n, s in engine.slots.items() if s.enabled} == {
        "straggler",
        "divergence",
        "failure",
        "checkpoint",
        "memory",
    }
    state = slow_state()
    out = engine.decide(4.0, state)
    assert [(d.policy, d.action, dry) for d, dry in out] == [("straggler", "alert", False)]
    state.note_acted(out[0][0].key, 4.0)
    assert engine.decide(5.0, state) == []  # within cooldown_s (8 s)
    engine.update("straggler", {"enabled": False})
    assert engine.decide(100.0, slow_state()) == []
    engine.update("straggler", {"enabled": "true", "dry_run": "yes"})
    assert [dry for _, dry in engine.decide(4.0, slow_state())] == [True]


def test_engine_refuses_bad_settings_and_changes_nothing():
    engine = PolicyEngine()
    before = engine.settings()
    for name, changes, words in [
        ("nope", {}, "unknown policy"),
        ("straggler", {"slow_ratio": "fast"}, "slow_ratio"),
        ("straggler", {"slow_ratio": 0.5}, "slow_ratio must be > 1"),
        ("straggler", {"mitigation": "reboot"}, "mitigation"),
        ("straggler", {"colour": 1}, "no parameter colour"),
        ("divergence", {"enabled": "maybe"}, "enabled must be true or false"),
    ]:
        with pytest.raises(InvalidRequestError, match=words):
            engine.update(name, changes)
    assert engine.settings() == before
    assert engine.update("straggler", {"slow_ratio": "1.5"})["params"]["slow_ratio"] == 1.5


def test_a_failing_policy_is_counted_and_skipped(monkeypatch):
    engine = PolicyEngine()

    def boom(now, state):
        raise RuntimeError("bug")

    monkeypatch.setattr(engine.slots["straggler"].policy, "decide", boom)
    assert engine.decide(4.0, slow_state()) == []
    assert engine.describe("straggler")["errors"] == 1


def test_engine_settings_from_a_toml_file(tmp_path):
    f = tmp_path / "policies.toml"
    f.write_text(
        '[straggler]\nmitigation = "alert"\nslow_ratio = 1.5\n[sync_every]\nenabled = true\n'
    )
    engine = PolicyEngine.from_file(f)
    assert engine.params("straggler").mitigation == "alert"
    assert engine.params("straggler").slow_ratio == 1.5
    assert engine.slots["sync_every"].enabled
    f.write_text("[straggler]\nslow_ratio = 0.1\n")
    with pytest.raises(InvalidRequestError, match="slow_ratio"):
        PolicyEngine.from_file(f)
    f.write_text("straggler = 3\n")
    with pytest.raises(InvalidRequestError, match="tables"):
        PolicyEngine.from_file(f)
    with pytest.raises(InvalidRequestError, match=r"policies\.nope"):
        PolicyEngine.from_file(tmp_path / "policies.nope")


EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"


def test_the_example_plugin_is_found_through_its_entry_point_and_decides(tmp_path, monkeypatch):
    """examples/policies as an installed distribution would look to importlib.metadata."""
    dist = tmp_path / "loom_plateau-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: loom-plateau\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(
        "[torchloom.policies]\nplateau = loom_plateau:PlateauPolicy\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    engine = PolicyEngine()
    assert engine.describe("plateau")["source"] == "loom_plateau:PlateauPolicy"
    assert engine.slots["plateau"].enabled  # a plugin someone installed is on

    def plateau_decisions(values):
        state = make_state(1)
        losses(state, "0", values)
        return [d for d, _ in engine.decide(1.0, state) if d.policy == "plateau"]

    improving = [2.0 * math.exp(-i / 100) for i in range(400)]
    assert plateau_decisions(improving) == []
    flat = improving[:100] + [0.74 + 0.01 * math.sin(i) for i in range(300)]
    (d,) = plateau_decisions(flat)
    assert d.values == {"lr": 0.05} and "has not improved" in d.reason
    with pytest.raises(InvalidRequestError, match="factor"):
        engine.update("plateau", {"factor": 2})
    sys.modules.pop("loom_plateau", None)


def test_a_broken_plugin_is_left_out(tmp_path, monkeypatch):
    dist = tmp_path / "badplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: badplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[torchloom.policies]\nbad = no_such_module:Nope\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "bad" not in PolicyEngine().slots


def test_decision_events_are_json_safe_rows():
    from torchloom.cli.policy import trajectory_row
    from torchloom.protocol import ControlReply
    from torchloom.weaver.deciding import decision_event

    (d, _), *_ = PolicyEngine().decide(4.0, slow_state())
    ev = decision_event(
        d, 4.0, dry_run=False, reply=ControlReply(ok=True, version=3, effective_step=9)
    )
    row = trajectory_row(ev)
    assert row["policy"] == "straggler" and row["features"]["rank"] == "1/0"
    assert msgspec.json.decode(msgspec.json.encode(row)) == row
    dry = decision_event(d, 4.0, dry_run=True, reply=None)
    assert dry.message.startswith("[dry run]") and dry.data["outcome"]["done"] is False


def test_scores_reach_the_dashboard_rows():
    from torchloom.weaver.web.frames import rank_row

    state = slow_state()
    job = state.jobs[JOB]
    for i in range(4):
        feed(state, "1", tel("1", 100 + i, device={"temp_c": 95.0}), 4.0)
    scores = PolicyEngine().scores(4.0, state)
    assert scores[(JOB, "1", 0)] == (True, 0.9)
    assert scores[(JOB, "0", 0)] == (False, None)
    for key, rank in job.ranks.items():
        rank.straggler, rank.risk = scores.get(key, (None, None))
    row = rank_row(job.ranks[(JOB, "1", 0)], job, 4.0)
    assert row["straggler"] is True and row["risk"] == 0.9


def test_divergence_rolls_back_to_the_newest_checkpoint_before_the_spike():
    from torchloom.protocol import CheckpointRecord

    p = DivergenceParams(mitigation="rollback")
    rng = random.Random(3)
    state = make_state(1)
    job = state.jobs[JOB]
    for cid, step, st in (("ckpt-v2", 40, "complete"), ("ckpt-v3", 90, "complete"),
                          ("ckpt-v4", 95, "failed"), ("ckpt-v5", 103, "complete")):  # fmt: skip
        job.checkpoints[cid] = CheckpointRecord(id=cid, job_id=JOB, step=step, version=2, state=st)
    losses(state, "0", [0.3 + 0.05 * rng.gauss(0, 1) for _ in range(100)] + [3.0] * 5)
    (d,) = DivergencePolicy(p).decide(1.0, state)
    assert d.action == "set" and "no rollback: not every rank runs a Checkpointer" in d.reason
    for rank in job.ranks.values():
        rank.checkpointing = True
    (d,) = DivergencePolicy(p).decide(1.0, state)
    assert d.action == "rollback" and d.values == {"to": "ckpt-v3", "lr": 0.05}
    assert d.features["spike_step"] == 100 and d.request().op == "rollback"
    with pytest.raises(ValueError, match="mitigation"):
        DivergencePolicy(DivergenceParams(mitigation="pray"))


def test_the_rollback_waits_for_a_pending_checkpoint_but_not_forever():
    from torchloom.protocol import CheckpointRecord
    from torchloom.weaver.policies.divergence import PENDING_WAIT_S, WAIT, rollback_point

    state = make_state(groups=1)
    job = state.jobs[JOB]
    for r in job.ranks.values():
        r.checkpointing = True
    job.checkpoints["ckpt-v2"] = CheckpointRecord(
        id="ckpt-v2", job_id=JOB, step=40, version=2, state="complete", requested_ts=10.0
    )
    job.checkpoints["ckpt-v3"] = CheckpointRecord(
        id="ckpt-v3", job_id=JOB, step=90, version=3, state="pending", requested_ts=100.0
    )
    assert rollback_point(job, 95, now=110.0) == (None, WAIT)
    # its writer never reported: past the wait, the older complete one is the point
    assert rollback_point(job, 95, now=100.0 + PENDING_WAIT_S + 1) == ("ckpt-v2", "")
    assert rollback_point(job, 60, now=110.0) == ("ckpt-v2", "")  # the pending one is after
    assert rollback_point(job, 30, now=110.0) == (None, "no complete checkpoint before step 30")
