"""``torchloom checkpoint save|list|show|pin|unpin|delete|export`` and ``torchloom rollback``:
checkpoints the Weaver orders, keeps and loads."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from torchloom.cli.options import (
    DEFAULT_TIMEOUT_S,
    JobOpt,
    NatsUrl,
    ReasonOpt,
    StateDir,
    TimeoutOpt,
    out,
    pick_job,
    weaver_client,
)
from torchloom.client import WeaverClient
from torchloom.errors import InvalidRequestError, NotReachableError, TorchloomError

app = typer.Typer(
    help="Checkpoints: save one at a step every rank agrees on; list, show, pin, delete, export."
)

IdArg = Annotated[str, typer.Argument(help="the checkpoint's id (ckpt-v<version>)")]


def _records(client: WeaverClient, job_id: str) -> dict[str, Any]:
    data = client.control("checkpoints", job_id).data
    return data if isinstance(data, dict) else {}


@app.command()
def save(
    wait: Annotated[
        bool, typer.Option("--wait", help="return when it is complete or failed")
    ] = False,
    wait_timeout_s: Annotated[
        float, typer.Option("--wait-timeout-s", help="how long --wait waits, in seconds")
    ] = 300.0,
    job: JobOpt = None,
    reason: ReasonOpt = "",
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """Every writing rank saves its state at one step (under torchft: one replica group)."""
    client = weaver_client(nats_url, state_dir, timeout_s)
    job_id = pick_job(client, job)
    reply = client.control("checkpoint", job_id, reason=reason)
    ckpt_id = (reply.data or {}).get("checkpoint", "?")
    out.print(
        f"v{reply.version}: checkpoint {ckpt_id} ordered → saved at step {reply.effective_step} "
        f"(job {job_id})"
    )
    if not wait:
        return
    deadline = time.monotonic() + wait_timeout_s
    while time.monotonic() < deadline:
        rec = _find(client, job_id, ckpt_id)
        if rec is not None and rec["state"] == "complete":
            out.print(f"checkpoint {ckpt_id} complete: {_size(rec['bytes'])} in {rec['storage']}")
            return
        if rec is not None and rec["state"] == "failed":
            raise TorchloomError(f"checkpoint {ckpt_id} failed: {rec['reason']}")
        time.sleep(0.2)
    raise NotReachableError(f"checkpoint {ckpt_id} did not end within {wait_timeout_s:g} s")


@app.command("list")
def list_(
    as_json: Annotated[bool, typer.Option("--json", help="print the registry as JSON")] = False,
    job: JobOpt = None,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """The job's checkpoints, newest first: state, step, config version, training loss, an
    evaluator's eval loss, size, where."""
    client = weaver_client(nats_url, state_dir, timeout_s)
    job_id = pick_job(client, job)
    data = _records(client, job_id)
    if as_json:
        out.print_json(json.dumps(data))
        return
    t = Table(
        title=f"checkpoints of {job_id} · a launch now resumes from "
        f"{data.get('resume_from') or 'none'} ({data.get('resume_why', '')})",
        title_justify="left",
    )
    cols = ("id", "state", "step", "version", "loss", "eval", "size", "stall ms", "where / why")
    for col in cols:
        t.add_column(col)
    for c in data.get("checkpoints", []):
        t.add_row(
            c["id"],
            c["state"] + (" (pinned)" if c.get("pinned") else ""),
            str(c["step"]),
            f"v{c['version']}",
            "" if c.get("loss") is None else f"{c['loss']:.4g}",
            _eval(c.get("scores") or {}),
            _size(c["bytes"]) if c["bytes"] else "",
            f"{c['stall_s'] * 1e3:.0f}" if c["stall_s"] else "",
            c["reason"] if c["state"] == "failed" else c["storage"],
        )
    out.print(t)


def _eval(scores: dict[str, float]) -> str:
    """An evaluator's scores in one cell: ``eval_loss`` first, else every score."""
    if "eval_loss" in scores:
        return f"{scores['eval_loss']:.4g}"
    return " ".join(f"{k}={v:.4g}" for k, v in scores.items())


def _record(client: WeaverClient, job_id: str, ckpt_id: str) -> dict[str, Any]:
    """The registry's record of ``ckpt_id``.

    Raises:
        InvalidRequestError: the job has no such checkpoint.
    """
    rec = _find(client, job_id, ckpt_id)
    if rec is None:
        raise InvalidRequestError(f"job {job_id!r} has no checkpoint {ckpt_id!r}")
    return rec


def _find(client: WeaverClient, job_id: str, ckpt_id: str) -> dict[str, Any] | None:
    """The registry's record of ``ckpt_id``, or None."""
    return next(
        (c for c in _records(client, job_id).get("checkpoints", []) if c["id"] == ckpt_id), None
    )


