"""The Weaver's state transitions, driven by explicit time: no server, no sleeps."""

import pytest

from tests.unit.conftest import beat
from torchloom.protocol import RankEvent, Telemetry
from torchloom.weaver.state import (
    PROGRESS_SAVE_S,
    ApplyTracking,
    LivenessConfig,
    WeaverState,
    check_liveness,
    on_connection_closed,
    on_rank_event,
    on_telemetry,
    unheard_since_restore,
)


def kinds(events):
    return [e.kind for e in events]


def rank0(state):
    return state.jobs["j"].ranks[("j", "0", 0)]


def test_first_heartbeat_joins_and_trains():
    s = WeaverState()
    ev = beat(s, 100.0)
    assert kinds(ev) == ["rank_joined", "rank_training"]
    assert rank0(s).state == "training"
    assert ("j", "0", 0) in s.dirty


def test_silence_makes_suspect_then_failed_within_the_timeout():
    s = WeaverState(liveness=LivenessConfig(failure_timeout_s=0.8, suspect_after_s=0.5))
    beat(s, 100.0)
    assert check_liveness(s, 100.4) == []
    assert kinds(check_liveness(s, 100.55)) == ["rank_suspect"]
    ev = check_liveness(s, 100.81)
    assert kinds(ev) == ["rank_failed"] and "no heartbeat" in ev[0].message
    assert check_liveness(s, 105.0) == []  # reported once


def test_a_heartbeat_brings_a_suspect_back():
    s = WeaverState()
    beat(s, 100.0)
    check_liveness(s, 100.6)
    assert kinds(beat(s, 100.7, step=11)) == ["rank_training"]


def test_step_not_moving_makes_hung_and_progress_clears_it():
    s = WeaverState(liveness=LivenessConfig(hang_timeout_s=5.0))
    beat(s, 100.0, step=10)
    for t in (101.0, 102.0, 103.0, 104.0, 105.0):
        beat(s, t, step=11)  # heartbeats keep coming, the step is stuck at 11
        check_liveness(s, t)
    assert rank0(s).state == "training"
    beat(s, 106.05, step=11)
    assert kinds(check_liveness(s, 106.1)) == ["rank_hung"]
    assert kinds(beat(s, 106.3, step=11)) == []  # still stuck: stays hung
    assert kinds(beat(s, 106.5, step=12)) == ["rank_training"]


def test_paused_rank_is_never_hung():
    s = WeaverState(liveness=LivenessConfig(hang_timeout_s=1.0))
    beat(s, 100.0, step=10)
    for t in range(101, 110):
        beat(s, float(t), step=10, state="paused")
        assert check_liveness(s, float(t)) == []
    assert rank0(s).state == "paused"


def test_exited_rank_is_not_revived_by_a_late_flush():
    s = WeaverState()
    beat(s, 100.0)
    on_rank_event(
        s,
        RankEvent(
            kind="exited", job_id="j", replica_id="0", rank=0, ts=100.1, step=20, reason="finished"
        ),
        100.1,
    )
    assert rank0(s).state == "exited"
    beat(s, 100.2, step=20)
    assert rank0(s).state == "exited"
    assert check_liveness(s, 200.0) == []


def test_a_new_pid_is_a_rejoin():
    s = WeaverState()
    beat(s, 100.0, pid=1)
    check_liveness(s, 102.0)
    assert rank0(s).state == "failed"
    ev = beat(s, 103.0, pid=2, step=0)
    assert "rank_joined" in kinds(ev) and rank0(s).state == "training" and rank0(s).entry.pid == 2


