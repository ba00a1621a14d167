"""The Weaver's checkpoint registry (weaver/checkpoints.py, through the control entry point):
who writes, complete only when every writer reported with DCP's metadata, failed when a writer
fails or leaves, only complete ones offered. Pure: explicit time, no server."""

import msgspec

from tests.unit.test_planning import SETTINGS, beat, ctl, join
from torchloom.protocol import RankEvent
from torchloom.weaver import checkpoints
from torchloom.weaver.state import WeaverState, check_liveness


def report(s, now, kind, ckpt, *, replica="0", rank=0, **data):
    ev = RankEvent(
        kind=kind,
        job_id="j",
        replica_id=replica,
        rank=rank,
        ts=now,
        step=0,
        data={"id": ckpt, **data},
    )
    return checkpoints.on_report(s.job("j"), ev, now)


def job_of(groups, *, ranks=1, quorum=False, now=100.0):
    s = WeaverState()
    for g in groups:
        for r in range(ranks):
            join(s, now, replica=g, rank=r)
            beat(s, now, replica=g, rank=r)
            if quorum:
                s.job("j").ranks[("j", g, r)].quorum = {"quorum_id": 1}
    return s


def test_without_torchft_every_rank_writes_and_the_order_rides_on_a_version():
    s = job_of(["0"], ranks=2)
    out, events = ctl(s, 101.0, "checkpoint")
    assert out.reply.ok and out.reply.data == {"checkpoint": f"ckpt-v{out.reply.version}"}
    snap = s.job("j").config.latest()
    assert snap.checkpoint.id == out.reply.data["checkpoint"] and snap.checkpoint.writers == ["0"]
    rec = s.job("j").checkpoints[snap.checkpoint.id]
    assert (
        rec.state == "pending" and rec.writers == ["0/0", "0/1"] and rec.step == snap.effective_step
    )
    assert [e.kind for e in events] == ["config_set", "checkpoint_requested"]


def test_under_torchft_the_healthiest_group_writes():
    s = job_of(["0", "1", "2"], quorum=True)
    s.job("j").ranks[("j", "0", 0)].straggler = True
    s.job("j").ranks[("j", "1", 0)].risk = 0.4
    assert checkpoints.choose_writers(s.job("j"))[0] == ["2"]
    s.job("j").ranks[("j", "2", 0)].risk = 0.7
    assert checkpoints.choose_writers(s.job("j"))[0] == ["1"]


def test_complete_only_when_every_writer_reported_with_the_metadata():
    s = job_of(["0"], ranks=2)
    out, _ = ctl(s, 101.0, "checkpoint")
    cid = out.reply.data["checkpoint"]
    assert report(s, 102.0, "checkpoint_saved", cid, rank=1, bytes=10) == []
    assert checkpoints.newest_complete(s.job("j")) is None  # one writer is not enough
    (ev,) = report(s, 102.5, "checkpoint_saved", cid, rank=0, bytes=20, metadata_sha256="ab")
    assert ev.kind == "checkpoint_completed"
    rec = s.job("j").checkpoints[cid]
    assert rec.state == "complete" and rec.bytes == 30 and rec.metadata_sha256 == "ab"
    assert checkpoints.listing(s.job("j"))["resume_from"] == cid
    assert report(s, 103.0, "checkpoint_failed", cid, rank=0) == []  # ended: nothing changes


def test_no_metadata_checksum_means_failed():
    s = job_of(["0"])
    out, _ = ctl(s, 101.0, "checkpoint")
    (ev,) = report(s, 102.0, "checkpoint_saved", out.reply.data["checkpoint"], bytes=5)
    assert ev.kind == "checkpoint_failed" and "metadata" in ev.message


