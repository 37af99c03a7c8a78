"""Flower Message-API strategies of flwr-analytic."""

from flwr_analytic.strategies.fedacnnl import FedACnnL, aggregate_personalized_evaluation
from flwr_analytic.strategies.fedacnnl_legacy import FedACnnLLegacy
from flwr_analytic.strategies.fedacnnl_server import (
    build_fedacnnl_strategy,
    make_fedacnnl_server_app,
    run_fedacnnl,
)
from flwr_analytic.strategies.history import (
    RoundHistoryMixin,
    arrayrecord_nbytes,
    personalized_metrics_aggregation,
)
from flwr_analytic.strategies.meta_baselines import (
    MeteredFedAvg,
    MeteredFedProx,
    build_meta_strategy,
)
from flwr_analytic.strategies.meta_server import (
    InProcessGrid,
    make_meta_server_app,
    run_meta,
    run_meta_in_process,
)
from flwr_analytic.strategies.nu_step_meta import NuStepMetaFedAvg
from flwr_analytic.strategies.pfedme import PFedMe

__all__ = [
    "FedACnnL",
    "FedACnnLLegacy",
    "InProcessGrid",
    "MeteredFedAvg",
    "MeteredFedProx",
    "NuStepMetaFedAvg",
    "PFedMe",
    "RoundHistoryMixin",
    "aggregate_personalized_evaluation",
    "arrayrecord_nbytes",
    "build_fedacnnl_strategy",
    "build_meta_strategy",
    "make_fedacnnl_server_app",
    "make_meta_server_app",
    "personalized_metrics_aggregation",
    "run_fedacnnl",
    "run_meta_in_process",
    "run_meta",
]
