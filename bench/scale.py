"""Benchmark: one Weaver holding many ranks, and what it costs as they grow.

Run:  python bench/scale.py [--sections growth ingest fanout detection threadlet]
                            [--ranks 100 1000 10000] [--hz 1 10] [--measure-s 15]

A real `torchloom up` (NATS server, Weaver and dashboard, as users start it) in its own
process; simulated ranks in `--clients` other processes, each an asyncio loop with one NATS
connection per `--ranks-per-conn` ranks, publishing real Telemetry on each rank's own
subject (replica groups of 8 ranks, 10 steps/s, a loss point per step, phase times, a
device sample each second), spread evenly over the period as unsynchronised ranks are.

* growth — the Weaver's own work in this process as N grows: decode and state update per
  message, and each periodic operation (liveness check, policy round, dashboard sample,
  `/metrics` scrape) right after a fresh flush of every rank.
* ingest — for each N and rate R: messages/s folded into the Weaver's state, lag from
  publish (the message's ``ts``) to state updated, p50/p99 from the Weaver's own lag
  histogram (``/metrics?name[]=torchloom_weaver_ingest_lag_seconds``, ±15 %), the
  Weaver's CPU (% of one core; the NATS server apart), its RSS, memory per rank and CPU
  per message, and whether the clients kept their schedule.
* fanout — N ranks each hold a core-NATS subscription on the job's desired config (as a
  Threadlet does); from `set` accepted (the snapshot's ``issued_ts``) to every rank holding
  the new version, decoded, and to the Weaver seeing every rank apply it; p50/p99 over sets.
* detection — real training processes (`torchloom.init`, no torch step) killed with
  SIGKILL → the Weaver's ``rank_failed``; a loop that stops stepping (heartbeats go on)
  → ``rank_hung``; p50/p99 over trials, beyond the configured timeout too.
* threadlet — the training-side cost at 1, 10 and 100 ms steps (torchloom's code between
  steps, with and without a NATS session; the Threadlet thread's CPU; the whole step),
  objects held per logged step, gen-0 collections, and telemetry bytes per rank per second.

All figures are printed as one table per section, with the date and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import platform
import re
import signal
import statistics
import tempfile
import time
import urllib.request
from datetime import date
from pathlib import Path
from typing import Any

import psutil

from torchloom.protocol import (
    ControlReply,
    ControlRequest,
    DesiredConfig,
    HistoryEvent,
    JoinInfo,
    MetricPoint,
    RankEvent,
    Telemetry,
    decode,
    encode,
    names,
)
from torchloom.transport import History, connect
from torchloom.weaver.ingest import IngestStats
from up_process import UpProcess  # bench/ is on sys.path when run as a script

SECTIONS = ("growth", "ingest", "fanout", "detection", "threadlet")
GROUP_SIZE = 8
STEPS_PER_S = 10.0


# ---- simulated ranks ------------------------------------------------------------------


def _telemetry(job: str, i: int, seq: int, now: float, t0: float, last_step: int) -> Telemetry:
    step = int((now - t0) * STEPS_PER_S)
    points = [
        MetricPoint(step=s, ts=now, values={"loss": 2.3 * math.exp(-s / 400.0)})
        for s in range(max(last_step + 1, step - 31), step + 1)
    ]
    second = int(now) != int(now - 1.0 / STEPS_PER_S)
    return Telemetry(
        job_id=job,
        replica_id=str(i // GROUP_SIZE),
        rank=i % GROUP_SIZE,
        group_world_size=GROUP_SIZE,
        seq=seq,
        ts=now,
        step=step,
        step_time_s=1.0 / STEPS_PER_S,
        samples_per_s=64 * STEPS_PER_S,
        points=points,
        phases_s={"data": 0.01, "compute": 0.07, "comm": 0.02},
        device_stats={"temp_c": 61.0, "power_w": 300.0, "mem_used_frac": 0.7} if second else None,
        host=f"node-{i // GROUP_SIZE:04d}",
        pid=100_000 + i,
        device=f"GPU-{i:08x}",
    )


async def _publish(
    nats_url: str, job: str, ranks: list[int], total: int, hz: float, start_at: float,
    stop: Any, per_conn: int,
) -> dict[str, float]:  # fmt: skip
    """Publish telemetry of ``ranks`` (of ``total``) at ``hz`` each, evenly spread, from
    ``start_at`` until ``stop`` (a multiprocessing Event) is set: the publishers run as long
    as the measurement needs them, however long the warm-up took."""
    conns = [
        await connect(nats_url, name=f"scale-sim-{k}")
        for k in range(max(1, math.ceil(len(ranks) / per_conn)))
    ]
    n = len(ranks)
    seqs = [0] * n
    last = [-1] * n
    while time.time() < start_at:
        await asyncio.sleep(0.01)
    t0 = time.time()
    sent, worst_behind = 0, 0.0
    subjects = [names.telemetry_subject(job, str(i // GROUP_SIZE), i % GROUP_SIZE) for i in ranks]
    while not stop.is_set():
        elapsed = time.time() - t0
        due = int(elapsed * hz * n) + 1
        if due - sent > n:  # more than a whole period behind
            worst_behind = max(worst_behind, (due - sent) / (hz * n))
        while sent < due:
            k = sent % n
            seqs[k] += 1
            now = time.time()
            tel = _telemetry(job, ranks[k], seqs[k], now, start_at, last[k])
            last[k] = tel.step
            await conns[k % len(conns)].publish(subjects[k], encode(tel))
            sent += 1
        await asyncio.sleep(0.002)
    for c in conns:
        await c.flush()
        await c.close()
    return {"sent": sent, "seconds": time.time() - t0, "worst_behind_s": worst_behind}


def _client(args: tuple, out: mp.Queue) -> None:  # type: ignore[type-arg]
    out.put(asyncio.run(_publish(*args)))


# ---- the Weaver's side ----------------------------------------------------------------


def scrape(ui_url: str, *families: str) -> str:
    query = "&".join(f"name[]={f}" for f in families)
    with urllib.request.urlopen(f"{ui_url.rstrip('/')}/metrics?{query}", timeout=30) as r:
        return r.read().decode()


def intake(text: str, kind: str = "telemetry") -> tuple[int, list[tuple[float, int]]]:
    """(messages, cumulative lag buckets [(le_s, count)]) of ``kind`` from a scrape."""
    m = re.search(rf'torchloom_weaver_messages_total{{kind="{kind}"}} ([0-9.e+]+)', text)
    buckets = [
        (float("inf") if le == "+Inf" else float(le), int(float(n)))
        for le, n in re.findall(
            rf'torchloom_weaver_ingest_lag_seconds_bucket{{kind="{kind}",le="([^"]+)"}} ([0-9.e+]+)',
            text,
        )
    ]
    return (int(float(m.group(1))) if m else 0), buckets


def lags_between(before: list, after: list) -> IngestStats:
    """The lags counted between two scrapes, as the Weaver's own histogram (its quantiles)."""
    cumulative = [a - b for (_, a), (_, b) in zip(after, before, strict=True)]
    counts = [c - p for c, p in zip(cumulative, [0, *cumulative[:-1]], strict=True)]
    return IngestStats(lag_counts=counts)


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def health(ui_url: str) -> dict:
    with urllib.request.urlopen(f"{ui_url.rstrip('/')}/api/health", timeout=30) as r:
        return json.loads(r.read())


