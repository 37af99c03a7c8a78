"""Bounded waits (issue 13, finding 1): a node that dies never hangs the run.

A grid whose node of one partition disconnects after the first layer's round: with ``min-nodes``
equal to the number of nodes, Flower's ``sample_nodes`` would wait forever at the next layer. Now
the round waits ``availability_timeout`` seconds and then goes on with the connected nodes (the
layer records name exactly the partitions summed), or stops with an error naming the missing
partition when fewer than ``min_valid_replies`` are left.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from rounding import TOL, output_rounding_bound

from flwr_analytic.analytic import AnalyticNetwork, fit_federated, merge
from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
from flwr_analytic.data import federated_split
from flwr_analytic.fedacnnl import LocalGrid
from flwr_analytic.models import mlp
from flwr_analytic.strategies import FedACnnL
from flwr_analytic.strategies.availability import NodesUnavailableError


class DisconnectingGrid(LocalGrid):
    """The node of partition ``gone`` disconnects once ``after`` rounds were sent."""

    def __init__(self, *args, gone: int, after: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gone_node = list(self.contexts)[gone]
        self.after, self.rounds = after, 0

    def get_node_ids(self):
        nodes = list(self.contexts)
        return [n for n in nodes if n != self.gone_node] if self.rounds >= self.after else nodes

    def send_and_receive(self, messages, *, timeout=None):
        self.rounds += 1
        return super().send_and_receive(messages, timeout=timeout)


def _setup(digits):
    split = federated_split(digits, 4, "dirichlet", alpha=0.5, test_fraction=0.2, seed=3)

    def load(context):
        return split.client(digits, int(context.node_config["partition-id"]))

    return split, make_fedacnnl_client_app(load)


def test_a_dead_node_does_not_hang_the_next_layer(digits):
    split, app = _setup(digits)
    arch = mlp(digits.input_shape, 10, hidden=24)
    grid = DisconnectingGrid(app, 4, gone=2, after=1, seed=5)
    strategy = FedACnnL(arch, seed=1, min_train_nodes=4, min_available_nodes=4,
                        min_evaluate_nodes=4, availability_timeout=0.5)  # fmt: skip
    t0 = time.perf_counter()
    result = strategy.start(grid=grid)
    assert time.perf_counter() - t0 < 30  # bounded (it used to wait forever)
    rounds = [r for r in strategy.history if r.kind == "train"]
    assert [r.details["partitions"] for r in rounds] == [[0, 1, 2, 3], [0, 1, 3]]
    # the output layer is exactly the one of the survivors' data (hidden layer of all four)
    ref = AnalyticNetwork(arch, seed=1)
    data = [(digits.x[i], digits.y[i]) for i in split.train]
    ref.solve(0, sum_stats(ref, 0, data))
    total = sum_stats(ref, 1, [d for k, d in enumerate(data) if k != 2])
    ref.solve(1, total)
    assert _rel(strategy.net.weights[0], ref.weights[0]) <= TOL
    assert _rel(strategy.net.weights[1], ref.weights[1]) <= output_rounding_bound(ref, total)
    assert result.evaluate_metrics_clientapp  # evaluation ran on the three survivors
    assert next(iter(result.evaluate_metrics_clientapp.values()))["num-clients"] == 3


def _rel(w, r):
    return float(np.abs(w - r).max() / np.abs(r).max())


def sum_stats(net, layer, data):
    return merge(net.statistics(layer, x, y) for x, y in data)


def test_too_few_nodes_stop_the_run_naming_the_missing_partition(digits):
    _, app = _setup(digits)
    grid = DisconnectingGrid(app, 4, gone=1, after=1, seed=5)
    strategy = FedACnnL(mlp(digits.input_shape, 10, hidden=24), min_train_nodes=4,
                        min_available_nodes=4, min_valid_replies=4,
                        availability_timeout=0.3)  # fmt: skip
    with pytest.raises(
        NodesUnavailableError, match=r"layer 2/2: 3 nodes connected .*missing partitions \[1\]"
    ):
        strategy.start(grid=grid)
    assert strategy.net.solved_layers == 1  # the solved layer is kept


def test_the_reference_fit_matches_without_faults(digits):
    """Control: with every node connected the run is the plain federated fit."""
    split, app = _setup(digits)
    arch = mlp(digits.input_shape, 10, hidden=24)
    strategy = FedACnnL(arch, seed=1, min_train_nodes=4, min_available_nodes=4,
                        availability_timeout=0.5)  # fmt: skip
    strategy.start(grid=LocalGrid(app, 4, seed=5))
    ref = AnalyticNetwork(arch, seed=1)
    fit = fit_federated(ref, [(digits.x[i], digits.y[i]) for i in split.train])
    total = merge(stats[1] for stats in fit.client_statistics)
    assert _rel(strategy.net.weights[0], ref.weights[0]) <= TOL
    assert _rel(strategy.net.weights[1], ref.weights[1]) <= output_rounding_bound(ref, total)
