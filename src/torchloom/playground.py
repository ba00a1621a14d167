"""The playground's sampling worker: completions from a model's versions, in a process of its own.

The dashboard's playground page (``/playground``) lets a person pick a checkpoint of a job —
or two, side by side — type a prompt and read a sampled completion. The Weaver never loads
torch: it keeps one worker process per host (``python -m torchloom.playground``, started on
the first request, :class:`torchloom.weaver.web.playground.Worker`) and sends it one request
per line of JSON on stdin; the worker answers one line on stdout.

What turns weights into text is the job's **sampler**, named when the Weaver starts
(``torchloom up --sampler gpt=examples/gpt/sample.py:load``): ``load(weights)`` is given a
checkpoint's location — a DCP directory, or a safetensors file an import brought in — and
returns ``generate(prompt, *, max_tokens, temperature, seed) -> str``. :func:`load_weights`
reads either kind into one state dict. The worker keeps the last few loaded models.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

MAX_PROMPT_CHARS = 4000
MAX_TOKENS = 1024
MAX_TEMPERATURE = 5.0
CACHED_MODELS = 4
"""Loaded models the worker keeps (least recently used dropped)."""


class Generate(Protocol):
    def __call__(self, prompt: str, *, max_tokens: int, temperature: float, seed: int) -> str: ...


Loader = Callable[[str], Generate]


def load_weights(location: str, *, key: str = "model") -> dict[str, Any]:
    """The tensors of a model's weights, by name, on the CPU: ``state[key]`` of a DCP
    checkpoint directory (every rank's shards gathered), or every tensor of a safetensors file.

    Raises:
        FileNotFoundError: nothing at ``location``.
        KeyError: a DCP checkpoint with no tensors under ``key``.
    """
    import torch

    if location.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(location))
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not (Path(location) / ".metadata").exists():
        raise FileNotFoundError(f"no checkpoint at {location}")
    with tempfile.TemporaryDirectory(prefix="torchloom-playground-") as tmp:
        whole = Path(tmp) / "whole.pt"
        dcp_to_torch_save(location, whole)
        sd = torch.load(whole, map_location="cpu", weights_only=False)
    part = sd.get(key)
    if not isinstance(part, dict) or not part:
        raise KeyError(f"the checkpoint has no tensors under {key!r}")
    return {k: v for k, v in part.items() if isinstance(v, torch.Tensor)}


def resolve(spec: str) -> Loader:
    """The sampler ``load`` function a spec names: ``path/to/file.py:func`` or ``module:func``.

    Raises:
        ValueError: not of that form, or no such function.
    """
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ValueError(f"sampler {spec!r}: give FILE.py:FUNCTION or MODULE:FUNCTION")
    if where.endswith(".py"):
        path = Path(where).resolve()
        if not path.is_file():
            raise ValueError(f"sampler {spec!r}: no file {path}")
        sys.path.insert(0, str(path.parent))  # its own imports next to it (model.py)
        module_spec = importlib.util.spec_from_file_location(f"_sampler_{path.stem}", path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"sampler {spec!r}: {where} has no function {name}")
    return fn  # type: ignore[no-any-return]


def check(request: dict[str, Any]) -> None:
    """Refuse a sampling request out of range, with a readable reason.

    Raises:
        ValueError: what is wrong.
    """
    prompt, max_tokens = request.get("prompt"), request.get("max_tokens")
    temperature, seed = request.get("temperature"), request.get("seed", 0)
    if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt must be text of at most {MAX_PROMPT_CHARS} characters")
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS:
        raise ValueError(f"max_tokens must be 1 … {MAX_TOKENS}")
    if not isinstance(temperature, int | float) or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be 0 … {MAX_TEMPERATURE:g} (0: the likeliest token)")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError("seed must be an integer")


class Samplers:
    """Loaded models by (sampler spec, weights location, file time), the newest few kept."""

    def __init__(self, *, keep: int = CACHED_MODELS) -> None:
        self.keep = keep
        self._loaded: OrderedDict[tuple[str, str, float], Generate] = OrderedDict()
        self._loaders: dict[str, Loader] = {}

    def get(self, spec: str, weights: str) -> tuple[Generate, float]:
        """The ``generate`` of these weights and the seconds its load took (0: cached)."""
        key = (spec, weights, os.path.getmtime(weights) if os.path.exists(weights) else 0.0)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key], 0.0
        t0 = time.perf_counter()
        if spec not in self._loaders:
            self._loaders[spec] = resolve(spec)
        generate = self._loaders[spec](weights)
        self._loaded[key] = generate
        while len(self._loaded) > self.keep:
            self._loaded.popitem(last=False)
        return generate, time.perf_counter() - t0

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request (``sampler``, ``weights``, ``prompt``, ``max_tokens``, ``temperature``,
        ``seed``) → ``{"ok": True, "text", "load_s", "sample_s"}`` or ``{"ok": False, "error"}``."""
        try:
            check(request)
            generate, load_s = self.get(str(request["sampler"]), str(request["weights"]))
            t0 = time.perf_counter()
            text = generate(
                request["prompt"],
                max_tokens=request["max_tokens"],
                temperature=float(request["temperature"]),
                seed=int(request.get("seed", 0)),
            )
            return {"ok": True, "text": str(text), "load_s": round(load_s, 4),
                    "sample_s": round(time.perf_counter() - t0, 4)}  # fmt: skip
        except Exception as exc:  # the worker goes on; the page shows why
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}


def serve() -> None:
    """The worker's loop: a JSON request per line on stdin, a JSON answer per line on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # a sampler's prints must not break the answers
    samplers = Samplers()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            answer = samplers.answer(request if isinstance(request, dict) else {})
        except json.JSONDecodeError as exc:
            answer = {"ok": False, "error": f"not JSON: {exc}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    serve()