def test_a_second_live_process_with_the_same_identity_is_fenced():
    """Issue 16.2: two processes as rank 0/0 made the Weaver flap between them (hundreds of
    rejoins a second). The first live claimant keeps the identity; the second's messages are
    dropped, reported once."""
    s = WeaverState()
    beat(s, 100.0, pid=1, step=10)
    events = []
    for i in range(50):  # both flush every 0.1 s, interleaved
        now = 100.1 + 0.1 * i
        events += beat(s, now, pid=2, step=900 + i, seq=10_000 + i)
        events += beat(s, now + 0.01, pid=1, step=11 + i)
    assert kinds(events).count("duplicate_rank") == 1
    assert "rank_joined" not in kinds(events)
    dup = next(e for e in events if e.kind == "duplicate_rank")
    assert dup.data == {"holder": {"host": "", "pid": 1}, "claimant": {"host": "", "pid": 2}}
    assert rank0(s).entry.pid == 1 and rank0(s).entry.last_step == 60
    assert s.dropped_messages["duplicate_rank"] == 50
    # the second process's goodbye is not the first's
    exit_ev = RankEvent(
        kind="exited", job_id="j", replica_id="0", rank=0, ts=105.2, step=949, pid=2
    )
    assert kinds(on_rank_event(s, exit_ev, 105.2)) == []
    assert rank0(s).state == "training"
    # once the holder is gone (silent past the failure timeout), the second takes over
    check_liveness(s, 106.2)
    assert rank0(s).state == "failed"
    ev = beat(s, 106.3, pid=2, step=950, seq=20_000)
    assert "rank_joined" in kinds(ev) and rank0(s).entry.pid == 2


def test_the_same_pid_on_another_host_is_another_process():
    s = WeaverState()
    on_telemetry(
        s, Telemetry(job_id="j", replica_id="0", rank=0, ts=1.0, step=1, pid=7, host="a"), 1.0
    )
    ev = on_telemetry(
        s, Telemetry(job_id="j", replica_id="0", rank=0, ts=1.1, step=1, pid=7, host="b"), 1.1
    )
    assert kinds(ev) == ["duplicate_rank"] and rank0(s).entry.host == "a"


def test_duplicate_or_reordered_flushes_are_ignored():
    s = WeaverState()
    beat(s, 100.0, step=10, seq=5)
    beat(s, 100.1, step=8, seq=4)
    assert rank0(s).entry.last_step == 10


def applied(s, rank, version, step, now):
    return on_rank_event(
        s,
        RankEvent(
            kind="config_applied",
            job_id="j",
            replica_id="0",
            rank=rank,
            ts=now,
            step=step,
            version=version,
        ),
        now,
    )


def two_ranks_with_tracking(eff=50):
    s = WeaverState()
    beat(s, 100.0, rank=0)
    beat(s, 100.0, rank=1)
    job = s.jobs["j"]
    job.applies[2] = ApplyTracking(
        version=2, effective_step=eff, issued_ts=100.0, expected={("j", "0", 0), ("j", "0", 1)}
    )
    return s


def test_consistent_apply_is_reported_once_with_each_rank_step():
    s = two_ranks_with_tracking()
    assert applied(s, 0, 2, 50, 101.0) == []
    ev = applied(s, 1, 2, 50, 101.1)
    assert kinds(ev) == ["config_applied"]
    assert ev[0].data["consistent"] is True and ev[0].data["ranks"] == {"0/0": 50, "0/1": 50}


def test_late_apply_is_an_event():
    s = two_ranks_with_tracking()
    applied(s, 0, 2, 50, 101.0)
    ev = applied(s, 1, 2, 53, 101.1)
    assert kinds(ev) == ["apply_late", "config_applied"]
    assert ev[1].data["consistent"] is False


def test_missing_apply_is_seen_from_telemetry():
    s = two_ranks_with_tracking(eff=50)
    assert kinds(beat(s, 101.0, rank=1, step=50, applied=2)) == []
    ev = beat(s, 101.0, rank=0, step=51, applied=1)
    assert kinds(ev) == ["apply_missing"]
    assert kinds(beat(s, 101.2, rank=0, step=52, applied=1)) == []  # once


def test_a_failed_rank_is_not_waited_for():
    s = two_ranks_with_tracking()
    applied(s, 0, 2, 50, 101.0)
    beat(s, 102.9, rank=0, step=60, applied=2)
    ev = check_liveness(s, 103.0)  # rank 1 went silent at 100.0
    assert kinds(ev) == ["rank_failed", "config_applied"]
    assert ev[1].data["ranks"] == {"0/0": 50}


