"""Whitened-patch layers (issue 15): contrast normalization, ZCA, zca-* schemes, k-means, ridge.

Every closed-form scheme trained federated equals the centralized fit (float64, 1e-9); the federated
k-means equals Lloyd's iterations on the pooled patches from the same seeded initialization.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flwr_analytic.analytic import AnalyticNetwork, Regularization, fit_centralized, fit_federated
from flwr_analytic.analytic.design import contrast_normalize, conv_rows, grid_positions
from flwr_analytic.analytic.solvers import ridge_solve
from flwr_analytic.analytic.statistics import merge
from flwr_analytic.analytic.targets import TargetScheme
from flwr_analytic.analytic.whitening import Whitening, encoder_filters, random_unit_filters
from flwr_analytic.data import load_digits, partition_indices
from flwr_analytic.models import ContrastConv2d, coates

EPS = 1e-3


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return data.x[:600].astype(np.float64), data.y[:600]


def _arch(filters: int = 24):
    return coates((1, 8, 8), 10, filters=filters, kernel=3, grid=2, contrast=EPS)


def _clients(x, y, k=4, seed=0):
    parts = partition_indices(y, k, "dirichlet", alpha=0.3, seed=seed)
    return [(x[idx], y[idx]) for idx in parts]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def test_contrast_conv_equals_normalized_patches():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 9, 9, dtype=torch.float64)
    conv = ContrastConv2d(3, 7, 4, padding=1, contrast=0.05).double()
    rows = contrast_normalize(conv_rows(x, 4, padding=1), 0.05)  # (N, P, 48)
    expected = rows @ conv.weight.reshape(7, -1).T + conv.bias
    got = conv(x).permute(0, 2, 3, 1).reshape(5, -1, 7)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    normed = rows.reshape(-1, 48)
    assert torch.allclose(normed.mean(1), torch.zeros(len(normed), dtype=x.dtype), atol=1e-12)


def test_mirrored_contrast_conv_takes_half_the_gemm_and_equals_the_full_one():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 9, 9, dtype=torch.float64)
    conv = ContrastConv2d(3, 8, 4, contrast=0.05).double()
    with torch.no_grad():
        conv.weight[4:] = -conv.weight[:4]  # the polarity split [c; −c], biases free
    rows = contrast_normalize(conv_rows(x, 4), 0.05)
    expected = rows @ conv.weight.reshape(8, -1).T + conv.bias
    with torch.no_grad():  # the half GEMM
        got = conv(x).permute(0, 2, 3, 1).reshape(4, -1, 8)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    out = conv(x)  # with autograd: the full GEMM, and gradients flow to both halves
    assert torch.allclose(out.permute(0, 2, 3, 1).reshape(4, -1, 8), expected, atol=1e-12)
    out.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad[4:].abs().sum() > 0
    with torch.no_grad():
        conv.weight[7, 0, 0, 0] += 0.5  # no longer mirrored: the full GEMM
        expected = rows @ conv.weight.reshape(8, -1).T + conv.bias
        assert torch.allclose(conv(x).permute(0, 2, 3, 1).reshape(4, -1, 8), expected, atol=1e-12)


def test_zca_whitens_the_patch_covariance():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4000, 6)) @ rng.standard_normal((6, 6)) + 3.0
    a = np.hstack([x, np.ones((len(x), 1))])
    from flwr_analytic.analytic.statistics import LayerStatistics

    white = Whitening.from_statistics(LayerStatistics(a.T @ a, np.zeros((7, 0)), len(x)), 0.1)
    cov = np.cov(x.T, bias=True)
    lam = np.linalg.eigvalsh(cov)
    eps = 0.1 * lam.mean()
    got = np.sort(np.linalg.eigvalsh(white.zca @ cov @ white.zca))
    assert np.allclose(got, np.sort(lam / (lam + eps)), rtol=1e-9)
    assert np.allclose(white.zca, white.zca.T)


@pytest.mark.parametrize("name", ["zca-random", "zca-pca"])
def test_closed_form_zca_schemes_federated_equal_centralized(digits, name):
    x, y = digits
    central = fit_centralized(AnalyticNetwork(_arch(), name), x, y, 100)
    fed = AnalyticNetwork(_arch(), name)
    fit_federated(fed, _clients(x, y), batch_size=[37, 64, 100, 256])
    for layer in range(central.num_layers):
        assert _rel(fed.weights[layer], central.weights[layer]) <= 1e-9
    assert central.evaluate(x, y)["accuracy"] > 0.8


def test_zca_design_is_the_soft_threshold_encoder(digits):
    x, y = digits
    net = fit_centralized(AnalyticNetwork(_arch(), TargetScheme("zca-random", threshold=0.3)), x, y)
    stats = AnalyticNetwork(_arch(), "zca-random").statistics(0, x, y)
    white = Whitening.from_statistics(stats, 0.1)
    c = random_unit_filters(24, 9, _layer_seed(net.seed, 0))
    rows = net.design_rows(0, torch.from_numpy(x[:20])).reshape(-1, 9).numpy()
    expected = np.maximum((rows - white.mean) @ white.zca @ c.T - 0.3, 0.0)
    w = net.weights[0]
    got = np.maximum(rows @ w[:-1] + w[-1], 0.0)
    assert np.allclose(got, expected, atol=1e-10)


@pytest.mark.parametrize("name", ["zca-random", "zca-kmeans"])
def test_polarity_split_is_c_and_minus_c_and_federated_equals_centralized(digits, name):
    x, y = digits
    scheme = TargetScheme(name, threshold=0.4, polarity=True, iterations=2, sample_stride=2)
    central = fit_centralized(AnalyticNetwork(_arch(), scheme), x, y, 100)
    fed = AnalyticNetwork(_arch(), scheme)
    fit_federated(fed, _clients(x, y), batch_size=[37, 64, 100, 256])
    for layer in range(central.num_layers):
        assert _rel(fed.weights[layer], central.weights[layer]) <= 1e-9
    # 12 learned filters c and their negations: features max(0, ±cᵀx̃ − 0.4)
    stats = AnalyticNetwork(_arch(), name).statistics(0, x, y)
    white = Whitening.from_statistics(stats, scheme.zca_eps)
    w = central.weights[0]
    c = np.linalg.lstsq(white.zca, w[:-1, :12], rcond=None)[0].T
    assert np.allclose(w, white.design(encoder_filters(c, True), 0.4), atol=1e-10)
    assert np.allclose(w[:-1, 12:], -w[:-1, :12])
    assert central.evaluate(x, y)["accuracy"] > 0.8


def _layer_seed(seed, layer):
    from flwr_analytic.analytic.network import layer_seed

    return layer_seed(seed, layer)


def _lloyd_reference(x, y, scheme, seed):
    """Lloyd's on the pooled, grid-sampled, normalized patches (numpy, from the same start)."""
    net = AnalyticNetwork(_arch(), scheme)
    rows = net.design_rows(0, torch.from_numpy(x))
    white = Whitening.from_statistics(merge([net.statistics(0, x, y)]), scheme.zca_eps)
    sampled = grid_positions(rows, 6, 6, scheme.sample_stride).reshape(-1, 9).numpy()
    xt = (sampled - white.mean) @ white.zca
    c = random_unit_filters(24, 9, _layer_seed(seed, 0))
    for _ in range(scheme.iterations):
        nearest = np.argmax(xt @ c.T - 0.5 * np.sum(c**2, axis=1), axis=1)
        for k in range(len(c)):
            if np.any(nearest == k):
                c[k] = xt[nearest == k].mean(axis=0)
    return white.design(c, scheme.threshold)


