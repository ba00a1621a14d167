"""The playground's server side: the sampling worker process and the import of weights.

The Weaver's loop never runs a model: :class:`Worker` keeps one ``python -m
torchloom.playground`` child (started on the first request, started again when it dies or a
request runs past ``timeout_s``) and talks to it a JSON line at a time, one request at a time.
:func:`store_import` checks and writes an uploaded safetensors file; the registry entry for it
is made through the control entry point (``checkpoint_import``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import struct
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchloom.errors import InvalidRequestError

log = logging.getLogger("torchloom.weaver.web")

MAX_IMPORT_BYTES = 2 << 30
"""The largest safetensors file an import takes (2 GiB)."""


@dataclass
class Playground:
    """What the playground needs: the samplers by job, where imports go, the worker.

    Attributes:
        samplers: job id → sampler spec (``FILE.py:FUNC`` or ``MODULE:FUNC``,
            :mod:`torchloom.playground`); a job without one cannot be sampled.
        imports_dir: where imported weights are written (``<dir>/<job>/<uuid>.safetensors``).
        timeout_s: the longest one sampling request may take (load included), seconds.
    """

    samplers: dict[str, str] = field(default_factory=dict)
    imports_dir: Path | None = None
    timeout_s: float = 120.0
    worker: Worker = field(init=False)

    def __post_init__(self) -> None:
        self.worker = Worker(timeout_s=self.timeout_s)


class Worker:
    """One sampling process, one request at a time (asyncio: the Weaver's loop only waits)."""

    def __init__(self, *, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def _start(self) -> asyncio.subprocess.Process:
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "torchloom.playground",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL, limit=64 << 20,
            )  # fmt: skip
            log.info("playground worker started (pid %d)", self._proc.pid)
        return self._proc

    async def sample(self, request: dict[str, Any]) -> dict[str, Any]:
        """The worker's answer to one request (:meth:`torchloom.playground.Samplers.answer`):
        ``{"ok": True, "text", …}`` or ``{"ok": False, "error"}`` — also when the worker died or
        took longer than ``timeout_s`` (it is then killed; the next request starts another)."""
        async with self._lock:
            try:
                proc = await self._start()
            except OSError as exc:
                return {"ok": False, "error": f"the sampling worker did not start: {exc}"}
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps(request).encode() + b"\n")
                await proc.stdin.drain()
                line = await asyncio.wait_for(proc.stdout.readline(), self.timeout_s)
            except TimeoutError:
                await self.close()
                return {"ok": False, "error": f"sampling took over {self.timeout_s:g} s"}
            except (ConnectionError, BrokenPipeError) as exc:
                await self.close()
                return {"ok": False, "error": f"the sampling worker ended: {exc}"}
            if not line:
                await self.close()
                return {"ok": False, "error": "the sampling worker ended (see the Weaver's log)"}
            try:
                answer = json.loads(line)
            except json.JSONDecodeError:
                return {"ok": False, "error": "the sampling worker's answer is not JSON"}
            return answer if isinstance(answer, dict) else {"ok": False, "error": "bad answer"}

    async def close(self) -> None:
        """End the worker (if any)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def safetensors_tensors(data: bytes) -> int:
    """Check that ``data`` is a safetensors file (an 8-byte little-endian header length, a JSON
    header of tensors with dtype, shape and data offsets inside the file); its tensor count.

    Raises:
        InvalidRequestError: it is not, said plainly.
    """
    if len(data) < 8:
        raise InvalidRequestError("not a safetensors file: shorter than its header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100 << 20:
        raise InvalidRequestError("not a safetensors file: its header length is out of range")
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequestError("not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise InvalidRequestError("not a safetensors file: its header is not a JSON object")
    body = len(data) - 8 - n
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, t in tensors.items():
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if not (
            isinstance(t, dict)
            and isinstance(t.get("dtype"), str)
            and isinstance(t.get("shape"), list)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and 0 <= offsets[0] <= offsets[1] <= body
        ):
            raise InvalidRequestError(f"not a safetensors file: tensor {name!r} is malformed")
    if not tensors:
        raise InvalidRequestError("the file holds no tensor")
    return len(tensors)


def store_import(imports_dir: Path, job_id: str, data: bytes) -> dict[str, Any]:
    """Check ``data`` (:func:`safetensors_tensors`) and write it under ``imports_dir``; the
    registry values of the entry: ``storage`` (its path), ``files`` (name → SHA-256),
    ``bytes``, ``tensors``.

    Raises:
        InvalidRequestError: too large, or not a safetensors file.
    """
    if len(data) > MAX_IMPORT_BYTES:
        raise InvalidRequestError(f"the file is larger than {MAX_IMPORT_BYTES >> 20} MiB")
    tensors = safetensors_tensors(data)
    where = imports_dir / job_id
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{uuid.uuid4().hex[:12]}.safetensors"
    path.write_bytes(data)
    return {
        "storage": str(path),
        "files": {path.name: hashlib.sha256(data).hexdigest()},
        "bytes": len(data),
        "tensors": tensors,
    }
