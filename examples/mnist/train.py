"""The MNIST reference job, run from a checkout: ``torchrun … examples/mnist/train.py``.

The job ships inside the package (so ``torchloom demo`` works from a ``pip install``):
its code is ``src/torchloom/examples/mnist/train.py``; this file only runs it.
"""

from torchloom.examples.mnist.train import main

if __name__ == "__main__":
    main()
