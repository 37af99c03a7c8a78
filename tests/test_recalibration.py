"""A client's local recalibration of its output layer (issue 15): the math core and the Flower path.

``recalibrate`` solves the normal equations from the client's statistics ``(G, B)``; the tests
compare it with the same least-squares problem written on the rows ``[AW, 1]`` and solved by
``lstsq`` (the penalty as extra rows), check the limits, and show the effect it is for: on clients
that hold a few classes, the recalibrated layer scores above the global one on held-out samples.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from flwr_analytic.analytic import (
    AnalyticNetwork,
    Regularization,
    fit_federated,
    personalize,
    recalibrate,
    ridge_solve,
)
from flwr_analytic.analytic.targets import one_hot
from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
from flwr_analytic.config_checks import ConfigError
from flwr_analytic.data import federated_split
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.fedacnnl.config import resolve_run_config
from flwr_analytic.fedacnnl.data import architecture_for
from flwr_analytic.grid import InProcessGrid
from flwr_analytic.models import cnn
from flwr_analytic.strategies import run_fedacnnl
from flwr_analytic.strategies.fedacnnl import FedACnnL

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def _rows(seed: int, n: int = 300, d: int = 25, m: int = 6):
    """Design rows ``[x, 1]``, one-hot targets of skewed labels, and some layer ``W``."""
    rng = np.random.default_rng(seed)
    a = np.hstack([rng.standard_normal((n, d - 1)), np.ones((n, 1))])
    y = rng.choice(m, n, p=np.r_[0.6, 0.3, np.full(m - 2, 0.1 / (m - 2))])
    return a, one_hot(y, m), rng.standard_normal((d, m)) / np.sqrt(d)


def _by_rows(a: np.ndarray, t: np.ndarray, w: np.ndarray, rho: float) -> np.ndarray:
    """``argmin_V ||T − [AW, 1]V||² + λ||V_s − I||²`` as one stacked least-squares problem."""
    x = np.hstack([a @ w, np.ones((len(a), 1))])
    m = w.shape[1]
    lam = rho * np.sum((a @ w) ** 2) / m  # ρ·trace(WᵀGW)/m
    root = np.sqrt(lam) * np.eye(m, m + 1)  # penalty rows on V_s only: the bias row is free
    v, *_ = np.linalg.lstsq(np.vstack([x, root]), np.vstack([t, np.sqrt(lam) * np.eye(m)]))
    return x @ v


@pytest.mark.parametrize(("seed", "rho"), [(0, 0.01), (1, 0.3), (2, 10.0)])
def test_recalibration_from_statistics_equals_the_row_problem(seed, rho):
    a, t, w = _rows(seed)
    layer = recalibrate(a.T @ a, a.T @ t, w, rho)
    assert layer.shape == w.shape and layer.dtype == np.float64
    reference = _by_rows(a, t, w, rho)
    np.testing.assert_allclose(a @ layer, reference, rtol=1e-9, atol=1e-9 * np.abs(reference).max())


def test_limits_large_rho_keeps_the_scores_plus_the_mean_residual_and_no_samples_keeps_w():
    a, t, w = _rows(3)
    layer = recalibrate(a.T @ a, a.T @ t, w, 1e12)
    shift = np.zeros_like(w)
    shift[-1] = (t - a @ w).mean(axis=0)  # the free bias row: the client's mean residual
    np.testing.assert_allclose(layer, w + shift, atol=1e-8)
    empty = np.zeros((len(w), len(w)))
    np.testing.assert_array_equal(recalibrate(empty, np.zeros_like(w), w, 0.01), w)


def test_bad_input_is_named():
    a, t, w = _rows(4)
    g, b = a.T @ a, a.T @ t
    for rho in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="rho must be finite and > 0"):
            recalibrate(g, b, w, rho)
    with pytest.raises(ValueError, match="shapes do not fit"):
        recalibrate(g, b[:, :3], w, 0.01)
    with pytest.raises(ValueError, match="shapes do not fit"):
        recalibrate(g[:-1, :-1], b, w, 0.01)


def test_skewed_clients_score_higher_after_recalibration(digits):
    """Digits, 6 clients Dirichlet(0.1): the global ``cnn``'s layer, recalibrated on each client's
    statistics, beats it on the client's held-out samples in total (label shift is what it fixes)."""
    split = federated_split(digits, 6, "dirichlet", alpha=0.1, seed=0)
    net = AnalyticNetwork(cnn(digits.input_shape, 10, channels=(2, 4)), seed=1)
    fit = fit_federated(net, [(digits.x[i], digits.y[i]) for i in split.train])
    last = net.num_layers - 1
    glob = mine = 0
    for k, test in enumerate(split.test):
        stats = fit.client_statistics[k]
        own = personalize(net, stats, Regularization(0.1), recalibration=0.01)
        w_k = personalize(net, stats, Regularization(0.1))[last]
        reference = recalibrate(stats[last].gram, stats[last].cross, w_k, 0.01)
        np.testing.assert_array_equal(own[last], reference)  # after pFedACnnL's λ: on W_k
        layer = recalibrate(stats[last].gram, stats[last].cross, net.weights[last], 0.01)
        x, y = digits.x[test], digits.y[test]
        glob += net.evaluate(x, y)["correct"]
        mine += net.with_weights([*net.weights[:-1], layer]).evaluate(x, y)["correct"]
    assert mine > glob, (glob, mine)
    with pytest.raises(ValueError, match="recalibration needs the output layer's statistics"):
        personalize(net, [None] * net.num_layers, Regularization(0.1), recalibration=0.01)


