"""Names of gradient codecs and optimizers: the grammar of the ``grad_compression`` and
``optimizer`` knobs, and what each codec sends. Pure; the codecs themselves are in
:mod:`torchloom.comm` (training side, torch).

Codecs (``grad_compression``):

- ``none``: the gradient as is (float32: 4 bytes per element).
- ``bf16`` / ``fp16``: cast to 16 bits for the allreduce and back (2 bytes per element).
- ``powersgd:R``: rank-``R`` approximation of each gradient matrix, ``M ≈ P Qᵀ``, by one
  power iteration with error feedback and warm start — Vogels et al. 2019, *PowerSGD:
  Practical Low-Rank Gradient Compression for Distributed Optimization* (NeurIPS). An
  ``n×m`` matrix sends ``R·(n+m)`` elements instead of ``n·m``; vectors go as they are.
- ``topk:F``: the fraction ``F`` of each gradient's largest-magnitude elements (values and
  indices), the rest kept as error feedback and added to the next step's gradient — Lin et
  al. 2018, *Deep Gradient Compression* (ICLR). Sends ``8·F`` bytes per element, gathered
  from every rank.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

CodecKind = Literal["none", "bf16", "fp16", "powersgd", "topk"]

CODEC_PATTERN = r"none|bf16|fp16|powersgd:(?:[1-9]|[1-5][0-9]|6[0-4])|topk:0?\.(?=\d*[1-9])\d{1,6}"
"""What ``grad_compression`` accepts: ``none``, ``bf16``, ``fp16``, ``powersgd:R`` (R in 1..64)
and ``topk:F`` (F a decimal fraction in (0, 1), e.g. ``0.01``)."""

OPTIMIZERS = ("sgd", "adamw", "lion", "muon")
"""What the ``optimizer`` knob accepts (see :mod:`torchloom.optim`)."""

OPTIMIZER_KNOBS = ("lr", "momentum", "beta2", "weight_decay")
"""The optimizer's hyperparameter knobs: a rebuilt optimizer takes them all."""


@dataclass(frozen=True, slots=True)
class Codec:
    """A parsed ``grad_compression`` value.

    Attributes:
        kind: ``none``, ``bf16``, ``fp16``, ``powersgd`` or ``topk``.
        rank: PowerSGD's approximation rank (0 for other kinds).
        fraction: Top-K's kept fraction (0.0 for other kinds).
    """

    kind: CodecKind
    rank: int = 0
    fraction: float = 0.0

    @property
    def text(self) -> str:
        if self.kind == "powersgd":
            return f"powersgd:{self.rank}"
        if self.kind == "topk":
            return f"topk:{self.fraction:g}"
        return self.kind

    def bytes_per_element(self, rows: int = 0, cols: int = 0) -> float:
        """Bytes this codec sends per float32 gradient element, for an ``rows×cols`` matrix
        (PowerSGD; other codecs ignore the shape). A rough figure for planning: the
        measured bytes come from the ranks (``comm_bytes`` in telemetry)."""
        if self.kind in ("bf16", "fp16"):
            return 2.0
        if self.kind == "topk":
            return 8.0 * self.fraction
        if self.kind == "powersgd" and rows > 1 and cols > 1:
            return min(4.0, 4.0 * self.rank * (rows + cols) / (rows * cols))
        return 4.0


def parse_codec(text: str) -> Codec:
    """Parse a ``grad_compression`` value.

    Raises:
        ValueError: ``text`` is not of the grammar :data:`CODEC_PATTERN`.
    """
    if not re.fullmatch(CODEC_PATTERN, text):
        raise ValueError(
            f"{text!r} is not a codec; use none, bf16, fp16, powersgd:R (R 1..64) or topk:F (0 < F < 1)"
        )
    if text.startswith("powersgd:"):
        return Codec("powersgd", rank=int(text.split(":", 1)[1]))
    if text.startswith("topk:"):
        fraction = float(text.split(":", 1)[1])
        assert 0.0 < fraction < 1.0 and math.isfinite(fraction)
        return Codec("topk", fraction=fraction)
    kind: CodecKind = "none" if text == "none" else ("bf16" if text == "bf16" else "fp16")
    return Codec(kind)
