"""Analytic (gradient-free) layer-wise learning from sufficient statistics (no Flower imports).

See :mod:`flwr_analytic.analytic.statistics` for ``(G, B, n)``, :mod:`~.solvers` for the closed forms,
:mod:`~.targets` for hidden-layer schemes, :mod:`~.network` for the layered network,
:mod:`~.personal_lambda` for each client's own pFedACnnL λ, :mod:`~.recalibration` for its
local recalibration, :mod:`~.second_stage` and :mod:`~.label_shift` for the quadratic second stage
and label-shift scoring, and :mod:`~.privacy` for secure
aggregation, differential privacy and the server's release policies.
"""

from flwr_analytic.analytic.design import StatisticsAccumulator, conv_rows
from flwr_analytic.analytic.network import AnalyticNetwork, layer_seed
from flwr_analytic.analytic.personal_lambda import AutoLambda, LambdaChoice, select_lambda
from flwr_analytic.analytic.privacy.release import DPRelease, ExactRelease, ReleasePolicy
from flwr_analytic.analytic.recalibration import recalibrate
from flwr_analytic.analytic.second_stage import QuadraticStage
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
    choose_output_lambda,
    fit_centralized,
    fit_federated,
    output_design,
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
    "AutoLambda",
    "DPRelease",
    "ExactRelease",
    "FederatedFit",
    "IllConditionedWarning",
    "LambdaChoice",
    "LayerStatistics",
    "QuadraticStage",
    "Regularization",
    "ReleasePolicy",
    "StatisticsAccumulator",
    "StatisticsError",
    "TargetScheme",
    "add_client_statistics",
    "choose_output_lambda",
    "conv_rows",
    "fit_centralized",
    "fit_federated",
    "layer_seed",
    "merge",
    "output_design",
    "personalize",
    "personalized_solve",
    "recalibrate",
    "remove_client_statistics",
    "ridge_solve",
    "select_lambda",
    "solve_output_layer",
]
