"""The Weaver's web face: live dashboard, read-only JSON API with OpenAPI, SSE feed, /metrics.

Reads the Weaver's state on its own loop and sends actions through its one
control entry point (:meth:`~torchloom.weaver.service.Weaver.submit`).
"""

from torchloom.weaver.web.server import Dashboard

__all__ = ["Dashboard"]
