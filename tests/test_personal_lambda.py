"""Per-client pFedACnnL λ by K-fold cross-validation (issue 15): the math core and the Flower path.

Synthetic clients draw from Gaussian classes around seeded centres; the global output layer is the
ridge solution on every client's data (what FedACnnL computes). On IID clients a fixed small λ
over-fits and the cross-validated choice keeps (or matches) the global model; on clients holding
two classes each the choice is a finite λ that beats the global model on the client's test data.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from flwr_analytic.analytic import (
    AnalyticNetwork,
    AutoLambda,
    Regularization,
    choose_output_lambda,
    fit_federated,
    output_design,
    personalize,
    personalized_solve,
    ridge_solve,
    select_lambda,
)
from flwr_analytic.analytic.personal_lambda import DEFAULT_GRID, GLOBAL, fold_assignment
from flwr_analytic.analytic.targets import one_hot
from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
from flwr_analytic.config_checks import ConfigError
from flwr_analytic.data import federated_split
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.fedacnnl.config import resolve_run_config
from flwr_analytic.grid import InProcessGrid
from flwr_analytic.models import cnn
from flwr_analytic.report import lambda_line
from flwr_analytic.strategies import run_fedacnnl
from flwr_analytic.strategies.evaluation import lambda_distribution
from flwr_analytic.strategies.fedacnnl import FedACnnL

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

D, M, NOISE = 41, 10, 1.6  # design width (bias included), classes, within-class spread


class World:
    """Seeded Gaussian classes; ``sample(n, classes)`` gives design rows ``[x, 1]`` and labels."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.centers = self.rng.standard_normal((M, D - 1))

    def sample(self, n: int, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y = self.rng.choice(classes, n)
        x = self.centers[y] + NOISE * self.rng.standard_normal((n, D - 1))
        return np.hstack([x, np.ones((n, 1))]), y


def _clients(world: World, classes: list[np.ndarray], n_train: int, n_test: int):
    return [(world.sample(n_train, c), world.sample(n_test, c)) for c in classes]


def _global(clients) -> np.ndarray:
    gram = sum(a.T @ a for (a, _), _ in clients)
    cross = sum(a.T @ one_hot(y, M) for (a, y), _ in clients)
    return ridge_solve(gram, cross, Regularization(1e-6))


def _correct(a: np.ndarray, y: np.ndarray, w: np.ndarray) -> int:
    return int(np.sum((a @ w).argmax(1) == y))


def _check_choice_rule(choice) -> None:
    """The chosen ρ has the most held-out correct; every larger candidate has fewer (ties → larger)."""
    best = max(choice.correct.values())
    assert choice.correct[choice.rho] == best
    assert all(count < best for rho, count in choice.correct.items() if rho > choice.rho)
    assert list(choice.correct) == [*DEFAULT_GRID, GLOBAL]


# ------------------------------------------------------------------------------- (a) IID clients
def test_iid_clients_keep_the_global_model_or_its_equal():
    world = World(0)
    clients = _clients(world, [np.arange(M)] * 10, n_train=60, n_test=200)
    w = _global(clients)
    auto = fixed = glob = 0
    for (a, y), (a_test, y_test) in clients:
        choice = select_lambda(a, y, w)
        _check_choice_rule(choice)
        assert choice.heldout == len(y)
        g, b = a.T @ a, a.T @ one_hot(y, M)
        if choice.keeps_global:
            assert choice.regularization is None
            np.testing.assert_array_equal(choice.weights, w)
        else:
            expected = personalized_solve(g, b, w, Regularization(choice.rho))
            np.testing.assert_array_equal(choice.weights, expected)
        auto += _correct(a_test, y_test, choice.weights)
        glob += _correct(a_test, y_test, w)
        fixed += _correct(a_test, y_test, personalized_solve(g, b, w, Regularization(0.1)))
    assert fixed < glob  # the problem: one fixed λ over-fits IID clients
    assert auto >= glob - 2  # the cross-validated λ does not (a couple of test samples of 2,000)


# ------------------------------------------------------------------------ (b) two classes each
@pytest.mark.parametrize("seed", [0, 1])
def test_skewed_clients_pick_a_finite_lambda_that_beats_the_global_model(seed):
    world = World(seed)
    clients = _clients(world, [np.array([2 * k, 2 * k + 1]) for k in range(5)], 200, 200)
    w = _global(clients)
    for (a, y), (a_test, y_test) in clients:
        choice = select_lambda(a, y, w)
        _check_choice_rule(choice)
        assert math.isfinite(choice.rho) and choice.rho in DEFAULT_GRID
        assert choice.correct[choice.rho] > choice.correct[GLOBAL]
        assert _correct(a_test, y_test, choice.weights) > _correct(a_test, y_test, w)


# ------------------------------------------------------------------------- (c) determinism etc.
def test_same_seed_same_choice_and_folds_are_a_balanced_permutation():
    world = World(2)
    a, y = world.sample(150, np.array([0, 3, 7]))
    w = _global(_clients(World(3), [np.arange(M)] * 4, 100, 1))
    first, again = select_lambda(a, y, w, seed=4), select_lambda(a, y, w, seed=4)
    assert (first.rho, first.correct) == (again.rho, again.correct)
    np.testing.assert_array_equal(first.weights, again.weights)
    assert AutoLambda(seed=4).select(a, y, w).correct == first.correct
    # a data loader's shuffle does not change the choice: the folds follow the rows' values
    perm = np.random.default_rng(5).permutation(len(y))
    shuffled = select_lambda(a[perm], y[perm], w, seed=4)
    assert (shuffled.rho, shuffled.correct) == (first.rho, first.correct)
    np.testing.assert_allclose(shuffled.weights, first.weights, rtol=1e-10, atol=1e-12)
    fold = fold_assignment(103, 5, seed=9)
    np.testing.assert_array_equal(fold, fold_assignment(103, 5, seed=9))
    assert sorted(np.bincount(fold)) == [20, 20, 21, 21, 21]
    assert not np.array_equal(fold, fold_assignment(103, 5, seed=10))


def test_primal_and_dual_forms_score_alike():
    world = World(4)
    w = _global(_clients(world, [np.arange(M)] * 4, 100, 1))
    for n in (30, 120):  # fewer and more rows than D
        a, y = world.sample(n, np.array([1, 4, 5]))
        primal = select_lambda(a, y, w, solver="primal")
        dual = select_lambda(a, y, w, solver="dual")
        assert primal.correct == dual.correct and primal.rho == dual.rho


def test_ties_go_to_the_global_model_and_tiny_clients_keep_it():
    world = World(5)
    w = _global(_clients(world, [np.arange(M)] * 4, 200, 1))
    separable = np.hstack([10 * world.centers[[0, 1] * 20], np.ones((40, 1))])  # no noise
    y = np.array([0, 1] * 20)
    choice = select_lambda(separable, y, w)
    assert set(choice.correct.values()) == {40} and choice.keeps_global  # every ρ ties
    tiny = select_lambda(separable[:3], y[:3], w, folds=5)
    assert tiny.keeps_global and tiny.correct == {} and tiny.heldout == 0
    with pytest.raises(ValueError, match="grid"):
        select_lambda(separable, y, w, grid=(0.1, math.inf))
    with pytest.raises(ValueError, match="folds"):
        AutoLambda(folds=1)


# -------------------------------------------------------------- the network helpers (in-process)
def test_choose_output_lambda_on_a_network_equals_personalize(digits):
    split = federated_split(digits, 4, "dirichlet", alpha=0.3, seed=0)
    net = AnalyticNetwork(cnn(digits.input_shape, 10, channels=(4, 8)), seed=1)
    fit = fit_federated(net, [(digits.x[i], digits.y[i]) for i in split.train])
    last = net.num_layers - 1
    for k, rows in enumerate(split.train):
        x, y = digits.x[rows], digits.y[rows]
        stats = fit.client_statistics[k][last]
        a, labels = output_design(net, x, y, batch_size=50)
        np.testing.assert_array_equal(labels, y)
        np.testing.assert_allclose(a.T @ a, stats.gram, rtol=1e-10, atol=1e-8)
        choice = choose_output_lambda(net, x, y, statistics=stats)
        weights = personalize(net, fit.client_statistics[k], Regularization(0.1), output=choice)
        reference = (
            net.weights[last]
            if choice.keeps_global
            else personalize(net, fit.client_statistics[k], Regularization(choice.rho))[last]
        )
        np.testing.assert_array_equal(weights[last], reference)
        for layer in range(last):  # layers below stay global with layers="last"
            np.testing.assert_array_equal(weights[layer], net.weights[layer])


# ---------------------------------------------------------------------- (d) the Flower app path
@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_flower_run_with_auto_lambda_reports_each_clients_choice(digits, partitioner):
    nodes = 6
    cfg = resolve_run_config(
        {"partitioner": partitioner, "min-nodes": nodes, "results-path": ""}
        | {"personal-lambda": "auto", "dirichlet-alpha": 0.1}
    )
    split = federated_split(digits, nodes, partitioner, seed=int(cfg["seed"]), alpha=0.1)

    def load(context):
        return split.client(digits, int(context.node_config["partition-id"]))

    app = make_fedacnnl_client_app(load, run_config=cfg)
    result, summary = run_fedacnnl(InProcessGrid(app, nodes, cfg), cfg)
    ev = result.evaluate_metrics_clientapp[max(result.evaluate_metrics_clientapp)]
    assert ev["client-ids"] == list(range(nodes))
    chosen = list(ev["personal-lambda-clients"])
    assert len(chosen) == nodes and set(chosen) <= {*DEFAULT_GRID, math.inf}
    assert sum(ev["personal-lambda-counts"]) + ev["personal-lambda-global"] == nodes
    sizes = np.array([len(t) for t in split.test])
    glob = np.rint(np.array(ev["global-accuracy-clients"]) * sizes)
    pers = np.rint(np.array(ev["personal-accuracy-clients"]) * sizes)
    if partitioner == "iid":  # personalizing never costs more than one test sample per client
        assert np.all(pers >= glob - 1), (glob, pers, chosen)
    else:  # some label-skewed client personalizes
        assert any(math.isfinite(c) for c in chosen), chosen

    # every client's choice is the core's on the final global model and the client's data
    net = AnalyticNetwork(cnn(digits.input_shape, 10), seed=int(cfg["seed"]))
    P.install_layers(net, {k: v.numpy() for k, v in result.arrays.to_torch_state_dict().items()})
    policy = AutoLambda(seed=int(cfg["seed"]))
    last = net.num_layers - 1
    for k, rows in enumerate(split.train):
        stats = net.statistics(last, digits.x[rows], digits.y[rows])
        mine = choose_output_lambda(
            net, digits.x[rows], digits.y[rows], policy=policy, statistics=stats
        )
        assert mine.rho == chosen[k] and mine.heldout == len(rows)
        own = net.with_weights(
            personalize(net, [None] * last + [stats], Regularization(1.0), output=mine)
        )
        test = split.test[k]
        assert own.evaluate(digits.x[test], digits.y[test])["correct"] == pers[k]
    line = lambda_line(ev)
    assert line is not None and f"∞ (global kept): {ev['personal-lambda-global']}" in line
    assert summary["evaluate"]["personal-lambda-global"] == ev["personal-lambda-global"]


def test_fixed_lambda_is_the_default_and_bad_modes_are_refused():
    assert resolve_run_config({})["personal-lambda"] == "fixed"
    with pytest.raises(ConfigError, match="personal-lambda"):
        resolve_run_config({"personal-lambda": "sometimes"})
    with pytest.raises(ConfigError, match="personal_lambda"):
        FedACnnL(cnn((1, 8, 8), 10), personal_lambda="sometimes")
    with pytest.raises(ValueError, match="personal-lambda"):
        P.personal_lambda_mode({P.PERSONAL_LAMBDA: "sometimes"})
    assert P.personal_lambda_mode({}) == "fixed"


def test_lambda_distribution_counts_each_value_and_the_global_model():
    dist = lambda_distribution([0.1, math.inf, 1.0, 0.1, math.inf, math.inf])
    assert dist["personal-lambda-values"] == [0.1, 1.0]
    assert dist["personal-lambda-counts"] == [2, 1]
    assert dist["personal-lambda-global"] == 3
    assert (
        lambda_line(dist) == "pFedACnnL λ per client (ρ: clients): 0.1: 2, 1: 1, ∞ (global kept): 3"
    )
    assert lambda_line({"personal-accuracy": 0.9}) is None
