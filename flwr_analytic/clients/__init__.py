"""Flower Message-API client logic of flwr-analytic."""

from flwr_analytic.clients.analytic_head_client import add_analytic_head_handlers
from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
from flwr_analytic.clients.fedacnnl_legacy import FedACnnLNumPyClient
from flwr_analytic.clients.fedacnnl_project import add_fedacnnl_handlers, partition_from_load_data
from flwr_analytic.clients.meta_client import (
    handle_evaluate,
    handle_train,
    local_evaluate,
    local_train,
    make_meta_client_app,
)

__all__ = [
    "FedACnnLNumPyClient",
    "add_analytic_head_handlers",
    "add_fedacnnl_handlers",
    "partition_from_load_data",
    "handle_evaluate",
    "handle_train",
    "local_evaluate",
    "local_train",
    "make_meta_client_app",
    "make_fedacnnl_client_app",
]
