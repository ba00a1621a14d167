"""The ``torchloom`` command (Typer + Rich).

A user mistake (unknown knob, bad value, no Weaver reachable) prints one line
and exits non-zero: 2 for a refused request, 3 when nothing answers, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from torchloom.cli import render
from torchloom.cli.client import WeaverClient, who
from torchloom.cli.launcher import RestartPolicy, Supervisor, kill_tree, script_argv
from torchloom.cli.options import (
    JobOpt,
    NatsUrl,
    StateDir,
    TimeoutOpt,
    err,
    out,
    parse_assignments,
)
from torchloom.cli.options import pick_job as _pick_job
from torchloom.cli.options import weaver_client as _client
from torchloom.cli.policy import app as policy_app
from torchloom.cli.printer import EventPrinter
from torchloom.cli.sim import sim as sim_command
from torchloom.cli.up import Stack
from torchloom.errors import (
    InvalidRequestError,
    LeadershipLostError,
    NotReachableError,
    TorchloomError,
)
from torchloom.paths import (
    DEFAULT_UI_PORT,
    ENV_NATS_URL,
    default_state_dir,
    read_endpoint,
    resolve_nats_url,
)
from torchloom.protocol import ControlRequest, HistoryEvent, to_builtins
from torchloom.secure import job_env
from torchloom.weaver import ControlSettings, LivenessConfig

app = typer.Typer(
    name="torchloom",
    help="An active controller for distributed PyTorch training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# ---- up / demo ---------------------------------------------------------------------------


def _stack(
    state_dir: Path | None,
    nats_url: str | None,
    nats_port: int | None,
    failure_timeout_s: float,
    hang_timeout_s: float,
    lead_time_s: float,
    on_event: Any,
    lighthouse: str | None = "auto",
    lighthouse_heartbeat_timeout_ms: int = 1000,
    ui: dict[str, Any] | None = None,
    policy_file: Path | None = None,
    security: dict[str, Any] | None = None,
    nice: int | None = None,
) -> Stack:
    return Stack(
        nice=nice,
        **(ui or {}),
        **(security or {}),
        policy_file=policy_file,
        lighthouse=lighthouse,
        lighthouse_heartbeat_timeout_ms=lighthouse_heartbeat_timeout_ms,
        state_dir=state_dir or default_state_dir(),
        nats_url=nats_url,
        nats_port=nats_port,
        liveness=LivenessConfig(
            failure_timeout_s=failure_timeout_s,
            suspect_after_s=failure_timeout_s * 0.6,  # a late heartbeat, not a missed one
            hang_timeout_s=hang_timeout_s,
        ),
        control_settings=ControlSettings(lead_time_s=lead_time_s),
        on_event=on_event,
    )


UiPortOpt = Annotated[
    int | None,
    typer.Option(
        "--ui-port",
        help=f"port of the dashboard, HTTP API and /metrics (0 picks a free one) "
        f"[default: {DEFAULT_UI_PORT}, or a free one when it is taken]",
        show_default=False,
    ),
]
UiHostOpt = Annotated[
    str,
    typer.Option("--ui-host", help="interface the dashboard binds; beyond loopback needs a token"),
]
SecureOpt = Annotated[
    bool | None,
    typer.Option(
        "--secure/--no-secure",
        help="nkey credentials per role, TLS and per-job permissions on NATS, HTTPS and a "
        "token on the dashboard [default: on when NATS or the dashboard binds beyond loopback]",
        show_default=False,
    ),
]
NatsHostOpt = Annotated[
    str,
    typer.Option("--nats-host", help="interface the embedded NATS binds (beyond loopback: secure)"),
]
TlsOpt = Annotated[Path | None, typer.Option(help="PEM file (default: made for this state dir)")]
UiTokenOpt = Annotated[
    str | None,
    typer.Option(
        "--ui-token",
        envvar="TORCHLOOM_UI_TOKEN",
        help="bearer token for the dashboard and API (turns authentication on)",
        show_default=False,
    ),
]
NoUiOpt = Annotated[bool, typer.Option("--no-ui", help="serve no dashboard")]
PoliciesOpt = Annotated[
    Path | None,
    typer.Option(
        "--policies",
        help="TOML settings of the policies (enabled, dry_run, parameters) [default: the stored "
        "settings, else straggler, divergence and failure on]",
        show_default=False,
    ),
]


def _ui(host: str, port: int | None, token: str | None, off: bool) -> dict[str, Any]:
    return {
        "ui_host": host,
        "ui_port": None if off else (DEFAULT_UI_PORT if port is None else port),
        "ui_token": token,
        "ui_port_fallback": port is None,
    }


LighthouseOpt = Annotated[
    str,
    typer.Option(
        "--lighthouse",
        help="torchft lighthouse URL; 'auto' starts one if torchft is installed; 'none' starts none",
    ),
]
LighthouseHbOpt = Annotated[
    int,
    typer.Option(
        "--lighthouse-heartbeat-timeout-ms", help="heartbeat timeout of the embedded lighthouse"
    ),
]


def _lighthouse_arg(value: str) -> str | None:
    return None if value.lower() in ("none", "off", "") else value


FailOpt = Annotated[
    float,
    typer.Option(
        "--failure-timeout-s",
        help="no heartbeat for this long → failed (60 % of it late → suspect)",
    ),
]
HangOpt = Annotated[
    float, typer.Option("--hang-timeout-s", help="step not moving for this long → hung")
]
LeadOpt = Annotated[
    float, typer.Option("--lead-time-s", help="time budget for a change to reach every rank")
]
NiceOpt = Annotated[
    int,
    typer.Option(
        "--nice",
        help="nice value of NATS and the Weaver where permitted (root or CAP_SYS_NICE): "
        "answers within milliseconds while training keeps every core busy; 0 leaves it",
    ),
]
PortOpt = Annotated[
    int | None, typer.Option("--nats-port", help="port of the embedded NATS [default: a free one]")
]


class _Stop(Exception):
    pass


def _wait_for_signal(stack: Stack, *, poll_s: float = 0.2) -> str:
    stopping = threading.Event()

    def _handler(signum: int, _frame: Any) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    while not stopping.wait(poll_s):
        if not stack.alive():
            error = stack.error
            if isinstance(error, LeadershipLostError):
                return f"this Weaver stepped down: {error.message}"
            if isinstance(error, TorchloomError):
                return error.message
            if error is not None:  # a bug: say what it was, in one line
                return f"{type(error).__name__}: {error}"
            return "a component stopped unexpectedly"
    return "signal"


def _secure_lines(stack: Stack) -> list[Text]:
    sd = stack.secure_dir
    if sd is None:
        return [Text.assemble(("security  ", "bold"), "off (loopback only; --secure turns it on)")]
    return [
        Text.assemble(
            ("security  ", "bold"),
            f"TLS + nkeys per role ({sd.dir}); the dashboard token is in {sd.dir / 'dashboard.token'}",
        ),
        Text.assemble(
            ("jobs      ", "bold"),
            "export TORCHLOOM_CREDS=$(torchloom creds job JOB)  (torchloom run/demo do it for you)",
        ),
    ]


def _priority_line(stack: Stack) -> str:
    if stack.nice is None:
        return "as started (--nice 0)"
    if stack.nice_applied:
        return f"nice {stack.nice} for NATS and the Weaver: they answer first on busy cores"
    return f"unchanged: nice {stack.nice} needs root or CAP_SYS_NICE (--nice 0 says so quietly)"


def _lighthouse_line(stack: Stack) -> str:
    if stack.lighthouse_url:
        return f"{stack.lighthouse_url} (torchft)"
    if stack.lighthouse_arg is None:
        return "none (--lighthouse none)"
    return "none (torchft is not installed: pip install 'torchloom[torchft]')"


def _dashboard_line(stack: Stack) -> str:
    if stack.dashboard is None:
        return "none (--no-ui)"
    auth = "  (token required)" if stack.dashboard.access.required else ""
    return f"{stack.dashboard.url}  · API {stack.dashboard.url}api/openapi.json{auth}"


@app.command()
def up(
    state_dir: StateDir = None,
    nats_url: NatsUrl = None,
    nats_port: PortOpt = None,
    failure_timeout_s: FailOpt = 0.8,
    hang_timeout_s: HangOpt = 30.0,
    lead_time_s: LeadOpt = 0.5,
    lighthouse: LighthouseOpt = "auto",
    lighthouse_heartbeat_timeout_ms: LighthouseHbOpt = 1000,
    ui_port: UiPortOpt = None,
    ui_host: UiHostOpt = "127.0.0.1",
    ui_token: UiTokenOpt = None,
    no_ui: NoUiOpt = False,
    policies: PoliciesOpt = None,
    nats_host: NatsHostOpt = "127.0.0.1",
    secure: SecureOpt = None,
    tls_cert: TlsOpt = None,
    tls_key: TlsOpt = None,
    tls_ca: TlsOpt = None,
    nice: NiceOpt = -5,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Start NATS (embedded, on loopback), the torchft lighthouse (when torchft is installed)
    and the Weaver, and serve until Ctrl-C / SIGTERM.

    A second `up` on another state dir with --nats-url of the first's NATS is a standby
    Weaver: it takes over within seconds when the leader dies."""
    _logging(verbose)
    printer = EventPrinter(out)
    stack = _stack(
        state_dir,
        nats_url,
        nats_port,
        failure_timeout_s,
        hang_timeout_s,
        lead_time_s,
        on_event=printer.add,
        lighthouse=_lighthouse_arg(lighthouse),
        lighthouse_heartbeat_timeout_ms=lighthouse_heartbeat_timeout_ms,
        ui=_ui(ui_host, ui_port, ui_token, no_ui),
        policy_file=policies,
        security={
            "nats_host": nats_host,
            "secure": secure,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "tls_ca": tls_ca,
        },
        nice=nice or None,
    )
    stack.start()
    nats_where = (
        f"{stack.nats_url} (embedded, pid {stack.nats.proc.pid})"
        if stack.nats and stack.nats.proc
        else f"{stack.nats_url} (external)"
    )
    out.print(
        Panel.fit(
            Group(
                Text.assemble(("NATS      ", "bold"), nats_where),
                Text.assemble(
                    ("Weaver    ", "bold"),
                    f"pid {os.getpid()}, failure timeout {failure_timeout_s:g} s"
                    + (
                        ""
                        if stack.weaver is None or stack.weaver.role == "leader"
                        else " · STANDBY: another Weaver leads; this one takes over when it stops"
                    ),
                ),
                Text.assemble(("lighthouse", "bold"), " " + _lighthouse_line(stack)),
                Text.assemble(("dashboard ", "bold"), _dashboard_line(stack)),
                Text.assemble(("priority  ", "bold"), _priority_line(stack)),
                *_secure_lines(stack),
                Text.assemble(("state dir ", "bold"), str(stack.state_dir)),
                Text.assemble(
                    ("training  ", "bold"),
                    f"export {ENV_NATS_URL}={stack.nats_url}  (or same user/state dir: found automatically)",
                ),
                Text.assemble(
                    ("steer     ", "bold"),
                    "torchloom status · torchloom set lr=0.01 · torchloom events --follow · "
                    "torchloom policy list",
                ),
            ),
            title="torchloom up",
            border_style="green",
        )
    )
    printer.start()
    try:
        why = _wait_for_signal(stack)
    finally:
        out.print("[dim]shutting down…[/]")
        stack.stop()
        printer.stop()
    if why != "signal":
        raise TorchloomError(f"torchloom up stopped: {why}")