def test_a_writer_that_fails_before_saving_fails_it_and_it_is_never_offered():
    s = job_of(["0"], ranks=2)
    out, _ = ctl(s, 101.0, "checkpoint")
    cid = out.reply.data["checkpoint"]
    report(s, 101.5, "checkpoint_saved", cid, rank=0, bytes=1, metadata_sha256="ab")
    beat(s, 101.6, rank=0)
    check_liveness(s, 101.6 + SETTINGS.lead_time_s + 5.0)  # rank 0/1 went silent: failed
    events = checkpoints.check_writers(s.job("j"), 107.0)
    assert [e.kind for e in events] == ["checkpoint_failed"] and "0/1" in events[0].message
    assert checkpoints.listing(s.job("j"))["resume_from"] is None


def test_a_report_from_a_rank_that_is_not_a_writer_changes_nothing():
    s = job_of(["0", "1"], quorum=True)
    out, _ = ctl(s, 101.0, "checkpoint")
    cid = out.reply.data["checkpoint"]
    writer = s.job("j").checkpoints[cid].writers[0].split("/")[0]
    other = "1" if writer == "0" else "0"
    assert report(s, 102.0, "checkpoint_saved", cid, replica=other, metadata_sha256="x") == []
    assert s.job("j").checkpoints[cid].saved == {}


def test_one_checkpoint_at_a_time_and_none_while_paused():
    s = job_of(["0"])
    assert ctl(s, 101.0, "checkpoint")[0].reply.ok
    second, _ = ctl(s, 101.1, "checkpoint")
    assert not second.reply.ok and "still being written" in second.reply.error.message
    s2 = job_of(["0"])
    ctl(s2, 101.0, "pause")
    paused, _ = ctl(s2, 101.1, "checkpoint")
    assert not paused.reply.ok and "paused" in paused.reply.error.message


def ready(s, *ranks_):
    for replica, rank in ranks_:
        s.job("j").ranks[("j", replica, rank)].checkpointing = True


def test_interval_is_young_daly_within_bounds():
    from torchloom.weaver.policies.checkpoint_interval import CheckpointIntervalParams, interval_s

    p = CheckpointIntervalParams(min_interval_s=60, max_interval_s=3600)
    assert interval_s(2.0, 3600.0, p) == 120.0  # √(2 · 2 s · 1 h)
    assert interval_s(1e-3, 3600.0, p) == 60.0  # floor
    assert interval_s(100.0, 1e6, p) == 3600.0  # ceiling


def test_the_interval_policy_asks_only_jobs_that_checkpoint_and_only_when_due():
    from torchloom.weaver.policies.checkpoint_interval import (
        CheckpointIntervalParams,
        CheckpointIntervalPolicy,
    )

    pol = CheckpointIntervalPolicy(
        CheckpointIntervalParams(min_interval_s=60, cost_prior_s=2.0, mtbf_prior_s=3600.0)
    )
    s = job_of(["0"], ranks=2)  # joined at t=100
    assert pol.decide(500.0, s) == []  # no Checkpointer in these processes
    ready(s, ("0", 0))
    assert pol.decide(500.0, s) == []  # one rank without
    ready(s, ("0", 1))
    # prior cost 2 s, MTBF 1 h + observed: interval ≈ √(2·2·(3600+t)) ≈ 120 s
    assert pol.decide(210.0, s) == []
    (d,) = pol.decide(230.0, s)
    assert d.action == "checkpoint" and d.request().op == "checkpoint"
    assert 119 < d.features["interval_s"] < 125 and d.features["failures"] == 0
    out, _ = ctl(s, 230.0, "checkpoint")
    assert pol.decide(400.0, s) == []  # pending
    cid = out.reply.data["checkpoint"]
    for rank in (0, 1):
        report(s, 231.0, "checkpoint_saved", cid, rank=rank, stall_s=0.005, metadata_sha256="x")
    assert pol.decide(260.0, s) == []  # measured cost 5 ms → the 60 s floor, from 230
    assert pol.decide(291.0, s)[0].features["cost_s"] == 0.005


