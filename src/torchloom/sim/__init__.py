"""``torchloom sim``: many simulated ranks with injected faults, to test policies at scale
without GPUs — on real NATS against a real Weaver (:mod:`~torchloom.sim.live`), or in
virtual time against the Weaver's pure state and policies (:mod:`~torchloom.sim.virtual`)."""

from torchloom.sim.model import Fault, SimJob, SimSpec

__all__ = ["Fault", "SimJob", "SimSpec"]
