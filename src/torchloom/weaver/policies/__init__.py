"""Policies: pure ``decide(now, state) -> [Decision]`` functions and the engine that runs them."""

from torchloom.weaver.policies.base import Decision, Policy
from torchloom.weaver.policies.engine import DEFAULT_ENABLED, ENTRY_POINT_GROUP, PolicyEngine

__all__ = ["DEFAULT_ENABLED", "ENTRY_POINT_GROUP", "Decision", "Policy", "PolicyEngine"]
