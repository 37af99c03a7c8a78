"""Checks of :class:`~flwr_analytic.strategies.fedacnnl.FedACnnL`'s constructor arguments.

Every argument that a run config also sets is checked with the app's run-config table
(:data:`flwr_analytic.fedacnnl.config.RUN_CONFIG`, the key being the argument with ``-`` for ``_``),
so ``flwr run --run-config`` and the Python API accept and refuse the same values with the same
message; the others are checked here. Errors are :class:`~flwr_analytic.config_checks.ConfigError`
(a ``ValueError``) naming the argument and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr_analytic.analytic import AnalyticNetwork
from flwr_analytic.analytic.server import AGGREGATIONS
from flwr_analytic.analytic.solvers import RULES
from flwr_analytic.config_checks import ConfigError, check_choice, check_number
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.models import Architecture, TracedArchitecture


def check_fedacnnl_arguments(args: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` for the first argument of ``FedACnnL(**args)`` that is not allowed."""
    check_number("fraction_train", args["fraction_train"], low=0.0, high=1.0, low_open=True)
    check_number("fraction_evaluate", args["fraction_evaluate"], low=0.0, high=1.0)
    check_number("availability_timeout", args["availability_timeout"], low=0.0)
    check_number("gamma", args["gamma"], low=0.0)
    check_number("hidden_gamma", args["hidden_gamma"], low=0.0)
    check_number("lam", args["lam"], low=0.0, low_open=True)  # λ → 0 is the local model
    check_number("pull_interval", args["pull_interval"], low=0.0, low_open=True)
    check_number("personal_recalibration", args["personal_recalibration"], low=0.0)
    for key, allowed in (
        ("gamma_rule", RULES),
        ("lam_rule", RULES),
        ("personal_lambda", P.PERSONAL_LAMBDA_MODES),
        ("personalize_layers", ("last", "all")),
        ("dtype", ("float64", "float32")),
        ("mirror", (False, True)),
        ("aggregation", AGGREGATIONS),
    ):
        check_choice(key, args[key], allowed)
    for key, low in (
        ("seed", 0),
        ("batch_size", 1),
        ("min_train_nodes", 0),
        ("min_evaluate_nodes", 0),
        ("min_available_nodes", 0),
        ("min_valid_replies", 0),
        ("num_groups", 0),
        ("max_retries", 0),
        ("max_in_flight", 0),
    ):
        check_number(key, args[key], low=low, integer=True)
    architecture = args["architecture"]
    if not isinstance(architecture, Architecture | TracedArchitecture):
        raise ConfigError(
            f"architecture: {architecture!r} is not allowed; must be a torch.nn.Module (with "
            "input_shape) or an Architecture (flwr_analytic.models.get_architecture)"
        )
    try:
        net = AnalyticNetwork(architecture, args["scheme"])
        P.personalized_layers(net, args["personalize_layers"])
    except ValueError as exc:
        raise ConfigError(f"scheme: {exc}") from exc


__all__ = ["check_fedacnnl_arguments"]
