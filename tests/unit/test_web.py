"""Pure parts of the dashboard: series thinning, tracking, frames and diffs, access rules."""

from __future__ import annotations

import math

import pytest

from torchloom.protocol import HistoryEvent, RegistryEntry
from torchloom.weaver.state import Job, Rank
from torchloom.weaver.web import frames
from torchloom.weaver.web.auth import SESSION_COOKIE, Access, _hostname
from torchloom.weaver.web.feed import Subscriber
from torchloom.weaver.web.series import Series
from torchloom.weaver.web.track import EVENTS_KEPT, JobTrack, sample, spark_points


def make_rank(replica: str, rank: int, *, step: int, state: str = "training", **figures):
    entry = RegistryEntry(
        job_id="j",
        replica_id=replica,
        rank=rank,
        state=state,  # type: ignore[arg-type]
        last_step=step,
        host="h",
        device="cpu:h",
        last_seen_ts=100.0,
    )
    r = Rank(entry)
    r.samples_per_s = figures.get("sps")
    r.step_time_s = figures.get("step_time_s")
    r.metrics = {k: figures[k] for k in ("loss", "test_acc", "mfu", "flops_per_s") if k in figures}
    return r


def make_job(*ranks: Rank) -> Job:
    job = Job("j")
    for r in ranks:
        job.ranks[r.key] = r
    return job


def event(kind: str, ts: float, message: str = "m") -> HistoryEvent:
    return HistoryEvent(job_id="j", kind=kind, ts=ts, message=message)


# ---- series ------------------------------------------------------------------------------


def test_series_keeps_bounded_memory_and_the_whole_run():
    s = Series(capacity=8)
    for i in range(100):
        s.add(float(i), {"a": float(i)})
    assert len(s.ts) <= 8
    assert s.ts[0] == 0.0  # the start of the run is still there
    assert s.ts[-1] >= 100 - s.stride  # and its recent end
    assert s.columns["a"] == s.ts  # columns stay aligned with time
    assert s.stride > 1


def test_series_backfills_new_columns_and_marks_missing_values():
    s = Series(capacity=16)
    s.add(1.0, {"a": 1.0})
    s.add(2.0, {"b": 2.0})
    assert s.columns == {"a": [1.0, None], "b": [None, 2.0]}
    assert s.since(1.0) == {"ts": [2.0], "columns": {"a": [None], "b": [2.0]}}
    with pytest.raises(ValueError):
        Series(capacity=2)


# ---- tracking ----------------------------------------------------------------------------


def test_sample_aggregates_per_replica_group_and_ignores_nan():
    job = make_job(
        make_rank("0", 0, step=10, loss=1.0, sps=100.0, test_acc=0.5),
        make_rank("0", 1, step=10, loss=3.0, sps=50.0),
        make_rank("1", 0, step=9, loss=float("nan"), sps=80.0),
        make_rank("2", 0, step=3, state="failed", loss=9.0, sps=1.0),
    )
    track = JobTrack()
    sample(job, track, 1000.0)
    cols = {k: v[-1] for k, v in track.series.columns.items()}
    assert cols["loss/0"] == 2.0 and cols["sps/0"] == 150.0 and cols["acc/0"] == 0.5
    assert cols["loss/1"] is None  # NaN is not drawn
    assert "loss/2" not in cols  # a failed rank is not a live line
    assert cols["sps"] == 230.0 and cols["step"] == 10.0
    assert set(spark_points(track)) == {"0/0", "0/1", "1/0"}


def test_goodput_counts_time_with_progress_over_time_with_live_ranks():
    r = make_rank("0", 0, step=0)
    job = make_job(r)
    track = JobTrack()
    assert track.goodput is None
    for t, step in [(0, 0), (1, 1), (2, 2), (3, 2), (4, 2), (5, 3)]:
        r.entry.last_step = step
        sample(job, track, float(t))
    assert track.observed_s == 5.0
    assert track.productive_s == 3.0  # 0→1, 1→2, 2→3; two stalled seconds
    assert track.goodput == pytest.approx(0.6)
    r.entry.state = "exited"
    sample(job, track, 100.0)  # time with no live rank is not held against the job
    assert track.observed_s == 5.0