def test_federated_kmeans_equals_centralized_lloyd(digits):
    x, y = digits
    scheme = TargetScheme("zca-kmeans", iterations=4, sample_stride=2)
    fed = AnalyticNetwork(_arch(), scheme)
    fit = fit_federated(fed, _clients(x, y), batch_size=[50, 64, 100, 33])
    central = fit_centralized(AnalyticNetwork(_arch(), scheme), x, y, 128)
    reference = _lloyd_reference(x, y, scheme, fed.seed)
    assert _rel(fed.weights[0], reference) <= 1e-9
    assert _rel(central.weights[0], reference) <= 1e-9
    assert _rel(fed.weights[1], central.weights[1]) <= 1e-9
    assert fed.kmeans is None and fed.solved_layers == fed.num_layers
    # 1 + 4 rounds for the k-means layer: every one uploaded
    assert fit.upload_floats[0] > 5 * 4 * (10 * 11 // 2)


def test_kmeans_round_statistics_are_per_centroid_sums_and_counts(digits):
    x, y = digits
    scheme = TargetScheme("zca-kmeans", iterations=2, sample_stride=3)
    net = AnalyticNetwork(_arch(), scheme)
    assert net.solve(0, net.statistics(0, x, y)) is None
    assert net.stage == 1 and net.num_targets(0) == 24
    stats = net.statistics(0, x, y, 64)
    assert stats.cross.shape == (10, 24)
    assert stats.cross[-1].sum() == len(x) * 4 == net.rows_per_sample(0) * len(x)
    assert stats.gram[-1, -1] == stats.cross[-1].sum()


def test_standardized_ridge_is_ridge_on_standardized_features():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((300, 8)) * np.array([0.1, 1, 10, 100, 1, 1, 5, 0.3]) + 2.0
    t = rng.standard_normal((300, 3))
    a = np.hstack([f, np.ones((300, 1))])
    w = ridge_solve(a.T @ a, a.T @ t, Regularization(0.5, "standardized"))
    mu, sd = f.mean(0), f.std(0)
    s = np.hstack([(f - mu) / sd, np.ones((300, 1))])
    pen = np.append(np.full(8, 0.5 * 300), 0.0)
    ws = np.linalg.solve(s.T @ s + np.diag(pen), s.T @ t)
    # the floor adds 1e-12 of the largest variance (1e-6 of the smallest here)
    assert np.allclose(a @ w, s @ ws, rtol=0, atol=1e-5 * np.abs(s @ ws).max())
    with pytest.raises(ValueError, match="diagonal"):
        Regularization(0.5, "standardized").amount(a.T @ a)


def test_bad_scheme_options_are_named():
    with pytest.raises(ValueError, match="iterations"):
        TargetScheme("zca-kmeans", iterations=0)
    with pytest.raises(ValueError, match="zca_eps"):
        TargetScheme("zca-random", zca_eps=0.0)
    with pytest.raises(ValueError, match="sample_stride"):
        TargetScheme("zca-kmeans", sample_stride=1.5)
    with pytest.raises(ValueError, match="polarity applies to zca-kmeans and zca-random"):
        TargetScheme("label-pca", polarity=True)
    with pytest.raises(ValueError, match="already come in ± pairs"):
        TargetScheme("zca-pca", polarity=True)
    with pytest.raises(ValueError, match="even number of channels"):
        TargetScheme("zca-random", polarity=True).filter_count(25)
    assert "polarity" not in TargetScheme("zca-kmeans").describe()  # older descriptions hold
