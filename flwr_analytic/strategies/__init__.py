"""Flower Message-API strategies of flwr-analytic, their wrappers and the apps' server side.

``FedACnnL`` (one strategy: aggregation ``sorted`` | ``streaming``, release exact | DP, groups);
wrappers that compose with any strategy: ``Metered`` (bytes, time, per-client metrics),
``Checkpointed`` (resume), ``SortedReplies``, ``EvaluateRounds``; ``AnalyticHead`` (a closed-form
head after any strategy) and ``warm_start`` (FedACnnL, then gradient FL); the ν-step meta strategies.
"""

from flwr_analytic.grid import InProcessGrid
from flwr_analytic.strategies.analytic_head import AnalyticHead
from flwr_analytic.strategies.checkpointing import Checkpointed
from flwr_analytic.strategies.evaluation import (
    aggregate_personalized_evaluation,
    personalized_metrics_aggregation,
)
from flwr_analytic.strategies.fedacnnl import FedACnnL
from flwr_analytic.strategies.fedacnnl_legacy import FedACnnLLegacy
from flwr_analytic.strategies.fedacnnl_server import (
    build_fedacnnl_strategy,
    make_fedacnnl_server_app,
    run_fedacnnl,
)
from flwr_analytic.strategies.meta_baselines import (
    MeteredFedAvg,
    MeteredFedProx,
    build_meta_strategy,
)
from flwr_analytic.strategies.meta_server import make_meta_server_app, run_meta, run_meta_in_process
from flwr_analytic.strategies.metering import Metered
from flwr_analytic.strategies.nu_step_meta import NuStepMetaFedAvg
from flwr_analytic.strategies.pfedme import PFedMe
from flwr_analytic.strategies.records import RoundLog, RoundRecord
from flwr_analytic.strategies.second_stage import SecondStage
from flwr_analytic.strategies.utils import arrays_nbytes
from flwr_analytic.strategies.warm_start import WarmStartResult, warm_start
from flwr_analytic.strategies.wrapper import EvaluateRounds, SortedReplies, StrategyWrapper

#: Former name of :func:`~flwr_analytic.strategies.utils.arrays_nbytes`.
arrayrecord_nbytes = arrays_nbytes

__all__ = [
    "AnalyticHead",
    "Checkpointed",
    "EvaluateRounds",
    "FedACnnL",
    "FedACnnLLegacy",
    "InProcessGrid",
    "Metered",
    "MeteredFedAvg",
    "MeteredFedProx",
    "NuStepMetaFedAvg",
    "PFedMe",
    "RoundLog",
    "RoundRecord",
    "SecondStage",
    "SortedReplies",
    "StrategyWrapper",
    "WarmStartResult",
    "aggregate_personalized_evaluation",
    "arrayrecord_nbytes",
    "arrays_nbytes",
    "build_fedacnnl_strategy",
    "build_meta_strategy",
    "make_fedacnnl_server_app",
    "make_meta_server_app",
    "personalized_metrics_aggregation",
    "run_fedacnnl",
    "run_meta",
    "run_meta_in_process",
    "warm_start",
]
