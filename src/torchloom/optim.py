"""An optimizer that can be switched live: the ``optimizer`` knob picks SGD, AdamW, Lion or
Muon, rebuilt at the effective step with its state mapped, the same on every rank.

Use it where a ``torch.optim`` optimizer would go and bind it to the run::

    opt = SwitchableOptimizer(model, kind="sgd", lr=0.05, momentum=0.9)
    run.bind_optimizer(opt)          # or FTOptimizer(manager, opt) under torchft, bound alike
    ...
    torchloom set optimizer=adamw lr=0.001    # every rank switches at one step

The kinds (with each one's knobs: ``lr``, ``momentum`` — β1 —, ``beta2``, ``weight_decay``):

- ``sgd``: ``torch.optim.SGD`` with momentum ``momentum``.
- ``adamw``: ``torch.optim.AdamW`` with betas ``(momentum, beta2)`` (Loshchilov & Hutter 2019).
- ``lion``: ``lion_pytorch.Lion`` with betas ``(momentum, beta2)`` (Chen et al. 2023, *Symbolic
  Discovery of Optimization Algorithms*); typically an lr 3-10× below AdamW's.
- ``muon``: ``torch.optim.Muon`` for the 2-D weight matrices (momentum ``momentum``, Nesterov,
  its lr adjusted to match AdamW's update RMS, Liu et al. 2025) and ``torch.optim.AdamW`` for
  the rest (biases, norms, convolution kernels) — Jordan et al. 2024, *Muon: An optimizer
  for hidden layers in neural networks*.

State mapping at a switch, per parameter, through a common first moment ``m`` (an
exponential average of the gradient, the scale of one gradient):

- SGD's momentum buffer ``b`` (``b ← μ·b + g``) is ``m = (1 − μ)·b``, and back ``b = m / (1 − μ)``;
- AdamW's and Lion's ``exp_avg`` and Muon's ``momentum_buffer`` are ``m`` as they are;
- AdamW's second moment ``v`` is carried between AdamW and Muon's AdamW part; from a kind
  without one it starts as ``m²`` (an underestimate: the first updates lean toward sign
  descent until ``v`` catches up, about ``1 / (1 − β2)`` steps), with AdamW's step count set
  so that its bias correction is 1 (``m`` and ``v`` are already unbiased averages).

A switch back and forth is therefore not lossless; a checkpoint taken just before the
switch (the Weaver orders one when the ranks run a Checkpointer) is the exact way back.

Checkpoints and torchft heals use :meth:`SwitchableOptimizer.state_dict`: a structure that
does not depend on the kind (per parameter name ``m``, ``v``, ``step``, plus the kind), so DCP
loads it in place into a fresh optimizer of any kind, and the loader takes the saved kind.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from torchloom.protocol.compression import OPTIMIZER_KNOBS, OPTIMIZERS

__all__ = ["OPTIMIZERS", "SwitchableOptimizer"]


class SwitchableOptimizer:
    """One of SGD, AdamW, Lion or Muon over ``module``'s parameters, switchable at a step.

    Behaves as a ``torch.optim.Optimizer`` for the training loop (``step``, ``zero_grad``,
    ``param_groups``, ``state``, ``state_dict``, ``load_state_dict``), so
    ``torchft.optim.OptimizerWrapper`` and LR schedulers take it.

    Args:
        module: the model (its ``named_parameters()`` name the state in checkpoints).
        kind: ``sgd``, ``adamw``, ``lion`` or ``muon``.
        lr: learning rate.
        momentum: SGD's momentum, β1 of AdamW and Lion, Muon's momentum.
        beta2: β2 of AdamW (and Muon's AdamW part) and of Lion.
        weight_decay: weight decay (decoupled for AdamW, Lion and Muon).

    Raises:
        ValueError: an unknown ``kind``.
        ImportError: ``kind="lion"`` without the ``lion-pytorch`` package (``pip install
            torchloom[torch]`` has it).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        kind: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        beta2: float = 0.999,
        weight_decay: float = 0.0,
    ) -> None:
        self.names = {p: n for n, p in module.named_parameters() if p.requires_grad}
        self.hyper: dict[str, float] = {
            "lr": lr,
            "momentum": momentum,
            "beta2": beta2,
            "weight_decay": weight_decay,
        }
        self.kind = ""
        self.inner: list[torch.optim.Optimizer] = []
        # OrderedDicts: torch's RemovableHandle keeps a weak reference to the hooks' dict
        self._pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._build(kind)

    # ---- what a torch optimizer offers --------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.inner for g in opt.param_groups]

    @property
    def state(self) -> dict[torch.Tensor, Any]:
        return {p: s for opt in self.inner for p, s in opt.state.items()}

    def step(self, closure: Callable[[], Any] | None = None) -> None:
        for hook in list(self._pre_hooks.values()):
            hook(self, (), {})
        for opt in self.inner:
            opt.step()
        for hook in list(self._post_hooks.values()):
            hook(self, (), {})

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """``hook(optimizer, args, kwargs)`` before every :meth:`step`, whatever the kind in
        force (torchft's LocalSGD and DiLoCo register one and a post-hook)."""
        handle = RemovableHandle(self._pre_hooks)
        self._pre_hooks[handle.id] = hook
        return handle

    def register_step_post_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """``hook(optimizer, args, kwargs)`` after every :meth:`step`, whatever the kind in
        force (torchft's LocalSGD and DiLoCo count inner steps with one)."""
        handle = RemovableHandle(self._post_hooks)
        self._post_hooks[handle.id] = hook
        return handle

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.inner:
            opt.zero_grad(set_to_none=set_to_none)

    # ---- the knobs ---------------------------------------------------------------------

    def set_hyper(self, **values: float | None) -> None:
        """Set ``lr``, ``momentum``, ``beta2``, ``weight_decay`` (None: unchanged) on every
        param group of the kind in force."""
        for name, value in values.items():
            if name in OPTIMIZER_KNOBS and value is not None:
                self.hyper[name] = float(value)
        h = self.hyper
        for opt in self.inner:
            for group in opt.param_groups:
                group["lr"] = h["lr"]
                group["weight_decay"] = h["weight_decay"]
                if "betas" in group:
                    group["betas"] = (h["momentum"], h["beta2"])
                elif "momentum" in group:
                    group["momentum"] = h["momentum"]

    def switch(self, kind: str) -> None:
        """Rebuild as ``kind`` now, with the state mapped (see the module doc). Call it between
        two steps, the same step on every rank (``run.bind_optimizer`` does).

        Raises:
            ValueError: an unknown ``kind``.
        """
        if kind == self.kind:
            return
        moments = {p: self._moments(p) for p in self.names}
        self._build(kind)
        for p, (m, v) in moments.items():
            if m is not None:
                self._put(p, m, v)

    # ---- checkpoints and heals ---------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"kind": str, "params": {name: {"m", "v", "step"}}}``: float tensors shaped like
        each parameter (``m``: the kind's first buffer as it is, ``v``: AdamW's second moment,
        zeros where the kind has none), ``step`` a 0-d float32 tensor. Zeros mean "no state
        yet", which every kind treats as its fresh state."""
        out: dict[str, Any] = {}
        for p, name in self.names.items():
            st = self._opt_of(p).state.get(p, {})
            first = st.get("momentum_buffer", st.get("exp_avg"))
            out[name] = {
                "m": first.detach().clone() if first is not None else torch.zeros_like(p),
                "v": st["exp_avg_sq"].detach().clone()
                if "exp_avg_sq" in st
                else torch.zeros_like(p),
                "step": torch.as_tensor(float(st.get("step", 0.0)), dtype=torch.float32),
            }
        return {"kind": self.kind, "params": out}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Take the kind and the buffers of :meth:`state_dict` exactly (no mapping).

        Raises:
            ValueError: an unknown kind. KeyError: a parameter name missing from ``sd``.
        """
        self._build(str(sd["kind"]))
        params = sd["params"]
        for p, name in self.names.items():
            entry = params[name]
            st = self._opt_of(p).state
            m, v = entry["m"].to(p.device, p.dtype), entry["v"].to(p.device, p.dtype)
            step = float(entry["step"])
            if self._is_muon_matrix(p) or self.kind == "sgd":
                st[p] = {"momentum_buffer": m.clone()}
            elif self.kind == "lion":
                st[p] = {"exp_avg": m.clone()}
            else:  # AdamW, or Muon's AdamW part
                st[p] = {
                    "step": torch.tensor(step, dtype=torch.float32),
                    "exp_avg": m.clone(),
                    "exp_avg_sq": v.clone(),
                }

    # ---- inside ------------------------------------------------------------------------

    def _is_muon_matrix(self, p: torch.Tensor) -> bool:
        return self.kind == "muon" and p.ndim == 2

    def _opt_of(self, p: torch.Tensor) -> torch.optim.Optimizer:
        return self.inner[0] if len(self.inner) == 1 or self._is_muon_matrix(p) else self.inner[1]

    def _build(self, kind: str) -> None:
        if kind not in OPTIMIZERS:
            raise ValueError(f"optimizer {kind!r} is not one of {list(OPTIMIZERS)}")
        h = self.hyper
        params = list(self.names)
        betas = (h["momentum"], h["beta2"])

        def adamw(ps: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
            return torch.optim.AdamW(ps, lr=h["lr"], betas=betas, weight_decay=h["weight_decay"])

        if kind == "sgd":
            inner: list[torch.optim.Optimizer] = [
                torch.optim.SGD(
                    params, lr=h["lr"], momentum=h["momentum"], weight_decay=h["weight_decay"]
                )
            ]
        elif kind == "adamw":
            inner = [adamw(params)]
        elif kind == "lion":
            from lion_pytorch import Lion

            inner = [Lion(params, lr=h["lr"], betas=betas, weight_decay=h["weight_decay"])]
        else:
            mats = [p for p in params if p.ndim == 2]
            rest = [p for p in params if p.ndim != 2]
            inner = [
                torch.optim.Muon(
                    mats,
                    lr=h["lr"],
                    momentum=h["momentum"],
                    weight_decay=h["weight_decay"],
                    adjust_lr_fn="match_rms_adamw",
                )
            ]
            if rest:
                inner.append(adamw(rest))
        self.kind, self.inner = kind, inner

    def _moments(self, p: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(m, v)`` of ``p`` in common terms (see the module doc); None where there is none."""
        st = self._opt_of(p).state.get(p, {})
        if self.kind == "sgd" or self._is_muon_matrix(p):
            buf = st.get("momentum_buffer")
            if buf is None:
                return None, None
            return (buf * (1.0 - self.hyper["momentum"]) if self.kind == "sgd" else buf), None
        m = st.get("exp_avg")
        return m, st.get("exp_avg_sq")

    def _put(self, p: torch.Tensor, m: torch.Tensor, v: torch.Tensor | None) -> None:
        st = self._opt_of(p).state
        mu, beta2 = self.hyper["momentum"], self.hyper["beta2"]
        if self.kind == "sgd":
            if mu > 0:
                st[p] = {"momentum_buffer": m / (1.0 - mu)}
        elif self._is_muon_matrix(p) or self.kind == "lion":
            key = "momentum_buffer" if self.kind == "muon" else "exp_avg"
            st[p] = {key: m.clone()}
        else:
            warm = math.ceil(10.0 / max(1e-6, 1.0 - beta2))  # bias corrections ≈ 1
            st[p] = {
                "step": torch.tensor(float(warm), dtype=torch.float32),
                "exp_avg": m.clone(),
                "exp_avg_sq": v.clone() if v is not None else m * m,
            }
