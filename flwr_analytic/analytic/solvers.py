"""Closed-form ridge solvers: FedACnnL's layer solve and pFedACnnL's personalized solve.

Server (Gu et al., arXiv 2502.06915, eq. for FedACnnL): ``W = (Σ_k G_k + γI)⁻¹ Σ_k B_k``.
Client k (pFedACnnL): ``W_k = (G_k + λI)⁻¹(B_k + λW) = W + (G_k + λI)⁻¹(B_k − G_k W)``, the minimizer of
``||T_k − A_k W||² + λ||W − W_global||²``: λ → ∞ gives the global model, λ → 0 the local ridge model.

Systems are solved by Cholesky (``scipy.linalg.cho_factor``), never with an explicit inverse. When the
factorization fails (a singular or indefinite matrix at too small a γ), a
:class:`IllConditionedWarning` is issued and the minimum-norm least-squares solution is returned.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg

RULES = ("relative", "absolute", "standardized")
#: ``standardized``: added to every variance, relative to the largest one (constant columns).
VARIANCE_FLOOR = 1e-12


#: Reciprocal condition numbers (1-norm estimate) below this make a Cholesky solve fall back to
#: least squares with an :class:`IllConditionedWarning` (the Cholesky solution would carry errors
#: up to ``eps/rcond`` ≈ 2e-3 relative). Default ridges keep ``rcond >= ρ/D`` ≈ 1e-10 or more.
RCOND_MIN = 1e-13


class IllConditionedWarning(RuntimeWarning):
    """A ridge system was not positive definite; a least-squares fallback was used."""


@dataclass(frozen=True)
class Regularization:
    """A ridge coefficient, absolute or relative to the Gram's mean eigenvalue.

    Parameters
    ----------
    value : float
        ``ρ`` (relative rule) or ``γ`` itself (absolute rule); must be >= 0.
    rule : {"relative", "absolute", "standardized"}
        ``relative``: ``γ = ρ · trace(G) / D`` (scale-free: the same ρ works for raw pixels and for
        features of any magnitude); ``absolute``: ``γ = value``; ``standardized``: a diagonal
        ridge ``γ_j = ρ · n · σ_j²`` from the column variances ``σ_j²`` in ``G`` (``n = G[-1, -1]``;
        plus ``1e-12`` of the largest) and no penalty on the bias: exactly ridge ``ρ`` on
        standardized features, for features of very different scales (wide pooled heads).

    """

    value: float
    rule: str = "relative"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(
                f"regularization rule: {self.rule!r} is not allowed; allowed values: "
                f"{', '.join(RULES)}"
            )
        if (
            isinstance(self.value, bool)
            or not isinstance(self.value, int | float | np.number)
            or not np.isfinite(self.value)
            or self.value < 0
        ):
            raise ValueError(
                f"regularization value (γ or λ): {self.value!r} is not allowed; must be a finite "
                "number >= 0"
            )

    def amount(self, gram: np.ndarray) -> float:
        """The ridge ``γ`` to add to ``gram``'s diagonal (scalar rules only)."""
        if self.rule == "standardized":
            raise ValueError(
                "the standardized ridge is diagonal, not one γ: this solver needs the relative "
                "or absolute rule"
            )
        if self.rule == "absolute":
            return float(self.value)
        return float(self.value * np.trace(gram) / gram.shape[0])

    def penalty(self, gram: np.ndarray) -> np.ndarray:
        """The ridge added to ``gram``'s diagonal, per entry (``γ·1`` for the scalar rules)."""
        if self.rule != "standardized":
            return np.full(gram.shape[0], self.amount(gram))
        return standardized_penalty(np.diag(gram), gram[:, -1], self.value)


def standardized_penalty(diagonal: np.ndarray, bias_column: np.ndarray, rho: float) -> np.ndarray:
    """The standardized rule's diagonal ridge from a Gram's diagonal and its last (ones) column.

    ``γ_j = ρ · n · (σ_j² + 10⁻¹² max σ²)`` with ``n = G[-1, -1]``, ``μ_j = G[j, -1]/n`` and
    ``σ_j² = G[j, j]/n − μ_j²``; ``0`` on the bias (last entry).
    """
    n = float(bias_column[-1])
    if n <= 0:
        raise ValueError("the standardized ridge needs statistics of at least one row")
    mean = bias_column[:-1] / n
    var = np.maximum(diagonal[:-1] / n - mean**2, 0.0)
    var = var + VARIANCE_FLOOR * max(float(var.max()), 1e-300)
    return np.append(rho * n * var, 0.0)