def test_an_apply_storm_is_reported_once_and_marks_the_registry_at_most_every_30_s():
    """10,000 ranks applying two changes: one ``config_applied`` each, at the last rank; the
    applied versions are progress, saved at most every PROGRESS_SAVE_S per rank."""
    s = WeaverState()
    n = 10_000
    for r in range(n):
        beat(s, 100.0, rank=r)
    keys = set(s.jobs["j"].ranks)
    assert s.dirty == keys  # joined, and the first progress of each rank
    s.dirty.clear()
    for version, now in ((2, 101.0), (3, 110.0)):
        s.jobs["j"].applies[version] = ApplyTracking(
            version=version, effective_step=50, issued_ts=now, expected=set(keys)
        )
        done = [kinds(applied(s, r, version, 50, now)) for r in range(n)]
        assert done[-1] == ["config_applied"] and not any(done[:-1])
    assert not s.dirty  # within 30 s of the last save: not yet
    beat(s, 100.0 + PROGRESS_SAVE_S, rank=0, step=11, applied=3)
    assert s.dirty == {("j", "0", 0)}
    assert rank0(s).entry.applied_version == 3


def test_a_rank_whose_step_goes_back_starts_its_windows_afresh():
    """A process restarted from a checkpoint (or from scratch) reports earlier steps: its old
    losses must not stay in the window a policy reads (a divergence guard saw the resumed run's
    first losses as a spike against the old run's tiny ones)."""
    from torchloom.protocol import MetricPoint

    s = WeaverState()
    for i, step in enumerate(range(100, 110)):
        msg = Telemetry(
            job_id="j", replica_id="0", rank=0, ts=1.0 + i, step=step, seq=i, step_time_s=0.01,
            points=[MetricPoint(step, 1.0 + i, {"loss": 1e-9, "grad_norm": float("nan")})],
        )  # fmt: skip
        on_telemetry(s, msg, 1.0 + i)
    w = rank0(s).window
    assert len(w.losses) == 10 and w.nonfinite is not None and w.timing_step[-1] == 109
    resumed = Telemetry(
        job_id="j", replica_id="0", rank=0, ts=20.0, step=50, seq=100, step_time_s=0.01,
        points=[MetricPoint(50, 20.0, {"loss": 0.5})],
    )  # fmt: skip
    on_telemetry(s, resumed, 20.0)
    assert [v for _, v in w.losses] == [0.5] and w.nonfinite is None
    assert list(w.timing_step) == [50]


def test_a_closed_connection_fails_its_rank_at_once_but_not_after_a_reconnect_or_goodbye():
    state = WeaverState()
    beat(state, 100.0, conn="S1/7")
    beat(state, 100.0, rank=1, conn="S1/8")
    # the server dropped a live client: it reconnects, nothing failed
    assert on_connection_closed(state, "S1/8", reason="Slow Consumer", now=100.1) == []
    assert state.jobs["j"].ranks[("j", "0", 1)].state == "training"
    # rank 0 moved to another server (its heartbeat names the new connection): the old one
    # closing afterwards is not a death
    beat(state, 100.2, conn="S2/3")
    assert on_connection_closed(state, "S1/7", reason="Client Closed", now=100.3) == []
    assert rank0(state).state == "training"
    # its process dies: its connection closes, failed at once (no heartbeat timeout waited)
    events = on_connection_closed(state, "S2/3", reason="Client Closed", now=100.31)
    assert kinds(events) == ["rank_failed"] and "connection closed" in events[0].message
    assert rank0(state).state == "failed"
    # an unknown connection (a CLI, another job's) changes nothing
    assert on_connection_closed(state, "S9/1", reason="Client Closed", now=100.4) == []


def test_a_rank_that_said_goodbye_is_not_failed_by_its_connection_closing():
    state = WeaverState()
    beat(state, 100.0, conn="S1/7")
    on_rank_event(
        state,
        RankEvent(job_id="j", replica_id="0", rank=0, ts=100.1, kind="exited", step=10, pid=1000),
        100.1,
    )
    assert on_connection_closed(state, "S1/7", reason="Client Closed", now=100.2) == []
    assert rank0(state).state == "exited"


