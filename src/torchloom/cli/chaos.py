"""``torchloom chaos``: fault injection on a live job (SIGKILL of a rank every interval)."""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from typing import Annotated

import typer

from torchloom.chaos import choose_victim, parse_duration
from torchloom.cli.options import JobOpt, NatsUrl, StateDir, out, pick_job, weaver_client
from torchloom.errors import InvalidRequestError


def chaos(
    kill_every: Annotated[
        str, typer.Option("--kill-every", help="time between kills, e.g. 30s, 500ms, 2m")
    ] = "30s",
    target: Annotated[
        str, typer.Option("--target", help="'random' or a replica group id")
    ] = "random",
    seed: Annotated[int | None, typer.Option("--seed", help="seed of the victim choice")] = None,
    duration: Annotated[
        str | None, typer.Option("--duration", help="stop after this long (default: until Ctrl-C)")
    ] = None,
    kills: Annotated[int | None, typer.Option("--kills", help="stop after this many kills")] = None,
    job: JobOpt = None,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
) -> None:
    """Fault injection: SIGKILL a live rank of the job (on this host) every interval.

    The interval runs from one kill to the next; when it is up and no rank of the target is
    live (a killed group still restarting), the next kill waits for one."""
    try:
        every_s = parse_duration(kill_every)
        until = time.monotonic() + parse_duration(duration) if duration else None
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    client = weaver_client(nats_url, state_dir)
    job_id = pick_job(client, job)
    rng, host, done = random.Random(seed), socket.gethostname(), 0
    out.print(f"chaos on job {job_id}: a kill every {every_s:g} s, target {target}, seed {seed}")

    def time_left() -> bool:
        return until is None or time.monotonic() < until

    try:
        next_kill = time.monotonic() + every_s
        while (kills is None or done < kills) and time_left():
            time.sleep(max(0.0, min(next_kill, until or next_kill) - time.monotonic()))
            waiting = False
            while time_left():
                jobs = client.status(job_id, states=["live"], limit=1000).get("jobs", [])
                victim = choose_victim(
                    jobs[0]["ranks"] if jobs else [], target=target, host=host, rng=rng
                )
                if victim is not None:
                    try:
                        os.kill(int(victim["pid"]), signal.SIGKILL)
                    except ProcessLookupError:  # dead already, not yet marked failed
                        victim = None
                if victim is not None:
                    break
                if not waiting:
                    out.print(
                        f"{time.strftime('%H:%M:%S')} no live rank of {target} on {host} yet: "
                        "waiting for one",
                        markup=False,
                    )
                    waiting = True
                time.sleep(0.5)
            else:
                break
            done += 1
            next_kill = time.monotonic() + every_s
            out.print(
                f"{time.strftime('%H:%M:%S')} killed rank {victim['replica_id']}/{victim['rank']} "
                f"(pid {victim['pid']}) at step {victim['step']}",
                markup=False,
            )
    except KeyboardInterrupt:
        pass
    out.print(f"chaos done: {done} kill(s)")
