"""The control entry point as a pure function: validation, versions, effective steps, joins."""

import msgspec
import pytest

from tests.unit.conftest import SETTINGS, beat, ctl, join, two_groups
from torchloom.protocol import ControlRequest, JoinInfo, KnobSpec, Telemetry
from torchloom.weaver.control import commit, handle
from torchloom.weaver.state import WeaverState, check_liveness, on_telemetry


def started(now=100.0):
    s = WeaverState()
    join(s, now, rank=0)
    join(s, now, rank=1)
    beat(s, now, rank=0, step=100)
    beat(s, now, rank=1, step=100)
    return s


def test_first_join_starts_the_job_from_the_initial_knobs():
    s = WeaverState()
    out, _ = join(s, 1.0, values={"lr": 0.2, "max_steps": 10})
    assert out.reset and out.new_config.latest().values == {"lr": 0.2, "max_steps": 10}
    assert out.reply.data["snapshots"][0]["version"] == 1
    assert [e.kind for e in out.events] == ["job_started"]


def test_set_answers_version_and_effective_step_ahead_of_the_ranks():
    s = started()
    out, _ = ctl(s, 100.0, "set", {"lr": "0.01", "batch_size": "128"})
    assert out.reply.ok and out.reply.version == 2
    assert out.reply.effective_step == 100 + 50 + 2
    latest = s.jobs["j"].config.latest()
    assert latest.values["lr"] == 0.01 and latest.values["batch_size"] == 128
    assert out.tracking.expected == {("j", "0", 0), ("j", "0", 1)}


@pytest.mark.parametrize(
    ("values", "replica", "code", "fragment"),
    [
        ({"lr": "-1"}, None, "invalid_knob", "must be > 0"),
        ({"lr": "0.1", "batch_size": "0"}, None, "invalid_knob", "batch_size"),
        ({"nope": "1"}, None, "invalid_knob", "unknown knob"),
        ({"max_steps": "5"}, "0", "invalid_knob", "job-wide"),
        ({"lr": "0.1"}, "9", "unknown_replica", "'9'"),
        ({}, None, "invalid_request", "at least one"),
    ],
)
def test_rejected_set_changes_nothing(values, replica, code, fragment):
    s = started()
    before = msgspec.json.encode(s.jobs["j"].config)
    out, _ = ctl(s, 100.0, "set", values, replica=replica)
    assert not out.reply.ok and out.reply.error.code == code and fragment in out.reply.error.message
    assert out.new_config is None
    assert msgspec.json.encode(s.jobs["j"].config) == before
    assert not s.jobs["j"].applies


def test_set_on_unknown_job_is_a_clear_error():
    out = handle(
        WeaverState(), ControlRequest(op="set", job_id="ghost", values={"lr": 1}), 0.0, SETTINGS
    )
    assert out.reply.error.code == "unknown_job"


def test_replica_override_and_job_wide_set_wins_later():
    s = WeaverState()
    join(s, 1.0, replica="0")
    join(s, 1.0, replica="1")
    ctl(s, 2.0, "set", {"batch_size": 32}, replica="1")
    assert s.jobs["j"].config.latest().overrides == {"1": {"batch_size": 32}}
    ctl(s, 3.0, "set", {"batch_size": 16})
    latest = s.jobs["j"].config.latest()
    assert latest.overrides == {} and latest.values["batch_size"] == 16


def test_effective_steps_never_go_back():
    s = started()
    first = ctl(s, 100.0, "set", {"lr": 0.05})[0].reply.effective_step
    beat(s, 100.1, rank=0, step=10)  # a report that looks slower must not schedule earlier
    beat(s, 100.1, rank=1, step=10)
    second = ctl(s, 100.1, "set", {"lr": 0.04})[0].reply.effective_step
    assert second >= first