def test_events_are_deduplicated_bounded_and_merged_with_stored_ones_first():
    track = JobTrack()
    live = event("rank_failed", 10.0)
    assert track.add_event(live)
    assert not track.add_event(event("rank_failed", 10.0))  # heard twice
    track.merge_stored([event("job_started", 1.0), event("rank_failed", 10.0)])
    kinds = [e["kind"] for e in track.events_after(0)]
    assert kinds == ["job_started", "rank_failed"]
    assert track.failures == 1
    for i in range(EVENTS_KEPT + 5):
        track.add_event(event("config_set", 20.0 + i))
    assert len(track.events) == EVENTS_KEPT
    seqs = [e["seq"] for e in track.events_after(0)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert len(track.events_after(seqs[-3])) == 2


# ---- frames ------------------------------------------------------------------------------


def test_header_counts_healthy_groups_and_skips_exited_ones():
    healing = make_rank("1", 0, step=5)
    healing.quorum = {"healing": True}
    job = make_job(
        make_rank("0", 0, step=7, loss=0.5, sps=10.0),
        healing,
        make_rank("2", 0, step=1, state="exited"),
        make_rank("3", 0, step=2, state="failed"),
    )
    h = frames.header(job, JobTrack(), {"ready": True})
    assert (h["groups_healthy"], h["groups_total"]) == (1, 3)
    assert h["step"] == 7 and h["loss"] == 0.5 and h["samples_per_s"] == 10.0
    assert h["ranks_live"] == 2


def test_header_has_the_live_ranks_mean_mfu_and_summed_flops():
    job = make_job(
        make_rank("0", 0, step=7, mfu=0.40, flops_per_s=4e14),
        make_rank("0", 1, step=7, mfu=0.30, flops_per_s=3e14),
        make_rank("1", 0, step=2, state="exited", mfu=0.9, flops_per_s=9e14),
    )
    h = frames.header(job, JobTrack(), {"ready": True})
    assert h["mfu"] == pytest.approx(0.35) and h["flops_per_s"] == pytest.approx(7e14)
    assert frames.header(make_job(make_rank("0", 0, step=1)), JobTrack(), {})["mfu"] is None


def test_update_sends_only_changed_rows_new_events_and_new_points():
    a, b = make_rank("0", 0, step=1), make_rank("0", 1, step=1)
    job = make_job(a, b)
    track = JobTrack()
    sample(job, track, 1.0)
    track.add_event(event("job_started", 1.0))
    snap = frames.snapshot(job, track, {}, 1.0, ["j"])
    cursor = frames.cursor_at(track, frames.rows(job, 1.0))
    assert {r["id"] for r in snap["ranks"]} == {"0/0", "0/1"}
    assert len(snap["events"]) == 1 and snap["series"]["ts"] == [1.0]

    a.entry.last_step = 2
    sample(job, track, 2.0)
    track.add_event(event("config_set", 2.0))
    up = frames.update(job, track, {}, 1.0, ["j"], cursor)  # same `now`: ages unchanged
    assert up["ranks"] == [{"id": "0/0", "step": 2}]  # only what changed
    assert [e["kind"] for e in up["events"]] == ["config_set"]
    assert up["series"]["ts"] == [2.0] and not up["series_reset"]

    up = frames.update(job, track, {}, 1.0, ["j"], cursor)
    assert up["ranks"] == [] and up["events"] == [] and up["series"]["ts"] == []

    del job.ranks[b.key]
    c = make_rank("1", 0, step=4)
    job.ranks[c.key] = c
    up = frames.update(job, track, {}, 1.0, ["j"], cursor)
    assert up["removed"] == ["0/1"]
    assert up["ranks"] == [frames.rows(job, 1.0)["1/0"]]  # a new rank comes whole


def test_update_resends_the_series_after_it_was_thinned():
    job = make_job(make_rank("0", 0, step=1))
    track = JobTrack()
    track.series = Series(capacity=4)
    sample(job, track, 0.0)
    cursor = frames.cursor_at(track, frames.rows(job, 0.0))
    for t in range(1, 6):
        sample(job, track, float(t))
    up = frames.update(job, track, {}, 5.0, ["j"], cursor)
    assert up["series_reset"] and up["series"]["ts"] == track.series.ts


def test_rank_rows_are_json_safe():
    job = make_job(make_rank("0", 0, step=1, loss=float("inf"), sps=float("nan")))
    row = frames.rows(job, 100.0)["0/0"]
    assert row["loss"] is None
    assert all(not (isinstance(v, float) and not math.isfinite(v)) for v in row.values())


# ---- feed back-pressure ------------------------------------------------------------------


def test_a_slow_page_gets_one_snapshot_instead_of_a_growing_queue():
    sub = Subscriber(job_id="j", max_pending_frames=3)
    sub.push(b"ignored")  # a new page starts with a snapshot
    assert sub.needs_snapshot and not sub.pending
    sub.needs_snapshot = False
    for i in range(3):
        sub.push(b"%d" % i)
    assert list(sub.pending) == [b"0", b"1", b"2"]
    sub.push(b"3")  # one more than it may hold
    assert sub.needs_snapshot and not sub.pending


# ---- access ------------------------------------------------------------------------------


def test_access_accepts_the_bearer_token_or_the_session_cookie_only():
    acc = Access(token="s3cret-token", loopback=True)
    assert acc.allowed({"authorization": "Bearer s3cret-token"}, {})
    assert not acc.allowed({"authorization": "Bearer wrong"}, {})
    assert not acc.allowed({}, {})
    assert acc.allowed({}, {SESSION_COOKIE: acc.session_value()})
    assert "s3cret" not in acc.session_value()
    assert not acc.allowed({}, {SESSION_COOKIE: "forged"})
    assert Access(token=None, loopback=True).allowed({}, {})
    with pytest.raises(ValueError, match="8 characters"):
        Access(token="short", loopback=True)


@pytest.mark.parametrize(
    "host, name",
    [("127.0.0.1:8787", "127.0.0.1"), ("localhost", "localhost"), ("[::1]:80", "::1"),
     ("evil.example:8787", "evil.example")],
)  # fmt: skip
def test_hostname_of_a_host_header(host, name):
    assert _hostname(host) == name
