"""The quadratic second stage: exact from federated sums, whitened, and checked input."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_analytic.analytic import QuadraticStage, Regularization, ridge_solve
from flwr_analytic.analytic.targets import one_hot


def _data(seed: int = 0, n: int = 600, d: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Features ``h = xQ + c`` (``x`` standard normal, ``Q`` a random rotation) and ``y = [x₀x₁ > 0]``:
    a label no linear function of ``h`` predicts, a quadratic one exactly."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * np.linspace(2.0, 0.5, d)
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return x @ rotation + rng.normal(size=d), (x[:, 0] * x[:, 1] > 0).astype(np.int64)


def _gram(h: np.ndarray) -> np.ndarray:
    a = np.hstack([h, np.ones((len(h), 1))])
    return a.T @ a


def test_federated_sum_gives_the_centralized_stage():
    h, _ = _data()
    parts = np.array_split(np.random.default_rng(1).permutation(len(h)), 5)
    federated = QuadraticStage.from_gram(sum(_gram(h[p]) for p in parts), 6)
    central = QuadraticStage.from_gram(_gram(h), 6)
    scale = np.abs(central.rows(h)).max()
    assert np.abs(federated.rows(h) - central.rows(h)).max() <= 1e-9 * scale
    assert federated.width == 21 and federated.rows(h).shape == (len(h), 12 + 21 + 1)


def test_whitened_components_have_identity_covariance_on_the_pooled_data():
    h, _ = _data(2)
    stage = QuadraticStage.from_gram(_gram(h), 5)
    z = stage.whitened(h)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(z.T @ z / len(h), np.eye(5), atol=1e-9)


def test_quadratic_features_learn_what_the_linear_head_cannot():
    h, y = _data(0, n=4000, d=4)
    train, test = slice(0, 3000), slice(3000, None)
    stage = QuadraticStage.from_gram(_gram(h[train]), 4)
    linear = np.hstack([h, np.ones((len(h), 1))])
    quad = stage.rows(h)
    acc = {}
    for name, a in (("linear", linear), ("quadratic", quad)):
        w = ridge_solve(
            a[train].T @ a[train], a[train].T @ one_hot(y[train], 2), Regularization(1e-3)
        )
        acc[name] = np.mean((a[test] @ w).argmax(1) == y[test])
    assert acc["linear"] < 0.6 < 0.9 < acc["quadratic"]


@pytest.mark.parametrize(
    ("gram", "components", "message"),
    [
        (np.ones((3, 4)), 1, "square"),
        (np.zeros((4, 4)), 1, "sample count"),
        (_gram(np.random.default_rng(0).normal(size=(50, 3))), 4, "components must be in 1 … 3"),
        (
            _gram(np.random.default_rng(0).normal(size=(50, 1)) * np.ones((1, 3))),
            2,
            "lower components",
        ),
    ],
)
def test_bad_input_names_the_problem(gram, components, message):
    with pytest.raises(ValueError, match=message):
        QuadraticStage.from_gram(gram, components)
