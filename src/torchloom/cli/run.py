"""``torchloom run``: a job as N replica groups, restarted when one fails
(:class:`torchloom.supervisor.Supervisor` does the work)."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from torchloom.cli.options import JobOpt, NatsUrl, StateDir, out
from torchloom.client import WeaverClient
from torchloom.errors import InvalidRequestError
from torchloom.launch import visible_gpus
from torchloom.paths import ENV_NATS_URL, default_state_dir, read_endpoint, resolve_nats_url
from torchloom.protocol import HistoryEvent
from torchloom.scheduler import KubernetesScheduler, scheduler_for
from torchloom.secure import job_env
from torchloom.supervisor import RestartPolicy, Supervisor, script_argv


def run(
    command: Annotated[
        list[str] | None, typer.Argument(help="the training command, after --")
    ] = None,
    replicas: Annotated[
        int, typer.Option("--replicas", "-n", help="replica groups (one torchrun each)")
    ] = 2,
    nproc_per_group: Annotated[
        int | None,
        typer.Option(
            "--nproc-per-group",
            help="ranks per replica group [default: the visible GPUs shared among the groups, "
            "1 on a CPU machine]",
        ),
    ] = None,
    max_restarts: Annotated[
        int, typer.Option("--max-restarts", help="restarts per replica group")
    ] = 3,
    backoff_s: Annotated[
        float, typer.Option("--backoff-s", help="wait before the first restart; doubles")
    ] = 1.0,
    job: JobOpt = None,
    lighthouse: Annotated[
        str | None,
        typer.Option(
            "--lighthouse",
            envvar="TORCHFT_LIGHTHOUSE",
            help="torchft lighthouse; default: the one `torchloom up` started",
        ),
    ] = None,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    scheduler: Annotated[
        str,
        typer.Option(
            "--scheduler",
            help="what starts the groups: local (torchrun here), slurm (one srun job step "
            "each; a drained group's node is set DRAIN) or kubernetes (a Job starts them: "
            "this only follows drains, cordons the node and deletes the group's pods)",
        ),
    ] = "local",
    partition: Annotated[
        str | None, typer.Option("--partition", help="Slurm partition [default: the cluster's]")
    ] = None,
    namespace: Annotated[
        str, typer.Option("--namespace", help="Kubernetes namespace of the training pods")
    ] = "default",
    evaluator: Annotated[
        str | None,
        typer.Option(
            "--evaluator",
            help="a command started beside the groups that scores each complete checkpoint "
            '(torchloom.evaluator), e.g. "python examples/gpt/evaluate.py"; it is given '
            "--evaluator-timeout-s after training ends to score the last ones",
        ),
    ] = None,
    evaluator_timeout_s: Annotated[
        float, typer.Option("--evaluator-timeout-s", help="see --evaluator (seconds)")
    ] = 300.0,
) -> None:
    """Launch a job as N replica groups (torchrun each) and restart a group that fails.

    Example: torchloom run --replicas 2 -- python -m torchloom.examples.mnist.train --ft
    On Slurm (inside an allocation or not): torchloom run --scheduler slurm --replicas 2 -- …
    """
    if nproc_per_group is None:
        nproc_per_group = max(1, visible_gpus() // max(replicas, 1))
    if replicas < 1 or nproc_per_group < 1:
        raise InvalidRequestError("--replicas and --nproc-per-group must be >= 1")
    sdir = state_dir or default_state_dir()
    url = resolve_nats_url(nats_url, sdir)
    if scheduler == "kubernetes":  # a JobSet starts the groups: follow the drains only
        if not (url and job):
            raise InvalidRequestError("--scheduler kubernetes needs --job and a NATS URL")
        _follow_drains_on_kubernetes(
            KubernetesScheduler(jobset=job, namespace=namespace), url, sdir, job
        )
        return
    try:
        script = script_argv(list(command or []))
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    adapter = scheduler_for(scheduler, **({"partition": partition} if scheduler == "slurm" else {}))
    lighthouse = lighthouse or (read_endpoint(sdir) or {}).get("lighthouse_url")
    env = {
        k: v
        for k, v in (
            (ENV_NATS_URL, url),
            ("TORCHFT_LIGHTHOUSE", lighthouse),
            ("TORCHLOOM_JOB", job),
        )
        if v
    }
    env.update(job_env(sdir, job) if url else {})
    if not url:
        out.print("[yellow]no torchloom found (torchloom up): the groups train without control[/]")
    if not lighthouse:
        out.print("[yellow]no torchft lighthouse known: a --ft job cannot form a quorum[/]")
    log_dir = sdir / "run" / (job or "job")
    sup = Supervisor(
        script=script,
        replicas=replicas,
        nproc_per_group=nproc_per_group,
        env=env,
        log_dir=log_dir,
        policy=RestartPolicy(max_restarts=max_restarts, backoff_s=backoff_s),
        say=_say,
        scheduler=adapter,
        job=job or "job",
    )

    if url and job:
        _follow_replacements(
            WeaverClient(nats_url=url, state_dir=sdir), job, sup, since_ts=time.time()
        )

    def _term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    scorer = _start_evaluator(evaluator, env=env, log_dir=log_dir) if evaluator else None
    try:
        rc = sup.run()
        if scorer is not None:
            _say(f"[evaluator] scoring the last checkpoints (at most {evaluator_timeout_s:g} s)")
            with contextlib.suppress(subprocess.TimeoutExpired):
                scorer.wait(evaluator_timeout_s)
    except KeyboardInterrupt:
        out.print("stopping every replica group…")
        sup.stop()
        rc = 130
    finally:
        if scorer is not None:
            _end_evaluator(scorer)
    raise typer.Exit(rc)


def _start_evaluator(
    command: str, *, env: dict[str, str], log_dir: Path
) -> subprocess.Popen[bytes]:
    """Start the evaluator command (split like a shell would), its output in ``evaluator.log``."""
    argv = shlex.split(command)
    if not argv:
        raise InvalidRequestError("--evaluator is an empty command")
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "evaluator.log"
    with path.open("ab") as log:
        try:
            proc = subprocess.Popen(
                argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise InvalidRequestError(f"--evaluator {command!r} did not start: {exc}") from None
    _say(f"[evaluator] started (pid {proc.pid}): {command}; log: {path}")
    return proc


def _end_evaluator(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _say(f"[evaluator] exited with code {proc.returncode}")


def _say(line: str) -> None:
    out.print(f"{time.strftime('%H:%M:%S')} {line}", highlight=False, markup=False)


def replaced_groups(ev: HistoryEvent, *, since_ts: float) -> list[int]:
    """The replica groups a drain asked to replace (``drain --replace``, or a policy's), if
    ``ev`` is such a drain recorded at ``since_ts`` (Unix s) or later; else none."""
    if not (
        ev.ts >= since_ts
        and ev.kind == "config_set"
        and ev.data.get("op") == "drain"
        and ev.data.get("replace")
    ):
        return []
    return [int(rid) for rid in ev.data.get("drain", []) if str(rid).isdigit()]


def _follow_drains_on_kubernetes(
    adapter: KubernetesScheduler, url: str, sdir: Path, job: str
) -> None:
    """Until interrupted: for every drain with replacement of the job, cordon the group's
    node and delete its pods (its Job starts new ones on another node)."""
    since = time.time()

    def on_event(ev: HistoryEvent) -> None:
        for rid in replaced_groups(ev, since_ts=since):
            try:
                node = adapter.node_of_group(rid)
                if node:
                    _say(
                        adapter.drain_node(node, reason=f"torchloom: group {rid} of {job} drained")
                    )
                n = adapter.replace_group(rid)
                _say(f"[replica {rid}] {n} pod(s) deleted; its Job starts new ones elsewhere")
            except Exception as exc:  # an API error must not end the follower
                _say(f"[replica {rid}] not replaced: {exc}")

    _say(f"following drains of {job} (Kubernetes namespace {adapter.namespace})")
    with contextlib.suppress(KeyboardInterrupt):
        WeaverClient(nats_url=url, state_dir=sdir).history(job, follow=True, on_event=on_event)


def _follow_replacements(
    client: WeaverClient, job: str, sup: Supervisor, *, since_ts: float
) -> None:
    """Watch the job's history for drains that asked for a replacement (a daemon thread)."""

    def on_event(ev: HistoryEvent) -> None:
        for rid in replaced_groups(ev, since_ts=since_ts):
            sup.request_replacement(rid)

    def follow() -> None:
        with contextlib.suppress(Exception):
            client.history(job, follow=True, on_event=on_event)

    threading.Thread(target=follow, name="torchloom-run-history", daemon=True).start()
