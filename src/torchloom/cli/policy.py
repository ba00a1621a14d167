"""``torchloom policy list|enable|disable|set|export``: the Weaver's policies, live."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from torchloom.cli.options import (
    DEFAULT_TIMEOUT_S,
    NatsUrl,
    StateDir,
    TimeoutOpt,
    out,
    parse_assignments,
    weaver_client,
)
from torchloom.client import who
from torchloom.protocol import ControlRequest, HistoryEvent, to_builtins
from torchloom.protocol.names import ALL_JOBS

app = typer.Typer(
    help="The Weaver's policies: list them, switch them, tune them, export decisions."
)


def _change(
    values: dict[str, Any], nats_url: str | None, state_dir: Path | None, timeout_s: float
) -> dict[str, Any]:
    reply = weaver_client(nats_url, state_dir, timeout_s).request(
        ControlRequest(op="policy", job_id=ALL_JOBS, values=values, requested_by=who())
    )
    return reply.data if isinstance(reply.data, dict) else {}


def _show(p: dict[str, Any]) -> None:
    state = ("on" if p["enabled"] else "off") + (" (dry run)" if p["dry_run"] else "")
    params = " ".join(f"{k}={v}" for k, v in p["params"].items())
    out.print(f"[bold]{p['name']}[/] {state}: {p['doc']}", highlight=False)
    out.print(f"  {params}", highlight=False, style="dim")


@app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """Every policy: on/off, dry run, its parameters."""
    reply = weaver_client(nats_url, state_dir, timeout_s).request(
        ControlRequest(op="policies", job_id=ALL_JOBS, requested_by=who())
    )
    policies = reply.data if isinstance(reply.data, list) else []
    if as_json:
        out.print_json(json.dumps(policies))
        return
    for p in policies:
        _show(p)


DryRunOpt = Annotated[
    bool | None,
    typer.Option("--dry-run/--live", help="only record what it would do / act", show_default=False),
]


@app.command()
def enable(
    name: Annotated[str, typer.Argument(help="policy name (see `torchloom policy list`)")],
    dry_run: DryRunOpt = None,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """Switch a policy on (with --dry-run it decides and records, but does nothing)."""
    values: dict[str, Any] = {"policy": name, "enabled": True}
    if dry_run is not None:
        values["dry_run"] = dry_run
    _show(_change(values, nats_url, state_dir, timeout_s))


@app.command()
def disable(
    name: Annotated[str, typer.Argument(help="policy name")],
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """Switch a policy off."""
    _show(_change({"policy": name, "enabled": False}, nats_url, state_dir, timeout_s))


@app.command("set")
def set_(
    name: Annotated[str, typer.Argument(help="policy name")],
    assignments: Annotated[list[str], typer.Argument(help="PARAM=VALUE … (e.g. slow_ratio=1.5)")],
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """Change a policy's parameters (all or nothing; kept across Weaver restarts)."""
    params = parse_assignments(assignments, what="PARAM")
    _show(_change({"policy": name, "params": params}, nats_url, state_dir, timeout_s))


def trajectory_row(ev: HistoryEvent) -> dict[str, Any] | None:
    """One row of the decision dataset from a ``policy_*`` history event (None for others)."""
    if not ev.kind.startswith("policy_") or ev.kind == "policy_settings":
        return None
    d = ev.data
    return {
        "ts": ev.ts,
        "job_id": ev.job_id,
        "policy": d.get("policy"),
        "action": d.get("action"),
        "dry_run": d.get("dry_run"),
        "replica_id": d.get("replica_id"),
        "values": d.get("values"),
        "features": d.get("features"),
        "outcome": d.get("outcome"),
        "reason": ev.message,
    }


@app.command()
def export(
    output: Annotated[Path, typer.Option("--out", "-o", help="JSONL file to write")],
    job: Annotated[str | None, typer.Option("--job", "-j", help="only this job")] = None,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
) -> None:
    """Every policy decision in the history, one JSON row each (features, action, outcome):
    the raw material for learning to steer runs."""
    rows: list[dict[str, Any]] = []

    def take(ev: HistoryEvent) -> None:
        row = trajectory_row(ev)
        if row is not None:
            rows.append(to_builtins(row))

    weaver_client(nats_url, state_dir).history(job, follow=False, on_event=take)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    out.print(f"{len(rows)} decision(s) written to {output}")
