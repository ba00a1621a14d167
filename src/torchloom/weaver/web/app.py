"""The dashboard's HTTP app: the page, a read-only JSON API, actions, SSE and /metrics.

Every action goes through :meth:`Weaver.submit <torchloom.weaver.service.Weaver.submit>`,
the same control entry point as the CLI; the handlers run on the Weaver's loop.
The OpenAPI description is at ``/api/openapi.json`` (no docs UI: it would load
from a CDN, and the page must work air-gapped).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import importlib.resources
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from torchloom.errors import InvalidRequestError
from torchloom.protocol import ControlReply, ControlRequest
from torchloom.weaver import checkpoints, views
from torchloom.weaver.service import Weaver
from torchloom.weaver.state import Job
from torchloom.weaver.web import frames
from torchloom.weaver.web.auth import SESSION_COOKIE, Access, AccessMiddleware, require_json
from torchloom.weaver.web.feed import Feed
from torchloom.weaver.web.metrics import IntakeCollector, WeaverCollector, exposition
from torchloom.weaver.web.playground import Playground, store_import
from torchloom.weaver.web.schema import (
    CheckpointsView,
    ConfigView,
    EventView,
    Header,
    Health,
    RankDetail,
    SeriesView,
    Summary,
)

STATIC = importlib.resources.files("torchloom.weaver.web") / "static"

_STATUS_BY_CODE = {
    "invalid_knob": 400,
    "invalid_request": 400,
    "decode_error": 400,
    "unknown_job": 404,
    "unknown_replica": 404,
    "not_reachable": 503,
    "rate_limited": 429,
}

EVENT_CATEGORIES: dict[str, frozenset[str]] = {
    "failure": frozenset({"rank_failed", "rank_hung", "rank_suspect", "commit_failed"}),
    "recovery": frozenset({"healed", "rank_training", "rank_joining", "quorum_changed"}),
    "drain": frozenset({"rank_drained", "replica_drained"}),
    "config": frozenset({"config_set", "config_applied", "config_apply_late", "job_started"}),
}
"""Event kinds by filter category; kinds starting with ``policy_`` are category ``policy``."""


def event_category(kind: str) -> str:
    if kind.startswith("policy"):
        return "policy"
    for name, kinds in EVENT_CATEGORIES.items():
        if kind in kinds:
            return name
    return "other"


class ErrorDetail(BaseModel):
    code: str
    message: str
    knob: str | None = None


class ErrorReply(BaseModel):
    """What a refused or failed request answers."""

    ok: bool = False
    error: ErrorDetail


NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorReply, "description": "no such job"}
}


class SetBody(BaseModel):
    """Change knobs, job-wide or for one replica group."""

    values: dict[str, Any] = Field(
        min_length=1, description="knob name → new value (null turns a knob off)"
    )
    replica_id: str | None = Field(None, description="one replica group; omitted = job-wide")
    reason: str = ""


class ActionBody(BaseModel):
    reason: str = ""


class DrainBody(BaseModel):
    """Drain a replica group (or the groups using a device) at an agreed step."""

    replica_id: str | None = None
    device: str | None = None
    replace: bool = Field(False, description="start a fresh replica group in its place")
    reason: str = ""


REFUSED: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorReply, "description": what}
    for code, what in (
        (400, "refused: invalid knob value or request (error.knob names the knob)"),
        (404, "no such job or replica group"),
        (415, "not sent as application/json"),
        (503, "not applied: the Weaver could not store it"),
    )
}


class PinBody(BaseModel):
    """Pin a checkpoint (a starting job resumes from it; it cannot be deleted), or unpin it."""

    pinned: bool = True
    reason: str = ""


class SampleBody(BaseModel):
    """A completion from one checkpoint's weights (the job's sampler, in the worker process)."""

    checkpoint: str
    prompt: str = Field("", max_length=4000)
    max_tokens: int = Field(64, ge=1, le=1024)
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    seed: int = 0


class ImportBody(BaseModel):
    """A safetensors file of model weights, base64-encoded (state changes travel as JSON)."""

    name: str = Field("weights.safetensors", max_length=200)
    data: str
    step: int | None = Field(None, ge=0)
    reason: str = ""


class RollbackBody(BaseModel):
    """Which complete checkpoint every rank loads: ``to`` (an id), else the newest at or
    before ``step``, else the newest; knob values to change with it (``values``)."""

    to: str | None = None
    step: int | None = Field(None, ge=0)
    values: dict[str, Any] = Field(default_factory=dict)
    reason: str = ""


class SessionBody(BaseModel):
    token: str


class ControlResult(BaseModel):
    """The Weaver's answer to an action."""

    ok: bool
    version: int | None = None
    effective_step: int | None = None
    error: ErrorDetail | None = None
    data: Any = Field(None, description="what the action made (a checkpoint's id or record)")


