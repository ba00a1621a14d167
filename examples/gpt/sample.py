"""The GPT job's sampler for the dashboard's playground (``torchloom up --sampler
gpt=examples/gpt/sample.py:load``): builds the model from a checkpoint's weights alone (its
``config_sizes``) and completes a prompt byte by byte.

It runs in the playground's worker process (:mod:`torchloom.playground`), never in the Weaver.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import GPT

from torchloom.playground import Generate, load_weights


def load(weights: str) -> Generate:
    """``generate(prompt, *, max_tokens, temperature, seed) -> str`` for the weights at
    ``weights`` (a DCP checkpoint directory or a safetensors file)."""
    model = GPT.from_weights(load_weights(weights))
    context = model.config.context

    @torch.no_grad()
    def generate(prompt: str, *, max_tokens: int, temperature: float, seed: int) -> str:
        g = torch.Generator().manual_seed(seed)
        idx = torch.tensor([list(prompt.encode("utf-8")) or [10]], dtype=torch.long)
        out: list[int] = []
        for _ in range(max_tokens):
            logits = model(idx[:, -context:])[0, -1]
            if temperature == 0:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=g))
            out.append(token)
            idx = torch.cat([idx, torch.tensor([[token]])], dim=1)
        return bytes(out).decode("utf-8", errors="replace")

    return generate
