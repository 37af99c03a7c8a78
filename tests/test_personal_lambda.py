"""Per-client pFedACnnL λ by exact leave-one-out (issue 15): the math core and the Flower path.

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
from scipy.stats import binomtest, norm

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
from flwr_analytic.analytic.leave_one_out import LeaveOneOut
from flwr_analytic.analytic.personal_lambda import (
    DEFAULT_GRID,
    GLOBAL,
    choose_rho,
    global_leverage,
)
from flwr_analytic.analytic.statistics import merge
from flwr_analytic.analytic.targets import one_hot
from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
from flwr_analytic.config_checks import ConfigError
from flwr_analytic.data import federated_split
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.fedacnnl.config import resolve_run_config
from flwr_analytic.fedacnnl.data import architecture_for
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

    def __init__(self, seed: int, noise: float = NOISE) -> None:
        self.rng = np.random.default_rng(seed)
        self.centers = self.rng.standard_normal((M, D - 1))
        self.noise = noise

    def sample(self, n: int, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y = self.rng.choice(classes, n)
        x = self.centers[y] + self.noise * self.rng.standard_normal((n, D - 1))
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
    """``ρ*`` follows the rule: ``W`` if among the best or not significantly beaten; otherwise the
    median of the best plateau (in grid order), whose paired gain over ``W`` exceeds one SE."""
    assert list(choice.correct) == [*DEFAULT_GRID, GLOBAL]
    best = max(choice.correct.values())
    b, c = choice.gain
    if choice.keeps_global:
        significant = b + c and binomtest(b, b + c, 0.5, alternative="greater").pvalue < 0.1587
        assert choice.correct[GLOBAL] == best or not significant
        return
    tied = [r for r in DEFAULT_GRID if choice.correct[r] == best]
    assert choice.correct[GLOBAL] < best and choice.rho == tied[(len(tied) - 1) // 2]
    assert b - c == choice.correct[choice.rho] - choice.correct[GLOBAL]
    assert binomtest(b, b + c, 0.5, alternative="greater").pvalue < norm.sf(1.0)


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
    assert auto >= glob - 2  # the validated λ does not (a couple of test samples of 2,000)


# ------------------------------------------------------------------------ (b) two classes each
@pytest.mark.parametrize(("seed", "rule"), [(0, "relative"), (1, "relative"), (0, "standardized")])
def test_skewed_clients_pick_a_finite_lambda_that_beats_the_global_model(seed, rule):
    world = World(seed, noise=2.5)  # the global 10-class model errs often on a 2-class client
    clients = _clients(world, [np.array([2 * k, 2 * k + 1]) for k in range(5)], 200, 200)
    w = _global(clients)
    for (a, y), (a_test, y_test) in clients:
        choice = select_lambda(a, y, w, rule=rule)
        _check_choice_rule(choice)
        assert math.isfinite(choice.rho) and choice.rho in DEFAULT_GRID
        assert choice.regularization == Regularization(choice.rho, rule)
        assert choice.correct[choice.rho] > choice.correct[GLOBAL]
        assert _correct(a_test, y_test, choice.weights) > _correct(a_test, y_test, w)
        g, b = a.T @ a, a.T @ one_hot(y, M)
        expected = personalized_solve(g, b, w, Regularization(choice.rho, rule))
        np.testing.assert_allclose(choice.weights, expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------- (c) determinism etc.
def test_same_data_same_choice_whatever_the_row_order():
    world = World(2)
    a, y = world.sample(150, np.array([0, 3, 7]))
    w = _global(_clients(World(3), [np.arange(M)] * 4, 100, 1))
    first, again = select_lambda(a, y, w), select_lambda(a, y, w)
    assert (first.rho, first.correct, first.gain) == (again.rho, again.correct, again.gain)
    np.testing.assert_array_equal(first.weights, again.weights)
    assert AutoLambda().select(a, y, w).correct == first.correct
    # a data loader's shuffle does not change the choice: leave-one-out has no folds
    perm = np.random.default_rng(5).permutation(len(y))
    shuffled = select_lambda(a[perm], y[perm], w)
    assert (shuffled.rho, shuffled.correct) == (first.rho, first.correct)
    np.testing.assert_allclose(shuffled.weights, first.weights, rtol=1e-10, atol=1e-12)


def test_the_rule_keeps_the_global_model_unless_measurably_better():
    grid = (0.01, 0.1, 1.0, 10.0)
    right_global = np.array([True] * 6 + [False] * 4)
    # W among the best: kept, even though ρ = 1 ties with it
    right = np.zeros((4, 10), bool)
    right[2] = right_global
    assert choose_rho(grid, right, right_global) == (GLOBAL, (0, 0))
    # the best plateau is ρ ∈ {0.1, 1, 10}: its median 1 is taken when the gain is > 1 SE
    right = np.tile(right_global, (4, 1))
    right[1:, 6:9] = True  # three samples only the personalized layers get right: p = 1/8
    assert choose_rho(grid, right, right_global) == (1.0, (3, 0))
    right[1:, 6] = False  # two of them: p = 1/4 >= Φ(−1) = 0.159, not measurable
    assert choose_rho(grid, right, right_global) == (GLOBAL, (2, 0))
    right[1:, 6] = True
    right[1:, 0] = False  # and one only W gets right: p = 5/16
    assert choose_rho(grid, right, right_global) == (GLOBAL, (3, 1))
    assert choose_rho(grid, right, right_global, z=0.4) == (1.0, (3, 1))  # Φ(−0.4) = 0.34
    assert choose_rho(grid, right, right_global, z=0.0) == (1.0, (3, 1))  # no test


def test_ties_go_to_the_global_model_tiny_clients_keep_it_and_bad_input_is_named():
    world = World(5)
    w = _global(_clients(world, [np.arange(M)] * 4, 200, 1))
    separable = np.hstack([10 * world.centers[[0, 1] * 20], np.ones((40, 1))])  # no noise
    y = np.array([0, 1] * 20)
    choice = select_lambda(separable, y, w)
    assert set(choice.correct.values()) == {40} and choice.keeps_global  # every ρ ties
    tiny = select_lambda(separable[:1], y[:1], w)
    assert tiny.keeps_global and tiny.correct == {} and tiny.heldout == 0
    with pytest.raises(ValueError, match="grid"):
        select_lambda(separable, y, w, grid=(0.1, math.inf))
    with pytest.raises(ValueError, match="rule"):
        AutoLambda(rule="absolute")
    with pytest.raises(ValueError, match="z must"):
        AutoLambda(z=-1.0)
    with pytest.raises(ValueError, match="bias column"):
        select_lambda(separable[:, :-1], y, w[:-1], rule="standardized")


# -------------------------------------------------------------- the network helpers (in-process)
def test_choose_output_lambda_on_a_network_equals_personalize(digits):
    split = federated_split(digits, 4, "dirichlet", alpha=0.3, seed=0)
    net = AnalyticNetwork(cnn(digits.input_shape, 10, channels=(4, 8)), seed=1)
    fit = fit_federated(net, [(digits.x[i], digits.y[i]) for i in split.train])
    last = net.num_layers - 1
    # h̄ = df/N of the output layer, as the server computes it from the summed statistics
    total = merge([fit.client_statistics[k][last] for k in range(len(split.train))])
    leverage = fit.global_leverage(net)
    assert leverage == global_leverage(total, net.output_reg) and 0.0 < leverage < 1.0
    assert fit.output_statistics.count == total.count == sum(len(r) for r in split.train)
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
    # skewed clients of a weaker global model (a narrow mlp: 95% on digits) gain measurably
    model = {"model": "mlp", "mlp-hidden": 16} if partitioner == "dirichlet" else {}
    cfg = resolve_run_config(
        {"partitioner": partitioner, "min-nodes": nodes, "results-path": ""}
        | {"personal-lambda": "auto", "dirichlet-alpha": 0.1}
        | model
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
    net = AnalyticNetwork(architecture_for(cfg), seed=int(cfg["seed"]))
    P.install_layers(net, {k: v.numpy() for k, v in result.arrays.to_torch_state_dict().items()})
    policy = P.auto_lambda_policy(cfg)
    last = net.num_layers - 1
    per_client = [net.statistics(last, digits.x[rows], digits.y[rows]) for rows in split.train]
    # the server's h̄ = df/N of the output layer, recomputed here from the clients' statistics
    reg = Regularization(float(cfg["gamma"]), str(cfg["gamma-rule"]))
    leverage = global_leverage(merge(per_client), reg, net.arch.has_bias(last))
    assert 0.0 < leverage < 1.0
    for k, rows in enumerate(split.train):
        stats = per_client[k]
        mine = choose_output_lambda(
            net, digits.x[rows], digits.y[rows], policy=policy, statistics=stats, leverage=leverage
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


def test_the_global_leverage_discounts_the_global_models_own_samples():
    """With ``h̄`` every left-out residual is divided by ``1 − h̄``: ``W`` must win by a margin."""
    world = World(6, noise=2.5)
    clients = _clients(world, [np.array([1, 2, 3])] * 2 + [np.arange(M)] * 2, 120, 1)
    w = _global(clients)
    (a, y), _ = clients[0]
    t = one_hot(y, M)
    plain, corrected = select_lambda(a, y, w), select_lambda(a, y, w, leverage=0.4)
    # ∞: sample i counts when argmax(A_i W − h̄ T_i) is its label (a margin of h̄ on its class)
    assert corrected.correct[GLOBAL] == int(np.sum((a @ w - 0.4 * t).argmax(1) == y))
    assert plain.correct[GLOBAL] == _correct(a, y, w)
    # finite ρ: the plain left-out prediction p becomes t − (t − p)/(1 − h̄)
    loo = LeaveOneOut(a, t, w)
    for rho in DEFAULT_GRID[::7]:
        p = loo.predictions(rho)
        expected = int(np.sum((t - (t - p) / 0.6).argmax(1) == y))
        assert corrected.correct[rho] == expected
    assert corrected.correct[GLOBAL] <= plain.correct[GLOBAL]
    with pytest.raises(ValueError, match="leverage"):
        select_lambda(a, y, w, leverage=1.0)
