"""The Threadlet: the training-side agent. Its hot path imports nothing heavy."""

from torchloom.threadlet.run import Run, init

__all__ = ["Run", "init"]
