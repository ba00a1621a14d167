"""Reference jobs shipped with torchloom, runnable from an installed package.

* :mod:`torchloom.examples.mnist` — MNIST on a small CNN under DDP or torchft, steered live
  (what ``torchloom demo`` trains). Needs ``pip install 'torchloom[torch]'``.
"""
