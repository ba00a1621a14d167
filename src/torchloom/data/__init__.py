"""Data loading that follows the run: batch size, sharding and transforms change exactly at a step.

* :class:`ElasticLoader` — per-step batches under the config in force and the step's quorum,
  prefetched by worker processes, exact at every change.
* :class:`SampleStream` — one shuffled index stream shared by all ranks through a cursor that
  moves with committed steps and heals with the model.
* :class:`Transforms` — named transforms switched by knobs at runtime.
"""

from torchloom.data.loader import Batch, ElasticLoader
from torchloom.data.stream import SampleStream
from torchloom.data.transforms import Transform, Transforms

__all__ = ["Batch", "ElasticLoader", "SampleStream", "Transform", "Transforms"]
