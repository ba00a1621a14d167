"""Rich renderings of status snapshots and history events (no I/O besides the console)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from torchloom.protocol import HistoryEvent

STATE_STYLE = {
    "training": "green",
    "joining": "cyan",
    "paused": "yellow",
    "suspect": "yellow",
    "hung": "bold red",
    "failed": "bold red",
    "exited": "dim",
    "draining": "magenta",
}
EVENT_STYLE = {
    "rank_failed": "bold red",
    "rank_hung": "bold red",
    "apply_late": "red",
    "apply_missing": "red",
    "rank_suspect": "yellow",
    "config_set": "cyan",
    "config_applied": "green",
    "job_started": "bold",
    "rank_drained": "magenta",
    "replica_drained": "magenta",
    "healed": "cyan",
}


def _num(x: Any, fmt: str = "{:.4g}") -> str:
    return "—" if x is None else fmt.format(x)


def job_table(job: dict[str, Any]) -> Table:
    desired = job.get("desired") or {}
    values = desired.get("values", {})
    title = (
        f"job [bold]{job['job_id']}[/] · desired v{desired.get('version', '—')} "
        f"from step {desired.get('effective_step', '—')} · {desired.get('run_state', '—')} · "
        + ", ".join(f"{k}={'off' if v is None else v}" for k, v in sorted(values.items()))
    )
    t = Table(title=title, title_justify="left", expand=False)
    ft = any(r.get("quorum") for r in job["ranks"])
    cols = ["replica/rank", "state", "step", "loss", "test_acc", "samples/s", "step ms", "config"]
    cols += ["quorum"] if ft else []
    for col in [*cols, "heartbeat", "device", "host:pid"]:
        t.add_column(
            col,
            justify="right"
            if col not in ("state", "device", "host:pid", "replica/rank")
            else "left",
        )
    for r in job["ranks"]:
        m = r.get("metrics", {})
        applied, wanted = r.get("applied_version"), r.get("desired_version")
        cfg = f"v{applied}" + (
            f" @ {r['applied_at_step']}" if r.get("applied_at_step") is not None else ""
        )
        if wanted is not None and applied != wanted and r["state"] not in ("exited", "failed"):
            cfg = f"[red]{cfg} (want v{wanted})[/]"
        step_ms = r.get("step_time_s")
        t.add_row(
            f"{r['replica_id']}/{r['rank']}",
            Text(r["state"], style=STATE_STYLE.get(r["state"], "")),
            str(r["step"]),
            _num(m.get("loss")),
            _num(m.get("test_acc"), "{:.4f}"),
            _num(r.get("samples_per_s"), "{:.0f}"),
            _num(step_ms * 1000 if step_ms else None, "{:.1f}"),
            cfg,
            *([_quorum(r.get("quorum"))] if ft else []),
            f"{r['heartbeat_age_s']:.1f} s",
            r.get("device", ""),
            f"{r.get('host', '')}:{r.get('pid', '')}",
        )
    return t


def _quorum(q: dict[str, Any] | None) -> Text:
    """``q<id> ×<participants>`` plus healing / heal count / commit failures, or —."""
    if not q:
        return Text("—")
    text = Text(f"q{q.get('quorum_id')} ×{q.get('participants')}")
    if q.get("healing"):
        text.append(" healing", style="yellow")
    elif q.get("heals"):
        text.append(f" healed×{q['heals']}", style="cyan")
    if q.get("commit_failures"):
        text.append(f" {q['commit_failures']} uncommitted", style="red")
    return text


def status_view(status: dict[str, Any]) -> Group:
    parts: list[Any] = []
    for job in status.get("jobs", []):
        parts.append(job_table(job))
        for p in job.get("pending_applies", []):
            parts.append(
                Text(
                    f"  pending v{p['version']} at step {p['effective_step']}: waiting for "
                    f"{', '.join(p['waiting_for']) or 'nobody'}",
                    style="yellow",
                )
            )
        for prob in job.get("apply_problems", []):
            parts.append(Text(f"  apply problem: {prob}", style="red"))
    if not parts:
        parts.append(
            Text("no jobs yet: start a training script that calls torchloom.init()", style="dim")
        )
    dropped = status.get("dropped_messages") or {}
    if dropped:
        parts.append(
            Text(
                "dropped messages: " + ", ".join(f"{k}={v}" for k, v in sorted(dropped.items())),
                style="yellow",
            )
        )
    return Group(*parts)


def event_line(ev: HistoryEvent) -> Text:
    ts = time.strftime("%H:%M:%S", time.localtime(ev.ts)) + f".{int((ev.ts % 1) * 1000):03d}"
    text = Text(f"{ts} ", style="dim")
    text.append(f"{ev.job_id:<8} {ev.kind:<15} ", style=EVENT_STYLE.get(ev.kind, ""))
    text.append(ev.message)
    return text


def event_lines(events: list[HistoryEvent], *, max_per_kind: int = 5) -> list[Text]:
    """The lines of a batch of events, at most ``max_per_kind`` per job and kind; the rest of
    a kind (a join storm of thousands of ranks, a partition) is one line with its count."""
    seen: dict[tuple[str, str], int] = {}
    lines = []
    for ev in events:
        n = seen[ev.job_id, ev.kind] = seen.get((ev.job_id, ev.kind), 0) + 1
        if n <= max_per_kind:
            lines.append(event_line(ev))
    for (job_id, kind), n in seen.items():
        if n > max_per_kind:
            more = Text(f"{'':13}{job_id:<8} {kind:<15} ", style=EVENT_STYLE.get(kind, ""))
            more.append(f"… and {n - max_per_kind} more (torchloom events -k {kind})", style="dim")
            lines.append(more)
    return lines
