"""The network-aware codec policy and the timeouts policy as pure functions of (now, state)."""

from __future__ import annotations

import msgspec
import pytest

from tests.unit.test_policies import JOB, make_state
from torchloom.protocol import HistoryEvent, MetricPoint, RegistryEntry, Telemetry
from torchloom.weaver.policies.network import NetworkParams, NetworkPolicy
from torchloom.weaver.policies.timeouts import TimeoutParams, TimeoutPolicy
from torchloom.weaver.state import Rank


def flush(state, rid, step, now, *, busy, comm, sent, dense, loss=None, seq=1):
    msg = Telemetry(
        job_id=JOB,
        replica_id=rid,
        rank=0,
        seq=seq,
        ts=now,
        step=step,
        step_time_s=busy + comm,
        phases_s={"data": 0.0, "compute": busy, "comm": comm},
        comm_bytes={"sent": sent, "dense": dense},
        points=[] if loss is None else [MetricPoint(step=step, ts=now, values={"loss": loss})],
    )
    state.jobs[JOB].ranks[(JOB, rid, 0)].window.observe(msg, now)


def run(state, t0, seconds, *, comm, sent, dense=1e6, busy=0.02, loss=None, step0=0):
    t, step = t0, step0
    while t < t0 + seconds:
        step += 2
        for rid in ("0", "1"):
            flush(state, rid, step, t, busy=busy, comm=comm, sent=sent, dense=dense, loss=loss)
        t += 0.2
    return t, step


def codec_state(codec, *, journal_ts=0.0):
    s = make_state(values={"grad_compression": codec})
    job = s.jobs[JOB]
    ev = HistoryEvent(
        job_id=JOB,
        kind="config_set",
        ts=journal_ts,
        step=0,
        message="",
        data={"op": "set", "values": {"grad_compression": codec}},
    )
    job.config = msgspec.structs.replace(job.config, journal=[ev])
    return s


def test_comm_bound_steps_up_the_ladder_and_free_links_are_left_alone():
    pol = NetworkPolicy(NetworkParams())
    s = codec_state("none")
    now, _ = run(s, 0.0, 3.0, comm=0.06, sent=1e6)  # 1 MB in 60 ms: 133 Mbit/s, 75 % of a step
    (d,) = pol.decide(now, s)
    assert d.values == {"grad_compression": "bf16"} and "75% of a step" in d.reason
    calm = codec_state("none")
    now, _ = run(calm, 0.0, 3.0, comm=0.002, sent=1e6)  # 9 % of a step: nothing to gain
    assert pol.decide(now, calm) == []
    waiting = codec_state("none")  # comm dominates but moves 8 Gbit/s: waiting, not the link
    now, _ = run(waiting, 0.0, 3.0, comm=0.001, sent=1e6, busy=0.0005)
    assert pol.decide(now, waiting) == []


def test_a_codec_steps_down_when_the_link_has_room_or_after_a_probe_interval():
    pol = NetworkPolicy(NetworkParams(probe_every_s=30.0))
    busy = codec_state("powersgd:4")  # 50 kB in 10 ms: bf16's 500 kB could take 100 ms
    now, _ = run(busy, 0.0, 3.0, comm=0.01, sent=5e4)
    assert pol.decide(now, busy) == []
    roomy = codec_state("powersgd:4")  # 50 kB in 1 ms: bf16 would take at most 10 ms of 30
    now, _ = run(roomy, 0.0, 3.0, comm=0.001, sent=5e4)
    (d,) = pol.decide(now, roomy)
    assert d.values == {"grad_compression": "bf16"} and "the link has room" in d.reason
    # no bound from topk to powersgd (shapes unknown): a probe, after probe_every_s
    probe = NetworkPolicy(NetworkParams(ladder="none,powersgd:4,topk:0.001", probe_every_s=30.0))
    s = codec_state("topk:0.001", journal_ts=0.0)
    now, _ = run(s, 0.0, 3.0, comm=0.001, sent=2e3)
    assert probe.decide(now, s) == []  # in force for 3 s only
    now, _ = run(s, 40.0, 3.0, comm=0.001, sent=2e3)
    (d,) = probe.decide(now, s)
    assert d.values == {"grad_compression": "powersgd:4"} and "probing" in d.reason