@app.command()
def creds(
    role: Annotated[str, typer.Argument(help="job, operator or weaver")],
    job: Annotated[str | None, typer.Argument(help="the job id (role job)")] = None,
    state_dir: StateDir = None,
) -> None:
    """Print the path of a role's credentials file of a secure `torchloom up` on this machine;
    for a job, issue them first if it has none (the running NATS reloads its users).

    Example: export TORCHLOOM_CREDS=$(torchloom creds job mnist)"""
    from torchloom.secure import SecureDir

    sdir = state_dir or default_state_dir()
    secure_dir = SecureDir(sdir)
    if not secure_dir.dir.exists():
        raise TorchloomError(f"{sdir} has no credentials: start `torchloom up --secure` there")
    if role == "job":
        if not job:
            raise InvalidRequestError("give the job id: torchloom creds job JOB")
        path = secure_dir.issue_job(job)
    elif role in ("operator", "weaver"):
        path = secure_dir.creds_file(role)  # type: ignore[arg-type]
    else:
        raise InvalidRequestError(f"unknown role {role!r}: use job, operator or weaver")
    print(path)


def _find_example() -> Path | None:
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *here.parents):
        candidate = base / "examples" / "mnist" / "train.py"
        if candidate.exists():
            return candidate
    return None


@app.command()
def demo(
    nproc: Annotated[int, typer.Option("--nproc", help="ranks (torchrun --nproc-per-node)")] = 2,
    max_steps: Annotated[int, typer.Option("--max-steps")] = 2000,
    job: Annotated[str, typer.Option("--job", "-j")] = "mnist",
    state_dir: StateDir = None,
    nats_url: NatsUrl = None,
    nats_port: PortOpt = None,
    script: Annotated[
        Path | None,
        typer.Option("--script", help="training script [default: examples/mnist/train.py]"),
    ] = None,
    failure_timeout_s: FailOpt = 0.8,
    hang_timeout_s: HangOpt = 30.0,
    lead_time_s: LeadOpt = 0.5,
    ui_port: UiPortOpt = None,
    ui_host: UiHostOpt = "127.0.0.1",
    ui_token: UiTokenOpt = None,
    no_ui: NoUiOpt = False,
    policies: PoliciesOpt = None,
    nice: NiceOpt = -5,
    extra: Annotated[
        list[str] | None, typer.Argument(help="extra arguments for the training script")
    ] = None,
) -> None:
    """Start torchloom and the MNIST job (torchrun, 2 ranks) with a live progress view."""
    _logging(False)
    script = script or _find_example()
    if script is None or not script.exists():
        raise TorchloomError(
            "examples/mnist/train.py not found: run from a torchloom checkout or pass --script"
        )
    events: list[HistoryEvent] = []
    stack = _stack(
        state_dir,
        nats_url,
        nats_port,
        failure_timeout_s,
        hang_timeout_s,
        lead_time_s,
        on_event=events.append,
        ui=_ui(ui_host, ui_port, ui_token, no_ui),
        policy_file=policies,
        nice=nice or None,
    )
    stack.start()
    env = {
        **os.environ,
        ENV_NATS_URL: stack.nats_url,
        "TORCHLOOM_JOB": job,
        **job_env(stack.state_dir, job),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(script),
        "--job-id",
        job,
        "--max-steps",
        str(max_steps),
        *(extra or []),
    ]
    log_path = stack.state_dir / f"demo-{job}.log"
    client = WeaverClient(nats_url=stack.nats_url, state_dir=stack.state_dir, timeout_s=2.0)
    out.print(
        f"[bold]torchloom demo[/]: NATS {stack.nats_url} · job [bold]{job}[/] · training log {log_path}"
    )
    out.print(f"dashboard: [bold cyan]{_dashboard_line(stack)}[/]")
    out.print(
        "steer it from another terminal:  [cyan]torchloom set lr=0.01 batch_size=128[/]  ·  "
        "[cyan]torchloom status[/]  ·  [cyan]torchloom events[/]  ·  [cyan]torchloom pause[/]/[cyan]resume[/]/[cyan]stop[/]"
    )
    t0 = time.time()
    rc: int | None = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            with Live(console=out, refresh_per_second=4, transient=False) as live:
                while rc is None:
                    rc = proc.poll()
                    live.update(_demo_view(client, job, events, time.time() - t0))
                    time.sleep(0.5)
                live.update(_demo_view(client, job, events, time.time() - t0))
        except KeyboardInterrupt:
            out.print("[yellow]interrupted: stopping the training job…[/]")
        finally:
            kill_tree(proc, graceful_s=15.0)
            stack.stop()
    out.print()
    tail = log_path.read_text(errors="replace").strip().splitlines()
    final = [line for line in tail if line.startswith("done at step")]
    out.print(final[-1] if final else "\n".join(tail[-5:]))
    out.print(_policy_summary(events))
    if rc not in (0, None):
        raise TorchloomError(f"the training job exited with code {rc}; see {log_path}")