def test_pause_resume_and_set_while_paused():
    s = started()
    p, _ = ctl(s, 100.0, "pause")
    assert p.reply.ok and s.jobs["j"].config.latest().run_state == "paused"
    assert not ctl(s, 100.0, "pause")[0].reply.ok
    beat(s, 101.0, rank=0, step=p.reply.effective_step, state="paused")
    beat(s, 101.0, rank=1, step=p.reply.effective_step, state="paused")
    sp, _ = ctl(s, 101.5, "set", {"lr": 0.5})
    assert sp.reply.effective_step == p.reply.effective_step  # applies before anyone moves on
    assert s.jobs["j"].config.latest().run_state == "paused"
    r, _ = ctl(s, 102.0, "resume")
    assert r.reply.effective_step == p.reply.effective_step
    assert s.jobs["j"].config.latest().run_state == "running"
    assert not ctl(s, 102.0, "resume")[0].reply.ok


def test_nothing_changes_after_stop():
    s = started()
    assert ctl(s, 100.0, "stop")[0].reply.ok
    out, _ = ctl(s, 100.1, "set", {"lr": 0.1})
    assert not out.reply.ok and "stopping" in out.reply.error.message


def test_rejoin_of_a_live_job_keeps_its_config():
    s = started()
    ctl(s, 100.0, "set", {"lr": 0.01})
    out, _ = join(s, 100.5, rank=1)
    assert not out.reset and out.reply.data["snapshots"][-1]["values"]["lr"] == 0.01


def test_join_after_every_rank_left_starts_a_new_epoch_with_higher_versions():
    s = started()
    ctl(s, 100.0, "set", {"lr": 0.01})
    check_liveness(s, 200.0)  # both failed
    out, _ = join(s, 300.0, values={"lr": 0.3})
    assert out.reset and s.jobs["j"].config.epoch == 2
    latest = s.jobs["j"].config.latest()
    assert latest.version == 3 and latest.values["lr"] == 0.3
    assert list(s.jobs["j"].ranks) == [("j", "0", 0)]


def test_custom_knobs_join_the_registry():
    s = WeaverState()
    join(
        s,
        1.0,
        values={"dropout": 0.1},
        custom=[KnobSpec(name="dropout", type="float", min=0, max=1)],
    )
    assert ctl(s, 2.0, "set", {"dropout": "0.3"})[0].reply.ok
    out, _ = ctl(s, 2.0, "set", {"dropout": "3"})
    assert out.reply.error.knob == "dropout"


def test_status_and_knobs_views():
    s = started()
    st = handle(s, ControlRequest(op="status", job_id="j"), 100.0, SETTINGS).reply.data
    assert [r["rank"] for r in st["jobs"][0]["ranks"]] == [0, 1]
    allj = handle(s, ControlRequest(op="status", job_id="_"), 100.0, SETTINGS).reply.data
    assert [j["job_id"] for j in allj["jobs"]] == ["j"]
    kn = handle(s, ControlRequest(op="knobs", job_id="j"), 100.0, SETTINGS).reply.data
    assert {k["name"] for k in kn["knobs"]} >= {
        "lr",
        "batch_size",
        "grad_clip",
        "max_steps",
        "sync_every",
    }


def test_bad_ids_are_refused():
    out = handle(WeaverState(), ControlRequest(op="status", job_id="a.b"), 0.0, SETTINGS)
    assert out.reply.error.code == "invalid_request"


def test_telemetry_before_join_neither_blocks_a_new_epoch_nor_duplicates_the_rank():
    s = started()
    ctl(s, 100.0, "set", {"lr": 0.01})
    check_liveness(s, 200.0)  # the old run is gone
    on_telemetry(
        s, Telemetry(job_id="j", replica_id="0", rank=0, ts=300.0, step=0, seq=1, pid=4242), 300.0
    )
    req = ControlRequest(
        op="join",
        job_id="j",
        join=JoinInfo(replica_id="0", rank=0, pid=4242, initial_values={"lr": 0.3}),
    )
    out = handle(s, req, 300.1, SETTINGS)
    events = commit(s, req, out, 300.1)
    assert out.reset and s.jobs["j"].config.latest().values == {"lr": 0.3}
    assert [e.kind for e in events] == ["job_started"]  # no second rank_joined
    assert (
        list(s.jobs["j"].ranks) == [("j", "0", 0)]
        and s.jobs["j"].ranks[("j", "0", 0)].entry.epoch == 2
    )