def test_a_loss_that_rises_after_a_switch_sends_the_codec_back_to_none():
    pol = NetworkPolicy(NetworkParams())
    worse = codec_state("bf16")
    job = worse.jobs[JOB]
    for rid in ("0", "1"):  # losses before the switch (steps < 0 are before step 0)
        w = job.ranks[(JOB, rid, 0)].window
        w.losses.extend((step, 0.5) for step in range(-40, 0))
    now, _ = run(worse, 0.0, 3.0, comm=0.05, sent=5e5, loss=0.9)
    (d,) = pol.decide(now, worse)
    assert d.values == {"grad_compression": "none"} and "loss" in d.reason
    now, _ = run(worse, now, 3.0, comm=0.08, sent=1e6, loss=0.5, step0=100)
    job.config = msgspec.structs.replace(
        job.config,
        snapshots=[
            msgspec.structs.replace(job.config.latest(), values={"grad_compression": "none"})
        ],
    )
    assert pol.decide(now, worse) == []  # held at none after a loss-driven return


def test_bad_ladders_are_refused():
    with pytest.raises(ValueError):
        NetworkPolicy(NetworkParams(ladder="bf16,none"))
    with pytest.raises(ValueError):
        NetworkPolicy(NetworkParams(ladder="none,gzip"))


def test_timeouts_follow_the_longest_stall_and_silence():
    pol = TimeoutPolicy(TimeoutParams())
    s = make_state(values={"collective_timeout_s": 1.0, "quorum_timeout_s": 1.0})
    now, _ = run(s, 0.0, 5.0, comm=0.005, sent=1e6)
    (d,) = pol.decide(now, s)  # calm: the 1 s torchft timeouts go to their 2 s floor
    assert d.values == {"collective_timeout_s": 2.0, "quorum_timeout_s": 2.0}
    s = make_state(values={"collective_timeout_s": 2.0, "quorum_timeout_s": 2.0})
    t, step = run(s, 0.0, 5.0, comm=0.005, sent=1e6)
    w = s.jobs[JOB].ranks[(JOB, "1", 0)].window
    w.silences.append((t, 1.6))  # a 1.6 s heartbeat gap, and a 1.6 s stall
    flush(s, "1", step + 1, t + 1.6, busy=0.02, comm=0.005, sent=1e6, dense=1e6)
    (d,) = pol.decide(t + 1.6, s)
    assert d.values["collective_timeout_s"] == pytest.approx(5.4)  # 3 × the 1.8 s between flushes
    assert d.values["failure_timeout_s"] == pytest.approx(4.8, abs=0.1)
    assert "hang_timeout_s" not in d.values  # 3 × 1.6 s is under its 30 s floor
    assert "1.60 s" in d.reason


def test_timeouts_go_down_step_by_step_and_only_on_every_rank_s_whole_window():
    """A restarted process's silences start afresh and a failed group's are gone: its calm
    peers alone must not lower the timeouts that kept it in."""
    pol = TimeoutPolicy(TimeoutParams())  # window_s 30, change_ratio 1.5
    s = make_state(values={"collective_timeout_s": 12.0, "quorum_timeout_s": 12.0})
    job = s.jobs[JOB]
    now, _ = run(s, 0.0, 40.0, comm=0.005, sent=1e6)  # 40 s calm, both ranks joined at 0
    (d,) = pol.decide(now, s)
    assert d.values == {"collective_timeout_s": 8.0, "quorum_timeout_s": 8.0}  # 12 / 1.5

    slow = job.ranks[(JOB, "1", 0)]
    slow.entry.joined_ts = now - 10.0  # its process restarted 10 s ago
    assert pol.decide(now, s) == []
    slow.entry.joined_ts = 0.0
    dead = RegistryEntry(job_id=JOB, replica_id="2", rank=0, state="failed")
    dead.state_since_ts = now - 10.0  # a third group failed 10 s ago
    job.ranks[(JOB, "2", 0)] = Rank(dead)
    assert pol.decide(now, s) == []
    dead.state_since_ts = now - 31.0
    assert pol.decide(now, s)[0].values["collective_timeout_s"] == 8.0

    # going up is never held back: an 8 s stall and silence of the young rank raise them at once
    slow.entry.joined_ts = now - 10.0
    slow.window.silences.append((now + 8.0, 8.0))
    flush(s, "1", 10_000, now + 8.0, busy=0.02, comm=0.005, sent=1e6, dense=1e6)
    (d,) = pol.decide(now + 8.0, s)
    assert d.values["collective_timeout_s"] > 18.0 and d.values["failure_timeout_s"] == 24.0
