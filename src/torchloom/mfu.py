"""Model FLOPs utilisation (MFU): the FLOPs a transformer's training step needs, against the
device's peak.

``MFU = tokens/s × FLOPs per token / peak FLOP/s`` (Chowdhery et al. 2022, *PaLM*, Appendix B).
FLOPs per token of training (forward and backward) for a decoder-only transformer:

    6·N + 12·L·H·Q·T

with N the parameters outside the embeddings, L layers, H heads, Q the head dimension and T the
context length: 6·N for the matrix multiplications (2 forward, 4 backward per parameter;
Kaplan et al. 2020, *Scaling Laws*), 12·L·H·Q·T for attention's two T×T products. Recompute
(activation checkpointing) is not counted — it is *model* FLOPs, not hardware FLOPs.

Peaks are dense bf16 tensor-core figures from the vendors' data sheets (without sparsity); a
CPU has no entry: :func:`peak_flops` returns None and MFU is not reported, only the achieved
FLOP/s.
"""

from __future__ import annotations

PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,  # SXM; NVIDIA H200 data sheet
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # a name without a form factor: the SXM part
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "MI300X": 1307e12,  # AMD Instinct MI300X data sheet
    "MI250X": 383e12,
}
"""Dense bf16 peak FLOP/s by a substring of the device's name (``torch.cuda.get_device_name``);
the longest matching key wins (``H100 PCIe`` before ``H100``)."""


def transformer_flops_per_token(
    *, non_embedding_params: int, layers: int, heads: int, head_dim: int, context: int
) -> float:
    """Training FLOPs per token (forward + backward) of a decoder-only transformer:
    ``6·N + 12·L·H·Q·T`` (PaLM, Appendix B)."""
    return 6.0 * non_embedding_params + 12.0 * layers * heads * head_dim * context


def peak_flops(device_name: str | None) -> float | None:
    """The dense bf16 peak FLOP/s of a device by its name, or None (a CPU, an unknown part)."""
    if not device_name:
        return None
    matches = [key for key in PEAK_BF16_FLOPS if key.lower() in device_name.lower()]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def mfu(*, tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Achieved over peak FLOP/s (0..1), or None without a peak (a CPU)."""
    if not peak or peak <= 0:
        return None
    return tokens_per_s * flops_per_token / peak
