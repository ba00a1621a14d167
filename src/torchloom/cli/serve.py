"""``torchloom up``: the control plane in the foreground, and the options and builder of the
stack that ``up`` and ``demo`` share."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.panel import Panel
from rich.text import Text

from torchloom.cli.options import NatsUrl, StateDir, out, setup_logging
from torchloom.cli.printer import EventPrinter
from torchloom.errors import InvalidRequestError, LeadershipLostError, TorchloomError
from torchloom.paths import DEFAULT_UI_PORT, ENV_NATS_URL, default_state_dir
from torchloom.protocol.names import check_id
from torchloom.stack import (
    DashboardConfig,
    LighthouseConfig,
    NatsConfig,
    SecurityConfig,
    Stack,
    StackConfig,
)
from torchloom.weaver import ControlSettings, LivenessConfig
from torchloom.weaver.state import Retention

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
ClusterOpt = Annotated[
    int,
    typer.Option(
        "--cluster",
        min=1,
        max=7,
        help="start this many embedded NATS servers joined into one JetStream cluster "
        "(3: the loss of any one server stops nothing); 1: a single server",
    ),
]
ReplicasOpt = Annotated[
    int | None,
    typer.Option(
        "--replicas",
        min=1,
        max=5,
        help="copies of torchloom's streams and KV buckets on a cluster; existing ones with "
        "fewer are scaled up [default: min(3, servers in the cluster)]",
        show_default=False,
    ),
]
PortOpt = Annotated[
    int | None, typer.Option("--nats-port", help="port of the embedded NATS [default: a free one]")
]


def stack_config(
    *,
    state_dir: Path | None,
    nats_url: str | None,
    nats_port: int | None,
    failure_timeout_s: float,
    hang_timeout_s: float,
    lead_time_s: float,
    ui_host: str,
    ui_port: int | None,
    ui_token: str | None,
    no_ui: bool,
    policies: Path | None,
    nice: int,
    nats_host: str = "127.0.0.1",
    lighthouse: str = "auto",
    lighthouse_heartbeat_timeout_ms: int = 1000,
    security: SecurityConfig | None = None,
    retention: Retention | None = None,
    cluster: int = 1,
    replicas: int | None = None,
    watch_connections: bool = True,
    ingest_workers: int = 0,
    samplers: dict[str, str] | None = None,
) -> StackConfig:
    """The stack ``up`` and ``demo`` run, from their command-line options (units as named)."""
    return StackConfig(
        state_dir=state_dir or default_state_dir(),
        nats=NatsConfig(
            url=nats_url, port=nats_port, host=nats_host, cluster=cluster, replicas=replicas
        ),
        lighthouse=LighthouseConfig(
            url=None if lighthouse.lower() in ("none", "off", "") else lighthouse,
            heartbeat_timeout_ms=lighthouse_heartbeat_timeout_ms,
        ),
        dashboard=None
        if no_ui
        else DashboardConfig(
            host=ui_host,
            port=DEFAULT_UI_PORT if ui_port is None else ui_port,
            port_fallback=ui_port is None,
            token=ui_token,
            samplers=dict(samplers or {}),
        ),
        security=security or SecurityConfig(),
        liveness=LivenessConfig(
            failure_timeout_s=failure_timeout_s,
            suspect_after_s=failure_timeout_s * 0.6,  # a late heartbeat, not a missed one
            hang_timeout_s=hang_timeout_s,
        ),
        control=ControlSettings(lead_time_s=lead_time_s),
        retention=retention,
        policy_file=policies,
        watch_connections=watch_connections,
        ingest_workers=ingest_workers,
        nice=nice or None,
    )


def parse_samplers(specs: list[str]) -> dict[str, str]:
    """``JOB=FILE.py:FUNC`` options → job id → sampler spec (a relative file made absolute:
    the worker may start elsewhere).

    Raises:
        InvalidRequestError: one is not of that form.
    """
    out: dict[str, str] = {}
    for spec in specs:
        job, eq, target = spec.partition("=")
        where, colon, func = target.rpartition(":")
        if not (eq and job and colon and where and func):
            raise InvalidRequestError(
                f"--sampler {spec!r}: give JOB=FILE.py:FUNC or JOB=MODULE:FUNC"
            )
        check_id("job id", job)
        if where.endswith(".py"):
            path = Path(where).resolve()
            if not path.is_file():
                raise InvalidRequestError(f"--sampler {spec!r}: no file {path}")
            where = str(path)
        out[job] = f"{where}:{func}"
    return out


class _Stop(Exception):
    pass


def wait_for_signal(stack: Stack, *, poll_s: float = 0.2) -> str:
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
    if stack.config.lighthouse.url is None:
        return "none (--lighthouse none)"
    return "none (torchft is not installed: pip install 'torchloom[torchft]')"


def _replication_line(done: dict[str, str]) -> str:
    """What starting did to the streams and buckets, in one short line."""
    if not done:
        return "(standby: the leader made them)"
    outcomes = set(done.values())
    if len(outcomes) == 1:
        return f"{len(done)} streams and KV buckets: {outcomes.pop()}"
    return ", ".join(f"{k} {v}" for k, v in sorted(done.items()))


def dashboard_line(stack: Stack) -> str:
    if stack.dashboard is None:
        return "none (--no-ui)"
    auth = "  (token required)" if stack.dashboard.access.required else ""
    return f"{stack.dashboard.url}  · API {stack.dashboard.url}api/openapi.json{auth}"


def up(
    state_dir: StateDir = None,
    nats_url: NatsUrl = None,
    nats_port: PortOpt = None,
    cluster: ClusterOpt = 1,
    replicas: ReplicasOpt = None,
    watch_connections: Annotated[
        bool,
        typer.Option(
            "--watch-connections/--no-watch-connections",
            help="mark a rank failed the moment its NATS connection closes (a kill -9, a "
            "crash: the embedded servers' disconnect advisories); off: heartbeats only",
        ),
    ] = True,
    ingest_workers: Annotated[
        int,
        typer.Option(
            "--ingest-workers",
            min=0,
            max=64,
            help="processes that take the ranks' telemetry in (a NATS queue group) and hand "
            "it to the Weaver in batches: its intake on more than one core (worth it beyond "
            "a few thousand ranks); 0: the Weaver's own loop",
        ),
    ] = 0,
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
    keep_gone_ranks: Annotated[
        int,
        typer.Option(
            "--keep-gone-ranks", min=0, help="gone (failed, exited) ranks kept in a job's DR map"
        ),
    ] = 1000,
    keep_gone_s: Annotated[
        float,
        typer.Option("--keep-gone-s", min=0.0, help="how long a gone rank stays in the DR map"),
    ] = 3600.0,
    sampler: Annotated[
        list[str] | None,
        typer.Option(
            "--sampler",
            help="JOB=FILE.py:FUNC (or MODULE:FUNC): how the dashboard's playground samples "
            "that job's checkpoints (torchloom.playground), e.g. "
            "gpt=examples/gpt/sample.py:load; repeat for more jobs",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Start NATS (embedded, on loopback), the torchft lighthouse (when torchft is installed)
    and the Weaver, and serve until Ctrl-C / SIGTERM.

    A second `up` on another state dir with --nats-url of the first's NATS is a standby
    Weaver: it takes over within seconds when the leader dies."""
    setup_logging(verbose)
    printer = EventPrinter(out)
    stack = stack_config(
        state_dir=state_dir,
        nats_url=nats_url,
        nats_port=nats_port,
        nats_host=nats_host,
        failure_timeout_s=failure_timeout_s,
        hang_timeout_s=hang_timeout_s,
        lead_time_s=lead_time_s,
        lighthouse=lighthouse,
        lighthouse_heartbeat_timeout_ms=lighthouse_heartbeat_timeout_ms,
        ui_host=ui_host,
        ui_port=ui_port,
        ui_token=ui_token,
        no_ui=no_ui,
        policies=policies,
        nice=nice,
        security=SecurityConfig(secure=secure, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca),
        retention=Retention(dead_ttl_s=keep_gone_s, max_dead_per_job=keep_gone_ranks),
        cluster=cluster,
        replicas=replicas,
        watch_connections=watch_connections,
        ingest_workers=ingest_workers,
        samplers=parse_samplers(sampler or []),
    ).build(on_event=printer.add)
    stack.start()
    if stack.cluster is not None:
        nats_where = (
            f"{stack.nats_url} (embedded cluster of {len(stack.cluster.servers)}, "
            f"pids {', '.join(map(str, stack.cluster.pids))})"
        )
    elif stack.nats and stack.nats.proc:
        nats_where = f"{stack.nats_url} (embedded, pid {stack.nats.proc.pid})"
    else:
        nats_where = f"{stack.nats_url} (external)"
    replication = _replication_line(stack.weaver.replication if stack.weaver else {})
    out.print(
        Panel.fit(
            Group(
                Text.assemble(("NATS      ", "bold"), nats_where),
                Text.assemble(("state     ", "bold"), replication),
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
                Text.assemble(("dashboard ", "bold"), dashboard_line(stack)),
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
        why = wait_for_signal(stack)
    finally:
        out.print("[dim]shutting down…[/]")
        stack.stop()
        printer.stop()
    if why != "signal":
        raise TorchloomError(f"torchloom up stopped: {why}")