def _all_finite(a: np.ndarray) -> bool:
    """No NaN or Inf in ``a``: a finite sum proves it without a D x D mask (else check entrywise)."""
    with np.errstate(over="ignore", invalid="ignore"):
        total = a.sum()
    return bool(np.isfinite(total)) or bool(np.all(np.isfinite(a)))


def _one_norm(a: np.ndarray, block: int = 512) -> float:
    """``‖a‖₁ = max_j Σ_i |a_ij|``, by blocks of columns (no D x D temporary)."""
    sums = [np.abs(a[:, j : j + block]).sum(axis=0) for j in range(0, a.shape[1], block)]
    return float(np.max(np.concatenate(sums))) if a.size else 0.0


def _with_diagonal(gram: np.ndarray, diagonal: np.ndarray) -> np.ndarray:
    """``G + diag(d)`` as a new float64 array (one copy, no dense ``diag(d)``)."""
    system = np.array(gram, dtype=np.float64, copy=True)
    system[np.diag_indices_from(system)] += diagonal
    return system


def _cholesky_solve(matrix: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray | None, str]:
    """``matrix⁻¹ rhs`` by Cholesky, or ``None`` and the reason when it fails or is unreliable.

    A factorization "succeeds" on a singular PSD matrix plus a tiny ridge (γ = 1e-30) with
    rounding-level pivots, and its solution is then rounding noise amplified by ``1/rcond``. So the
    reciprocal condition number is estimated from the factor (LAPACK ``dpocon``, ``O(D²)``) and a
    value below :data:`RCOND_MIN` counts as a failed factorization.
    """
    try:
        factor = scipy.linalg.cho_factor(matrix, lower=False, check_finite=False)
    except np.linalg.LinAlgError as exc:
        return None, str(exc)
    rcond, info = scipy.linalg.lapack.dpocon(factor[0], _one_norm(matrix), uplo="U")
    if info == 0 and rcond < RCOND_MIN:
        return (
            None,
            f"numerically singular, reciprocal condition number {rcond:.1e} < {RCOND_MIN:g}",
        )
    solution = scipy.linalg.cho_solve(factor, rhs, check_finite=False)
    if not np.all(np.isfinite(solution)):
        return None, "non-finite Cholesky solution"
    return solution, ""


def _solve_spd(matrix: np.ndarray, rhs: np.ndarray, what: str) -> np.ndarray:
    """Solve ``matrix @ X = rhs`` by Cholesky, or by least squares with a warning.

    1. Cholesky with a reliability check (:func:`_cholesky_solve`).
    2. If that fails, Cholesky of the Jacobi-equilibrated system ``(SAS) Y = S·rhs``, ``X = S·Y``,
       ``S = diag(A)^{-1/2}`` (van der Sluis, Numer. Math. 1969: within a factor ``D`` of the best
       diagonal scaling). This rescues systems that are only badly *scaled*, e.g. a standardized ridge
       whose dead features (all zero: a filter that never fires) carry a near-zero penalty.
    3. Else the minimum-norm least-squares ``X`` and an :class:`IllConditionedWarning`.
    """
    if not (_all_finite(matrix) and _all_finite(rhs)):
        raise ValueError(f"{what}: the system has non-finite entries (NaN or Inf)")
    solution, reason = _cholesky_solve(matrix, rhs)
    if solution is not None:
        return solution
    diagonal = np.diag(matrix)
    if np.all(diagonal > 0):
        scale = 1.0 / np.sqrt(diagonal)
        scaled = matrix * scale[:, None]
        scaled *= scale[None, :]
        solution, _ = _cholesky_solve(scaled, rhs * scale[:, None])
        del scaled
        if solution is not None:
            return solution * scale[:, None]
    warnings.warn(
        f"{what}: Cholesky failed ({reason}); using the least-squares solution. Increase the "
        "regularization for a better-conditioned system.",
        IllConditionedWarning,
        stacklevel=3,
    )
    solution = scipy.linalg.lstsq(matrix, rhs, check_finite=True, lapack_driver="gelsd")[0]
    return np.nan_to_num(solution, nan=0.0, posinf=0.0, neginf=0.0)