def _policy_summary(events: list[HistoryEvent]) -> str:
    """``policy decisions: none`` or how many of which policy (a healthy demo should take none)."""
    counts: dict[str, int] = {}
    for ev in events:
        if ev.kind.startswith("policy_") and ev.kind != "policy_settings":
            counts[ev.kind] = counts.get(ev.kind, 0) + 1
    if not counts:
        return "policy decisions: none"
    what = ", ".join(f"{k.removeprefix('policy_')} ×{n}" for k, n in sorted(counts.items()))
    return f"policy decisions: {what} (torchloom events -k {min(counts)})"


def _demo_view(
    client: WeaverClient, job: str, events: list[HistoryEvent], elapsed_s: float
) -> Group:
    try:
        status = client.status(job)
        body: Any = render.status_view(status)
    except TorchloomError as exc:
        body = Text(f"(status unavailable: {exc})", style="yellow")
    recent = [render.event_line(ev) for ev in events if ev.kind not in ("rank_joining",)][-8:]
    return Group(
        Text(f"elapsed {elapsed_s:.0f} s", style="dim"),
        body,
        Text("recent events:", style="bold"),
        *recent,
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    command: Annotated[list[str], typer.Argument(help="the training command, after --")],
    replicas: Annotated[
        int, typer.Option("--replicas", "-n", help="replica groups (one torchrun each)")
    ] = 2,
    nproc_per_group: Annotated[
        int, typer.Option("--nproc-per-group", help="ranks per replica group")
    ] = 1,
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
) -> None:
    """Launch a job as N replica groups (torchrun each) and restart a group that fails.

    Example: torchloom run --replicas 2 -- python examples/mnist/train.py --ft
    """
    if replicas < 1 or nproc_per_group < 1:
        raise InvalidRequestError("--replicas and --nproc-per-group must be >= 1")
    try:
        script = script_argv(list(command))
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    sdir = state_dir or default_state_dir()
    url = resolve_nats_url(nats_url, sdir)
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
        say=lambda line: out.print(
            f"{time.strftime('%H:%M:%S')} {line}", highlight=False, markup=False
        ),
    )

    if url and job:
        _follow_replacements(
            WeaverClient(nats_url=url, state_dir=sdir), job, sup, since_ts=time.time()
        )

    def _term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    try:
        rc = sup.run()
    except KeyboardInterrupt:
        out.print("stopping every replica group…")
        sup.stop()
        rc = 130
    raise typer.Exit(rc)


