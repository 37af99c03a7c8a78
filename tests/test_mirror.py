"""Mirror symmetry (issue 15): train on every image and its mirror, score the mean of the two views.

A mirrored network is the plain network trained on the explicitly mirrored data set: its
statistics, its federated fit (equal to the centralized fit on the pooled mirrored data for any
partition) and its scores (the mean over the two views) are checked against that plain network.
Through Flower the flag travels in the strategy's config and the clients' personalized heads are
those of the core on the clients' mirrored statistics.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from flwr_analytic.analytic import (
    AnalyticNetwork,
    Regularization,
    fit_centralized,
    fit_federated,
    personalize,
)
from flwr_analytic.analytic.mirror import mirror_images
from flwr_analytic.analytic.training import output_design
from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
from flwr_analytic.config_checks import ConfigError
from flwr_analytic.data import federated_split
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.fedacnnl.config import resolve_run_config
from flwr_analytic.fedacnnl.data import architecture_for, scheme_for
from flwr_analytic.grid import InProcessGrid
from flwr_analytic.models import coates
from flwr_analytic.strategies import run_fedacnnl
from flwr_analytic.strategies.fedacnnl import FedACnnL

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

SCHEME = "zca-random"  # closed form: one round per layer


def _arch(digits):
    return coates(digits.input_shape, 10, filters=16, kernel=3, grid=2, contrast=1e-3)


def _net(digits, mirror):
    reg = Regularization(1e-3, "standardized")
    return AnalyticNetwork(_arch(digits), SCHEME, output_reg=reg, seed=3, mirror=mirror)


def _both(x, y):
    return np.concatenate([x, x[..., ::-1]]), np.concatenate([y, y])


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_mirror_images_reverses_the_width_axis(digits):
    x = digits.x[:3]
    assert np.array_equal(mirror_images(x)[..., 0], x[..., -1])
    assert np.array_equal(mirror_images(mirror_images(x)), x)
    assert mirror_images(x).flags["C_CONTIGUOUS"]


def test_federated_mirrored_fit_equals_centralized_on_the_mirrored_pooled_data(digits):
    split = federated_split(digits, 5, "dirichlet", alpha=0.1, seed=2)
    clients = [(digits.x[r], digits.y[r]) for r in split.train]
    net = _net(digits, mirror=True)
    fit = fit_federated(net, clients, batch_size=[7, 64, 33, 256, 5])  # batches do not matter
    pooled = np.concatenate(split.train)
    plain = fit_centralized(_net(digits, mirror=False), *_both(digits.x[pooled], digits.y[pooled]))
    for w, r in zip(net.weights, plain.weights, strict=True):
        assert _rel(w, r) <= 1e-9
    # each client's statistics are those of its own mirrored samples: count 2N
    for (x, y), stats in zip(clients, fit.client_statistics, strict=True):
        ref = plain.statistics(net.num_layers - 1, *_both(x, y))
        assert stats[-1].count == 2 * len(y) == ref.count
        assert _rel(stats[-1].gram, ref.gram) <= 1e-9 and _rel(stats[-1].cross, ref.cross) <= 1e-9
    # scores: the mean of the two views; without the flag, the single view
    test = np.concatenate(split.test)
    xt = digits.x[test]
    mean = 0.5 * (plain.predict(xt) + plain.predict(xt[..., ::-1].copy()))
    assert np.allclose(net.predict(xt), mean, rtol=1e-9, atol=1e-12)
    assert not np.allclose(plain.predict(xt), mean)
    # the output layer's design rows (the clients' leave-one-out) hold both views, labels twice
    x0, y0 = clients[0]
    a, y = output_design(net, x0, y0, batch_size=50)
    assert a.shape == (2 * len(y0), net.design_dim(net.num_layers - 1))
    assert _rel(a.T @ a, fit.client_statistics[0][-1].gram) <= 1e-9
    per_batch = [y0[i : i + 50] for i in range(0, len(y0), 50) for _ in ("view", "mirror")]
    assert np.array_equal(y, np.concatenate(per_batch))


def test_flower_run_with_mirror_equals_the_core_globally_and_per_client(digits):
    nodes = 4
    cfg = resolve_run_config(
        {"partitioner": "dirichlet", "dirichlet-alpha": 0.1, "min-nodes": nodes, "mirror": True}
        | {"model": "coates", "coates-filters": 16, "scheme": SCHEME, "results-path": ""}
        | {"gamma": 1e-3, "gamma-rule": "standardized"}
    )
    split = federated_split(digits, nodes, "dirichlet", seed=int(cfg["seed"]), alpha=0.1)

    def load(context):
        return split.client(digits, int(context.node_config["partition-id"]))

    app = make_fedacnnl_client_app(load, run_config=cfg)
    result, _ = run_fedacnnl(InProcessGrid(app, nodes, cfg), cfg)
    reg = Regularization(float(cfg["gamma"]), str(cfg["gamma-rule"]))
    net = AnalyticNetwork(
        architecture_for(cfg), scheme_for(cfg), output_reg=reg, seed=int(cfg["seed"]), mirror=True
    )
    fit = fit_federated(net, [(digits.x[r], digits.y[r]) for r in split.train])
    sent = {k: v.numpy() for k, v in result.arrays.to_torch_state_dict().items()}
    got = AnalyticNetwork(architecture_for(cfg), seed=int(cfg["seed"]), mirror=True)
    P.install_layers(got, sent)
    for w, r in zip(got.weights, net.weights, strict=True):
        assert _rel(w, r) <= 1e-9
    ev = result.evaluate_metrics_clientapp[max(result.evaluate_metrics_clientapp)]
    sizes = np.array([len(t) for t in split.test])
    glob = np.rint(np.array(ev["global-accuracy-clients"]) * sizes)
    pers = np.rint(np.array(ev["personal-accuracy-clients"]) * sizes)
    lam = P.personal_regularization(cfg)
    for k, test in enumerate(split.test):
        assert got.evaluate(digits.x[test], digits.y[test])["correct"] == glob[k]
        own = got.with_weights(personalize(got, fit.client_statistics[k], lam))
        assert own.evaluate(digits.x[test], digits.y[test])["correct"] == pers[k]


def test_mirror_is_off_by_default_travels_only_when_set_and_bad_values_are_refused(digits):
    assert resolve_run_config({})["mirror"] is False
    plain = FedACnnL(_arch(digits), SCHEME)
    assert not plain.net.mirror and P.MIRROR not in P.network_config(plain.net, 8)
    mirrored = FedACnnL(_arch(digits), SCHEME, mirror=True)
    config = P.network_config(mirrored.net, 8)
    assert config[P.MIRROR] is True and P.network_from_config(config).mirror
    assert "mirror" in mirrored.server.fingerprint() and "mirror" not in plain.server.fingerprint()
    with pytest.raises(ConfigError, match="mirror"):
        resolve_run_config({"mirror": "yes"})
    with pytest.raises(ConfigError, match="mirror"):
        FedACnnL(_arch(digits), SCHEME, mirror="yes")