def ridge_solve(gram: np.ndarray, cross: np.ndarray, reg: Regularization) -> np.ndarray:
    """``W = (G + Γ)⁻¹ B`` with ``Γ = diag(reg.penalty(G))`` (``γI`` for the scalar rules).

    Parameters
    ----------
    gram : numpy.ndarray
        Summed ``G`` (D x D).
    cross : numpy.ndarray
        Summed ``B`` (D x m).
    reg : Regularization
        The ridge rule.

    Returns
    -------
    numpy.ndarray
        ``W`` (D x m), float64.

    """
    system = _with_diagonal(gram, reg.penalty(gram))
    return _solve_spd(system, cross, "ridge solve")


def personalized_solve(
    gram: np.ndarray, cross: np.ndarray, w_global: np.ndarray, reg: Regularization
) -> np.ndarray:
    """pFedACnnL: ``W_k = (G_k + λI)⁻¹(B_k + λ W_global)``, computed as a correction of ``W_global``.

    ``W_k = W_global + (G_k + λI)⁻¹(B_k − G_k W_global)`` (the same matrix, better conditioned in
    floating point when ``W_k`` is close to ``W_global``).
    """
    lam = reg.penalty(gram)
    if np.all(lam[:-1] <= 0):
        raise ValueError(
            "personalization needs λ > 0 (λ = 0 is the local ridge model: use ridge_solve)"
        )
    system = _with_diagonal(gram, lam)
    return w_global + _solve_spd(system, cross - gram @ w_global, "personalized solve")


def effective_dof(gram: np.ndarray, reg: Regularization) -> float:
    """Effective degrees of freedom of a ridge fit, ``df = trace((G + Γ)⁻¹ G)``.

    The trace of the hat matrix ``H = A(G + Γ)⁻¹Aᵀ`` (Hastie, Tibshirani & Friedman, ESL §3.4.1):
    ``df / n`` is the mean leverage of a training row, the quantity generalized cross-validation
    puts in place of each ``h_ii`` (Craven & Wahba 1979). Computed as
    ``df = D − Σ_j Γ_j [(G + Γ)⁻¹]_jj`` from the Cholesky factor of the Jacobi-equilibrated system
    ``M = S(G + Γ)S`` (``[(G + Γ)⁻¹]_jj = s_j² ‖(U⁻¹)_j‖²`` for ``M = UᵀU``), one triangular inverse
    (``D³/3`` flops). A numerically singular ``M`` (``rcond <`` :data:`RCOND_MIN`, e.g. ``Γ = 0`` on
    dependent columns) uses its eigendecomposition, ``df = Σ_{λ_k > 0} (1 − v_kᵀ SΓS v_k / λ_k)``.
    """
    penalty = reg.penalty(gram)
    system = _with_diagonal(gram, penalty)
    diagonal = np.diag(system).copy()
    scale = 1.0 / np.sqrt(np.where(diagonal > 0, diagonal, 1.0))
    system *= scale[:, None]
    system *= scale[None, :]
    scaled_penalty = penalty * scale**2  # SΓS
    try:
        upper = scipy.linalg.cholesky(system, lower=False, check_finite=False)
        rcond, _ = scipy.linalg.lapack.dpocon(upper, _one_norm(system), uplo="U")
        if rcond < RCOND_MIN:
            raise np.linalg.LinAlgError(f"reciprocal condition number {rcond:.1e}")
        inverse = scipy.linalg.solve_triangular(upper, np.eye(len(system)), check_finite=False)
        return float(len(system) - scaled_penalty @ np.einsum("ij,ij->i", inverse, inverse))
    except np.linalg.LinAlgError:
        values, vectors = scipy.linalg.eigh(system, check_finite=False)
        keep = values > np.finfo(np.float64).eps * len(values) * max(float(values.max()), 0.0)
        shrink = (scaled_penalty @ vectors[:, keep] ** 2) / values[keep]
        return float(np.sum(1.0 - shrink))
