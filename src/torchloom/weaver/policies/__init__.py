"""Policies: pure decisions ``decide(now, state) -> [Decision]`` over the Weaver's state.

None ship yet; the Weaver's tick is where they will be called.
"""
