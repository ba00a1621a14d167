"""Policies on the simulator, several seeds: straggler detection delay, false positives over
healthy 10-minute runs, throughput recovered by rebalancing, NaN reaction, and the lead time
of proactive drains before the device would have failed.

Runs the simulator in virtual time (:mod:`torchloom.sim.virtual`): the Weaver's own state,
control entry point and policy engine with their default parameters, no I/O. The same
model runs against a real Weaver on NATS with ``torchloom sim``.

    python bench/policies.py [--seeds 5] [--groups 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

from torchloom.sim import Fault, SimSpec
from torchloom.sim.virtual import run_virtual

SLOW_AT_S = 60.0


def first(run, policy, after_s=0.0):
    return next(((t, d) for t, d, _ in run.decisions if d.policy == policy and t >= after_s), None)


def straggler_case(seed: int, groups: int, factor: float) -> dict[str, float | None]:
    spec = SimSpec(groups=groups, seed=seed, faults=[Fault("slow", "1", SLOW_AT_S, factor)])
    run = run_virtual(spec, duration_s=150.0)
    hit = first(run, "straggler")
    out: dict[str, float | None] = {"delay_s": None, "before": None, "slowed": None, "after": None}
    job = run.job
    out["before"] = job.mean_throughput(SLOW_AT_S - 30, SLOW_AT_S)
    if hit is None or hit[0] < SLOW_AT_S:
        out["false_alarm"] = float(hit is not None)
        return out
    t, _ = hit
    out["delay_s"] = t - SLOW_AT_S
    out["slowed"] = job.mean_throughput(SLOW_AT_S + 0.5, t)
    out["after"] = job.mean_throughput(t + 10, 150.0)
    # the best any split can do (no noise): every group busy for the same time
    speeds = [1.0] * (groups - 1) + [1.0 / factor]
    work = spec.sample_s * spec.global_batch
    out["ideal_ratio"] = (work / groups + spec.allreduce_s) / (
        work / sum(speeds) + spec.allreduce_s
    )
    return out


def healthy_case(seed: int, groups: int, noise: float, drift: float = 0.0) -> dict[str, int]:
    """Decisions of each policy over a 10-minute run with no fault injected."""
    run = run_virtual(SimSpec(groups=groups, seed=seed, noise=noise, drift=drift), duration_s=600.0)
    out = {"straggler": 0, "divergence": 0, "failure": 0}
    for _, d, _ in run.decisions:
        out[d.policy] = out.get(d.policy, 0) + 1
    return out


def fault_case(seed: int, groups: int) -> dict[str, float | None]:
    spec = SimSpec(
        groups=groups,
        seed=seed,
        faults=[Fault("nan", "0", 40.0), Fault("degrade", "2", 60.0, 1.0)],
    )
    run = run_virtual(spec, duration_s=120.0)
    nan = first(run, "divergence", 40.0)
    drain = first(run, "failure", 60.0)
    return {
        "nan_delay_s": nan[0] - 40.0 if nan else None,
        "drain_lead_s": spec.fail_after_s - (drain[0] - 60.0) if drain else None,
        "failed": float(bool(run.job.failed)),
    }


def fmt(xs, unit="", digits=1):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    return f"{statistics.median(xs):.{digits}f}{unit} (max {max(xs):.{digits}f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--groups", type=int, default=8)
    args = ap.parse_args()
    seeds = range(args.seeds)
    t0 = time.perf_counter()
    print(
        f"policies on the simulator: {args.groups} replica groups, {args.seeds} seeds, defaults\n"
    )
    print(
        "| case | detection delay (s), median (max) | missed | throughput slowed → rebalanced (× of healthy) | ideal |"
    )
    print("| --- | --- | --- | --- | --- |")
    for factor in (1.3, 1.5, 2.0):
        rows = [straggler_case(s, args.groups, factor) for s in seeds]
        missed = sum(1 for r in rows if r["delay_s"] is None)
        slowed = [r["slowed"] / r["before"] for r in rows if r["slowed"] and r["before"]]
        after = [r["after"] / r["before"] for r in rows if r["after"] and r["before"]]
        ideal = [r["ideal_ratio"] for r in rows if r.get("ideal_ratio")]
        print(
            f"| one group {round((factor - 1) * 100)} % slower | {fmt([r['delay_s'] for r in rows], ' s')} "
            f"| {missed}/{len(rows)} | {statistics.mean(slowed):.3f} → {statistics.mean(after):.3f} "
            f"| {statistics.mean(ideal):.3f} |"
        )
    print()
    print(
        "| healthy 10-minute run | runs with a straggler flag | straggler flags per rank-hour "
        "| divergence actions | failure drains |"
    )
    print("| --- | --- | --- | --- | --- |")
    for noise, drift in ((0.05, 0.0), (0.10, 0.0), (0.20, 0.0), (0.30, 0.0), (0.10, 0.10)):
        runs = [healthy_case(s, args.groups, noise, drift) for s in seeds]
        hours = len(runs) * args.groups * 600 / 3600
        flags = [r["straggler"] for r in runs]
        what = f"compute noise σ = {noise:.2f}" + (
            f" + slow drift σ = {drift:.2f} (a noisy neighbour)" if drift else ""
        )
        print(
            f"| {what} | {sum(1 for f in flags if f)}/{len(runs)} "
            f"| {sum(flags) / hours:.3f} | {sum(r['divergence'] for r in runs)} "
            f"| {sum(r['failure'] for r in runs)} |"
        )
    print()
    faults = [fault_case(s, args.groups) for s in seeds]
    print("| fault | reaction, median (max) | outcome |")
    print("| --- | --- | --- |")
    print(
        f"| NaN loss | lr lowered {fmt([f['nan_delay_s'] for f in faults], ' s')} after it | training goes on |"
    )
    failed = sum(int(f["failed"] or 0) for f in faults)
    print(
        f"| device degrading (fails 30 s in) | drained {fmt([f['drain_lead_s'] for f in faults], ' s')} "
        f"before the failure | {failed}/{len(faults)} runs saw the failure |"
    )
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
