"""Effective steps from the job's position: a quorum over replica groups, outliers left out,
versions out of reach superseded and re-planned. Pure: explicit time, no server."""

from tests.unit.conftest import SETTINGS, beat, ctl, join, two_groups
from torchloom.weaver.control import replan_request
from torchloom.weaver.planning import Reach, plan_effective_step, position, review
from torchloom.weaver.state import WeaverState, check_liveness

BOGUS = 10**15


def test_effective_step_is_ahead_of_the_fastest_rank():
    s = WeaverState()
    beat(s, 100.0, rank=0, step=100, step_time_s=0.01)  # 100 steps/s
    beat(s, 100.0, rank=1, step=90, step_time_s=0.02)
    job = s.jobs["j"]
    eff = plan_effective_step(job, 100.0, lead_time_s=0.5, min_lead_steps=2)
    assert eff == 100 + 50 + 2
    # staleness of the last report counts too
    assert plan_effective_step(job, 100.2, lead_time_s=0.5, min_lead_steps=2) == 100 + 70 + 2


def test_effective_step_with_no_live_rank_is_zero():
    s = WeaverState()
    beat(s, 100.0, step=100)
    check_liveness(s, 110.0)
    assert plan_effective_step(s.jobs["j"], 110.0, lead_time_s=0.5, min_lead_steps=2) == 0


def test_a_rank_far_ahead_is_left_out_and_flagged_once():
    s = WeaverState()
    for replica in ("0", "1", "2"):
        join(s, 100.0, replica=replica)
    beat(s, 100.0, replica="0", step=100)
    beat(s, 100.0, replica="1", step=101)
    beat(s, 100.0, replica="2", step=BOGUS)
    out, events = ctl(s, 100.0, "set", {"lr": "0.01"})
    assert out.reply.effective_step == 101 + 50 + 2
    flagged = [e for e in events if e.kind == "step_outlier"]
    assert [(e.replica_id, e.step) for e in flagged] == [("2", BOGUS)]
    assert "over 6000 steps ahead" in flagged[0].message  # 60 s at 100 steps/s
    _, again = ctl(s, 100.1, "set", {"lr": "0.02"})
    assert not [e for e in again if e.kind == "step_outlier"]  # once, not at every change


def test_one_bad_rank_inside_a_group_does_not_move_the_group():
    s = WeaverState()
    beat(s, 100.0, rank=0, step=100)
    beat(s, 100.0, rank=1, step=BOGUS)
    out, events = ctl_after_join(s)
    assert out.reply.effective_step == 100 + 50 + 2
    assert [e.rank for e in events if e.kind == "step_outlier"] == [1]


def ctl_after_join(s):
    join(s, 100.0, rank=0)
    join(s, 100.0, rank=1)
    return ctl(s, 100.0, "set", {"lr": "0.01"})


def test_two_groups_that_disagree_follow_the_older_one():
    # the rank that came later with a bogus step is the suspect …
    s = two_groups()
    join(s, 105.0, replica="2")
    beat(s, 105.0, replica="2", step=BOGUS)
    del s.jobs["j"].ranks[("j", "1", 0)]
    pos = position(s.jobs["j"], reach=Reach())
    assert [r.key for r in pos.outliers] == [("j", "2", 0)]
    # … and so is a group that restarted (new join) and has not healed to its peers' step yet:
    # it is behind, not an outlier, and the effective step follows the healthy group
    s = two_groups(steps=(5000, 5000))
    join(s, 110.0, replica="1")  # a new process of group 1
    beat(s, 110.0, replica="1", step=0, pid=4242)
    pos = position(s.jobs["j"], reach=Reach())
    assert pos.outliers == [] and pos.top_step == 5000


def test_a_version_planned_from_a_bogus_step_is_re_planned_when_that_rank_fails():
    """Issue 16.1 as seen: with the old rule this set was effective at 10^15 + 2, and every
    later one too, so no change ever applied on the honest ranks."""
    s = WeaverState()
    join(s, 100.0, replica="0")
    beat(s, 100.0, replica="0", step=100)
    join(s, 100.0, replica="1")
    beat(s, 100.0, replica="1", step=BOGUS)  # only two groups, the honest one is older
    out, _ = ctl(s, 100.0, "set", {"lr": "0.01"})
    assert out.reply.effective_step == 152
    # a version already planned out of reach (as the old rule did), then the bogus rank dies
    job = s.jobs["j"]
    latest = job.config.latest()
    job.config.snapshots[-1] = type(latest)(
        **{**{f: getattr(latest, f) for f in latest.__struct_fields__}, "effective_step": BOGUS}
    )
    beat(s, 101.0, replica="0", step=200)
    check_liveness(s, 101.5)  # rank 1/0 silent since 100.0: failed
    events, pos = review(job, 101.5, reach=SETTINGS.reach)
    req = replan_request(job, pos)
    assert req is not None and req.op == "replan" and "out of reach" in req.reason
    out, events = ctl(s, 101.5, "replan", request=req)
    assert out.reply.ok and out.reply.version == 3
    assert 200 < out.reply.effective_step < 400
    assert job.config.latest().values["lr"] == 0.01  # the re-planned version keeps its values
    assert [
        snap.effective_step for snap in job.config.snapshots if snap.effective_step >= BOGUS
    ] == []
    assert "supersedes v2" in events[0].message and events[0].data["superseded"] == [2]
    assert 2 not in job.applies  # never reported as missing or late
    # and the next change is planned from the honest ranks again
    out, _ = ctl(s, 101.6, "set", {"lr": "0.02"})
    assert out.reply.effective_step < 400
    # nothing more to re-plan
    assert replan_request(job, review(job, 101.7, reach=SETTINGS.reach)[1]) is None


def test_a_set_supersedes_a_pending_version_out_of_reach():
    s = two_groups()
    job = s.jobs["j"]
    ctl(s, 100.0, "set", {"lr": "0.01"})
    latest = job.config.latest()
    job.config.snapshots[-1] = type(latest)(
        **{**{f: getattr(latest, f) for f in latest.__struct_fields__}, "effective_step": BOGUS}
    )
    out, events = ctl(s, 100.1, "set", {"lr": "0.02"})
    assert out.reply.effective_step < 200
    assert [snap.version for snap in job.config.snapshots] == [1, 3]
    assert events[0].data["superseded"] == [2]


def test_a_pending_version_within_reach_is_still_the_floor():
    s = two_groups()
    out1, _ = ctl(s, 100.0, "set", {"lr": "0.01"})
    out2, _ = ctl(s, 99.0, "set", {"lr": "0.02"})  # a clock that says "earlier"
    assert out2.reply.effective_step >= out1.reply.effective_step


def test_replan_is_refused_when_everything_is_in_reach():
    s = two_groups()
    ctl(s, 100.0, "set", {"lr": "0.01"})
    out, _ = ctl(s, 100.1, "replan")
    assert not out.reply.ok and "in reach" in out.reply.error.message


def test_review_is_a_plain_pass_when_every_rank_is_close():
    s = two_groups()
    events, pos = review(s.jobs["j"], 100.0, reach=Reach())
    assert events == [] and pos is None
