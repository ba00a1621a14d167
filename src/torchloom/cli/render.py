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


COLUMNS = (
    "replica/rank",
    "state",
    "step",
    "loss",
    "test_acc",
    "samples/s",
    "step ms",
    "MFU",
    "config",
    "quorum",
    "heartbeat",
    "device",
    "host:pid",
)
"""The replicas table's columns, in display order."""
PRIORITY = (
    "replica/rank",
    "state",
    "step",
    "config",
    "loss",
    "step ms",
    "heartbeat",
    "samples/s",
    "quorum",
    "MFU",
    "test_acc",
    "host:pid",
    "device",
)
"""Which columns stay when the terminal is narrow: the first ones that fit."""
_LEFT = {"replica/rank", "state", "device", "host:pid"}


def _cells(r: dict[str, Any]) -> dict[str, Any]:
    m = r.get("metrics", {})
    applied, wanted = r.get("applied_version"), r.get("desired_version")
    cfg = f"v{applied}" + (
        f" @ {r['applied_at_step']}" if r.get("applied_at_step") is not None else ""
    )
    if wanted is not None and applied != wanted and r["state"] not in ("exited", "failed"):
        cfg = f"[red]{cfg} (want v{wanted})[/]"
    step_ms = r.get("step_time_s")
    state = r["state"] + (" (outlier)" if r.get("outlier") else "")
    return {
        "replica/rank": f"{r['replica_id']}/{r['rank']}",
        "state": Text(state, style=STATE_STYLE.get(r["state"], "")),
        "step": str(r["step"]),
        "loss": _num(m.get("loss")),
        "test_acc": _num(m.get("test_acc"), "{:.4f}"),
        "samples/s": _num(r.get("samples_per_s"), "{:.0f}"),
        "step ms": _num(step_ms * 1000 if step_ms else None, "{:.1f}"),
        "MFU": _utilisation(m),
        "config": cfg,
        "quorum": _quorum(r.get("quorum")),
        "heartbeat": f"{r['heartbeat_age_s']:.1f} s",
        "device": r.get("device", ""),
        "host:pid": f"{r.get('host', '')}:{r.get('pid', '')}",
    }


def _utilisation(metrics: dict[str, Any]) -> str:
    """``mfu`` as a percentage when the rank reports it, else its achieved ``flops_per_s`` in
    TFLOP/s (a CPU has no peak to divide by), else a dash."""
    if metrics.get("mfu") is not None:
        return f"{metrics['mfu']:.1%}"
    if metrics.get("flops_per_s") is not None:
        return f"{metrics['flops_per_s'] / 1e12:.3g} TF/s"
    return "—"


def _width(value: Any) -> int:
    return Text.from_markup(value).cell_len if isinstance(value, str) else len(str(value))


def pick_columns(rows: list[dict[str, Any]], *, width: int, with_quorum: bool) -> list[str]:
    """The columns that fit ``width`` terminal cells, most useful first (:data:`PRIORITY`),
    shown in :data:`COLUMNS` order (``MFU`` only when a rank reports it)."""
    chosen: set[str] = set()
    used = 1  # the table's left border
    with_mfu = any(row["MFU"] != "—" for row in rows)
    for col in PRIORITY:
        if (col == "quorum" and not with_quorum) or (col == "MFU" and not with_mfu):
            continue
        need = max([len(col), *(_width(row[col]) for row in rows)]) + 3  # padding + border
        if used + need > width:
            continue
        chosen.add(col)
        used += need
    return [c for c in COLUMNS if c in chosen]


def job_table(job: dict[str, Any], *, width: int = 200) -> Table:
    desired = job.get("desired") or {}
    values = desired.get("values", {})
    title = (
        f"job [bold]{job['job_id']}[/] · desired v{desired.get('version', '—')} "
        f"from step {desired.get('effective_step', '—')} · {desired.get('run_state', '—')} · "
        + ", ".join(f"{k}={'off' if v is None else v}" for k, v in sorted(values.items()))
    )
    rows = [_cells(r) for r in job["ranks"]]
    ft = any(r.get("quorum") for r in job["ranks"])
    cols = pick_columns(rows, width=width, with_quorum=ft)
    t = Table(title=title, title_justify="left", expand=False)
    for col in cols:
        t.add_column(col, justify="left" if col in _LEFT else "right", no_wrap=True)
    for row in rows:
        t.add_row(*(row[c] for c in cols))
    return t


def summary_line(job: dict[str, Any]) -> Text:
    """``3000 ranks: 2990 training · 10 failed | 2/3 replica groups live | applied v5 ×2990 |
    slowest 0/1 66.9 ms`` (a job of any size in one line)."""
    s = job.get("summary") or {}
    text = Text(f"{s.get('ranks', 0)} rank(s): ")
    for i, (state, n) in enumerate((s.get("states") or {}).items()):
        text.append(" · " if i else "")
        text.append(f"{n} {state}", style=STATE_STYLE.get(state, ""))
    text.append(
        f" | {s.get('replica_groups_live', 0)}/{s.get('replica_groups', 0)} replica groups live"
    )
    versions = s.get("applied_versions") or {}
    if versions:
        text.append(
            " | applied "
            + ", ".join(
                f"v{v} ×{n}" for v, n in sorted(versions.items(), key=lambda kv: -int(kv[0]))
            )
        )
    slowest = [x for x in s.get("slowest") or [] if x.get("step_time_s")]
    if len(s.get("states") or {}) and len(slowest) > 1:
        text.append(
            " | slowest "
            + ", ".join(f"{x['id']} {x['step_time_s'] * 1000:.1f} ms" for x in slowest[:3])
        )
    if s.get("outliers"):
        text.append(f" | step outliers {', '.join(s['outliers'])}", style="red")
    return text


def page_line(job: dict[str, Any]) -> Text | None:
    """Which ranks the table shows, when it is not all of them."""
    page = job.get("page") or {}
    total = (job.get("summary") or {}).get("ranks", 0)
    matched, shown, offset = (
        page.get("matched", 0),
        len(job.get("ranks", [])),
        page.get("offset", 0),
    )
    if shown == total and offset == 0:
        return None
    first = offset + 1 if shown else offset
    return Text(
        f"  showing {first}–{offset + shown} of {matched} matching rank(s) ({page.get('sort')} "
        f"order); --offset {offset + shown} for more, --state / --replica to filter, --limit N",
        style="dim",
    )


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


def status_view(status: dict[str, Any], *, width: int = 200) -> Group:
    """Per job: the summary line, the page of ranks (columns that fit ``width``), pending
    applies and apply problems."""
    parts: list[Any] = []
    for job in status.get("jobs", []):
        parts.append(job_table(job, width=width))
        parts.append(summary_line(job))
        more = page_line(job)
        if more is not None:
            parts.append(more)
        for p in job.get("pending_applies", []):
            waiting = ", ".join(p["waiting_for"]) or "nobody"
            if p.get("waiting_count", 0) > len(p["waiting_for"]):
                waiting += f" … ({p['waiting_count']} in all)"
            parts.append(
                Text(
                    f"  pending v{p['version']} at step {p['effective_step']}: waiting for {waiting}",
                    style="yellow",
                )
            )
        for prob in job.get("apply_problems", []):
            parts.append(Text(f"  apply problem: {prob}", style="red"))
        hidden = job.get("apply_problems_total", 0) - len(job.get("apply_problems", []))
        if hidden > 0:
            parts.append(Text(f"  … and {hidden} more apply problems", style="red"))
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
