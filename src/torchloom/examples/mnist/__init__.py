"""The MNIST reference job: :mod:`~torchloom.examples.mnist.train` (the training script, run
under torchrun) and :mod:`~torchloom.examples.mnist.mnist_data` (the dataset, fetched with its
SHA-256 checked).

``torchloom demo`` runs it; by hand::

    torchrun --standalone --nproc-per-node 2 -m torchloom.examples.mnist.train
"""
