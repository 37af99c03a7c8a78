"""FedACnnL / pFedACnnL on Flower: wire format and run configuration.

The strategy lives in :mod:`flwr_analytic.strategies.fedacnnl`, the client app in
:mod:`flwr_analytic.clients.fedacnnl_client` (Gu et al., arXiv 2502.06915). ``LocalGrid`` is
re-exported from :mod:`flwr_analytic.grid` for backwards compatibility.
"""

from flwr_analytic.fedacnnl.config import (
    DEFAULT_RUN_CONFIG,
    architecture_for,
    load_partition_from_config,
    resolve_run_config,
)
from flwr_analytic.grid import LocalGrid

__all__ = [
    "DEFAULT_RUN_CONFIG",
    "LocalGrid",
    "architecture_for",
    "load_partition_from_config",
    "resolve_run_config",
]
