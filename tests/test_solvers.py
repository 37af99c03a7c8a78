import warnings

import numpy as np
import pytest

from flwr_analytic.analytic import (
    IllConditionedWarning,
    Regularization,
    personalized_solve,
    ridge_solve,
)
from flwr_analytic.analytic.solvers import effective_dof


def _problem(rng, n=50, d=6, m=3):
    a = np.hstack([rng.standard_normal((n, d - 1)), np.ones((n, 1))])
    t = rng.standard_normal((n, m))
    return a, t


def test_ridge_matches_normal_equations():
    rng = np.random.default_rng(0)
    a, t = _problem(rng)
    g, b = a.T @ a, a.T @ t
    w = ridge_solve(g, b, Regularization(0.3, "absolute"))
    np.testing.assert_allclose((g + 0.3 * np.eye(6)) @ w, b, atol=1e-10)


def test_relative_rule_scales_with_trace():
    g = np.diag([2.0, 4.0, 6.0])
    assert Regularization(0.5).amount(g) == pytest.approx(0.5 * 12 / 3)
    assert Regularization(0.5, "absolute").amount(g) == 0.5
    with pytest.raises(ValueError, match="rule"):
        Regularization(1.0, "weird")
    with pytest.raises(ValueError, match=">= 0"):
        Regularization(-1.0)


def test_singular_gram_falls_back_with_warning_and_stays_finite():
    rng = np.random.default_rng(1)
    a, t = _problem(rng)
    a = np.hstack([a, a[:, :1]])  # duplicate feature: singular Gram
    with pytest.warns(IllConditionedWarning, match="Cholesky failed"):
        w = ridge_solve(a.T @ a, a.T @ t, Regularization(0.0))
    assert np.all(np.isfinite(w))
    # the fallback is still a least-squares solution
    np.testing.assert_allclose(a.T @ a @ w, a.T @ t, atol=1e-8)


def test_well_posed_solve_issues_no_warning():
    rng = np.random.default_rng(2)
    a, t = _problem(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ridge_solve(a.T @ a, a.T @ t, Regularization(1e-3))


def test_personalized_solve_is_the_regularized_minimizer_and_interpolates():
    rng = np.random.default_rng(3)
    a, t = _problem(rng)
    g, b = a.T @ a, a.T @ t
    w_glob = rng.standard_normal((6, 3))
    lam = 2.5
    w_k = personalized_solve(g, b, w_glob, Regularization(lam, "absolute"))
    # normal equations of ||T − AW||² + λ||W − W_glob||²
    np.testing.assert_allclose((g + lam * np.eye(6)) @ w_k, b + lam * w_glob, atol=1e-9)
    far = personalized_solve(g, b, w_glob, Regularization(1e12, "absolute"))
    np.testing.assert_allclose(far, w_glob, atol=1e-8)
    near = personalized_solve(g, b, w_glob, Regularization(1e-10, "absolute"))
    np.testing.assert_allclose(near, np.linalg.lstsq(a, t, rcond=None)[0], atol=1e-6)
    with pytest.raises(ValueError, match="λ > 0"):
        personalized_solve(g, b, w_glob, Regularization(0.0))


def test_dead_features_of_a_standardized_ridge_are_rescued_by_equilibration():
    """Features that never fire (all zero) get a near-zero standardized penalty: the raw system is
    numerically singular, its Jacobi-equilibrated form is not; their weights are 0 and the rest is
    ridge on the standardized live features (no least-squares fallback, no warning)."""
    from flwr_analytic.analytic.solvers import _cholesky_solve

    rng = np.random.default_rng(0)
    f = np.maximum(rng.standard_normal((500, 40)), 0) * rng.uniform(0.1, 10, 40)
    f[:, :5] = 0.0  # dead
    f[:, 5:8] *= 1e-3  # live, badly scaled
    a, t = np.hstack([f, np.ones((500, 1))]), np.eye(3)[rng.integers(0, 3, 500)]
    reg = Regularization(3e-3, "standardized")
    system = a.T @ a + np.diag(reg.penalty(a.T @ a))
    assert _cholesky_solve(system, a.T @ t)[0] is None  # the raw system fails the rcond check
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = ridge_solve(a.T @ a, a.T @ t, reg)
    assert np.abs(w[:5]).max() == 0.0
    live = f[:, 5:]
    s = np.hstack([(live - live.mean(0)) / live.std(0), np.ones((500, 1))])
    ws = np.linalg.solve(s.T @ s + np.diag(np.append(np.full(35, 3e-3 * 500), 0.0)), s.T @ t)
    np.testing.assert_allclose(a @ w, s @ ws, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "reg",
    [Regularization(0.1), Regularization(0.3, "standardized"), Regularization(1e-3, "absolute")],
)
def test_effective_dof_is_the_trace_of_the_hat_matrix(reg):
    rng = np.random.default_rng(7)
    scales = rng.uniform(0.1, 5.0, 20)
    a = np.hstack([rng.standard_normal((50, 20)) * scales + scales, np.ones((50, 1))])
    gram = a.T @ a
    hat = a @ np.linalg.solve(gram + np.diag(reg.penalty(gram)), a.T)
    assert effective_dof(gram, reg) == pytest.approx(np.trace(hat), rel=1e-10)
    # dependent columns at no ridge: the rank (the pseudo-inverse path)
    dependent = np.hstack([a, a[:, :3] + a[:, 3:6]])
    assert effective_dof(dependent.T @ dependent, Regularization(0.0, "absolute")) == (
        pytest.approx(np.linalg.matrix_rank(dependent), abs=1e-6)
    )
