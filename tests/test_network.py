import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flwr_analytic.analytic import (
    AnalyticNetwork,
    Regularization,
    fit_centralized,
    fit_federated,
    personalize,
    ridge_solve,
)
from flwr_analytic.analytic.design import conv_rows, conv_to_weight, weight_to_conv
from flwr_analytic.data import federated_split
from flwr_analytic.models import build_module, cnn, lenet5, linear, mlp


def test_conv_weight_layout_matches_design_rows():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((3, 2, 7, 7)))
    w = rng.standard_normal((2 * 9 + 1, 4))
    weight, bias = weight_to_conv(w, 2, 3)
    conv = F.conv2d(x, torch.from_numpy(weight), torch.from_numpy(bias), padding=1)  # (3, 4, 7, 7)
    rows = conv_rows(x, 3, 1).numpy()  # (3, 49, 18)
    design = np.concatenate([rows, np.ones((3, 49, 1))], axis=2) @ w  # (3, 49, 4)
    np.testing.assert_allclose(
        conv.permute(0, 2, 3, 1).reshape(3, 49, 4).numpy(), design, atol=1e-12
    )
    np.testing.assert_array_equal(conv_to_weight(weight, bias), w)


def test_planted_conv_kernel_is_recovered_from_statistics():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((40, 1, 9, 9)))
    weight = rng.standard_normal((1, 1, 3, 3))
    target = F.conv2d(x, torch.from_numpy(weight), torch.tensor([0.7], dtype=torch.float64))
    rows = conv_rows(x, 3, 0).reshape(-1, 9).numpy()
    a = np.hstack([rows, np.ones((len(rows), 1))])
    w = ridge_solve(a.T @ a, a.T @ target.reshape(-1, 1).numpy(), Regularization(0.0, "absolute"))
    got_w, got_b = weight_to_conv(w, 1, 3)
    np.testing.assert_allclose(got_w, weight, atol=1e-10)
    np.testing.assert_allclose(got_b, [0.7], atol=1e-10)


@pytest.mark.parametrize("factory", [linear, mlp, lenet5, cnn])
def test_export_runs_as_plain_torch_module(digits, factory):
    arch = factory(digits.input_shape, 10)
    net = fit_centralized(AnalyticNetwork(arch, seed=1), digits.x[:600], digits.y[:600])
    fresh = build_module(arch).double()
    fresh.load_state_dict(net.state_dict())
    with torch.no_grad():
        out = fresh(torch.from_numpy(digits.x[600:700]).double()).numpy()
    np.testing.assert_allclose(out, net.predict(digits.x[600:700]), rtol=1e-10, atol=1e-12)
    module32 = net.to_module()
    assert next(module32.parameters()).dtype == torch.float32
    again = AnalyticNetwork(arch, seed=1)
    again.load_module(fresh)
    for a, b in zip(again.weights, net.weights):
        np.testing.assert_allclose(a, b, rtol=1e-14)


def test_analytic_cnn_beats_random_features_of_equal_width(digits):
    split = federated_split(digits, 1, "iid", seed=0)
    tr, te = split.train[0], split.test[0]
    accs = {}
    for scheme in ("label-pca", "random"):
        net = fit_centralized(
            AnalyticNetwork(cnn(digits.input_shape), scheme, seed=0), digits.x[tr], digits.y[tr]
        )
        accs[scheme] = net.evaluate(digits.x[te], digits.y[te])["accuracy"]
    assert accs["label-pca"] > accs["random"] + 0.01, accs
    assert accs["label-pca"] > 0.97


def test_personalization_limits_and_gain(digits):
    split = federated_split(digits, 10, "dirichlet", alpha=0.1, seed=2)
    clients = [(digits.x[i], digits.y[i]) for i in split.train]
    net = AnalyticNetwork(mlp(digits.input_shape, 10, hidden=64), "label-encoding", seed=0)
    fit = fit_federated(net, clients)
    k = int(np.argmax([len(i) for i in split.train]))
    stats = fit.client_statistics[k]
    huge = personalize(net, stats, Regularization(1e12, "absolute"))
    for a, b in zip(huge, net.weights):
        np.testing.assert_allclose(a, b, atol=1e-6)
    last = personalize(net, stats, Regularization(0.1))
    np.testing.assert_array_equal(last[0], net.weights[0])  # hidden layer untouched
    assert not np.allclose(last[1], net.weights[1])
    every = personalize(net, stats, Regularization(0.1), layers="all")
    assert not np.allclose(every[0], net.weights[0])  # label-encoding layer personalized too
    glob = pers = total = 0
    for i, test in enumerate(split.test):
        w = personalize(net, fit.client_statistics[i], Regularization(0.1))
        glob += net.evaluate(digits.x[test], digits.y[test])["correct"]
        pers += net.with_weights(w).evaluate(digits.x[test], digits.y[test])["correct"]
        total += len(test)
    assert pers > glob, (pers / total, glob / total)


def test_misuse_gives_clear_errors(digits):
    net = AnalyticNetwork(mlp(digits.input_shape, 10, hidden=16), "pca")
    with pytest.raises(RuntimeError, match="next is 0"):
        net.solve(1, None)
    with pytest.raises(RuntimeError, match="needs layers 0..0 solved"):
        net.statistics(1, digits.x[:10], digits.y[:10])
    with pytest.raises(ValueError, match="weights must be"):
        net.set_layer(0, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="unknown target scheme"):
        AnalyticNetwork(mlp(digits.input_shape), "magic")
    with pytest.raises(ValueError, match="2 schemes given for 1 hidden"):
        AnalyticNetwork(mlp(digits.input_shape), ["pca", "pca"])
    with pytest.raises(ValueError, match="at most 64 filter pairs"):
        fit_centralized(
            AnalyticNetwork(mlp(digits.input_shape, 10, hidden=200), "pca"), digits.x, digits.y
        )
    with pytest.raises(ValueError, match="labels must be in 0..9"):
        net.statistics(0, digits.x[:3], np.array([0, 1, 12])) if net.num_targets(
            0
        ) else net.layer_targets(1, np.array([12]))
    with pytest.raises(RuntimeError, match="solved"):
        net.predict(digits.x[:2])