def test_rapid_changes_coalesce_at_one_effective_step():
    s = started()
    outs = [ctl(s, 100.0, "set", {"lr": 0.1 / (k + 2)})[0] for k in range(100)]
    assert all(o.reply.ok for o in outs)
    effs = {o.reply.effective_step for o in outs}
    assert effs == {outs[0].reply.effective_step}
    snaps = s.jobs["j"].config.snapshots
    assert [x.version for x in snaps] == [
        1,
        101,
    ]  # the newest full snapshot replaced the pending ones
    assert snaps[-1].values["lr"] == 0.1 / 101


def test_knobs_that_need_no_common_step_apply_at_each_ranks_next_boundary():
    from torchloom.protocol import RankEvent
    from torchloom.weaver.state import on_rank_event

    s = WeaverState()
    log_every = KnobSpec(name="log_every", type="int", min=1, consistent=False)
    join(s, 1.0, rank=0, values={"log_every": 10}, custom=[log_every])
    join(s, 1.0, rank=1, values={"log_every": 10}, custom=[log_every])
    beat(s, 100.0, rank=0, step=500)
    beat(s, 100.0, rank=1, step=480)
    out, _ = ctl(s, 100.0, "set", {"log_every": 5})
    assert out.reply.effective_step == 481  # the slowest rank's next step, not a lead-time ahead
    mixed, _ = ctl(s, 100.0, "set", {"log_every": 6, "lr": 0.1})
    assert mixed.reply.effective_step > 550  # a consistent knob in the request needs the lead time
    ev = []
    for rank, step in ((0, 501), (1, 481)):
        ev += on_rank_event(
            s,
            RankEvent(
                kind="config_applied",
                job_id="j",
                replica_id="0",
                rank=rank,
                ts=100.1,
                step=step,
                version=out.reply.version,
            ),
            100.1,
        )
    assert [e.kind for e in ev] == ["config_applied"]  # rank 0 at 501 is not "late"


def test_drain_schedules_the_group_out_and_refuses_what_cannot_be_done():
    s = two_groups()
    out, _ = ctl(s, 100.0, "drain", replica="1")
    assert out.reply.ok and out.reply.effective_step == 152
    assert s.jobs["j"].config.latest().drained == ["1"]
    assert "drain replica group(s) 1" in out.events[0].message
    again, _ = ctl(s, 100.0, "drain", replica="1")
    assert not again.reply.ok and "already draining" in again.reply.error.message
    last, _ = ctl(s, 100.0, "drain", replica="0")
    assert not last.reply.ok and "no replica group" in last.reply.error.message
    assert ctl(s, 100.0, "drain", replica="7")[0].reply.error.code == "unknown_replica"
    both = handle(
        s, ControlRequest(op="drain", job_id="j", replica_id="0", device="cpu:x"), 100.0, SETTINGS
    )
    assert not both.reply.ok and "exactly one" in both.reply.error.message


def test_drain_by_device_picks_the_groups_on_it():
    s = WeaverState()
    for replica, dev in (("0", "GPU-a"), ("1", "GPU-b")):
        req = ControlRequest(
            op="join",
            job_id="j",
            join=JoinInfo(
                replica_id=replica, rank=0, pid=7, device=dev, initial_values={"lr": 0.1}
            ),
        )
        commit(s, req, handle(s, req, 1.0, SETTINGS), 1.0)
    out = handle(s, ControlRequest(op="drain", job_id="j", device="GPU-b"), 2.0, SETTINGS)
    assert out.reply.ok and out.new_config.latest().drained == ["1"]
    none = handle(s, ControlRequest(op="drain", job_id="j", device="GPU-zzz"), 2.0, SETTINGS)
    assert "no live rank" in none.reply.error.message


