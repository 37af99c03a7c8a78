"""Exact leave-one-out of the personalized ridge (issue 15): equal to refitting without each sample."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_analytic.analytic.leave_one_out import LeaveOneOut
from flwr_analytic.analytic.solvers import Regularization
from flwr_analytic.analytic.targets import one_hot


def _client(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Design rows with columns of very different scales, a ones column last, labels, a ``W``."""
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.1, 10.0, dim - 1)
    a = np.hstack([rng.standard_normal((n, dim - 1)) * scales + scales, np.ones((n, 1))])
    return a, rng.integers(0, 3, n), rng.standard_normal((dim, 3))


@pytest.mark.parametrize("rule", ["relative", "standardized"])
@pytest.mark.parametrize(("n", "dim", "form"), [(30, 50, "dual"), (80, 20, "primal")])
def test_predictions_equal_refits_without_each_sample(rule, n, dim, form):
    a, y, w = _client(n, dim, seed=n)
    t = one_hot(y, 3)
    loo = LeaveOneOut(a, t, w, rule)
    assert loo.dual == (form == "dual")
    penalty_rule = Regularization(1.0, rule)
    for rho, pred in zip((1e-3, 0.1, 10.0), loo.path((1e-3, 0.1, 10.0)), strict=True):
        # λ from the full statistics, as the choice uses it: diag(P) = ρ · P(ρ = 1)
        penalty = rho * penalty_rule.penalty(a.T @ a)
        for i in range(n):
            keep = np.arange(n) != i
            g, b = a[keep].T @ a[keep], a[keep].T @ t[keep]
            refit = w + np.linalg.solve(g + np.diag(penalty), b - g @ w)
            expected = a[i] @ refit
            np.testing.assert_allclose(
                pred[i], expected, rtol=1e-9, atol=1e-9 * abs(expected).max()
            )


def test_bad_input_is_named():
    a, y, w = _client(10, 5, seed=0)
    with pytest.raises(ValueError, match="rules"):
        LeaveOneOut(a, one_hot(y, 3), w, "absolute")
    with pytest.raises(ValueError, match="ρ > 0"):
        LeaveOneOut(a, one_hot(y, 3), w).predictions(0.0)