def _follow_replacements(
    client: WeaverClient, job: str, sup: Supervisor, *, since_ts: float
) -> None:
    """Watch the job's history for drains that asked for a replacement (a daemon thread)."""

    def on_event(ev: HistoryEvent) -> None:
        if (
            ev.ts >= since_ts
            and ev.kind == "config_set"
            and ev.data.get("op") == "drain"
            and ev.data.get("replace")
        ):
            for rid in ev.data.get("drain", []):
                if str(rid).isdigit():
                    sup.request_replacement(int(rid))

    def follow() -> None:
        with contextlib.suppress(Exception):
            client.history(job, follow=True, on_event=on_event)

    threading.Thread(target=follow, name="torchloom-run-history", daemon=True).start()


# ---- steering ------------------------------------------------------------------------------


@app.command("set")
def set_(
    assignments: Annotated[
        list[str], typer.Argument(help="KNOB=VALUE … (e.g. lr=0.01 batch_size=128 grad_clip=off)")
    ],
    replica: Annotated[
        str | None, typer.Option("--replica", "-r", help="only this replica group")
    ] = None,
    reason: Annotated[str, typer.Option("--reason", help="recorded in the history")] = "",
    wait: Annotated[
        bool, typer.Option("--wait", help="wait until every rank has applied it")
    ] = False,
    job: JobOpt = None,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = 5.0,
) -> None:
    """Change knobs, job-wide or for one replica group, at a step every rank agrees on."""
    values = parse_assignments(assignments, what="KNOB")
    client = _client(nats_url, state_dir, timeout_s)
    job_id = _pick_job(client, job)
    reply = client.control("set", job_id, values=values, replica_id=replica, reason=reason)
    out.print(
        f"v{reply.version} accepted: {' '.join(assignments)}"
        f"{f' on replica group {replica}' if replica else ''} → effective at step {reply.effective_step} (job {job_id})"
    )
    if wait:
        _wait_applied(client, job_id, int(reply.version or 0), timeout_s=max(timeout_s, 60.0))