def test_failures_shorten_the_interval():
    from torchloom.weaver.policies.checkpoint_interval import (
        CheckpointIntervalParams,
        CheckpointIntervalPolicy,
    )

    pol = CheckpointIntervalPolicy(
        CheckpointIntervalParams(min_interval_s=1, cost_prior_s=2.0, mtbf_prior_s=3600.0)
    )
    s = job_of(["0"], ranks=2)
    ready(s, ("0", 0), ("0", 1))
    calm = pol.decide(400.0, s)[0].features["interval_s"]
    s.job("j").failures = 8
    stormy = pol.decide(400.0, s)[0].features["interval_s"]
    assert stormy < calm / 2.5  # MTBF / 9: interval / 3


def test_a_launch_after_a_clean_end_starts_anew_after_a_failure_resumes():
    from torchloom.weaver.state import set_rank_state

    def ended(how):
        s = job_of(["0"], ranks=2)
        out, _ = ctl(s, 101.0, "checkpoint")
        cid = out.reply.data["checkpoint"]
        for rank in (0, 1):
            report(s, 102.0, "checkpoint_saved", cid, rank=rank, metadata_sha256="x")
        assert checkpoints.listing(s.job("j"))["resume_from"] == cid  # live: a restart resumes
        for rank in (0, 1):
            state = how if rank == 1 else "exited"
            set_rank_state(s, s.job("j").ranks[("j", "0", rank)], state, 110.0, "end")
        return checkpoints.listing(s.job("j")), cid

    listing, cid = ended("failed")
    assert listing["resume_from"] == cid
    listing, _ = ended("exited")
    assert listing["resume_from"] is None and "ended cleanly" in listing["resume_why"]


def complete_checkpoint(s, now):
    out, _ = ctl(s, now, "checkpoint")
    cid = out.reply.data["checkpoint"]
    for key in list(s.job("j").ranks):
        report(s, now + 0.5, "checkpoint_saved", cid, rank=key[2], metadata_sha256="x")
    return s.job("j").checkpoints[cid]


def test_rollback_targets_and_refusals():
    s = job_of(["0"], ranks=2)
    assert "run no Checkpointer" in ctl(s, 100.5, "rollback")[0].reply.error.message
    ready(s, ("0", 0), ("0", 1))
    assert "no complete checkpoint" in ctl(s, 100.6, "rollback")[0].reply.error.message
    first = complete_checkpoint(s, 101.0)
    beat(s, 102.0, rank=0, step=300)
    beat(s, 102.0, rank=1, step=300)
    second = complete_checkpoint(s, 103.0)
    job = s.job("j")
    assert checkpoints.rollback_target(job, {}).id == second.id
    assert checkpoints.rollback_target(job, {"step": second.step - 1}).id == first.id
    assert checkpoints.rollback_target(job, {"to": first.id}).id == first.id
    for values, why in (
        ({"to": "ckpt-v99"}, "no checkpoint 'ckpt-v99'"),
        ({"step": first.step - 1}, "no complete checkpoint"),
        ({"step": "soon"}, "not a whole number"),
    ):
        out, _ = ctl(s, 104.0, "rollback", values)
        assert not out.reply.ok and why in out.reply.error.message, out.reply.error
    job.checkpoints[first.id] = msgspec.structs.replace(first, state="failed")
    out, _ = ctl(s, 104.0, "rollback", {"to": first.id})
    assert "only a complete checkpoint" in out.reply.error.message


def test_a_rollback_orders_every_rank_back_with_the_checkpoints_knobs():
    s = job_of(["0"], ranks=2)
    ready(s, ("0", 0), ("0", 1))
    rec = complete_checkpoint(s, 101.0)
    ctl(s, 102.0, "set", {"lr": 0.01})
    out, events = ctl(s, 103.0, "rollback", {"to": rec.id})
    assert out.reply.ok
    snap = s.job("j").config.latest()
    assert snap.rollback.id == rec.id and snap.rollback.step == rec.step
    assert snap.values["lr"] == rec.values["lr"] == 0.1  # the desired config goes back too
    assert events[0].data["rollback"] == {"id": rec.id, "step": rec.step}


