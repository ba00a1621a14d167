"""Status at any size: a summary, filters and pages, a bounded reply; gone ranks forgotten by
retention or by an operator. Pure: explicit time, no server."""

import pytest

from tests.unit.conftest import beat, join
from torchloom.protocol import ControlRequest, encode
from torchloom.weaver.control import STATUS_BUDGET_BYTES, ControlSettings, commit, handle
from torchloom.weaver.state import Retention, WeaverState, check_liveness, expire_dead

SETTINGS = ControlSettings()


def big_job(n_groups=300, ranks_per_group=10, *, failed_groups=5):
    """3,000 ranks, the first ``failed_groups`` groups silent (failed)."""
    s = WeaverState()
    join(s, 1.0, values={"lr": 0.1}, settings=SETTINGS)
    for g in range(n_groups):
        for k in range(ranks_per_group):
            t = 1.0 if g < failed_groups else 10.0
            beat(
                s,
                t,
                replica=str(g),
                rank=k,
                host=f"host{g}",
                step_time_s=0.01 + (0.05 if (g, k) == (42, 3) else 0.0),
            )
    check_liveness(s, 10.0)
    return s


def status(s, now=10.0, **values):
    replica = values.pop("replica", None)
    out = handle(
        s, ControlRequest(op="status", job_id="j", values=values, replica_id=replica), now, SETTINGS
    )
    assert out.reply.ok, out.reply.error
    return out.reply.data["jobs"][0], out.reply


def test_status_of_3000_ranks_is_a_summary_and_a_page_that_fits():
    """Issue 16.4 as seen: `torchloom status` answered 993,172 bytes for 3,000 ranks, over the
    256 KiB limit, and failed."""
    s = big_job()
    job, reply = status(s)
    assert len(encode(reply)) <= STATUS_BUDGET_BYTES
    summary = job["summary"]
    assert summary["ranks"] == 3000
    assert summary["states"] == {"failed": 50, "training": 2950}
    assert list(summary["states"]) == ["failed", "training"]  # attention order
    assert summary["replica_groups"] == 300 and summary["replica_groups_live"] == 295
    assert summary["applied_versions"] == {"0": 2950}
    assert summary["slowest"][0]["id"] == "42/3"
    assert len(job["ranks"]) == 100 and job["page"]["matched"] == 3000
    # failed first (attention), then by replica/rank
    assert [r["state"] for r in job["ranks"][:50]] == ["failed"] * 50
    assert job["ranks"][50]["state"] == "training"


def test_filters_pages_and_sorts():
    s = big_job()
    job, _ = status(s, state=["failed"], limit=20, offset=40)
    assert job["page"]["matched"] == 50 and len(job["ranks"]) == 10
    job, _ = status(s, state="live", replica="7", sort="rank")
    assert [r["rank"] for r in job["ranks"]] == list(range(10))
    job, _ = status(s, sort="slowest", limit=1)
    assert (job["ranks"][0]["replica_id"], job["ranks"][0]["rank"]) == ("42", 3)
    job, _ = status(s, limit=0)
    assert job["ranks"] == [] and job["summary"]["ranks"] == 3000


@pytest.mark.parametrize(
    "values",
    [{"state": ["sleeping"]}, {"sort": "random"}, {"limit": 5000}, {"offset": -1}, {"limit": "x"}],
)
def test_a_bad_status_query_is_refused_clearly(values):
    s = big_job(n_groups=2, failed_groups=0)
    out = handle(s, ControlRequest(op="status", job_id="j", values=values), 10.0, SETTINGS)
    assert not out.reply.ok and out.reply.error.code == "invalid_request"


def test_a_page_of_huge_rows_shrinks_until_the_reply_fits():
    s = big_job(n_groups=100, failed_groups=0)
    for rank in s.jobs["j"].ranks.values():
        rank.metrics = {f"metric_{i}": float(i) for i in range(40)}
    job, reply = status(s, limit=1000)
    assert len(encode(reply)) <= STATUS_BUDGET_BYTES
    assert 0 < len(job["ranks"]) < 1000 and job["page"]["limit"] == len(job["ranks"])


def test_gone_ranks_are_forgotten_past_their_retention():
    s = big_job(n_groups=20, ranks_per_group=10, failed_groups=15)  # 150 failed
    s.retention = Retention(dead_ttl_s=3600.0, max_dead_per_job=100)
    events = expire_dead(s, 11.0)
    assert [e.kind for e in events] == ["ranks_forgotten"] and events[0].data["count"] == 50
    assert len(s.jobs["j"].ranks) == 150 and len(s.removed) == 50
    assert expire_dead(s, 12.0) == []
    events = expire_dead(s, 10.0 + 3600.0)  # every failed rank now gone for an hour
    assert events[0].data["count"] == 100 and len(s.jobs["j"].ranks) == 50


def test_forget_takes_gone_ranks_out_and_refuses_a_live_one():
    s = big_job(n_groups=4, ranks_per_group=2, failed_groups=2)
    out = handle(
        s,
        ControlRequest(op="forget", job_id="j", replica_id="3", values={"rank": 1}),
        10.0,
        SETTINGS,
    )
    assert not out.reply.ok and "is live (training)" in out.reply.error.message
    req = ControlRequest(op="forget", job_id="j", requested_by="cli:me")
    out = handle(s, req, 10.0, SETTINGS)
    assert out.reply.ok and out.reply.data == {
        "forgotten": 4,
        "ranks": ["0/0", "0/1", "1/0", "1/1"],
    }
    events = commit(s, req, out, 10.0)
    assert [e.kind for e in events] == ["ranks_forgotten"] and "cli:me" in events[0].message
    assert sorted(k[1:] for k in s.jobs["j"].ranks) == [("2", 0), ("2", 1), ("3", 0), ("3", 1)]