def _wait_applied(client: WeaverClient, job_id: str, version: int, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = client.status(job_id, states=["live"], limit=20, sort="rank").get("jobs", [])
        applied = jobs[0]["summary"]["applied_versions"] if jobs else {}
        if applied and all(int(v) >= version for v in applied):
            n = sum(applied.values())
            steps = [
                f"{r['replica_id']}/{r['rank']} at step {r.get('applied_at_step')}"
                for r in jobs[0]["ranks"]
            ]
            more = f" … and {n - len(steps)} more" if n > len(steps) else ""
            out.print(f"v{version} applied by {n} rank(s): " + ", ".join(steps) + more)
            return
        time.sleep(0.2)
    raise NotReachableError(
        f"v{version} was not applied by every rank within {timeout_s:g} s (see `torchloom status`)"
    )


ReasonOpt = Annotated[str, typer.Option("--reason", help="recorded in the history")]


def _run_state_command(op: str, doc: str) -> None:
    """Register ``torchloom pause|resume|stop``: one request each, the same options."""

    def command(
        job: JobOpt = None,
        reason: ReasonOpt = "",
        nats_url: NatsUrl = None,
        state_dir: StateDir = None,
        timeout_s: TimeoutOpt = 5.0,
    ) -> None:
        client = _client(nats_url, state_dir, timeout_s)
        job_id = _pick_job(client, job)
        reply = client.control(op, job_id, reason=reason)
        out.print(
            f"v{reply.version}: {op} accepted → effective at step {reply.effective_step} (job {job_id})"
        )

    command.__doc__ = doc
    app.command(op)(command)


_run_state_command("pause", "Hold every rank at the same step boundary until `torchloom resume`.")
_run_state_command("resume", "Let a paused job go on from the step it paused at.")
_run_state_command("stop", "End the job: every rank leaves its step loop at the same step.")


@app.command()
def drain(
    replica: Annotated[
        str | None, typer.Option("--replica", "-r", help="the replica group to take out")
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="`torchloom run` starts a fresh group in its place")
    ] = False,
    device: Annotated[
        str | None,
        typer.Option("--device", help="take out the groups using this device (UUID or cpu:HOST)"),
    ] = None,
    job: JobOpt = None,
    reason: ReasonOpt = "",
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = 5.0,
) -> None:
    """Take a replica group (or every group on a device) out of the run at a step all agree on:
    it finishes the step before, leaves, exits 0 and is removed from the DR map."""
    client = _client(nats_url, state_dir, timeout_s)
    job_id = _pick_job(client, job)
    reply = client.request(
        ControlRequest(
            op="drain",
            job_id=job_id,
            replica_id=replica,
            device=device,
            replace=replace,
            reason=reason,
            requested_by=who(),
            request_id=uuid.uuid4().hex,
        )
    )
    what = f"replica group {replica}" if replica else f"the replica group(s) on {device}"
    out.print(
        f"v{reply.version}: drain of {what} accepted → it leaves before step {reply.effective_step} (job {job_id})"
    )