@app.command()
def show(
    ckpt_id: IdArg,
    job: JobOpt = None,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """One checkpoint's record as JSON: step, version, knob values, loss, files and checksums."""
    client = weaver_client(nats_url, state_dir, timeout_s)
    out.print_json(json.dumps(_record(client, pick_job(client, job), ckpt_id)))


@app.command()
def pin(
    ckpt_id: IdArg,
    job: JobOpt = None,
    reason: ReasonOpt = "",
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """A starting job resumes from this checkpoint (not the newest); it cannot be deleted."""
    client = weaver_client(nats_url, state_dir, timeout_s)
    job_id = pick_job(client, job)
    client.control("checkpoint_pin", job_id, values={"id": ckpt_id}, reason=reason)
    out.print(f"checkpoint {ckpt_id} pinned: a starting job {job_id} resumes from it")


@app.command()
def unpin(
    ckpt_id: IdArg,
    job: JobOpt = None,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """Take the pin off: a starting job resumes from the newest complete checkpoint again."""
    client = weaver_client(nats_url, state_dir, timeout_s)
    job_id = pick_job(client, job)
    client.control("checkpoint_pin", job_id, values={"id": ckpt_id, "pinned": False})
    out.print(f"checkpoint {ckpt_id} unpinned")


@app.command()
def delete(
    ckpt_id: IdArg,
    job: JobOpt = None,
    reason: ReasonOpt = "",
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """Take a checkpoint out of the registry (never offered again) and remove its files: here
    when its directory is reachable from this host, else by the job's next checkpoint writer."""
    client = weaver_client(nats_url, state_dir, timeout_s)
    job_id = pick_job(client, job)
    rec = client.control("checkpoint_delete", job_id, values={"id": ckpt_id}, reason=reason).data
    where = Path(rec.get("storage", "")) if isinstance(rec, dict) else None
    if where is not None and where.name == ckpt_id and where.is_dir():
        shutil.rmtree(where)
        out.print(f"checkpoint {ckpt_id} deleted; {where} removed")
    else:
        out.print(f"checkpoint {ckpt_id} deleted; its files go with the next checkpoint's save")


@app.command()
def export(
    ckpt_id: IdArg,
    out_path: Annotated[
        Path | None, typer.Option("--out", help="the file to write (default: <id>.safetensors)")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="safetensors (the only one)")] = (
        "safetensors"
    ),
    key: Annotated[str, typer.Option("--key", help="the state entry to export")] = "model",
    job: JobOpt = None,
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """Write a complete checkpoint's model weights as one safetensors file (needs torch and
    the checkpoint's directory on this host)."""
    if fmt != "safetensors":
        raise InvalidRequestError(f"format {fmt!r}: only safetensors is written")
    client = weaver_client(nats_url, state_dir, timeout_s)
    rec = _record(client, pick_job(client, job), ckpt_id)
    if rec["state"] != "complete":
        raise InvalidRequestError(f"checkpoint {ckpt_id} is {rec['state']}: nothing to export")
    try:
        from torchloom.checkpoint import export_safetensors
    except ImportError as exc:
        raise TorchloomError(
            f"export needs torch: pip install 'torchloom[torch]' ({exc})"
        ) from None
    target = out_path or Path(f"{ckpt_id}.safetensors")
    try:
        shapes = export_safetensors(rec["storage"], target, key=key)
    except (FileNotFoundError, KeyError) as exc:
        raise InvalidRequestError(str(exc).strip('"')) from None
    out.print(f"{target}: {len(shapes)} tensors of {key!r} from {ckpt_id} (step {rec['step']})")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def rollback(
    to: Annotated[str | None, typer.Option("--to", help="the checkpoint id to load")] = None,
    step: Annotated[
        int | None, typer.Option("--step", help="the newest complete checkpoint at or before it")
    ] = None,
    job: JobOpt = None,
    reason: ReasonOpt = "",
    nats_url: NatsUrl = None,
    state_dir: StateDir = None,
    timeout_s: TimeoutOpt = DEFAULT_TIMEOUT_S,
) -> None:
    """Every rank loads a complete checkpoint at one step and goes on from its step, without
    restarting: weights, optimizer, data cursor, RNG and the desired config go back
    (default: the newest complete checkpoint)."""
    if to is not None and step is not None:
        raise InvalidRequestError("give --to or --step, not both")
    client = weaver_client(nats_url, state_dir, timeout_s)
    job_id = pick_job(client, job)
    values: dict[str, Any] = {"to": to} if to else ({"step": step} if step is not None else {})
    reply = client.control("rollback", job_id, values=values, reason=reason)
    out.print(
        f"v{reply.version}: rollback accepted → every rank loads it at step "
        f"{reply.effective_step} (job {job_id}); `torchloom events -k checkpoint_loaded`"
    )
