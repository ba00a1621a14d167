"""A small decoder-only transformer (GPT-2's shape: pre-norm blocks, learned positions, a head
tied to the token embedding), built from a config; byte-level tokens (vocabulary 256)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchloom.mfu import transformer_flops_per_token


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of the model. ``d_model`` must be a multiple of ``heads``."""

    layers: int = 4
    heads: int = 4
    d_model: int = 128
    context: int = 128
    vocab: int = 256
    dropout: float = 0.0

    def problems(self) -> list[str]:
        """What is inconsistent, one line each (empty: fine)."""
        out = []
        for name in ("layers", "heads", "d_model", "context", "vocab"):
            if getattr(self, name) < 1:
                out.append(f"{name}={getattr(self, name)} must be at least 1")
        if self.heads >= 1 and self.d_model % self.heads:
            out.append(f"d_model={self.d_model} is not a multiple of heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"dropout={self.dropout} must be in [0, 1)")
        return out


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.ln1 = nn.LayerNorm(c.d_model)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(c.d_model, 4 * c.d_model), nn.GELU(), nn.Linear(4 * c.d_model, c.d_model)
        )
        self.dropout = c.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        drop = self.dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """``[B, T] int64`` token ids → ``[B, T, vocab]`` float32 logits (T ≤ ``context``)."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.config = c
        self.tok = nn.Embedding(c.vocab, c.d_model)
        self.pos = nn.Embedding(c.context, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab, bias=False)
        self.head.weight = self.tok.weight  # tied
        # the sizes travel with the weights (checkpoints, safetensors exports): a sampler or an
        # evaluator builds the model from them alone
        sizes = torch.tensor([c.layers, c.heads, c.d_model, c.context, c.vocab])
        self.register_buffer("config_sizes", sizes, persistent=True)
        for m in self.modules():  # GPT-2's initialisation: N(0, 0.02), zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @classmethod
    def from_weights(cls, weights: dict[str, torch.Tensor]) -> GPT:
        """The model of a state dict that holds ``config_sizes`` (every checkpoint of this
        job), its weights loaded, in eval mode."""
        layers, heads, d_model, context, vocab = (int(v) for v in weights["config_sizes"])
        model = cls(GPTConfig(layers=layers, heads=heads, d_model=d_model, context=context,
                              vocab=vocab))  # fmt: skip
        weights = dict(weights)
        weights.setdefault("head.weight", weights["tok.weight"])  # tied: exports keep one
        model.load_state_dict(weights)
        return model.eval()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.head(self.ln_f(x))
        return logits

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy, in nats: ``idx`` and ``targets`` ``[B, T] int64``."""
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def flops_per_token(self) -> float:
        """Training FLOPs per token (:func:`torchloom.mfu.transformer_flops_per_token`)."""
        c = self.config
        embedding = self.tok.weight.numel() + self.pos.weight.numel()
        n = sum(p.numel() for p in self.parameters()) - embedding
        n += c.vocab * c.d_model  # the tied head is a matmul all the same
        return transformer_flops_per_token(
            non_embedding_params=n,
            layers=c.layers,
            heads=c.heads,
            head_dim=c.d_model // c.heads,
            context=c.context,
        )
