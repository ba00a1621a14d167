"""Benchmark: what torchloom costs a training step, and how fast a change reaches every rank.

Run:  python bench/threadlet_overhead.py [--steps 3000] [--rounds 5] [--ranks 2 8] [--sets 200]

(a) Per-step cost. The same loop runs alternately without torchloom (``for step in
    range(n)``) and with it (``for step in run.steps(): … run.log(loss=loss)``), with
    a live ``torchloom up`` (NATS server and Weaver, in their own processes), the Threadlet connected and flushing
    telemetry every 200 ms. Two workloads: an empty step (torchloom's own cost) and
    a small CPU training step (a 2-layer MLP, batch 64), whose time gives the ratio.
    Figures are medians over rounds.
(b) Control latency. N Threadlets (in this process, each with its own NATS session
    and thread, as N ranks) follow one job; a client issues ``set`` requests one at a
    time, 20 per second. For each, the latency runs from the Weaver accepting it (the
    snapshot's ``issued_ts``, before the KV write) to the moment the last rank's
    Threadlet holds the new version (not waiting for the effective step).
    p50 / p99 / max over sets.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import torch

import torchloom
from torchloom.protocol import ControlReply, ControlRequest, decode, encode, names
from torchloom.transport import connect
from up_process import UpProcess  # bench/ is on sys.path when run as a script


def mlp_step_fn(guard=None):
    """A 2-layer MLP step; ``guard(parameters)`` (e.g. ``run.guard_gradients``) after backward."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 128), torch.randint(0, 10, (64,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if guard is not None:
            guard(model.parameters())
        opt.step()
        return loss.detach()

    return step


def empty_step():
    return 0.5


def time_baseline(work, n):
    t0 = time.perf_counter()
    for _ in range(n):
        work()
    return time.perf_counter() - t0


def time_torchloom(work, n, url, job, *, marks=False, guard=False):
    """``work`` in ``run.steps()`` with ``run.log``; ``marks``: three ``run.mark`` per step;
    ``guard``: ``work`` is an MLP step that calls ``run.guard_gradients`` after backward."""
    run = torchloom.init(
        job_id=job,
        knobs={"lr": 0.01, "batch_size": 64, "skip_nonfinite": True},
        max_steps=n,
        nats_url=url,
        rank=0,
        replica_id="0",
    )
    run.agent.joined.wait(5)
    if guard:
        work = mlp_step_fn(run.guard_gradients)
    t0 = time.perf_counter()
    for _ in run.steps():
        if marks:
            run.mark("data")
            loss = work()
            run.mark("compute")
            run.mark("comm")
        else:
            loss = work()
        run.log(loss=loss)
    return time.perf_counter() - t0


def bench_step_cost(url, *, steps, rounds):
    rows = []
    cases = (
        ("empty step", empty_step, {}),
        ("empty step + 3 run.mark() phases", empty_step, {"marks": True}),
        ("MLP step (CPU)", mlp_step_fn(), {}),
        ("MLP step + run.guard_gradients (norm, NaN zeroing)", mlp_step_fn(), {"guard": True}),
    )
    for name, work, options in cases:
        base, tl = [], []
        for r in range(rounds):
            base.append(time_baseline(work, steps) / steps)
            elapsed = time_torchloom(work, steps, url, f"bench{r}", **options)
            tl.append(elapsed / steps)
        b, t = statistics.median(base), statistics.median(tl)
        spread = (max(base) - min(base)) / b  # how much the plain loop itself varies between rounds
        rows.append((name, b * 1e6, t * 1e6, (t - b) * 1e6, spread))
    return rows


async def _set_latencies(url, *, n_ranks, n_sets, job):
    received: dict[int, list[float]] = {}
    runs = []
    stop = threading.Event()

    for i in range(n_ranks):
        run = torchloom.init(
            job_id=job, knobs={"lr": 0.1}, max_steps=10**9, nats_url=url, rank=i, replica_id="0"
        )
        offer = run.shared.offer

        def hook(doc, ts, _offer=offer):
            latest = doc.latest()
            if latest is not None:
                received.setdefault(latest.version, []).append(time.time())
            _offer(doc, ts)

        run.shared.offer = hook
        runs.append(run)

    def loop(run):
        for _ in run.steps():
            time.sleep(0.005)
            if stop.is_set():
                break

    threads = [threading.Thread(target=loop, args=(r,), daemon=True) for r in runs]
    for t in threads:
        t.start()
    for r in runs:
        r.agent.joined.wait(10)
    await asyncio.sleep(1.0)
    conn = await connect(url, name="bench")
    lat = []
    for k in range(n_sets):
        req = ControlRequest(op="set", job_id=job, values={"lr": 0.1 / (k + 2)})
        reply = decode(
            await conn.request(names.control_subject(job), encode(req), timeout_s=5), ControlReply
        )
        if not reply.ok:
            raise RuntimeError(reply.error)
        issued = None
        deadline = time.time() + 5
        while len(received.get(reply.version, [])) < n_ranks and time.time() < deadline:
            await asyncio.sleep(0.0005)
        got = received.get(reply.version, [])
        issued = runs[0].shared.doc.latest().issued_ts if runs[0].shared.doc else None
        if len(got) == n_ranks and issued is not None:
            lat.append(max(got) - issued)
        await asyncio.sleep(0.05)  # 20 changes/s: a busy policy loop, not a flood
    await conn.close()
    stop.set()
    for r in runs:
        r.close()
    return lat


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--sets", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        stack = UpProcess(Path(tmp) / "state")
        try:
            print(
                f"# torchloom benchmark — {date.today()} — {platform.node()}, {platform.machine()}, "
                f"{len(__import__('os').sched_getaffinity(0))} cores, Python {platform.python_version()}, torch {torch.__version__}"
            )
            print(
                f"\n## (a) per-step cost ({args.steps} steps × {args.rounds} rounds, medians; Threadlet connected, "
                "telemetry every 200 ms)\n"
            )
            rows = bench_step_cost(stack.nats_url, steps=args.steps, rounds=args.rounds)
            print(
                "| workload | plain loop µs/step | with torchloom µs/step | difference µs/step | plain-loop spread between rounds |"
            )
            print("|---|---:|---:|---:|---:|")
            for name, b, t, d, spread in rows:
                print(f"| {name} | {b:.2f} | {t:.2f} | {d:.2f} | {spread * 100:.1f}% |")
            own = rows[0][3]
            step = rows[2][1]
            print(
                f"\ntorchloom's own cost per step (empty-step difference): {own:.2f} µs = "
                f"{own / step * 100:.2f}% of the {step:.0f} µs MLP step. The direct MLP difference is "
                "only meaningful when it is well above the plain loop's own spread."
            )
            print(
                f"\n## (b) control latency: `set` accepted → every rank's Threadlet holds the new version "
                f"({args.sets} sets each)\n"
            )
            print("| ranks | p50 ms | p99 ms | max ms | sets measured |")
            print("|---:|---:|---:|---:|---:|")
            for n in args.ranks:
                lat = asyncio.run(
                    _set_latencies(stack.nats_url, n_ranks=n, n_sets=args.sets, job=f"lat{n}")
                )
                print(
                    f"| {n} | {pct(lat, 50) * 1e3:.2f} | {pct(lat, 99) * 1e3:.2f} | {max(lat) * 1e3:.2f} | {len(lat)} |"
                )
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