def test_the_fast_liveness_check_finds_the_silent_and_the_still_among_fresh_ranks():
    state = WeaverState(liveness=LivenessConfig(failure_timeout_s=1.0, suspect_after_s=0.5,
                                                hang_timeout_s=5.0))  # fmt: skip
    for r in range(50):
        beat(state, 100.0, rank=r, step=1)
    for t in (100.5, 101.0, 101.5, 102.0):  # ranks 1..49 heartbeat and step; rank 0 is silent
        for r in range(1, 50):
            beat(state, t, rank=r, step=int(t * 10) if r != 7 else 1)  # rank 7: beats, no step
    events = check_liveness(state, 102.0, full=False)
    assert [(e.kind, e.rank) for e in events] == [("rank_failed", 0)]
    later = 105.1  # rank 7 has not stepped for 5.1 s while it kept heart-beating
    for r in range(1, 50):
        beat(state, later, rank=r, step=int(later * 10) if r != 7 else 1)
    events = check_liveness(state, later, full=False)
    assert [(e.kind, e.rank) for e in events] == [("rank_hung", 7)]
    # the full pass agrees: nothing more to find
    assert check_liveness(state, later, full=True) == []


def test_a_rank_that_applied_then_exited_is_still_listed():
    """A stop: one rank applies it and says goodbye before the other's report comes in."""
    s = two_ranks_with_tracking()
    applied(s, 1, 2, 50, 101.0)
    exited = RankEvent(
        kind="exited", job_id="j", replica_id="0", rank=1, ts=101.1, step=49, reason="stopped"
    )
    assert kinds(on_rank_event(s, exited, 101.1)) == ["rank_exited"]
    ev = applied(s, 0, 2, 50, 101.2)
    assert kinds(ev) == ["config_applied"]
    assert ev[0].data["ranks"] == {"0/0": 50, "0/1": 50} and ev[0].data["consistent"] is True


@pytest.mark.parametrize(
    "kind", ["config_not_applied", "batch_size_deferred", "max_steps_capped", "batch_size_found"]
)
def test_an_integrations_event_reaches_the_history_with_its_reason(kind):
    from torchloom.protocol import decode, encode

    s = two_ranks_with_tracking()
    raw = encode(
        RankEvent(
            kind=kind,
            job_id="j",
            replica_id="0",
            rank=1,
            ts=101.0,
            step=7,
            reason="it said why",
            data={"max_batch_size": 96},
        )
    )
    ev = on_rank_event(s, decode(raw, RankEvent), 101.0)  # what the Weaver decodes
    assert [(e.kind, e.message) for e in ev] == [(kind, f"rank 0/1: {kind}: it said why")]


def test_a_goodbye_that_comes_just_after_the_connection_closed_makes_it_an_exit():
    state = WeaverState()
    beat(state, 100.0, conn="S1/7")
    beat(state, 100.0, rank=1, conn="S1/8")
    on_connection_closed(state, "S1/7", reason="Client Closed", now=100.2)
    assert rank0(state).state == "failed" and state.jobs["j"].failures == 1
    bye = RankEvent(job_id="j", replica_id="0", rank=0, ts=100.1, kind="exited", step=10,
                    reason="finished", pid=1000)  # fmt: skip
    events = on_rank_event(state, bye, 100.25)
    assert kinds(events) == ["rank_exited"] and "goodbye came 0.050 s after" in events[0].message
    assert rank0(state).state == "exited" and state.jobs["j"].failures == 0
    # a goodbye long after the close: the failure still counts
    on_connection_closed(state, "S1/8", reason="Client Closed", now=101.0)
    late = RankEvent(job_id="j", replica_id="0", rank=1, ts=120.0, kind="exited", step=10,
                     reason="finished", pid=1001)  # fmt: skip
    events = on_rank_event(state, late, 120.0)
    assert "goodbye came" not in events[0].message
    assert state.jobs["j"].failures == 1


def test_a_restored_rank_is_unheard_until_its_first_heartbeat_or_its_failure():
    s = WeaverState(liveness=LivenessConfig(failure_timeout_s=0.8, suspect_after_s=0.5))
    beat(s, 100.0, step=5)
    beat(s, 100.0, rank=1, step=5)
    for r in s.jobs["j"].ranks.values():  # as a Weaver that took over loads them
        r.restored = True
    assert len(unheard_since_restore(s, "j")) == 2
    beat(s, 100.1, step=40)  # rank 0 is far past the step the registry had saved
    assert [r.key for r in unheard_since_restore(s, "j")] == [("j", "0", 1)]
    check_liveness(s, 101.0)  # rank 1 stays silent: failed, no longer waited for
    assert unheard_since_restore(s, "j") == []
    assert unheard_since_restore(s, "no-such-job") == []