def test_a_rollback_can_change_knobs_with_it():
    s = job_of(["0"], ranks=1)
    ready(s, ("0", 0))
    rec = complete_checkpoint(s, 101.0)
    out, events = ctl(s, 102.0, "rollback", {"to": rec.id, "lr": 0.02})
    assert out.reply.ok and s.job("j").config.latest().values["lr"] == 0.02
    assert "lr=0.02" in events[0].message
    out, _ = ctl(s, 103.0, "rollback", {"to": rec.id, "lr": -1})
    assert not out.reply.ok and out.reply.error.knob == "lr"


def complete_one(s, now):
    """A checkpoint ordered and reported complete by the job's one rank; its record."""
    out, _ = ctl(s, now, "checkpoint")
    cid = out.reply.data["checkpoint"]
    files = {".metadata": "aa", "__0_0.distcp": "bb"}
    report(s, now, "checkpoint_saved", cid, metadata_sha256="aa", files=files, bytes=10)
    return s.job("j").checkpoints[cid]


def test_pin_makes_the_resume_choice_and_guards_against_delete():
    s = job_of(["0"])
    old, new = complete_one(s, 101.0), complete_one(s, 102.0)
    assert old.files == {".metadata": "aa", "__0_0.distcp": "bb"}
    assert checkpoints.listing(s.job("j"))["resume_from"] == new.id
    out, events = ctl(s, 103.0, "checkpoint_pin", {"id": old.id})
    assert out.reply.ok and [e.kind for e in events] == ["checkpoint_pinned"]
    listing = checkpoints.listing(s.job("j"))
    assert listing["resume_from"] == old.id and listing["fallbacks"] == [new.id]
    out, _ = ctl(s, 104.0, "checkpoint_delete", {"id": old.id})
    assert not out.reply.ok and "unpin it first" in out.reply.error.message
    assert ctl(s, 104.0, "checkpoint_pin", {"id": new.id})[0].reply.ok  # one pin at a time
    assert not s.job("j").checkpoints[old.id].pinned and s.job("j").checkpoints[new.id].pinned
    assert ctl(s, 105.0, "checkpoint_pin", {"id": new.id, "pinned": False})[0].reply.ok
    out, events = ctl(s, 106.0, "checkpoint_delete", {"id": old.id})
    assert out.reply.ok and [e.kind for e in events] == ["checkpoint_deleted"]
    assert s.job("j").checkpoints[old.id].state == "deleted"
    out, _ = ctl(s, 107.0, "checkpoint_delete", {"id": old.id})  # gone already
    assert not out.reply.ok and "no checkpoint" in out.reply.error.message
    out, _ = ctl(s, 107.0, "checkpoint_pin", {"id": old.id})
    assert not out.reply.ok


def test_a_corrupt_checkpoint_is_failed_and_its_files_are_ordered_removed_once():
    s = job_of(["0"])
    rec = complete_one(s, 101.0)
    ev = RankEvent(
        kind="checkpoint_corrupt",
        job_id="j",
        replica_id="0",
        rank=0,
        ts=102.0,
        step=0,
        data={"id": rec.id},
        reason="x changed",
    )
    events = checkpoints.on_corrupt(s.job("j"), ev, 102.0)
    assert [e.kind for e in events] == ["checkpoint_failed"] and "checksums" in events[0].message
    assert checkpoints.listing(s.job("j"))["resume_from"] is None
    assert ctl(s, 103.0, "checkpoint")[0].reply.ok
    order = s.job("j").config.latest().checkpoint
    assert order.remove == [rec.id]
    report(s, 104.0, "checkpoint_saved", order.id, metadata_sha256="aa", removed=[rec.id])
    checkpoints.on_removed(
        s.job("j"),
        RankEvent(
            kind="checkpoint_saved",
            job_id="j",
            replica_id="0",
            rank=0,
            ts=104.0,
            step=0,
            data={"id": order.id, "removed": [rec.id]},
        ),
    )
    assert s.job("j").checkpoints[rec.id].files_removed
    assert checkpoints.to_remove(s.job("j")) == []