def test_a_drained_rank_leaves_the_dr_map_and_its_late_flush_does_not_bring_it_back():
    from torchloom.protocol import RankEvent
    from torchloom.weaver.state import on_rank_event

    s = two_groups()
    ctl(s, 100.0, "drain", replica="1")
    ev = on_rank_event(
        s,
        RankEvent(
            kind="exited", job_id="j", replica_id="1", rank=0, ts=101.0, step=151, reason="drained"
        ),
        101.0,
    )
    assert [e.kind for e in ev][:2] == ["rank_drained", "replica_drained"]
    assert ("j", "1", 0) not in s.jobs["j"].ranks and ("j", "1", 0) in s.removed
    beat(s, 101.1, replica="1", step=151)  # same pid: the final flush
    assert ("j", "1", 0) not in s.jobs["j"].ranks
    assert check_liveness(s, 110.0) == [] or all(
        e.replica_id == "0" for e in check_liveness(s, 110.0)
    )


def test_changing_the_global_batch_scales_lr_by_the_chosen_rule():
    s = started()
    ctl(s, 100.0, "set", {"global_batch_size": 128, "lr_scaling": "linear"})
    out, _ = ctl(s, 100.0, "set", {"global_batch_size": 256})
    assert out.reply.ok and s.jobs["j"].config.latest().values["lr"] == pytest.approx(0.2)
    ctl(s, 100.0, "set", {"lr_scaling": "sqrt"})
    ctl(s, 100.0, "set", {"global_batch_size": 64})
    assert s.jobs["j"].config.latest().values["lr"] == pytest.approx(0.2 * 0.5)
    ctl(s, 100.0, "set", {"global_batch_size": 128, "lr": 0.05})  # an explicit lr wins
    assert s.jobs["j"].config.latest().values["lr"] == 0.05


def test_a_restarted_rank_resumes_the_job_instead_of_starting_a_new_epoch():
    s = started()
    ctl(s, 100.0, "stop")
    check_liveness(s, 200.0)  # torchrun is restarting every rank
    req = ControlRequest(
        op="join",
        job_id="j",
        join=JoinInfo(replica_id="0", rank=0, pid=999, resuming=True, initial_values={"lr": 0.3}),
    )
    out = handle(s, req, 201.0, SETTINGS)
    commit(s, req, out, 201.0)
    assert not out.reset and s.jobs["j"].config.epoch == 1
    assert s.jobs["j"].config.latest().run_state == "stopped"  # the stop still holds


def test_a_join_as_a_live_rank_from_another_process_is_refused_and_changes_nothing():
    s = started()
    ctl(s, 100.0, "set", {"lr": "0.01"})
    before = s.jobs["j"].config
    req = ControlRequest(
        op="join",
        job_id="j",
        join=JoinInfo(replica_id="0", rank=0, pid=4242, host="h", initial_values={"lr": 0.5}),
    )
    out = handle(s, req, 100.1, SETTINGS)
    assert not out.reply.ok and out.reply.error.code == "duplicate_rank"
    assert "held by pid 1000" in out.reply.error.message
    assert out.duplicate == (("j", "0", 0), "h", 4242)
    assert s.jobs["j"].config is before and s.jobs["j"].ranks[("j", "0", 0)].entry.pid == 1000
    # the same process joining again (a reconnect) is fine
    again = ControlRequest(op="join", job_id="j", join=JoinInfo(replica_id="0", rank=0, pid=1000))
    assert handle(s, again, 100.2, SETTINGS).reply.ok
    # and once the holder is gone, the other process may join
    check_liveness(s, 102.0)
    assert handle(s, req, 102.1, SETTINGS).reply.ok
