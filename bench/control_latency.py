"""Benchmark: how long a change takes, end to end, while the ranks train flat out.

Run:  python bench/control_latency.py [--ranks 2 4] [--sets 200] [--step-ms 20]

A real ``torchloom up`` (NATS and the Weaver in their own process) and N rank processes, each
a CPU-bound training loop (a 256×256 float32 matmul chain for ``--step-ms`` per step, one torch
thread) under ``torchloom.init``; on this 2-core machine they keep both cores busy. A client
holds one NATS connection and sends ``set`` requests one at a time, 20 per second. Per set:

* **reply**: the client's request → its reply (the version is on disk in the KV bucket);
* **end to end**: the client's request → the last rank's Threadlet holds the new version
  (a hook on the rank's ``run.shared.offer`` notes the time; all processes share this host's clock);
* **accepted → held**: the Weaver accepting it (the snapshot's ``issued_ts``) → the same.

``status`` requests are timed the same way as replies. p50 / p99 / max over the sets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from torchloom.protocol import ControlReply, ControlRequest, decode, encode, names
from torchloom.transport import connect
from up_process import UpProcess  # bench/ is on sys.path when run as a script


def rank_main(url: str, job: str, rank: int, step_ms: float, out: str) -> None:
    """One rank: a CPU-bound loop; every desired-config version it receives, with the time."""
    import torch

    import torchloom

    torch.set_num_threads(1)
    run = torchloom.init(
        job_id=job, replica_id="0", rank=rank, knobs={"lr": 0.1}, nats_url=url, interval_ms=200
    )
    seen = open(out, "w", buffering=1)  # noqa: SIM115 - for the process's life
    offer = run.shared.offer

    def hook(doc, ts):  # on the Threadlet's thread, as the doc arrives
        latest = doc.latest()
        if latest is not None:
            seen.write(json.dumps([latest.version, time.time(), latest.issued_ts]) + "\n")
        offer(doc, ts)

    run.shared.offer = hook  # type: ignore[method-assign]
    a = torch.randn(256, 256)
    for _ in run.steps():
        t0 = time.perf_counter()
        if step_ms < 0:  # an idle rank: the same step time, asleep (a baseline without load)
            time.sleep(-step_ms / 1000)
        while (time.perf_counter() - t0) * 1000 < step_ms:
            a = torch.tanh(a @ a * 0.01)
        run.log(loss=float(a[0, 0]))


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def client(
    url: str, job: str, n_sets: int
) -> tuple[list[tuple[int, float, float]], list[float]]:
    """``(version, request time, reply time)`` of each set, and status round trips (s)."""
    conn = await connect(url, name="bench-client")
    sets, status = [], []
    try:
        for k in range(n_sets):
            req = ControlRequest(
                op="set", job_id=job, values={"lr": 0.1 / (k + 2)}, requested_by="bench"
            )
            t0 = time.time()
            raw = await conn.request(names.control_subject(job), encode(req), timeout_s=5)
            t1 = time.time()
            reply = decode(raw, ControlReply)
            if not reply.ok:
                raise RuntimeError(reply.error)
            sets.append((int(reply.version or 0), t0, t1))
            await asyncio.sleep(0.025)
            req = ControlRequest(op="status", job_id=job, values={"limit": 10})
            t0 = time.perf_counter()
            await conn.request(names.control_subject(job), encode(req), timeout_s=5)
            status.append(time.perf_counter() - t0)
            await asyncio.sleep(0.025)  # 20 changes/s: a busy policy loop, not a flood
    finally:
        await conn.close()
    return sets, status


def measure(url: str, tmp: Path, *, n_ranks: int, n_sets: int, step_ms: float) -> dict:
    job = f"lat{n_ranks}"
    outs = [tmp / f"{job}-{i}.jsonl" for i in range(n_ranks)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank-proc", url, job, str(i), str(step_ms), str(outs[i])],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for i in range(n_ranks)
    ]
    try:
        deadline = time.time() + 60
        while not all(o.exists() and o.read_text() for o in outs):  # each holds the first config
            if time.time() > deadline:
                raise RuntimeError("the ranks did not join in time")
            time.sleep(0.1)
        time.sleep(2.0)  # training flat out
        sets, status = asyncio.run(client(url, job, n_sets))
        time.sleep(1.0)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    held: dict[int, list[tuple[float, float]]] = {}
    for o in outs:
        for line in o.read_text().splitlines():
            version, ts, issued = json.loads(line)
            held.setdefault(version, []).append((ts, issued))
    reply, e2e, accepted = [], [], []
    for version, t0, t1 in sets:
        got = held.get(version, [])
        reply.append(t1 - t0)
        if len(got) == n_ranks:
            last = max(ts for ts, _ in got)
            e2e.append(last - t0)
            accepted.append(last - got[0][1])
    return {"ranks": n_ranks, "reply": reply, "e2e": e2e, "accepted": accepted, "status": status}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--sets", type=int, default=200)
    ap.add_argument(
        "--step-ms",
        type=float,
        default=20.0,
        help="CPU-bound work per step, ms; negative: that long asleep instead (no load)",
    )
    args = ap.parse_args()
    print(
        f"# control latency — {date.today()} — {platform.node()}, {platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}; "
        f"{args.sets} sets per row, CPU-bound rank loops of {args.step_ms:g} ms steps\n"
    )
    print(
        "| ranks | reply p50 / p99 / max ms | end to end p50 / p99 / max ms | "
        "accepted → held p50 / p99 ms | status reply p50 / p99 ms | sets held by every rank |"
    )
    print("|---:|---|---|---|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        up = UpProcess(Path(tmp) / "state")
        try:
            for n in args.ranks:
                r = measure(
                    up.nats_url, Path(tmp), n_ranks=n, n_sets=args.sets, step_ms=args.step_ms
                )
                ms = lambda xs, p: pct(xs, p) * 1e3  # noqa: E731
                print(
                    f"| {n} | {ms(r['reply'], 50):.2f} / {ms(r['reply'], 99):.2f} / "
                    f"{max(r['reply']) * 1e3:.2f} | {ms(r['e2e'], 50):.1f} / {ms(r['e2e'], 99):.1f} / "
                    f"{max(r['e2e']) * 1e3:.1f} | {ms(r['accepted'], 50):.1f} / "
                    f"{ms(r['accepted'], 99):.1f} | {ms(r['status'], 50):.2f} / "
                    f"{ms(r['status'], 99):.2f} | {len(r['e2e'])} / {len(r['reply'])} |",
                    flush=True,
                )
                if not r["e2e"] or len(r["e2e"]) < len(r["reply"]) * 0.9:
                    raise SystemExit(
                        f"only {len(r['e2e'])} of {len(r['reply'])} sets reached every rank: "
                        "the measurement is not valid"
                    )
        finally:
            up.stop()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-proc":
        _, _, url_, job_, rank_, step_, out_ = sys.argv
        rank_main(url_, job_, int(rank_), float(step_), out_)
    else:
        main()
