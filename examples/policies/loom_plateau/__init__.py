"""An example torchloom policy plugin: ``ReduceLROnPlateau``, decided by the Weaver for the
whole job instead of by each rank.

When the median loss of the ranks' last ``window_steps`` logged losses has not improved
on the best median seen ``patience_steps`` earlier by ``min_delta`` (relative), lower
``lr`` by ``factor``, down to ``min_lr``. Pure: it reads the Weaver's state and returns
decisions; the engine sends them through the control entry point and records them.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from torchloom.weaver.policies import Decision
from torchloom.weaver.policies.base import median


class PlateauParams(msgspec.Struct, kw_only=True):
    """Parameters (``torchloom policy set plateau factor=0.3``).

    Attributes:
        window_steps: logged losses whose median is the loss "now".
        patience_steps: how many steps back the best median must be to count as a plateau.
        min_delta: relative improvement that counts (0.01 = 1 %).
        factor: multiply lr by this, in (0, 1).
        min_lr: never go below.
        cooldown_s: seconds between two lowerings.
    """

    window_steps: int = 50
    patience_steps: int = 200
    min_delta: float = 0.01
    factor: float = 0.5
    min_lr: float = 1e-5
    cooldown_s: float = 60.0


class PlateauPolicy:
    name = "plateau"
    doc = "lower lr by factor when the loss has not improved for patience_steps (ReduceLROnPlateau)"
    Params = PlateauParams

    def __init__(self, params: PlateauParams) -> None:
        if not 0.0 < params.factor < 1.0 or params.window_steps < 1:
            raise ValueError("factor must be in (0, 1) and window_steps >= 1")
        self.params = params

    def decide(self, now: float, state: Any) -> list[Decision]:
        p = self.params
        out = []
        for job in state.jobs.values():
            latest = job.config.latest() if job.config else None
            if latest is None or latest.run_state != "running" or latest.values.get("lr") is None:
                continue
            losses = sorted(
                (s, v)
                for r in job.live_ranks()
                for s, v in r.window.losses
                if math.isfinite(v) and s >= latest.effective_step
            )
            if not losses or losses[-1][0] - losses[0][0] < p.patience_steps + p.window_steps:
                continue
            end = losses[-1][0]
            now_med = median([v for s, v in losses if s > end - p.window_steps])
            past = [v for s, v in losses if s <= end - p.patience_steps]
            best = min(
                median(past[i : i + p.window_steps])
                for i in range(0, max(1, len(past) - p.window_steps + 1), p.window_steps)
            )
            lr = latest.values["lr"]
            if now_med < best * (1 - p.min_delta) or lr * p.factor < p.min_lr:
                continue
            out.append(
                Decision(
                    policy=self.name,
                    job_id=job.job_id,
                    action="set",
                    values={"lr": lr * p.factor},
                    reason=f"loss {now_med:.4g} has not improved on {best:.4g} in {p.patience_steps} steps: "
                    f"lr {lr:g} → {lr * p.factor:g}",
                    key=f"{self.name}/{job.job_id}",
                    features={"loss": now_med, "best": best, "lr": lr},
                )
            )
        return out