def test_under_torchft_a_group_that_starts_beside_a_peer_ahead_heals_instead_of_loading():
    s = job_of(["0", "1"], quorum=True)
    rec = complete_one(s, 101.0)
    assert checkpoints.listing(s.job("j"), "1")["resume_from"] == rec.id  # nobody is ahead
    s.job("j").ranks[("j", "0", 0)].entry.last_step = rec.step + 10
    listing = checkpoints.listing(s.job("j"), "1")
    assert listing["resume_from"] is None and "heals this group" in listing["resume_why"]
    assert checkpoints.listing(s.job("j"))["resume_from"] == rec.id  # a whole-job start loads


def test_backup_retention_keeps_the_last_every_nth_the_best_and_the_pinned():
    s = job_of(["0"])
    job = s.job("j")
    recs = [complete_one(s, 101.0 + i) for i in range(6)]
    assert checkpoints.backup_drop(job, "ckpt-v99") == []  # no backup said
    for i, r in enumerate(recs):
        job.checkpoints[r.id] = msgspec.structs.replace(r, backup=f"b/{r.id}", loss=1.0 - i / 10)
    job.backup_keep = {"keep_last": 2, "keep_every": 0, "keep_best": False}
    new = "ckpt-v99"
    assert checkpoints.backup_drop(job, new) == [r.id for r in recs[:5]]
    job.backup_keep = {"keep_last": 1, "keep_every": 3, "keep_best": False}
    assert checkpoints.backup_drop(job, new) == [recs[i].id for i in (0, 1, 3, 4)]  # 3rd, 6th kept
    job.checkpoints[recs[1].id] = msgspec.structs.replace(
        job.checkpoints[recs[1].id], loss=0.01, pinned=False
    )
    job.checkpoints[recs[4].id] = msgspec.structs.replace(job.checkpoints[recs[4].id], pinned=True)
    job.backup_keep = {"keep_last": 1, "keep_every": 0, "keep_best": True}
    assert checkpoints.backup_drop(job, new) == [recs[i].id for i in (0, 2, 3, 5)]


def test_an_evaluators_scores_land_on_a_complete_checkpoint_and_bad_ones_are_refused():
    from torchloom.evaluator import to_score

    s = job_of(["0"])
    rec = complete_one(s, 101.0)
    listing = checkpoints.listing(s.job("j"))
    assert [c.id for c in to_score(listing, set())] == [rec.id]
    assert to_score(listing, {rec.id}) == []  # tried here already
    out, events = ctl(s, 102.0, "checkpoint_score", {"id": rec.id, "scores": {"eval_loss": 2.5}})
    assert out.reply.ok and [e.kind for e in events] == ["checkpoint_evaluated"]
    assert events[0].data["scores"] == {"eval_loss": 2.5} and events[0].step == rec.step
    assert "eval_loss=2.5" in events[0].message
    assert s.job("j").checkpoints[rec.id].scores == {"eval_loss": 2.5}
    assert to_score(checkpoints.listing(s.job("j")), set()) == []  # scored: not again
    ctl(s, 103.0, "checkpoint_score", {"id": rec.id, "scores": {"accuracy": 1}})
    assert s.job("j").checkpoints[rec.id].scores == {"eval_loss": 2.5, "accuracy": 1.0}
    for bad, says in (
        ({"id": rec.id, "scores": {"eval_loss": float("nan")}}, "not a finite number"),
        ({"id": rec.id, "scores": {"eval loss": 1.0}}, "letters, digits and _"),
        ({"id": rec.id, "scores": {}}, "mapping of 1 to 16"),
        ({"id": rec.id, "scores": {"x": True}}, "not a finite number"),
        ({"id": "ckpt-v99", "scores": {"x": 1.0}}, "has no checkpoint"),
    ):
        out, events = ctl(s, 104.0, "checkpoint_score", bad)
        assert not out.reply.ok and says in out.reply.error.message and not events
    pending, _ = ctl(s, 105.0, "checkpoint")
    out, _ = ctl(s, 106.0, "checkpoint_score", {"id": pending.reply.data["checkpoint"],
                                                "scores": {"x": 1.0}})  # fmt: skip
    assert not out.reply.ok and "only a complete checkpoint is scored" in out.reply.error.message
