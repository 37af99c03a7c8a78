"""The round loop of layer-wise strategies (FedACnnL): train until every layer is solved, evaluate.

Flower's ``Strategy.start`` runs a fixed number of rounds, each ``configure_train`` →
``aggregate_train`` → ``configure_evaluate`` → ``aggregate_evaluate`` → ``evaluate_fn``, and calls
``evaluate_fn`` on the model of every round. A layer-wise strategy (Gu et al., arXiv 2502.06915)
needs one round per fitted layer plus retries, can only evaluate the complete model, and (streaming
aggregation) reads replies as they arrive. :func:`run_layerwise` is that loop, with the same calls in
the same order, on any object with the strategy interface: the strategy itself, or a wrapper
(:class:`~flwr_analytic.strategies.wrapper.StrategyWrapper`) that delegates to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import DEBUG, INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result


def run_layerwise(
    strategy: Any,
    grid: Grid,
    initial_arrays: ArrayRecord | None = None,
    num_rounds: int | None = None,
    timeout: float = 3600,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
) -> Result:
    """Train until ``strategy.finished``, then evaluate once; rounds are numbered from 1.

    ``strategy`` provides the four ``configure_*`` / ``aggregate_*`` methods, ``summary``,
    ``finished``, ``num_rounds`` (fitted layers), ``architecture``, ``reply_grid(grid)`` and
    ``global_arrays()``. ``aggregate_train`` raises when a layer cannot be solved after its retries.
    A strategy that is already finished (restored from a finished checkpoint) only evaluates.
    The loop logs no line per round: :class:`~flwr_analytic.strategies.metering.Metered` logs one
    (layer, clients, bytes, seconds, elapsed and remaining time).
    """
    needed = strategy.num_rounds
    if num_rounds is not None and 0 < num_rounds < needed:
        raise ValueError(
            f"FedACnnL needs {needed} rounds (one per fitted layer of "
            f"{strategy.architecture.name}); num_rounds={num_rounds}"
        )
    if num_rounds is not None and num_rounds > needed:
        log(WARNING, "num_rounds=%d > %d fitted layers: running %d", num_rounds, needed, needed)
    if initial_arrays is not None and len(initial_arrays):
        expected = set(strategy.architecture.build_module().state_dict())
        if not set(initial_arrays.keys()) <= expected:  # a resumed run passes the solved layers
            raise ValueError("initial_arrays do not match the architecture's state_dict keys")
    inner = strategy.innermost() if hasattr(strategy, "innermost") else strategy
    log(INFO, "Starting %s strategy:", type(inner).__name__)
    strategy.summary()
    log(INFO, "")
    grid = strategy.reply_grid(grid)
    train_config = ConfigRecord() if train_config is None else train_config
    evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
    result, t_start, server_round = Result(), time.time(), 0
    while True:
        if not strategy.finished:
            server_round += 1
            log(DEBUG, "[ROUND %s]", server_round)
            messages = strategy.configure_train(server_round, ArrayRecord(), train_config, grid)
            replies = grid.send_and_receive(messages=messages, timeout=timeout)
            arrays, metrics = strategy.aggregate_train(server_round, replies)
            if arrays is not None:
                result.arrays = arrays
            if metrics is not None:
                result.train_metrics_clientapp[server_round] = metrics
        arrays = strategy.global_arrays()
        messages = list(strategy.configure_evaluate(server_round, arrays, evaluate_config, grid))
        replies = grid.send_and_receive(messages=messages, timeout=timeout) if messages else []
        agg = strategy.aggregate_evaluate(server_round, replies)
        if agg is not None:
            result.evaluate_metrics_clientapp[server_round] = agg
        if strategy.finished:
            break
    result.arrays = strategy.global_arrays()
    if evaluate_fn is not None:
        res = evaluate_fn(server_round, result.arrays)
        log(INFO, "Global evaluation: %s", res)
        if res is not None:
            result.evaluate_metrics_serverapp[server_round] = res
    log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
    return result


__all__ = ["run_layerwise"]
