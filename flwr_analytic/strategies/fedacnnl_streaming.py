"""Deprecated: ``StreamingFedACnnL`` is ``FedACnnL(aggregation="streaming")`` (kept one release).

Streaming aggregation is an option of :class:`~flwr_analytic.strategies.fedacnnl.FedACnnL` (Gu et
al., arXiv 2502.06915); the reply stream lives in :mod:`flwr_analytic.strategies.streaming`.
"""

from __future__ import annotations

import warnings
from typing import Any

from flwr_analytic.strategies.fedacnnl import FedACnnL

#: Key of the client's per-call compute time in its reply's ``MetricRecord`` (seconds).
COMPUTE_TIME = "compute-time"


class StreamingFedACnnL(FedACnnL):
    """Deprecated alias of ``FedACnnL(..., aggregation="streaming")``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warnings.warn(
            "StreamingFedACnnL is deprecated: use FedACnnL(..., aggregation='streaming')",
            DeprecationWarning,
            stacklevel=2,
        )
        kwargs.setdefault("aggregation", "streaming")
        super().__init__(*args, **kwargs)


__all__ = ["COMPUTE_TIME", "StreamingFedACnnL"]