def test_flower_run_recalibrates_each_client_as_the_core_does(digits):
    nodes = 4
    cfg = resolve_run_config(
        {"partitioner": "dirichlet", "dirichlet-alpha": 0.1, "min-nodes": nodes}
        | {"model": "mlp", "mlp-hidden": 16, "personal-recalibration": 0.01, "results-path": ""}
    )
    split = federated_split(digits, nodes, "dirichlet", seed=int(cfg["seed"]), alpha=0.1)

    def load(context):
        return split.client(digits, int(context.node_config["partition-id"]))

    app = make_fedacnnl_client_app(load, run_config=cfg)
    result, _ = run_fedacnnl(InProcessGrid(app, nodes, cfg), cfg)
    ev = result.evaluate_metrics_clientapp[max(result.evaluate_metrics_clientapp)]
    sizes = np.array([len(t) for t in split.test])
    pers = np.rint(np.array(ev["personal-accuracy-clients"]) * sizes)
    net = AnalyticNetwork(architecture_for(cfg), seed=int(cfg["seed"]))
    P.install_layers(net, {k: v.numpy() for k, v in result.arrays.to_torch_state_dict().items()})
    last = net.num_layers - 1
    reg = P.personal_regularization(cfg)
    for k, rows in enumerate(split.train):
        stats = [None] * last + [net.statistics(last, digits.x[rows], digits.y[rows])]
        own = net.with_weights(personalize(net, stats, reg, recalibration=0.01))
        test = split.test[k]
        assert own.evaluate(digits.x[test], digits.y[test])["correct"] == pers[k]


def test_recalibration_is_off_by_default_and_bad_values_are_refused():
    assert resolve_run_config({})["personal-recalibration"] == 0.0
    assert P.personal_recalibration({}) is None
    assert P.personal_recalibration({P.PERSONAL_RECALIBRATION: 0.01}) == 0.01
    with pytest.raises(ConfigError, match="personal-recalibration"):
        resolve_run_config({"personal-recalibration": -1.0})
    with pytest.raises(ConfigError, match="personal_recalibration"):
        FedACnnL(cnn((1, 8, 8), 10), personal_recalibration=-0.5)
    with pytest.raises(ValueError, match="personal-recalibration"):
        P.personal_recalibration({P.PERSONAL_RECALIBRATION: math.nan})
    a, t, _ = _rows(5)
    w = ridge_solve(a.T @ a, a.T @ t, Regularization(1e-3))
    assert np.isfinite(recalibrate(a.T @ a, a.T @ t, w, 0.01)).all()