async def join_one(nats_url: str, job: str) -> None:
    """Create the job (its knob registry and first config) by joining one rank."""
    conn = await connect(nats_url, name="scale-join")
    req = ControlRequest(
        op="join",
        job_id=job,
        join=JoinInfo(
            replica_id="0", rank=0, group_world_size=GROUP_SIZE,
            initial_values={"lr": 0.01, "batch_size": 64},
        ),
    )  # fmt: skip
    raw = await conn.request(names.control_subject(job), encode(req), timeout_s=10.0)
    reply = decode(raw, ControlReply)
    await conn.close()
    if not reply.ok:
        raise RuntimeError(f"join refused: {reply.error}")


def measure_ingest(
    *, ranks: int, hz: float, measure_s: float, clients: int, per_conn: int, up_args: list[str]
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        up = UpProcess(Path(tmp), *up_args)
        try:
            assert up.ui_url is not None
            weaver = psutil.Process(up.proc.pid)
            nats = [p for p in weaver.children(recursive=True) if "nats" in p.name()]
            workers = [p for p in weaver.children(recursive=True)
                       if "ingest_worker" in " ".join(p.cmdline())]  # fmt: skip
            job = f"scale{ranks}"
            asyncio.run(join_one(up.nats_url, job))
            rss0 = weaver.memory_info().rss
            ctx = mp.get_context("spawn")
            out = ctx.Queue()
            stop = ctx.Event()
            warm_s = 5.0 + ranks / 2000
            start_at = time.time() + 3.0
            split = [list(range(k, ranks, clients)) for k in range(clients)]
            procs = [
                ctx.Process(
                    target=_client,
                    args=((up.nats_url, job, part, ranks, hz, start_at, stop, per_conn), out),
                )
                for part in split
            ]
            for p in procs:
                p.start()
            time.sleep(max(0.0, start_at - time.time()) + warm_s)
            waited = time.time()
            while health(up.ui_url)["unsaved_events"]:
                if time.time() - waited > 600:
                    raise SystemExit("the join storm's history was not written within 10 min")
                time.sleep(0.5)  # the join storm's history is written
            before = intake(scrape(up.ui_url, "torchloom_weaver_messages",
                                   "torchloom_weaver_ingest_lag_seconds"))  # fmt: skip
            c0, n0, t0 = cpu_s(weaver), sum(cpu_s(p) for p in nats), time.time()
            w0 = sum(cpu_s(p) for p in workers)
            time.sleep(measure_s)
            after = intake(scrape(up.ui_url, "torchloom_weaver_messages",
                                  "torchloom_weaver_ingest_lag_seconds"))  # fmt: skip
            c1, n1, t1 = cpu_s(weaver), sum(cpu_s(p) for p in nats), time.time()
            w1 = sum(cpu_s(p) for p in workers)
            rss = weaver.memory_info().rss
            stop.set()  # the publishers ran through the whole window
            results = [out.get(timeout=120) for _ in procs]
            for p in procs:
                p.join(30)
            h = health(up.ui_url)
        finally:
            up.stop()
    msgs = after[0] - before[0]
    lags = lags_between(before[1], after[1])
    wall = t1 - t0
    if msgs < 0.5 * ranks * hz * wall:
        raise SystemExit(
            f"ingest measured {msgs} messages in {wall:.1f} s, under half of the "
            f"{ranks * hz * wall:.0f} offered: the publishers and the window did not overlap, "
            "or the Weaver fell far behind — no figure printed"
        )
    return {
        "ranks": ranks,
        "hz": hz,
        "workers": len(workers),
        "workers_cpu": (w1 - w0) / wall * 100,
        "offered": ranks * hz,
        "ingest": msgs / wall,
        "p50_ms": (lags.lag_quantile_s(0.5) or math.nan) * 1000,
        "p99_ms": (lags.lag_quantile_s(0.99) or math.nan) * 1000,
        "cpu": (c1 - c0) / wall * 100,
        "nats_cpu": (n1 - n0) / wall * 100,
        "us_per_msg": (c1 - c0) / max(1, msgs) * 1e6,
        "rss_mb": rss / 1e6,
        "kb_per_rank": (rss - rss0) / ranks / 1e3,
        "behind_s": max(r["worst_behind_s"] for r in results),
        "dropped": sum(h["dropped_messages"].values()),
    }


INGEST_HEAD = (
    "| ranks | Hz | ingest workers | offered msg/s | ingested msg/s | lag p50 ms | lag p99 ms "
    "| Weaver CPU % | workers CPU % | NATS CPU % | Weaver µs/msg | Weaver RSS MB | kB per rank "
    "| clients behind s | dropped |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def ingest_row(r: dict) -> str:
    return (
        f"| {r['ranks']} | {r['hz']:g} | {r['workers']} | {r['offered']:.0f} | {r['ingest']:.0f} | "
        f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['cpu']:.0f} | {r['workers_cpu']:.0f} | "
        f"{r['nats_cpu']:.0f} | "
        f"{r['us_per_msg']:.0f} | {r['rss_mb']:.0f} | {r['kb_per_rank']:.1f} | "
        f"{r['behind_s']:.2f} | {r['dropped']} |"
    )


# ---- fan-out: from `set` accepted to every rank holding the new config -----------------


async def _follow(
    nats_url: str, job: str, ranks: list[int], per_conn: int, ready: Any, stop: Any,
) -> list[tuple[int, float]]:  # fmt: skip
    """Ranks ``ranks`` as a Threadlet follows its job: each announces itself with one
    telemetry message, holds its own subscription on the job's desired config, decodes each
    copy it gets, and reports ``config_applied`` at the effective step, until ``stop`` is set.
    Returns ``[(version, seconds from issued to held)]``, one per rank and version."""
    conns = [
        await connect(nats_url, name=f"scale-follow-{k}")
        for k in range(max(1, math.ceil(len(ranks) / per_conn)))
    ]
    held: list[tuple[int, float]] = []
    now = time.time()
    for n, i in enumerate(ranks):
        conn = conns[n % len(conns)]
        replica, rank = str(i // GROUP_SIZE), i % GROUP_SIZE

        async def on_config(msg, conn=conn, replica=replica, rank=rank) -> None:  # type: ignore[no-untyped-def]
            got = time.time()
            snap = decode(msg.data, DesiredConfig).snapshots[-1]
            held.append((snap.version, got - snap.issued_ts))
            ev = RankEvent(kind="config_applied", job_id=job, replica_id=replica, rank=rank,
                           ts=time.time(), step=snap.effective_step, version=snap.version)  # fmt: skip
            await conn.publish(names.events_subject(job, replica, rank), encode(ev))

        await conn.subscribe(names.config_watch_subject(job), on_config)
        await conn.publish(
            names.telemetry_subject(job, replica, rank), encode(_telemetry(job, i, 1, now, now, -1))
        )
    for c in conns:
        await c.flush(timeout_s=30)
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.1)
    for c in conns:
        await c.close()
    return held


def _follower(args: tuple, out: mp.Queue) -> None:  # type: ignore[type-arg]
    out.put(asyncio.run(_follow(*args)))


async def _set(nats_url: str, job: str, sets: int, gap_s: float) -> None:
    """Issue ``sets`` job-wide ``set lr=…`` ``gap_s`` apart."""
    conn = await connect(nats_url, name="scale-set")
    for k in range(sets):
        req = ControlRequest(op="set", job_id=job, values={"lr": 0.01 + 0.001 * (k + 1)},
                             requested_by="bench")  # fmt: skip
        raw = await conn.request(names.control_subject(job), encode(req), timeout_s=30.0)
        reply = decode(raw, ControlReply)
        if not reply.ok:
            raise RuntimeError(f"set refused: {reply.error}")
        await asyncio.sleep(gap_s)
    await conn.close()


async def _history(nats_url: str, job: str) -> list[HistoryEvent]:
    conn = await connect(nats_url, name="scale-history")
    events = [decode(r, HistoryEvent) async for r in History(conn).read(names.history_filter(job))]
    await conn.close()
    return events


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else math.nan


def measure_fanout(*, ranks: int, sets: int, clients: int, per_conn: int) -> dict:
    gap_s = 1.0 + ranks / 2500
    with tempfile.TemporaryDirectory() as tmp:
        up = UpProcess(
            Path(tmp), "--ui-port", "0", "--failure-timeout-s", "3600", "--hang-timeout-s", "3600"
        )
        try:
            assert up.ui_url is not None
            weaver = psutil.Process(up.proc.pid)
            job = f"fanout{ranks}"
            asyncio.run(join_one(up.nats_url, job))
            ctx = mp.get_context("spawn")
            out = ctx.Queue()
            split = [list(range(k, ranks, clients)) for k in range(clients)]
            readies = [ctx.Event() for _ in split]
            stop = ctx.Event()
            procs = [
                ctx.Process(target=_follower,
                            args=((up.nats_url, job, part, per_conn, ev, stop), out))
                for part, ev in zip(split, readies, strict=True)
            ]  # fmt: skip
            for p in procs:
                p.start()
            for ev in readies:
                if not ev.wait(120):
                    raise RuntimeError("the simulated ranks did not subscribe in time")
            deadline = time.time() + 120
            while (heard := intake(scrape(up.ui_url, "torchloom_weaver_messages"))[0]) < ranks or (
                health(up.ui_url)["unsaved_events"]
            ):
                if time.time() > deadline:
                    raise RuntimeError(f"the Weaver heard {heard} of {ranks} ranks")
                time.sleep(0.5)  # every rank known, the join storm's history written
            c0, t0 = cpu_s(weaver), time.time()
            asyncio.run(_set(up.nats_url, job, sets, gap_s))
            cpu = (cpu_s(weaver) - c0) / (time.time() - t0) * 100
            time.sleep(gap_s)  # the last change reaches every rank
            stop.set()
            history = asyncio.run(_history(up.nats_url, job))
            held = [x for _ in procs for x in out.get(timeout=300)]
            for p in procs:
                p.join(30)
        finally:
            up.stop()
    by_version: dict[int, list[float]] = {}
    for version, lag in held:
        by_version.setdefault(version, []).append(lag)
    complete = [max(v) for v in by_version.values() if len(v) == ranks]
    first = [min(v) for v in by_version.values()]
    applied = [
        e.data["latency_s"] for e in history if e.kind == "config_applied" and e.version > 1
    ]  # v1 is the job's initial config
    lags = [lag for v in by_version.values() for lag in v]
    if len(complete) < sets:
        raise SystemExit(
            f"fan-out: only {len(complete)} of {sets} changes reached all {ranks} ranks — "
            "no figure printed"
        )
    return {
        "ranks": ranks,
        "sets": len(by_version),
        "complete": len(complete),
        "first_ms": _quantile(first, 0.5) * 1000,
        "p50_ms": _quantile(lags, 0.5) * 1000,
        "p99_ms": _quantile(lags, 0.99) * 1000,
        "all_ms": _quantile(complete, 0.5) * 1000,
        "all_max_ms": max(complete, default=math.nan) * 1000,
        "applied_ms": _quantile(applied, 0.5) * 1000,
        "applied_n": len(applied),
        "cpu": cpu,
    }


FANOUT_HEAD = (
    "| ranks | sets | every rank held it | first rank p50 ms | rank held p50 ms | rank held p99 ms | last rank p50 ms "
    "| last rank max ms | Weaver saw all applied p50 ms | Weaver CPU % |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def fanout_row(r: dict) -> str:
    return (
        f"| {r['ranks']} | {r['sets']} | {r['complete']} | {r['first_ms']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
        f"{r['all_ms']:.0f} | {r['all_max_ms']:.0f} | {r['applied_ms']:.0f} ({r['applied_n']}) | "
        f"{r['cpu']:.0f} |"
    )


# ---- detection: kill -9 → failed, a stopped loop → hung ----------------------------------

UP_FAILURE_TIMEOUT_S = "0.8"
UP_HANG_TIMEOUT_S = "2"


RANK_SCRIPT = """
import signal, sys, time
import torchloom
job, replica, url = sys.argv[1:4]
run = torchloom.init(job_id=job, replica_id=replica, rank=0, group_world_size=1, nats_url=url,
                     knobs={"lr": 0.01, "batch_size": 1})
stuck = []
signal.signal(signal.SIGUSR1, lambda *_: stuck.append(time.time()))
for step in run.steps():
    time.sleep(0.01)
    run.log(loss=1.0)
    while stuck:  # the loop is stuck (a deadlocked collective); the Threadlet's heartbeats go on
        time.sleep(1.0)
"""


def _detect(up: UpProcess, *, trials: int, batch: int, hang: bool, seed: int) -> list[float]:
    """Seconds from the fault (SIGKILL, or SIGUSR1: the loop stops) to the Weaver's
    ``rank_failed`` / ``rank_hung`` event, one per trial; ``batch`` ranks at a time."""
    import random
    import subprocess
    import sys

    rng = random.Random(seed)
    kind = "rank_hung" if hang else "rank_failed"
    delays: list[float] = []
    for b in range(math.ceil(trials / batch)):
        job = f"{'hang' if hang else 'kill'}{b}"
        procs = {
            str(k): subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, job, str(k), up.nats_url])
            for k in range(min(batch, trials - b * batch))
        }
        try:
            deadline = time.time() + 60
            while sum(
                e.kind == "rank_joined" for e in asyncio.run(_history(up.nats_url, job))
            ) < len(procs):
                if time.time() > deadline:
                    raise RuntimeError("the rank processes did not join in time")
                time.sleep(0.5)
            time.sleep(1.0)  # every rank stepping
            faulted: dict[str, float] = {}
            for replica, proc in procs.items():
                time.sleep(rng.uniform(0.05, 0.5))  # any phase against heartbeats and ticks
                faulted[replica] = time.time()
                proc.send_signal(signal.SIGUSR1 if hang else signal.SIGKILL)
            time.sleep(3.0 + (float(UP_HANG_TIMEOUT_S) if hang else 0.0))
            seen = {
                e.replica_id: e.ts
                for e in asyncio.run(_history(up.nats_url, job))
                if e.kind == kind and e.replica_id in faulted
            }
            missing = set(faulted) - set(seen)
            if missing:
                raise RuntimeError(f"no {kind} for replica groups {sorted(missing)}")
            delays += [seen[r] - t for r, t in faulted.items()]
        finally:
            for proc in procs.values():
                proc.kill()
                proc.wait()
    return delays


