"""``torchloom demo``: the control plane and the MNIST reference job, with a live view."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.text import Text

from torchloom.cli import render
from torchloom.cli.options import NatsUrl, StateDir, out, setup_logging
from torchloom.cli.serve import (
    FailOpt,
    HangOpt,
    LeadOpt,
    NiceOpt,
    NoUiOpt,
    PoliciesOpt,
    PortOpt,
    UiHostOpt,
    UiPortOpt,
    UiTokenOpt,
    dashboard_line,
    stack_config,
)
from torchloom.client import WeaverClient
from torchloom.errors import InvalidRequestError, TorchloomError
from torchloom.paths import ENV_NATS_URL
from torchloom.protocol import HistoryEvent
from torchloom.secure import job_env
from torchloom.supervisor import kill_tree

REFERENCE_JOB = "torchloom.examples.mnist.train"


def _reference_job_ready(extra: list[str]) -> None:
    """Check that the shipped MNIST job can run here, and fetch MNIST once if needed.

    Raises:
        TorchloomError: torch is not installed, or MNIST could not be downloaded.
    """
    if importlib.util.find_spec("torch") is None:
        raise TorchloomError("the demo trains with torch: pip install 'torchloom[torch]'")
    if any(a == "--data-dir" or a.startswith("--data-dir=") for a in extra):
        return
    from torchloom.examples.mnist import mnist_data

    data_dir = mnist_data.default_data_dir()
    if mnist_data.present(data_dir):
        return
    out.print(f"downloading MNIST into {data_dir} (once; SHA-256 checked)…")
    try:
        mnist_data.download(data_dir)
    except mnist_data.DataError as exc:
        raise TorchloomError(
            f"{exc} — put mnist.npz or the IDX files in a directory and pass it as "
            f"${mnist_data.ENV_DATA_DIR} or `torchloom demo -- --data-dir DIR`"
        ) from None


def demo(
    nproc: Annotated[int, typer.Option("--nproc", help="ranks (torchrun --nproc-per-node)")] = 2,
    max_steps: Annotated[int, typer.Option("--max-steps")] = 2000,
    job: Annotated[str, typer.Option("--job", "-j")] = "mnist",
    state_dir: StateDir = None,
    nats_url: NatsUrl = None,
    nats_port: PortOpt = None,
    script: Annotated[
        Path | None,
        typer.Option(
            "--script", help=f"training script [default: the shipped MNIST job, {REFERENCE_JOB}]"
        ),
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
    """Start torchloom and the MNIST job (torchrun, 2 ranks) with a live progress view.

    The MNIST job ships in the package; MNIST itself is read from a checkout's
    examples/mnist/data, or downloaded once into ~/.cache/torchloom/mnist. Without
    --policies the checkpoint policy saves every 10 s or so, so that checkpoints appear
    (`torchloom checkpoint list`, the dashboard's panel) and a rollback has one to go to."""
    setup_logging(False)
    if script is None:
        _reference_job_ready(extra or [])
        target = ["-m", REFERENCE_JOB]
    elif script.is_file():
        target = [str(script)]
    else:
        raise InvalidRequestError(f"--script {script}: no such file")
    if policies is None and script is None:
        policies = _demo_policies()
    events: list[HistoryEvent] = []
    stack = stack_config(
        state_dir=state_dir,
        nats_url=nats_url,
        nats_port=nats_port,
        failure_timeout_s=failure_timeout_s,
        hang_timeout_s=hang_timeout_s,
        lead_time_s=lead_time_s,
        ui_host=ui_host,
        ui_port=ui_port,
        ui_token=ui_token,
        no_ui=no_ui,
        policies=policies,
        nice=nice,
    ).build(on_event=events.append)
    stack.start()
    if script is None:  # checkpoints the Weaver orders (`torchloom checkpoint save`, the policy)
        target += ["--checkpoint-dir", str(stack.state_dir / "checkpoints")]
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
        *target,
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
    out.print(f"dashboard: [bold cyan]{dashboard_line(stack)}[/]")
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


DEMO_POLICIES = "[checkpoint]\nmin_interval_s = 10.0\ncost_prior_s = 0.05\nmtbf_prior_s = 1800.0\n"
"""The demo's policy settings: checkpoints every ~10 s instead of a production cadence."""


def _demo_policies() -> Path:
    """A TOML file with :data:`DEMO_POLICIES` (in the temporary directory)."""
    import tempfile

    path = Path(tempfile.gettempdir()) / f"torchloom-demo-policies-{os.getpid()}.toml"
    path.write_text(DEMO_POLICIES)
    return path