@app.command()
def forget(
    replica: Annotated[
        str | None, typer.Option("--replica", "-r", help="only this replica group")
    ] = None,
    rank: Annotated[
        int | None, typer.Option("--rank", help="only this rank (with --replica)")
    ] = None,
    job: JobOpt = None,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = 5.0,
) -> None:
    """Take gone ranks (failed, exited) out of the DR map: all of the job's, of one replica
    group, or one rank. Live ranks are never forgotten. (The Weaver forgets gone ranks by
    itself after an hour, and keeps at most 1,000 per job.)"""
    client = _client(nats_url, state_dir, timeout_s)
    job_id = _pick_job(client, job)
    values = {"rank": rank} if rank is not None else {}
    reply = client.control("forget", job_id, values=values, replica_id=replica)
    data = reply.data or {}
    ids = data.get("ranks", [])
    shown = ", ".join(ids[:10]) + (" …" if len(ids) > 10 else "")
    out.print(f"forgot {data.get('forgotten', 0)} gone rank(s) of job {job_id}: {shown or '—'}")


@app.command()
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
    import random
    import socket as _socket

    from torchloom.chaos import choose_victim, parse_duration

    try:
        every_s = parse_duration(kill_every)
        until = time.monotonic() + parse_duration(duration) if duration else None
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    client = _client(nats_url, state_dir)
    job_id = _pick_job(client, job)
    rng, host, done = random.Random(seed), _socket.gethostname(), 0
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