def create_app(
    weaver: Weaver, feed: Feed, access: Access, playground: Playground | None = None
) -> FastAPI:
    """The ASGI app of the dashboard for ``weaver`` (run it on the Weaver's loop)."""
    play = playground or Playground()
    app = FastAPI(
        title="torchloom dashboard API",
        version="1",
        description="Read-only views of the Weaver's state, actions through its control entry "
        "point, a Server-Sent Events feed and Prometheus metrics.",
        openapi_url="/api/openapi.json",
        dependencies=[Depends(require_json)],  # every POST route, present and future
        responses={
            422: {"model": ErrorReply, "description": "the request does not validate"},
        },
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(AccessMiddleware, access=access)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        return JSONResponse(
            {"ok": False, "error": {"code": code, "message": str(exc.detail)}},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()
        )
        return JSONResponse(
            {"ok": False, "error": {"code": "invalid_request", "message": problems}},
            status_code=422,
        )

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    collectors = [
        WeaverCollector(weaver.state, feed.tracks, feed.clock),
        IntakeCollector(weaver.ingest),
    ]

    def find_job(job_id: str) -> Job | None:
        job = weaver.state.jobs.get(job_id)
        return job if job is not None and frames.shown(job) else None

    def not_found(job_id: str) -> JSONResponse:
        return JSONResponse(
            {"ok": False, "error": {"code": "unknown_job", "message": f"no job {job_id!r}"}},
            status_code=404,
        )

    async def submit(request: Request, req: ControlRequest) -> JSONResponse:
        who = request.client.host if request.client else "?"
        req.requested_by = f"web:{who}"
        reply: ControlReply = await weaver.submit(req)
        body: dict[str, Any] = {
            "ok": reply.ok,
            "version": reply.version,
            "effective_step": reply.effective_step,
            "error": None,
            "data": reply.data,
        }
        if reply.error is not None:
            body["error"] = {
                "code": reply.error.code,
                "message": reply.error.message,
                "knob": reply.error.knob,
            }
        status = (
            200 if reply.ok else _STATUS_BY_CODE.get(reply.error.code if reply.error else "", 409)
        )
        return JSONResponse(body, status_code=status)

    # ---- the page ------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> HTMLResponse:
        page = "index.html" if access.allowed(request.headers, request.cookies) else "login.html"
        return HTMLResponse((STATIC / page).read_text(), headers={"cache-control": "no-store"})

    @app.get("/playground", include_in_schema=False)
    async def playground_page(request: Request) -> HTMLResponse:
        ok = access.allowed(request.headers, request.cookies)
        page = "playground.html" if ok else "login.html"
        return HTMLResponse((STATIC / page).read_text(), headers={"cache-control": "no-store"})

    @app.post("/api/session", include_in_schema=False)
    async def login(body: SessionBody) -> Response:
        if not access.required:
            return JSONResponse({"ok": True})
        if not access.check_token(body.token):
            return JSONResponse(
                {"ok": False, "error": {"code": "unauthorized", "message": "wrong token"}},
                status_code=401,
            )
        resp = JSONResponse({"ok": True})
        resp.set_cookie(SESSION_COOKIE, access.session_value(), httponly=True, samesite="strict")
        return resp

    # ---- read-only API -------------------------------------------------------------

    @app.get("/api/health", tags=["read"])
    async def health() -> Health:
        """The Weaver's health: NATS link and round trip (ms), loop lateness (ms), drops."""
        return feed.health()

    @app.get("/api/jobs", tags=["read"])
    async def jobs() -> list[Header]:
        """Every job with its run header (step, samples/s, loss, accuracy, groups, goodput)."""
        health = feed.health()
        return [
            frames.header(weaver.state.jobs[j], feed.track(j), health)
            for j in frames.job_ids(weaver.state)
        ]

    @app.get("/api/jobs/{job_id}", tags=["read"], response_model=Header, responses=NOT_FOUND)
    async def job(job_id: str) -> Header | JSONResponse:
        """One job's run header."""
        j = find_job(job_id)
        return frames.header(j, feed.track(job_id), feed.health()) if j else not_found(job_id)

    @app.get(
        "/api/jobs/{job_id}/ranks",
        tags=["read"],
        response_model=list[RankDetail],
        responses={
            **NOT_FOUND,
            400: {"model": ErrorReply, "description": "an unknown state in the filter"},
        },
    )
    async def ranks(
        job_id: str,
        response: Response,
        state: list[str] | None = Query(
            None, description="only ranks in these states (training, failed, …; live, dead)"
        ),
        replica_id: str | None = Query(None, description="only this replica group"),
        limit: int = Query(1000, ge=0, le=views.MAX_PAGE, description="ranks per page"),
        offset: int = Query(0, ge=0, description="ranks skipped first"),
        sort: Literal["rank", "attention", "slowest", "step"] = Query("rank"),
    ) -> list[RankDetail] | JSONResponse:
        """The DR map, a page at a time: each rank with host, device, state, step, figures and
        config versions. ``X-Total-Count`` says how many ranks matched the filters."""
        j = find_job(job_id)
        if j is None:
            return not_found(job_id)
        try:
            query = views.StatusQuery.from_values(
                {"state": state, "limit": limit, "offset": offset, "sort": sort}, replica_id
            )
        except InvalidRequestError as exc:
            return JSONResponse(
                {"ok": False, "error": {"code": exc.code, "message": exc.message}},
                status_code=400,
            )
        page, matched = views.select(j, query)
        response.headers["X-Total-Count"] = str(matched)
        now = feed.clock()
        return [frames.rank_detail(r, j, now) for r in page]

    @app.get(
        "/api/jobs/{job_id}/summary", tags=["read"], response_model=Summary, responses=NOT_FOUND
    )
    async def summary(job_id: str) -> Summary | JSONResponse:
        """A job of any size in a few numbers: ranks per state, replica groups, applied config
        versions, the slowest ranks, step outliers."""
        j = find_job(job_id)
        return views.summary(j) if j else not_found(job_id)  # type: ignore[return-value]

    @app.get(
        "/api/jobs/{job_id}/config", tags=["read"], response_model=ConfigView, responses=NOT_FOUND
    )
    async def config(job_id: str) -> ConfigView | JSONResponse:
        """The desired config: values, overrides, knob registry with bounds, recent applies."""
        j = find_job(job_id)
        return frames.config(j) if j else not_found(job_id)

    @app.get(
        "/api/jobs/{job_id}/events",
        tags=["read"],
        response_model=list[EventView],
        responses=NOT_FOUND,
    )
    async def events(
        job_id: str,
        category: str | None = Query(
            None, description="failure | recovery | drain | config | policy | other"
        ),
        kind: str | None = Query(None, description="one event kind, e.g. rank_failed"),
        after_seq: int = Query(0, ge=0, description="only events after this seq"),
        limit: int = Query(500, ge=1, le=2000),
    ) -> list[EventView] | JSONResponse:
        """The job's event history (kept across Weaver restarts), oldest first."""
        if find_job(job_id) is None and job_id not in feed.tracks:
            return not_found(job_id)
        out = [
            e
            for e in feed.track(job_id).events_after(after_seq)
            if (kind is None or e["kind"] == kind)
            and (category is None or event_category(e["kind"]) == category)
        ]
        return out[-limit:]

    @app.get(
        "/api/jobs/{job_id}/series", tags=["read"], response_model=SeriesView, responses=NOT_FOUND
    )
    async def series(
        job_id: str, since_ts: float = Query(0.0, description="Unix seconds")
    ) -> SeriesView | JSONResponse:
        """Chart series: ``ts`` and columns ``loss/<replica>``, ``acc/<replica>``,
        ``sps/<replica>`` (samples/s), ``sps`` and ``step`` (job-wide)."""
        if find_job(job_id) is None:
            return not_found(job_id)
        return feed.track(job_id).series.since(since_ts)

    @app.get("/api/stream", tags=["read"])
    async def stream(job: str | None = Query(None)) -> StreamingResponse:
        """Server-Sent Events: a ``snapshot`` frame, then ``update`` frames (JSON, one per
        ``data:`` line) every push interval; a fresh snapshot when the client fell behind."""
        sub = feed.subscribe(job or feed.default_job())

        async def gen() -> AsyncIterator[bytes]:
            try:
                yield b"retry: 1000\n\n"
                while True:
                    out = await feed.frames_for(sub)
                    if not out:
                        yield b": keepalive\n\n"
                    for data in out:
                        yield b"data: " + data + b"\n\n"
            finally:
                feed.unsubscribe(sub)

        return StreamingResponse(
            gen(),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    @app.get("/metrics", tags=["read"], response_class=Response)
    async def metrics(
        name: list[str] | None = Query(None, alias="name[]", description="only these families"),
    ) -> Response:
        """Prometheus text exposition: per-rank step, step time, loss, samples/s, state,
        heartbeat age, applied config version; per-job failures and config version; the
        Weaver's intake (messages, bytes, lag histogram). ``name[]`` (repeatable) limits
        the answer to those metric families, as Prometheus' own exporters do."""
        return Response(exposition(collectors, name), media_type="text/plain; version=0.0.4")

    # ---- actions (the control entry point) -----------------------------------------

    @app.post(
        "/api/jobs/{job_id}/config",
        tags=["actions"],
        response_model=ControlResult,
        responses=REFUSED,
    )
    async def set_knobs(job_id: str, body: SetBody, request: Request) -> JSONResponse:
        """Change knobs (validated against the knob registry); applied at a common step."""
        return await submit(
            request,
            ControlRequest(
                op="set",
                job_id=job_id,
                values=body.values,
                replica_id=body.replica_id,
                reason=body.reason,
            ),
        )

    def run_state_action(op: Literal["pause", "resume", "stop"]) -> Any:
        async def action(
            job_id: str, request: Request, body: ActionBody | None = None
        ) -> JSONResponse:
            reason = body.reason if body else ""
            return await submit(request, ControlRequest(op=op, job_id=job_id, reason=reason))

        action.__doc__ = f"{op.capitalize()} the job at a common step."
        return action

    for op in ("pause", "resume", "stop"):
        app.post(
            f"/api/jobs/{{job_id}}/{op}",
            tags=["actions"],
            response_model=ControlResult,
            responses=REFUSED,
            operation_id=f"{op}_job",
        )(run_state_action(op))

    @app.post(
        "/api/jobs/{job_id}/drain",
        tags=["actions"],
        response_model=ControlResult,
        responses=REFUSED,
    )
    async def drain(job_id: str, body: DrainBody, request: Request) -> JSONResponse:
        """Drain a replica group (``replica_id``) or those on a ``device`` at an agreed step."""
        return await submit(
            request,
            ControlRequest(
                op="drain",
                job_id=job_id,
                replica_id=body.replica_id,
                device=body.device,
                replace=body.replace,
                reason=body.reason,
            ),
        )

    # ---- checkpoints ----------------------------------------------------------------

    @app.get(
        "/api/jobs/{job_id}/checkpoints",
        tags=["read"],
        response_model=CheckpointsView,
        responses=NOT_FOUND,
    )
    async def checkpoint_list(job_id: str) -> CheckpointsView | JSONResponse:
        """The job's checkpoint registry, newest first, and the one a starting job loads."""
        j = find_job(job_id)
        return checkpoints.listing(j) if j else not_found(job_id)  # type: ignore[return-value]

    @app.post(
        "/api/jobs/{job_id}/checkpoints",
        tags=["actions"],
        response_model=ControlResult,
        responses=REFUSED,
    )
    async def checkpoint_save(
        job_id: str, request: Request, body: ActionBody | None = None
    ) -> JSONResponse:
        """Order a checkpoint at a step every rank agrees on (``data``: its id)."""
        reason = body.reason if body else ""
        return await submit(request, ControlRequest(op="checkpoint", job_id=job_id, reason=reason))

    @app.post(
        "/api/jobs/{job_id}/checkpoints/{checkpoint_id}/pin",
        tags=["actions"],
        response_model=ControlResult,
        responses=REFUSED,
    )
    async def checkpoint_pin(
        job_id: str, checkpoint_id: str, request: Request, body: PinBody | None = None
    ) -> JSONResponse:
        """Pin a complete checkpoint (``pinned: false`` unpins it)."""
        b = body or PinBody()
        values = {"id": checkpoint_id, "pinned": b.pinned}
        return await submit(
            request,
            ControlRequest(op="checkpoint_pin", job_id=job_id, values=values, reason=b.reason),
        )

    @app.post(
        "/api/jobs/{job_id}/checkpoints/{checkpoint_id}/delete",
        tags=["actions"],
        response_model=ControlResult,
        responses=REFUSED,
    )
    async def checkpoint_delete(
        job_id: str, checkpoint_id: str, request: Request, body: ActionBody | None = None
    ) -> JSONResponse:
        """Take a checkpoint out of the registry; its files go with the next save."""
        return await submit(
            request,
            ControlRequest(
                op="checkpoint_delete",
                job_id=job_id,
                values={"id": checkpoint_id},
                reason=body.reason if body else "",
            ),
        )

    @app.post(
        "/api/jobs/{job_id}/rollback",
        tags=["actions"],
        response_model=ControlResult,
        responses=REFUSED,
    )
    async def rollback(job_id: str, body: RollbackBody, request: Request) -> JSONResponse:
        """Every rank loads a complete checkpoint at one step and goes on from its step."""
        values: dict[str, Any] = dict(body.values)
        if body.to is not None:
            values["to"] = body.to
        if body.step is not None:
            values["step"] = body.step
        return await submit(
            request,
            ControlRequest(op="rollback", job_id=job_id, values=values, reason=body.reason),
        )

    @app.get(
        "/api/jobs/{job_id}/checkpoints/{checkpoint_id}/export",
        tags=["read"],
        response_class=Response,
        responses={
            200: {"content": {"application/octet-stream": {}}, "description": "safetensors"},
            **REFUSED,
        },
    )
    async def checkpoint_export(job_id: str, checkpoint_id: str) -> Response:
        """A complete checkpoint's model weights as one safetensors file (made by a separate
        Python process with torch, so the Weaver never loads torch)."""
        j = find_job(job_id)
        if j is None:
            return not_found(job_id)
        rec = j.checkpoints.get(checkpoint_id)
        if rec is None or rec.state not in ("complete", "imported"):
            state = "no such checkpoint" if rec is None else f"checkpoint is {rec.state}"
            return JSONResponse(
                {"ok": False, "error": {"code": "invalid_request", "message": state}},
                status_code=404 if rec is None else 400,
            )
        if rec.state == "imported":  # already one safetensors file
            data, error = await _read(rec.storage)
        else:
            data, error = await export_weights(rec.storage)
        if data is None:
            return JSONResponse(
                {"ok": False, "error": {"code": "not_reachable", "message": error}},
                status_code=503,
            )
        name = f"{job_id}-{checkpoint_id}.safetensors"
        return Response(
            data,
            media_type="application/octet-stream",
            headers={"content-disposition": f'attachment; filename="{name}"'},
        )

    # ---- the playground -------------------------------------------------------------

    @app.get("/api/playground", tags=["read"])
    async def playground_jobs() -> dict[str, Any]:
        """The jobs that can be sampled (a sampler was named at ``torchloom up --sampler``)."""
        return {"samplers": dict(play.samplers), "imports": play.imports_dir is not None}

    @app.post(
        "/api/jobs/{job_id}/playground/sample",
        tags=["actions"],
        responses={**REFUSED, **NOT_FOUND},
    )
    async def playground_sample(job_id: str, body: SampleBody) -> JSONResponse:
        """A completion of ``prompt`` by a complete (or imported) checkpoint's weights: the
        job's sampler runs in the playground's worker process, never on the Weaver's loop."""
        j = find_job(job_id)
        if j is None:
            return not_found(job_id)
        spec = play.samplers.get(job_id)
        rec = j.checkpoints.get(body.checkpoint)
        why = (
            f"no sampler for job {job_id!r}: start the Weaver with --sampler {job_id}=FILE.py:FUNC"
            if spec is None
            else f"no checkpoint {body.checkpoint!r}"
            if rec is None
            else f"checkpoint {rec.id} is {rec.state}: only complete or imported ones are sampled"
            if rec.state not in ("complete", "imported")
            else ""
        )
        if why:
            status = 404 if spec is not None and rec is None else 400
            return JSONResponse(
                {"ok": False, "error": {"code": "invalid_request", "message": why}},
                status_code=status,
            )
        assert rec is not None
        answer = await play.worker.sample(
            {"sampler": spec, "weights": rec.storage, "prompt": body.prompt,
             "max_tokens": body.max_tokens, "temperature": body.temperature, "seed": body.seed}
        )  # fmt: skip
        if not answer.get("ok"):
            message = str(answer.get("error", "sampling failed"))
            return JSONResponse(
                {"ok": False, "error": {"code": "sampling_failed", "message": message}},
                status_code=502,
            )
        return JSONResponse({**answer, "checkpoint": rec.id, "step": rec.step})

    @app.post(
        "/api/jobs/{job_id}/checkpoints/import",
        tags=["actions"],
        response_model=ControlResult,
        responses=REFUSED,
    )
    async def checkpoint_import(job_id: str, body: ImportBody, request: Request) -> JSONResponse:
        """Bring model weights in from a safetensors file as an ``imported`` registry entry
        (sampled and exported like a checkpoint; never resumed or rolled back to)."""
        if find_job(job_id) is None:
            return not_found(job_id)
        try:
            if play.imports_dir is None:
                raise InvalidRequestError("this Weaver keeps no imports (no state dir)")
            try:
                raw = base64.b64decode(body.data, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidRequestError("data is not base64") from None
            stored = await asyncio.to_thread(store_import, play.imports_dir, job_id, raw)
        except InvalidRequestError as exc:
            return JSONResponse(
                {"ok": False, "error": {"code": exc.code, "message": str(exc)}}, status_code=400
            )
        values = {**stored, "source": body.name, "step": body.step}
        return await submit(
            request,
            ControlRequest(op="checkpoint_import", job_id=job_id, values=values,
                           reason=body.reason),
        )  # fmt: skip

    return app


async def _read(path: str) -> tuple[bytes | None, str]:
    try:
        return await asyncio.to_thread(Path(path).read_bytes), ""
    except OSError as exc:
        return None, f"the imported file cannot be read: {exc.strerror or exc}"


EXPORT_TIMEOUT_S = 600.0
"""How long the dashboard's export of a checkpoint may take, in seconds."""


async def export_weights(storage: str) -> tuple[bytes | None, str]:
    """The safetensors bytes of the checkpoint in ``storage`` (its DCP directory), written by
    ``torchloom.checkpoint.export_safetensors`` in a child Python; or None and why not."""
    with tempfile.TemporaryDirectory(prefix="torchloom-export-") as tmp:
        out = Path(tmp) / "model.safetensors"
        code = (
            "import sys; from torchloom.checkpoint import export_safetensors; "
            "export_safetensors(sys.argv[1], sys.argv[2])"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            storage,
            str(out),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), EXPORT_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            return None, f"the export took over {EXPORT_TIMEOUT_S:g} s"
        if proc.returncode != 0:
            last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            return None, f"the export failed: {last[0]}"
        return out.read_bytes(), ""
