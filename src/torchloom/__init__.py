"""torchloom: an active controller for distributed PyTorch training.

Training side: :func:`init` returns a :class:`Run` (see :mod:`torchloom.threadlet`).
Controller side: ``torchloom up`` starts NATS and the Weaver (:mod:`torchloom.weaver`).
"""

from torchloom.errors import TorchloomError
from torchloom.protocol.knobs import KnobSpec
from torchloom.threadlet import Run, init

__version__ = "0.1.0"
__all__ = ["KnobSpec", "Run", "TorchloomError", "__version__", "init"]
