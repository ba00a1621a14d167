"""Benchmark: the dashboard with many ranks — update-to-paint in the browser, push traffic per page.

Run:  python bench/dashboard.py [--ranks 8 256] [--hz 4] [--measure-s 20]

A real `torchloom up` (NATS, Weaver, dashboard) in its own process; simulated ranks in
another (one NATS connection, N ranks publishing real Telemetry messages at R Hz each,
8 ranks per host, replica groups of 8 ranks); the page in Debian's Chromium (headless,
Playwright). For each N, after the page shows all N ranks and a 3 s warm-up:

* update→paint: from a frame's arrival in the page (EventSource message) to the
  animation frame after the one that rendered it (an upper bound on the time to paint;
  measured in the page with performance.now());
* long tasks: main-thread tasks over 50 ms (the browser's PerformanceObserver);
* push traffic: frames/s and kB/s received by the page, kB per frame;
* Weaver CPU: the `torchloom up` process (NATS server not included), in % of one core.

The smallest N is the baseline: ratios of the others are printed against it.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import psutil

from torchloom.protocol import MetricPoint, Telemetry, encode, names
from torchloom.transport import connect
from up_process import UpProcess  # bench/ is on sys.path when run as a script

RANKS_PER_HOST = 8
GROUP_SIZE = 8
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


async def simulate(nats_url: str, *, job: str, ranks: int, hz: float, duration_s: float) -> None:
    """Publish telemetry of ``ranks`` simulated ranks at ``hz`` each, spread over the period."""
    conn = await connect(nats_url, name="dashboard-bench-sim")
    rng = random.Random(0)
    t0 = time.time()
    period_s = 1.0 / hz
    seq = 0
    slow = {rng.randrange(ranks) for _ in range(max(1, ranks // 64))}  # a few stragglers
    while time.time() - t0 < duration_s:
        tick = time.monotonic()
        seq += 1
        for i in range(ranks):
            now = time.time()
            step_time = 0.1 * (1.6 if i in slow else 1.0) * rng.uniform(0.95, 1.05)
            step = int((now - t0) / step_time)
            loss = 2.3 * math.exp(-step / 400.0) + rng.uniform(0, 0.05)
            points = [MetricPoint(step=step, ts=now, values={"loss": loss})]
            if seq % 20 == 0:
                points.append(MetricPoint(step=step, ts=now, values={"test_acc": 1 - loss / 3}))
            tel = Telemetry(
                job_id=job,
                replica_id=str(i // GROUP_SIZE),
                rank=i % GROUP_SIZE,
                group_world_size=GROUP_SIZE,
                seq=seq,
                ts=now,
                step=step,
                step_time_s=step_time,
                samples_per_s=64 / step_time,
                points=points,
                host=f"node-{i // RANKS_PER_HOST:03d}",
                pid=100_000 + i,
                device=f"cuda:GPU-{i:04x}-{i % RANKS_PER_HOST}",
            )
            await conn.publish(names.telemetry_subject(job, tel.replica_id, tel.rank), encode(tel))
            if i % 16 == 15:  # spread the ranks over the period, as real ranks are
                await asyncio.sleep(period_s * 16 / ranks * 0.9)
        await asyncio.sleep(max(0.0, period_s - (time.monotonic() - tick)))
    await conn.close()


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


INSTALL_OBSERVER = """() => {
  window.__loomLong = [];
  new PerformanceObserver((l) => l.getEntries().forEach((e) => window.__loomLong.push(e.duration)))
    .observe({ type: "longtask", buffered: false });
  Object.assign(window.__loomPerf, { frames: 0, bytes: 0, paint_ms: [] });
}"""


def measure(browser, up: UpProcess, *, ranks: int, hz: float, measure_s: float) -> dict:
    job = f"sim{ranks}"
    sim = subprocess.Popen(
        [sys.executable, __file__, "--simulate", up.nats_url, "--job", job,
         "--ranks", str(ranks), "--hz", str(hz), "--duration-s", str(measure_s + 60)],
    )  # fmt: skip
    weaver = psutil.Process(up.proc.pid)
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    try:
        page.goto(f"{up.ui_url}?job={job}")
        page.wait_for_function(
            f"document.querySelectorAll('#drmap .chip').length === {ranks}", timeout=60_000
        )
        page.wait_for_timeout(3000)
        page.evaluate(INSTALL_OBSERVER)
        weaver.cpu_percent()
        page.wait_for_timeout(int(measure_s * 1000))
        cpu = weaver.cpu_percent()
        perf = page.evaluate("({...window.__loomPerf, long: window.__loomLong})")
    finally:
        page.close()
        sim.terminate()
        sim.wait(10)
    paint = perf["paint_ms"]
    return {
        "ranks": ranks,
        "hz": hz,
        "frames_per_s": perf["frames"] / measure_s,
        "kb_per_s": perf["bytes"] / measure_s / 1000,
        "kb_per_frame": perf["bytes"] / max(1, perf["frames"]) / 1000,
        "p50": statistics.median(paint) if paint else float("nan"),
        "p95": percentile(paint, 0.95),
        "p99": percentile(paint, 0.99),
        "max": max(paint) if paint else float("nan"),
        "long_tasks": len(perf["long"]),
        "long_ms": sum(perf["long"]),
        "cpu": cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 256])
    ap.add_argument("--hz", type=float, default=4.0, help="telemetry rate of each rank")
    ap.add_argument("--measure-s", type=float, default=20.0)
    ap.add_argument("--simulate", metavar="NATS_URL", help=argparse.SUPPRESS)
    ap.add_argument("--job", default="sim", help=argparse.SUPPRESS)
    ap.add_argument("--duration-s", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.simulate:
        asyncio.run(
            simulate(
                args.simulate,
                job=args.job,
                ranks=args.ranks[0],
                hz=args.hz,
                duration_s=args.duration_s,
            )
        )
        return

    from playwright.sync_api import sync_playwright

    rows = []
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        up = UpProcess(Path(tmp) / "state", "--ui-port", "0")
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            for n in sorted(args.ranks):
                rows.append(measure(browser, up, ranks=n, hz=args.hz, measure_s=args.measure_s))
                print(f"  measured {n} ranks", file=sys.stderr)
        finally:
            browser.close()
            up.stop()
    base = rows[0]
    print(
        f"\ndashboard, {date.today()}, {platform.node()} ({psutil.cpu_count()} cores), "
        f"{args.hz:g} Hz per rank, {args.measure_s:g} s per row, push interval 500 ms\n"
    )
    print(
        "| ranks | frames/s | kB/s per page | kB/frame | update→paint p50 / p95 / p99 / max (ms) "
        "| long tasks (total ms) | Weaver CPU | p99 vs baseline |"
    )
    print("| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['ranks']} | {r['frames_per_s']:.2f} | {r['kb_per_s']:.1f} | "
            f"{r['kb_per_frame']:.1f} | {r['p50']:.0f} / {r['p95']:.0f} / {r['p99']:.0f} / "
            f"{r['max']:.0f} | {r['long_tasks']} ({r['long_ms']:.0f}) | {r['cpu']:.0f} % | "
            f"{r['p99'] / base['p99']:.2f}× |"
        )
    worst = rows[-1]
    verdict = "met" if worst["p99"] < 250 else "MISSED"
    print(
        f"\ntarget update→paint < 250 ms at {worst['ranks']} ranks: {verdict} (p99 {worst['p99']:.0f} ms)"
    )


if __name__ == "__main__":
    main()