# ---- looking -------------------------------------------------------------------------------


@app.command()
def status(
    job: JobOpt = None,
    state: Annotated[
        list[str] | None,
        typer.Option(
            "--state",
            "-s",
            help="only ranks in this state (repeatable): training, failed, …, or live / dead",
        ),
    ] = None,
    replica: Annotated[
        str | None, typer.Option("--replica", "-r", help="only this replica group")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="ranks shown (0: summary only)")] = 50,
    offset: Annotated[int, typer.Option("--offset", help="ranks skipped first")] = 0,
    sort: Annotated[
        str, typer.Option("--sort", help="attention (failed first), rank, slowest, step")
    ] = "attention",
    as_json: Annotated[bool, typer.Option("--json", help="print the raw status as JSON")] = False,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = 5.0,
) -> None:
    """A summary of the job (ranks per state, replica groups, applied versions, the slowest
    ranks) and a page of its DR map: per rank state, step, loss, samples/s, config version."""
    data = _client(nats_url, state_dir, timeout_s).status(
        job, states=state, replica_id=replica, limit=limit, offset=offset, sort=sort
    )
    if as_json:
        out.print_json(json.dumps(data))
    else:
        out.print(render.status_view(data, width=out.width))


@app.command()
def knobs(
    job: JobOpt = None,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = 5.0,
) -> None:
    """The job's knob registry: each knob's type, bounds, scope and desired value."""
    client = _client(nats_url, state_dir, timeout_s)
    job_id = _pick_job(client, job)
    data = client.control("knobs", job_id).data or {}
    from rich.table import Table

    t = Table(title=f"knobs of {job_id} (desired v{data.get('version')})", title_justify="left")
    for col in ("knob", "value", "rule", "scope", "doc"):
        t.add_column(col)
    for k in data.get("knobs", []):
        t.add_row(
            k["name"],
            "off" if k["value"] is None and k.get("allow_off") else str(k["value"]),
            k["rule"],
            k["scope"],
            k.get("doc", ""),
        )
    out.print(t)


@app.command()
def events(
    job: Annotated[
        str | None, typer.Option("--job", "-j", envvar="TORCHLOOM_JOB", help="only this job")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing new events")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    kind: Annotated[
        list[str] | None, typer.Option("--kind", "-k", help="only these kinds (repeatable)")
    ] = None,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
) -> None:
    """The job's history (joins, failures, config changes and applies), from the events stream."""
    kinds = set(kind or [])

    def show(ev: HistoryEvent) -> None:
        if kinds and ev.kind not in kinds:
            return
        if as_json:
            print(json.dumps(to_builtins(ev)), flush=True)
        else:
            out.print(render.event_line(ev))

    try:
        _client(nats_url, state_dir).history(job, follow=follow, on_event=show)
    except KeyboardInterrupt:
        pass


app.add_typer(policy_app, name="policy")
app.command("sim")(sim_command)


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main() -> None:
    """Entry point of the ``torchloom`` command: one clear line for every torchloom error."""
    try:
        app()
    except TorchloomError as exc:
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        sys.exit(_exit_code(exc))


def _exit_code(exc: TorchloomError) -> int:
    """2: refused (by the Weaver, or a mistake on the command line); 3: nothing answered; 1:
    anything else."""
    if exc.remote or isinstance(exc, InvalidRequestError):
        return 2
    return 3 if isinstance(exc, NotReachableError) else 1
