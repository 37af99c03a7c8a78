"""Release policies (exact / DP statistics) and the network hooks they use.

:mod:`flwr_analytic.analytic.privacy.release`: the server core checks each reply and solves each layer
through an :class:`ExactRelease` or a :class:`DPRelease`; these tests compare them with direct
computations on the digits data (clipping, the public prior and ridge, ``solve_noisy_layer``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from flwr_analytic.analytic import AnalyticNetwork, LayerStatistics, Regularization, merge
from flwr_analytic.analytic.design import conv_rows
from flwr_analytic.analytic.privacy import (
    DP_CLIP_NORM,
    DP_NOISE_MULTIPLIER,
    DPConfig,
    DPRelease,
    ExactRelease,
    ReleasePolicy,
    add_gaussian_noise,
    clipped_statistics,
    dp_regularization,
    dp_ridge,
    noise_rng,
    privacy_report,
    public_prior,
    rows_per_sample,
    solve_noisy_layer,
)
from flwr_analytic.analytic.solvers import ridge_solve
from flwr_analytic.analytic.statistics import StatisticsError
from flwr_analytic.models import Architecture, ConvSpec, DenseSpec, get_architecture

DP = DPConfig(1.5, clip_norm=3.0, target_bound=1.0)
ANNOUNCED = {DP_NOISE_MULTIPLIER: DP.noise_multiplier, DP_CLIP_NORM: DP.clip_norm}


def conv_arch(digits) -> Architecture:
    """An unpadded pooled conv (36 output positions), a padded conv (9), a dense layer, the output."""
    hidden = (ConvSpec(4, 3, padding=0, pool=2), ConvSpec(5, 3, padding=1, pool=1), DenseSpec(12))
    return Architecture("test-conv", digits.input_shape, hidden, 10)


def shards(digits, k: int = 4, size: int = 60) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (digits.x[i * size : (i + 1) * size], digits.y[i * size : (i + 1) * size]) for i in range(k)
    ]


def noisy_releases(net: AnalyticNetwork, layer: int, data, seed: int = 3) -> list[LayerStatistics]:
    sigma = DP.sigma(net.rows_per_sample(layer), net.num_targets(layer))
    return [
        add_gaussian_noise(
            clipped_statistics(net, layer, x, y, DP), sigma, noise_rng(seed, k, layer)
        )
        for k, (x, y) in enumerate(data)
    ]


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# --------------------------------------------------------------------------- network hooks
def test_rows_per_sample_is_the_number_of_conv_output_positions(digits):
    arch = conv_arch(digits)
    net = AnalyticNetwork(arch, "label-pca", seed=0)
    x, y = digits.x[:50], digits.y[:50]
    for layer in range(net.num_layers):
        spec = arch.spec(layer)
        h = net.layer_input(layer, x)
        positions = (
            conv_rows(h, spec.kernel_size, spec.padding).shape[1]
            if isinstance(spec, ConvSpec)
            else 1
        )
        stats = net.statistics(layer, x, y)
        assert net.rows_per_sample(layer) == positions == stats.rows / stats.count
        assert rows_per_sample(net, layer) == positions  # the old function is an alias
        net.solve(layer, stats)
    assert [net.rows_per_sample(layer) for layer in range(4)] == [36, 9, 1, 1]


def test_solve_uses_the_given_ridge_and_leaves_the_network_s_ridge(digits):
    arch = get_architecture("linear", digits.input_shape, 10)
    stats = AnalyticNetwork(arch, seed=0).statistics(0, digits.x[:300], digits.y[:300])
    override = Regularization(5.0, "absolute")
    net = AnalyticNetwork(arch, seed=0, output_reg=Regularization(1e-6))
    w = net.solve(0, stats, reg=override)
    assert net.output_reg == Regularization(1e-6)
    np.testing.assert_array_equal(w, ridge_solve(stats.gram, stats.cross, override))
    plain = AnalyticNetwork(arch, seed=0, output_reg=Regularization(1e-6)).solve(0, stats)
    assert rel_diff(w, plain) > 1e-3  # the override really changed the solve


def test_solve_override_reaches_hidden_label_regression(digits):
    arch = get_architecture("mlp", digits.input_shape, 10, hidden=16)
    x, y = digits.x[:300], digits.y[:300]
    stats = AnalyticNetwork(arch, "label-pca", seed=0).statistics(0, x, y)
    override = Regularization(0.5)
    net = AnalyticNetwork(arch, "label-pca", seed=0)
    before = net.hidden_reg
    w = net.solve(0, stats, reg=override)
    assert net.hidden_reg == before
    swapped = AnalyticNetwork(arch, "label-pca", seed=0, hidden_reg=override)
    np.testing.assert_array_equal(w, swapped.solve(0, stats))


def test_clipped_statistics_equal_the_statistics_of_clipped_rows(digits):
    arch = get_architecture("linear", digits.input_shape, 10)
    net = AnalyticNetwork(arch, seed=0)
    x, y = digits.x[:200], digits.y[:200]
    dp = DPConfig(1.0, clip_norm=4.0, target_bound=0.5)
    a = x.reshape(len(x), -1).astype(np.float64)
    limit = math.sqrt(dp.clip_norm**2 - 1)
    a *= np.minimum(1.0, limit / np.linalg.norm(a, axis=1, keepdims=True))
    assert np.linalg.norm(a, axis=1).max() <= limit * (1 + 1e-12)
    design = np.hstack([a, np.ones((len(a), 1))])
    t = np.eye(10)[y] * dp.target_bound
    got = clipped_statistics(net, 0, x, y, dp, batch_size=64)
    assert got.count == len(y)
    assert rel_diff(got.gram, design.T @ design) <= 1e-12
    assert rel_diff(got.cross, design.T @ t) <= 1e-12


# ---------------------------------------------------------------------------- ExactRelease
def test_exact_release_accepts_honest_statistics_of_every_layer(digits):
    release = ExactRelease()
    assert isinstance(release, ReleasePolicy)
    net = AnalyticNetwork(conv_arch(digits), "label-pca", seed=0)
    data = shards(digits, 3)
    for layer in range(net.num_layers):
        stats = [net.statistics(layer, x, y) for x, y in data]
        for s in stats:
            release.check(s, net, layer, {})
        total = merge(stats)
        w = release.solve(net, layer, total, len(stats))
        np.testing.assert_array_equal(w, net.weights[layer])
    np.testing.assert_array_equal(
        release.group_weights(net, total, 3), ridge_solve(total.gram, total.cross, net.output_reg)
    )
    assert release.fingerprint() == {"release": "exact"}
    assert release.details(net, net.num_layers - 1, 3) == {}
    assert release.report(4) is None


def test_exact_release_rejects_forged_statistics(digits):
    release = ExactRelease()
    net = AnalyticNetwork(conv_arch(digits), "label-pca", seed=0)
    out = net.num_layers - 1
    for layer in range(out):
        net.solve(layer, net.statistics(layer, digits.x[:200], digits.y[:200]))
    honest = net.statistics(out, digits.x[200:260], digits.y[200:260])
    release.check(honest, net, out, {})

    indefinite = LayerStatistics(honest.gram.copy(), honest.cross, honest.count)
    indefinite.gram[0, 1] = indefinite.gram[1, 0] = (
        2.0 * math.sqrt(honest.gram[0, 0] * honest.gram[1, 1]) + 1.0
    )
    with pytest.raises(StatisticsError, match="positive semi-definite"):
        release.check(indefinite, net, out, {})

    histogram = LayerStatistics(honest.gram, honest.cross.copy(), honest.count)
    histogram.cross[-1, 0] += 1.0
    histogram.cross[-1, 1] -= 1.0 + 0.5  # no longer whole
    with pytest.raises(StatisticsError, match="label histogram"):
        release.check(histogram, net, out, {})

    conv = AnalyticNetwork(conv_arch(digits), "label-pca", seed=0)
    s = conv.statistics(0, digits.x[:20], digits.y[:20])
    wrong_rows = LayerStatistics(s.gram, s.cross, s.count * 2)  # G[-1,-1] = 36 n, not 18 n'
    with pytest.raises(StatisticsError, match="rows per sample"):
        release.check(wrong_rows, conv, 0, {})


# ------------------------------------------------------------------------------- DPRelease
def test_dp_release_solve_is_the_ridge_of_the_sum_plus_prior(digits):
    arch = get_architecture("mlp", digits.input_shape, 10, hidden=16)
    data = shards(digits, 4)
    reference = AnalyticNetwork(arch, "label-pca", seed=1, output_reg=Regularization(1e-4))
    release = DPRelease(DP)
    net = AnalyticNetwork(arch, "label-pca", seed=1, output_reg=Regularization(1e-4))
    for layer in range(net.num_layers):
        released = noisy_releases(net, layer, data)
        total = merge(released)
        dim, m, k = net.design_dim(layer), net.num_targets(layer), len(released)
        sigma = release.sigma(net, layer)
        assert sigma == DP.sigma(1, m)
        gamma = dp_ridge(sigma, k, dim)  # κ = 2
        assert release.ridge(net, layer, k) == gamma
        assert release.details(net, layer, k) == {"dp-ridge": gamma, "dp-sigma": sigma}
        base = net.output_reg if net.is_output(layer) else net.hidden_reg
        reg = dp_regularization(base, total.gram, gamma)
        system = total + public_prior(dim, m, gamma)
        # the prior makes every feature diagonal positive; the bias gets γ_DP through the ridge
        assert np.all(np.diag(system.gram)[:-1] > np.diag(total.gram)[:-1])
        w = release.solve(net, layer, total, k)
        label = ridge_solve(system.gram, system.cross, reg)
        if net.is_output(layer):
            assert rel_diff(w, label) <= 1e-12
        else:  # label-pca: the first c channels are the label regression
            assert rel_diff(w[:, : label.shape[1]], label) <= 1e-12
        np.testing.assert_array_equal(
            w, solve_noisy_layer(reference, layer, released, sigma)
        )  # the benchmarks' solve path
        assert reference.output_reg == net.output_reg == Regularization(1e-4)


def test_dp_release_group_weights_use_the_group_s_contributors(digits):
    arch = get_architecture("linear", digits.input_shape, 10)
    net = AnalyticNetwork(arch, seed=0, output_reg=Regularization(1e-3))
    release = DPRelease(DP, ridge_factor=1.0)
    released = noisy_releases(net, 0, shards(digits, 3))
    total = merge(released)
    dim = net.design_dim(0)
    gamma = 0.5 * dp_ridge(release.sigma(net, 0), 3, dim)
    system = total + public_prior(dim, 10, gamma)
    expected = ridge_solve(
        system.gram, system.cross, dp_regularization(net.output_reg, total.gram, gamma)
    )
    got = release.group_weights(net, total, 3)
    assert rel_diff(got, expected) <= 1e-12
    assert net.weights[0] is None  # not installed
    np.testing.assert_array_equal(got, release.solve(net, 0, total, 3))
    assert rel_diff(release.group_weights(net, total, 6), got) > 0  # K enters γ_DP


def test_dp_release_check_wants_the_announced_parameters(digits):
    arch = get_architecture("linear", digits.input_shape, 10)
    net = AnalyticNetwork(arch, seed=0)
    release = DPRelease(DP)
    (noisy,) = noisy_releases(net, 0, shards(digits, 1))
    assert np.diag(noisy.gram).min() < 0  # constant pixels + noise: the exact checks refuse it
    with pytest.raises(StatisticsError):
        ExactRelease().check(noisy, net, 0, {})
    release.check(noisy, net, 0, ANNOUNCED)
    release.check(noisy, net, 0, {**ANNOUNCED, DP_CLIP_NORM: DP.clip_norm * (1 + 1e-14)})
    for metrics, key in (
        ({}, DP_NOISE_MULTIPLIER),
        ({DP_NOISE_MULTIPLIER: DP.noise_multiplier}, DP_CLIP_NORM),
        ({**ANNOUNCED, DP_NOISE_MULTIPLIER: 1.0}, DP_NOISE_MULTIPLIER),
        ({**ANNOUNCED, DP_CLIP_NORM: 3.5}, DP_CLIP_NORM),
        ({**ANNOUNCED, DP_CLIP_NORM: [3.0]}, DP_CLIP_NORM),
    ):
        with pytest.raises(StatisticsError, match=f"{key}=.*expects"):
            release.check(noisy, net, 0, metrics)
    asym = LayerStatistics(noisy.gram.copy(), noisy.cross, noisy.count)
    asym.gram[0, 1] += 1e-9
    with pytest.raises(StatisticsError, match="not symmetric"):
        release.check(asym, net, 0, ANNOUNCED)
    with pytest.raises(StatisticsError, match="target columns"):
        release.check(
            LayerStatistics(noisy.gram, noisy.cross[:, :3], noisy.count), net, 0, ANNOUNCED
        )


def test_dp_release_parameters_fingerprint_and_report():
    with pytest.raises(ValueError, match="dp-noise-multiplier"):
        DPRelease(DPConfig(0.0, 0.0))
    with pytest.raises(ValueError, match="delta"):
        DPRelease(DP, delta=1.0)
    with pytest.raises(ValueError, match="ridge_factor"):
        DPRelease(DP, ridge_factor=-1.0)
    release = DPRelease(DP, delta=1e-6, ridge_factor=1.5)
    assert isinstance(release, ReleasePolicy) and release.name == "dp"
    assert release.fingerprint() == {
        "release": "dp",
        "dp-noise-multiplier": 1.5,
        "dp-clip-norm": 3.0,
        "dp-target-bound": 1.0,
        "dp-ridge-factor": 1.5,
        "dp-delta": 1e-6,
    }
    report = release.report(3)
    expected = privacy_report([1.5] * 3, 1e-6)
    assert {k: report[k] for k in expected} == expected
    assert report["released-layers"] == 3 and report["clip-norm"] == 3.0
    assert report["target-bound"] == 1.0
    assert report["epsilon"] > privacy_report([1.5] * 2, 1e-6)["epsilon"]


def test_dp_release_without_ridge_is_the_plain_solve(digits):
    arch = get_architecture("linear", digits.input_shape, 10)
    net = AnalyticNetwork(arch, seed=0)
    total = net.statistics(0, digits.x[:300], digits.y[:300])  # exact: passes the plain checks
    release = DPRelease(DP, ridge_factor=0.0)
    w = release.solve(net, 0, total, 5)
    np.testing.assert_array_equal(w, AnalyticNetwork(arch, seed=0).solve(0, total))
    np.testing.assert_array_equal(release.group_weights(net, total, 5), w)
    assert release.details(net, 0, 5) == {}


def test_validate_noisy_skips_only_the_sign_check(digits):
    arch = get_architecture("linear", digits.input_shape, 10)
    net = AnalyticNetwork(arch, seed=0)
    (noisy,) = noisy_releases(net, 0, shards(digits, 1))
    with pytest.raises(StatisticsError, match="negative diagonal"):
        noisy.validate()
    assert noisy.validate(65, 10, rows_per_sample=1, noisy=True) is noisy
    with pytest.raises(ValueError, match="noisy"):
        noisy.validate(noisy=True, check_psd=True)
    bad_count = LayerStatistics(noisy.gram, noisy.cross, noisy.count + 1)
    with pytest.raises(StatisticsError, match="inconsistent"):
        bad_count.validate(noisy=True)
    tiny = LayerStatistics(noisy.gram.copy(), noisy.cross, noisy.count)
    tiny.gram[0, 1] = np.nextafter(tiny.gram[1, 0], np.inf)  # within the default tolerance
    tiny.validate(noisy=True)
    with pytest.raises(StatisticsError, match="not symmetric"):
        tiny.validate(noisy=True, symmetry_tol=0.0)
