"""``torchloom sim``: simulated ranks with injected faults, against the running Weaver or in virtual time."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from torchloom.cli import render
from torchloom.cli.options import NatsUrl, StateDir, out
from torchloom.errors import InvalidRequestError, NotReachableError
from torchloom.paths import resolve_nats_url
from torchloom.protocol import HistoryEvent


def sim(
    groups: Annotated[int, typer.Option("--groups", help="replica groups at the start")] = 4,
    ranks_per_group: Annotated[int, typer.Option("--ranks-per-group")] = 1,
    duration_s: Annotated[float, typer.Option("--duration-s", help="how long, in seconds")] = 60.0,
    global_batch: Annotated[int, typer.Option("--global-batch", help="samples per step")] = 256,
    noise: Annotated[
        float, typer.Option("--noise", help="σ of the lognormal compute noise")
    ] = 0.05,
    slow: Annotated[
        list[str] | None,
        typer.Option(
            "--slow", help="REPLICA:AT_S:FACTOR — compute × FACTOR from AT_S (repeatable)"
        ),
    ] = None,
    nan: Annotated[
        list[str] | None, typer.Option("--nan", help="REPLICA:AT_S — a NaN loss at AT_S")
    ] = None,
    degrade: Annotated[
        list[str] | None,
        typer.Option("--degrade", help="REPLICA:AT_S[:RATE] — device degrades, fails 30 s later"),
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    job: Annotated[str, typer.Option("--job", "-j", help="job id of the simulated job")] = "sim",
    virtual: Annotated[
        bool,
        typer.Option(
            "--virtual", help="run in virtual time in this process with the default policies"
        ),
    ] = False,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
) -> None:
    """Simulate a job of many ranks with injected slowdowns, noise, NaNs and failing devices;
    the Weaver's policies see it as a real job. Prints the job's history as it happens."""
    from torchloom.sim import Fault, SimSpec

    try:
        faults = [
            Fault.parse(kind, text)
            for kind, texts in (("slow", slow), ("nan", nan), ("degrade", degrade))
            for text in texts or []
        ]
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    if groups < 1 or ranks_per_group < 1 or global_batch < groups:
        raise InvalidRequestError(
            "need --groups >= 1, --ranks-per-group >= 1, --global-batch >= --groups"
        )
    spec = SimSpec(
        job_id=job,
        groups=groups,
        ranks_per_group=ranks_per_group,
        global_batch=global_batch,
        noise=noise,
        seed=seed,
        faults=faults,
    )

    def show(ev: HistoryEvent) -> None:
        if ev.kind not in ("config_applied", "rank_training", "quorum_changed"):
            out.print(render.event_line(ev))

    if virtual:
        from torchloom.sim.virtual import run_virtual

        run = run_virtual(spec, duration_s=duration_s)
        for ev in sorted(run.events, key=lambda e: e.ts):
            show(ev)
        for t, d, done in run.decisions:
            out.print(
                f"{t:8.1f} s  policy {d.policy}: {d.reason}" + ("" if done else " [not done]")
            )
        sim_job = run.job
    else:
        url = resolve_nats_url(nats_url, state_dir)
        if not url:
            raise NotReachableError("no torchloom is running here: start one with `torchloom up`")
        from torchloom.sim.live import run_live

        out.print(
            f"simulating job {job}: {groups} group(s) × {ranks_per_group} rank(s) for {duration_s:g} s on {url}"
        )
        sim_job = asyncio.run(run_live(spec, nats_url=url, duration_s=duration_s, on_event=show))
    out.print(
        f"done: {sim_job.step} steps, {sim_job.samples} samples, "
        f"{len(sim_job.groups)} group(s) at the end, failed: {[r for r, _ in sim_job.failed] or 'none'}"
    )