def measure_detection(*, trials: int, batch: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        up = UpProcess(Path(tmp), "--failure-timeout-s", UP_FAILURE_TIMEOUT_S,
                       "--hang-timeout-s", UP_HANG_TIMEOUT_S)  # fmt: skip
        try:
            for hang, what, bound in (
                (False, "kill -9 → failed (connection closed)", UP_FAILURE_TIMEOUT_S),
                (True, "loop stopped → hung", UP_HANG_TIMEOUT_S),
            ):
                d = _detect(up, trials=trials, batch=batch, hang=hang, seed=len(rows))
                rows.append({"what": what, "timeout_s": float(bound), "n": len(d),
                             "p50": _quantile(d, 0.5), "p99": _quantile(d, 0.99),
                             "min": min(d), "max": max(d)})  # fmt: skip
        finally:
            up.stop()
        # before: heartbeats only, as every Weaver was until the connection watch
        up = UpProcess(Path(tmp) / "hb", "--failure-timeout-s", UP_FAILURE_TIMEOUT_S,
                       "--no-watch-connections", "--no-ui")  # fmt: skip
        try:
            d = _detect(up, trials=trials, batch=batch, hang=False, seed=len(rows))
            rows.append({"what": "kill -9 → failed (heartbeat only: before)",
                         "timeout_s": float(UP_FAILURE_TIMEOUT_S), "n": len(d),
                         "p50": _quantile(d, 0.5), "p99": _quantile(d, 0.99),
                         "min": min(d), "max": max(d)})  # fmt: skip
        finally:
            up.stop()
    return rows


DETECTION_HEAD = (
    "| fault | configured timeout s | trials | p50 s | p99 s | min s | max s |\n"
    "|---|---:|---:|---:|---:|---:|---:|"
)


def detection_row(r: dict) -> str:
    return (
        f"| {r['what']} | {r['timeout_s']:g} | {r['n']} | {r['p50']:.3f} | {r['p99']:.3f} | "
        f"{r['min']:.3f} | {r['max']:.3f} |"
    )


# ---- threadlet: the training side's cost ----------------------------------------------


def _spin(iterations: int) -> int:
    """Fixed CPU work that holds the GIL: the worst case for a background thread."""
    x = 0
    for _ in range(iterations):
        x += 1
    return x


def _iterations_for(step_s: float) -> int:
    n = 20_000
    per = statistics.median(_timed(lambda: _spin(n)) for _ in range(50)) / n
    return max(1, round(step_s / per))


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _plain_round(iters: int, n: int) -> tuple[float, list[float]]:
    """(seconds, seconds outside the step's own work per step) of ``n`` plain steps."""
    outside = []
    t = last = time.perf_counter()
    for _ in range(n):
        w = time.perf_counter()
        _spin(iters)
        end = time.perf_counter()
        outside.append(w - last)
        last = end
    return time.perf_counter() - t, outside


def _loom_round(iters: int, n: int, run) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    """The same steps under torchloom: ``run.steps()``, two marks, ``run.log``."""
    outside = []
    t = last = time.perf_counter()
    for _ in run.steps():
        run.mark("data")
        w = time.perf_counter()
        _spin(iters)
        end = time.perf_counter()
        run.mark("compute")
        run.log(loss=0.5)
        outside.append(w - last)
        last = end
    return time.perf_counter() - t, outside


def measure_threadlet(*, step_ms: float, seconds: float, rounds: int, up: UpProcess) -> dict:
    """Alternate rounds of a plain loop and the same loop under torchloom, the Threadlet
    connected to a live Weaver and flushing every 200 ms. Per step: torchloom's own code on
    the training thread (time between one step's work and the next, less the plain loop's;
    median and mean — the mean includes the rare step boundary where the Threadlet's thread
    held the GIL; and the same with no NATS session, the Threadlet's thread not running: what
    the code costs by itself), the Threadlet thread's CPU (process CPU less the training thread's, % of
    wall time: what it can take from a step that holds the GIL), and the whole step's
    difference (medians over rounds; includes both, and this shared machine's noise).
    Telemetry bytes/s per rank from the Weaver's own intake counter."""
    import torchloom

    assert up.ui_url is not None
    iters = _iterations_for(step_ms / 1000)
    n = max(50, int(seconds * 1000 / step_ms))
    plain, loom, thread_cpu, loom_s = [], [], [], 0.0
    p_out: list[float] = []
    l_out: list[float] = []
    a_out: list[float] = []  # torchloom with no NATS session: the Threadlet's thread not running
    received = "torchloom_weaver_received_bytes"
    bytes0 = _intake_bytes(scrape(up.ui_url, received))
    for r in range(rounds):
        if r % 2 == 0:  # the plain loop first in even rounds, last in odd ones: no order bias
            p_total, p_steps = _plain_round(iters, n)
        run = torchloom.init(job_id=f"cost{step_ms:g}ms{r}", replica_id="0", rank=0,
                             group_world_size=1, nats_url=up.nats_url, max_steps=n,
                             knobs={"lr": 0.01, "batch_size": 64})  # fmt: skip
        run.agent.joined.wait(10)
        cpu0, th0 = time.process_time(), time.thread_time()
        l_total, l_steps = _loom_round(iters, n, run)
        thread_cpu.append((time.process_time() - cpu0 - (time.thread_time() - th0)) / l_total)
        l_out += l_steps[1:]
        run.close()
        run = torchloom.init(job_id="alone", max_steps=n, connect=False,
                             knobs={"lr": 0.01, "batch_size": 64})  # fmt: skip
        a_out += _loom_round(iters, n, run)[1][1:]
        run.close()
        if r % 2 == 1:
            p_total, p_steps = _plain_round(iters, n)
        p_out += p_steps[1:]
        plain.append(p_total / n)
        loom.append(l_total / n)
        loom_s += l_total
    time.sleep(0.5)  # the last flushes are counted
    sent = _intake_bytes(scrape(up.ui_url, received)) - bytes0
    p, lo = statistics.median(plain), statistics.median(loom)
    return {"step_ms": step_ms, "plain_us": p * 1e6, "loom_us": lo * 1e6,
            "own_us": (statistics.median(l_out) - statistics.median(p_out)) * 1e6,
            "own_mean_us": (statistics.fmean(l_out) - statistics.fmean(p_out)) * 1e6,
            "alone_us": (statistics.median(a_out) - statistics.median(p_out)) * 1e6,
            "thread_pct": statistics.median(thread_cpu) * 100,
            "extra_us": (lo - p) * 1e6, "extra_pct": (lo - p) / p * 100,
            "spread_pct": (max(plain) - min(plain)) / p * 100,
            "bytes_per_s": sent / loom_s}  # fmt: skip


def _intake_bytes(text: str) -> float:
    m = re.search(r'torchloom_weaver_received_bytes_total{kind="telemetry"} ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


def measure_held_per_step(steps: int = 5000) -> dict:
    """What the training thread keeps per logged step until the next flush (tracemalloc,
    no NATS session: the Threadlet's thread is not running) and the cyclic GC's gen-0
    collections per 1,000 steps, against a plain loop doing the same ``float`` math."""
    import gc
    import tracemalloc

    import torchloom

    def gen0() -> int:
        return int(gc.get_stats()[0]["collections"])

    c = gen0()
    for _ in range(steps):
        _spin(10)
    plain_gc = gen0() - c
    run = torchloom.init(job_id="held", max_steps=steps, connect=False,
                         knobs={"lr": 0.01, "batch_size": 64})  # fmt: skip
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    c = gen0()
    for _ in run.steps():
        run.mark("data")
        _spin(10)
        run.mark("compute")
        run.log(loss=0.5)
    loom_gc = gen0() - c
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    keep = [tracemalloc.Filter(False, tracemalloc.__file__)]
    diff = after.filter_traces(keep).compare_to(before.filter_traces(keep), "filename")
    run.close()
    return {
        "blocks": sum(d.count_diff for d in diff) / steps,
        "bytes": sum(d.size_diff for d in diff) / steps,
        "plain_gc": plain_gc * 1000 / steps,
        "loom_gc": loom_gc * 1000 / steps,
    }


THREADLET_HEAD = (
    "| step | plain loop µs/step | torchloom's code on the training thread µs/step (median / mean) "
    "| the same, no NATS session µs/step "
    "| Threadlet thread CPU % | under torchloom µs/step | whole-step difference "
    "| plain loop's own spread % | telemetry bytes/s per rank |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def threadlet_row(r: dict) -> str:
    return (
        f"| {r['step_ms']:g} ms | {r['plain_us']:.0f} | {r['own_us']:.2f} / {r['own_mean_us']:.2f} | {r['alone_us']:.2f} | {r['thread_pct']:.2f} | "
        f"{r['loom_us']:.0f} | {r['extra_us']:+.0f} µs ({r['extra_pct']:+.2f} %) | "
        f"{r['spread_pct']:.1f} | {r['bytes_per_s']:.0f} |"
    )


# ---- growth: the Weaver's own work, in this process, as N grows -------------------------


def _filled_state(ranks: int, flushes: int):
    """A WeaverState holding ``ranks`` ranks of one job, each after ``flushes`` flushes at
    5 Hz, built through the Weaver's real ingest (``on_telemetry``) and join."""
    from torchloom.weaver import control
    from torchloom.weaver.state import WeaverState, on_telemetry

    state = WeaverState()
    join = ControlRequest(
        op="join", job_id="g",
        join=JoinInfo(replica_id="0", rank=0, group_world_size=GROUP_SIZE,
                      initial_values={"lr": 0.01, "batch_size": 64}),
    )  # fmt: skip
    out = control.handle(state, join, 0.0, control.ControlSettings())
    control.commit(state, join, out, 0.0)
    t0 = 1_000.0
    last = [-1] * ranks
    for f in range(flushes):
        for i in range(ranks):
            now = t0 + f * 0.2 + i * 0.2 / ranks
            tel = _telemetry("g", i, f + 1, now, t0, last[i])
            last[i] = tel.step
            on_telemetry(state, tel, now)
    state.dirty.clear()
    return state, t0 + flushes * 0.2, last


def measure_growth(ranks: int, *, flushes: int = 100) -> dict:
    """The Weaver's periodic work as it really runs: after ``flushes`` flushes of history per
    rank, each timed operation follows one more flush of every rank at a later time (the
    policies' per-round caches are keyed on both); medians of 3 after one warm-up."""
    from torchloom.weaver.policies import PolicyEngine
    from torchloom.weaver.state import check_liveness, on_telemetry
    from torchloom.weaver.web.metrics import WeaverCollector, exposition
    from torchloom.weaver.web.track import JobTrack, sample

    state, now, last = _filled_state(ranks, flushes)
    t0 = now - flushes * 0.2
    job = state.jobs["g"]
    seq = flushes

    def next_flush() -> list[Telemetry]:
        nonlocal now, seq
        seq += 1
        msgs = [_telemetry("g", i, seq, now + i * 0.2 / ranks, t0, last[i]) for i in range(ranks)]
        for i, tel in enumerate(msgs):
            last[i] = tel.step
        now += 0.2
        return msgs

    msgs = next_flush()  # steady-state ingest, timed per message
    t = time.perf_counter()
    for tel in msgs:
        on_telemetry(state, tel, tel.ts)
    ingest_us = (time.perf_counter() - t) / ranks * 1e6
    raw = [encode(m) for m in msgs]
    t = time.perf_counter()
    for r in raw:
        decode(r, Telemetry)
    decode_us = (time.perf_counter() - t) / ranks * 1e6

    def after_a_flush(fn) -> float:  # type: ignore[no-untyped-def]
        times = []
        for _ in range(4):
            for tel in next_flush():
                on_telemetry(state, tel, tel.ts)
            times.append(_timed(fn))
        return statistics.median(times[1:]) * 1000

    engine = PolicyEngine()
    track = JobTrack()
    return {
        "ranks": ranks,
        "decode_us": decode_us,
        "ingest_us": ingest_us,
        "liveness_ms": after_a_flush(lambda: check_liveness(state, now)),
        "liveness_fast_ms": after_a_flush(lambda: check_liveness(state, now, full=False)),
        "policies_ms": after_a_flush(
            lambda: (engine.scores(now, state), engine.decide(now, state))
        ),
        "dashboard_ms": after_a_flush(lambda: sample(job, track, now)),
        "metrics_ms": _timed(lambda: exposition([WeaverCollector(state, {}, lambda: now)])) * 1000,
    }


GROWTH_HEAD = (
    "| ranks | decode µs/msg | state update µs/msg | liveness check ms (full pass, 1/s) "
    "| liveness check ms (per tick) | policy round ms | dashboard sample ms | /metrics scrape ms |"
    "\n|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def growth_row(r: dict) -> str:
    return (
        f"| {r['ranks']} | {r['decode_us']:.1f} | {r['ingest_us']:.1f} | {r['liveness_ms']:.2f} | "
        f"{r['liveness_fast_ms']:.3f} | {r['policies_ms']:.1f} | {r['dashboard_ms']:.1f} | "
        f"{r['metrics_ms']:.0f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--ranks", nargs="+", type=int, default=[100, 1000, 10000])
    ap.add_argument("--hz", nargs="+", type=float, default=[1.0, 10.0])
    ap.add_argument("--measure-s", type=float, default=15.0)
    ap.add_argument("--clients", type=int, default=1, help="processes of simulated ranks")
    ap.add_argument("--ingest-workers", nargs="+", type=int, default=[0, 2],
                    help="Weaver ingest workers, one row each (0: its own loop)")  # fmt: skip
    ap.add_argument("--ranks-per-conn", type=int, default=250)
    ap.add_argument("--sets", type=int, default=20, help="config changes per fan-out row")
    ap.add_argument("--trials", type=int, default=50, help="faults of each kind (detection)")
    ap.add_argument("--batch", type=int, default=10, help="rank processes at a time (detection)")
    ap.add_argument("--step-ms", nargs="+", type=float, default=[1.0, 10.0, 100.0])
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (threadlet)")
    args = ap.parse_args()
    print(
        f"# torchloom scale bench — {date.today()}, {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}"
    )
    if "growth" in args.sections:
        print("\n## Growth (the Weaver's work in one process, per operation)\n")
        print(GROWTH_HEAD, flush=True)
        for n in args.ranks:
            print(growth_row(measure_growth(n)), flush=True)
    if "ingest" in args.sections:
        print("\n## Ingest\n")
        print(INGEST_HEAD, flush=True)
        for hz in args.hz:
            for n in args.ranks:
                for workers in args.ingest_workers:
                    r = measure_ingest(
                        ranks=n, hz=hz, measure_s=args.measure_s, clients=args.clients,
                        per_conn=args.ranks_per_conn,
                        up_args=["--ui-port", "0", "--failure-timeout-s", str(max(0.8, 3.0 / hz)),
                                 "--ingest-workers", str(workers)],
                    )  # fmt: skip
                    print(ingest_row(r), flush=True)
    if "fanout" in args.sections:
        print("\n## Control fan-out\n")
        print(FANOUT_HEAD, flush=True)
        for n in args.ranks:
            r = measure_fanout(ranks=n, sets=args.sets, clients=args.clients,
                               per_conn=args.ranks_per_conn)  # fmt: skip
            print(fanout_row(r), flush=True)
    if "detection" in args.sections:
        print("\n## Detection (real rank processes, torchloom.init, a 10 ms step)\n")
        print(DETECTION_HEAD, flush=True)
        for r in measure_detection(trials=args.trials, batch=args.batch):
            print(detection_row(r), flush=True)
    if "threadlet" in args.sections:
        print("\n## Training-side cost (the step holds the GIL; medians over rounds)\n")
        print(THREADLET_HEAD, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            up = UpProcess(Path(tmp), "--ui-port", "0")
            try:
                for ms in args.step_ms:
                    r = measure_threadlet(step_ms=ms, seconds=args.measure_s / 5,
                                          rounds=args.rounds, up=up)  # fmt: skip
                    print(threadlet_row(r), flush=True)
            finally:
                up.stop()
        h = measure_held_per_step()
        print(
            f"\nHeld per logged step until the next flush: {h['blocks']:.1f} blocks, "
            f"{h['bytes']:.0f} bytes; gen-0 GC collections per 1,000 steps: "
            f"{h['loom_gc']:.1f} (plain loop {h['plain_gc']:.1f})."
        )


if __name__ == "__main__":
    main()
