"""Analytic warm start: FedACnnL's closed-form model as the initial model of gradient FL.

FedACnnL (Gu et al., arXiv 2502.06915) trains a model layer by layer in closed form, one round
per layer, with no learning rate; its result equals centralized layer-wise training on the pooled
data. :func:`warm_start` runs it, casts the model (float64 ``state_dict`` entries with your
parameter names) to float32, and hands it to a gradient strategy (FedAvg, FedProx, ...) as
``initial_arrays``, in the same run: the gradient rounds start from the analytic solution (no
gradient step, one round per layer) instead of a random initialization.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flwr_analytic.strategies.fedacnnl import FedACnnL
from flwr_analytic.strategies.wrapper import StrategyWrapper


@dataclass(repr=False)
class WarmStartResult(Result):
    """The gradient strategy's :class:`~flwr.serverapp.strategy.Result` and the analytic phase.

    ``arrays`` and the three metric dicts are those of the gradient strategy (rounds numbered
    from 1 as it numbered them); the FedACnnL phase is kept apart.

    Attributes
    ----------
    analytic : Result
        FedACnnL's result: float64 ``arrays``, ``train_metrics_clientapp`` (one round per layer),
        ``evaluate_metrics_clientapp`` (global and pFedACnnL accuracy after the last layer).
    initial_arrays : ArrayRecord
        The float32 model the gradient strategy started from (``analytic.arrays`` cast).
    analytic_time, gradient_time : float
        Wall seconds of each phase.

    """

    analytic: Result = field(default_factory=Result)
    initial_arrays: ArrayRecord = field(default_factory=ArrayRecord)
    analytic_time: float = 0.0
    gradient_time: float = 0.0

    def phase_metrics(self) -> MetricRecord:
        """``analytic-time``, ``gradient-time`` and FedACnnL's last evaluation metrics, if any.

        The evaluation's scalar metrics are prefixed ``analytic-`` (e.g.
        ``analytic-global-accuracy``).
        """
        out: dict[str, Any] = {
            "analytic-time": self.analytic_time,
            "gradient-time": self.gradient_time,
        }
        evaluated = self.analytic.evaluate_metrics_clientapp
        if evaluated:
            last = evaluated[max(evaluated)]
            out.update({f"analytic-{k}": v for k, v in last.items() if isinstance(v, int | float)})
        return MetricRecord(out)

    def __repr__(self) -> str:
        """Flower's ``Result`` text, then the phases' wall times."""
        return (
            super().__repr__()
            + f"\nAnalytic warm start: FedACnnL {self.analytic_time:.2f} s, then gradient "
            f"rounds {self.gradient_time:.2f} s\n"
        )


def to_float32(arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` with every floating-point entry cast to float32 (others as they are)."""
    out = {}
    for key, array in arrays.items():
        value = array.numpy()
        if np.issubdtype(value.dtype, np.floating):
            value = np.ascontiguousarray(value, dtype=np.float32)
        out[key] = Array(value)
    return ArrayRecord(out)


def warm_start(
    grid: Grid,
    analytic: FedACnnL | Strategy,
    then: Strategy,
    *,
    num_rounds: int,
    timeout: float = 3600,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    **start_kwargs: Any,
) -> WarmStartResult:
    """Train with FedACnnL, then continue from its model with a gradient strategy (same run).

    Parameters
    ----------
    grid : Grid
        The run's grid; the client app must serve both strategies' messages
        (``add_fedacnnl_handlers`` beside your FedAvg handlers).
    analytic : FedACnnL
        FedACnnL on your model (``FedACnnL(Net(), input_shape=...)``), possibly wrapped
        (``Metered``); run with ``analytic.start(grid)``.
    then : Strategy
        The gradient strategy (``FedAvg(...)``, ``FedProx(...)``, possibly wrapped).
    num_rounds : int
        Rounds of ``then``.
    timeout : float (default: 3600)
        Seconds to wait for replies, in both phases.
    evaluate_fn : callable, optional
        Centralized evaluation ``(round, arrays) -> MetricRecord``, given to both phases (FedACnnL
        calls it once, on its final model: ``result.analytic.evaluate_metrics_serverapp``).
    **start_kwargs
        More keywords of ``then.start`` (``train_config``, ``evaluate_config``).

    Returns
    -------
    WarmStartResult
        The gradient strategy's result, with the FedACnnL phase's result, the float32 initial
        arrays and each phase's wall time.

    """
    if "initial_arrays" in start_kwargs:
        raise TypeError("warm_start: the initial arrays are FedACnnL's model; do not pass any")
    t0 = time.perf_counter()
    first = analytic.start(grid, timeout=timeout, evaluate_fn=evaluate_fn)
    analytic_time = time.perf_counter() - t0
    arrays = to_float32(first.arrays)
    inner = then.innermost() if isinstance(then, StrategyWrapper) else then
    log(INFO, "Analytic warm start: FedACnnL done in %.2f s; %s continues from its model",
        analytic_time, type(inner).__name__)  # fmt: skip
    t1 = time.perf_counter()
    second = then.start(
        grid,
        initial_arrays=arrays,
        num_rounds=num_rounds,
        timeout=timeout,
        evaluate_fn=evaluate_fn,
        **start_kwargs,
    )
    return WarmStartResult(
        arrays=second.arrays,
        train_metrics_clientapp=second.train_metrics_clientapp,
        evaluate_metrics_clientapp=second.evaluate_metrics_clientapp,
        evaluate_metrics_serverapp=second.evaluate_metrics_serverapp,
        analytic=first,
        initial_arrays=arrays,
        analytic_time=analytic_time,
        gradient_time=time.perf_counter() - t1,
    )


__all__ = ["WarmStartResult", "to_float32", "warm_start"]
