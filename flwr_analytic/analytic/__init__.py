"""Analytic (gradient-free) layer-wise learning from sufficient statistics (no Flower imports).

See :mod:`flwr_analytic.analytic.statistics` for ``(G, B, n)``, :mod:`~.solvers` for the closed forms,
:mod:`~.targets` for hidden-layer schemes, :mod:`~.network` for the layered network and
:mod:`~.privacy` for secure aggregation, differential privacy and the server's release policies.
"""

from flwr_analytic.analytic.design import StatisticsAccumulator, conv_rows
from flwr_analytic.analytic.network import AnalyticNetwork, layer_seed
from flwr_analytic.analytic.privacy.release import DPRelease, ExactRelease, ReleasePolicy
from flwr_analytic.analytic.solvers import (
    IllConditionedWarning,
    Regularization,
    personalized_solve,
    ridge_solve,
)
from flwr_analytic.analytic.statistics import LayerStatistics, StatisticsError, merge
from flwr_analytic.analytic.targets import SCHEMES, TargetScheme
from flwr_analytic.analytic.training import (
    FederatedFit,
    fit_centralized,
    fit_federated,
    personalize,
)
from flwr_analytic.analytic.updates import (
    add_client_statistics,
    remove_client_statistics,
    solve_output_layer,
)

__all__ = [
    "SCHEMES",
    "AnalyticNetwork",
    "DPRelease",
    "ExactRelease",
    "FederatedFit",
    "IllConditionedWarning",
    "LayerStatistics",
    "Regularization",
    "ReleasePolicy",
    "StatisticsAccumulator",
    "StatisticsError",
    "TargetScheme",
    "add_client_statistics",
    "conv_rows",
    "fit_centralized",
    "fit_federated",
    "layer_seed",
    "merge",
    "personalize",
    "personalized_solve",
    "remove_client_statistics",
    "ridge_solve",
    "solve_output_layer",
]
