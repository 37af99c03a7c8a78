"""Exact leave-one-out predictions of a client's personalized ridge, for every λ of a grid at once.

The pFedACnnL output layer of client ``k`` (Gu et al., arXiv 2502.06915) is

    ``W_k(λ) = argmin_V ||T − AV||² + (V − W)ᵀ P(λ) (V − W)``

(``A``: the client's n x D design rows ``[h(x), 1]``; ``T``: one-hot labels; ``W``: the global
layer; ``P(λ)`` diagonal: ``λI`` for the relative rule, ``ρ·n·σ_j²`` on the features and ``0`` on
the bias for the standardized rule, :class:`~flwr_analytic.analytic.solvers.Regularization`).
With ``U = V − W`` and the residual targets ``R = T − AW`` this is a ridge regression of ``R`` on
``A``; its fitted values are ``HR`` for the hat matrix ``H = A(AᵀA + P)⁻¹Aᵀ``. For any
quadratically penalized least squares the leave-one-out residual is exact in closed form (Allen
1974; Golub, Heath & Wahba 1979; the same identity as scikit-learn's ``RidgeCV``):

    ``e_{−i} = e_i / (1 − h_ii)``,   ``e = R − HR``,

so the prediction for sample ``i`` by the model fitted without it is ``T_i − e_i/(1 − h_ii)``
(the scores ``A_i W + R̂_{−i}``). One eigendecomposition serves every λ:

* relative rule, ``X = A``, ``λ = ρ·trace(AᵀA)/D``;
* standardized rule: the unpenalized bias is profiled out by centring, ``X = (A_feat − mean)/s``
  with ``s_j² = n·σ_j²`` (the rule's penalty at ``ρ = 1``, floor included), ``R`` centred,
  ``λ = ρ``; the hat matrix gains the bias's ``11ᵀ/n``.

Dual (``n ≤ D``): ``XXᵀ = U diag(s) Uᵀ``; with ``c = λ/(s + λ)``, ``e = U diag(c) UᵀR`` and
``1 − h_ii = Σ_j U_ij² c_j`` (− 1/n standardized) — no cancellation at small λ.
Primal (``n > D``): ``XᵀX = V diag(s) Vᵀ``, ``Q = XV``; ``HR = Q diag(1/(s + λ)) QᵀR`` and
``h_ii = Σ_j Q_ij²/(s_j + λ)`` (+ 1/n). Cost: ``min(n, D)³`` once plus ``n·D·min(n, D)``; each
λ then costs ``O(n·min(n, D)·m)``.

λ is fixed from the client's full statistics (its value with one sample left out differs by a
``1/n`` share of the trace or the variances): the predictions are exactly those of refitting the
personalized layer without sample ``i`` at that λ (tested against explicit refits).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from scipy import linalg

from flwr_analytic.analytic.solvers import standardized_penalty

#: Rules with a closed-form leave-one-out path.
LOO_RULES = ("relative", "standardized")


class LeaveOneOut:
    """The eigendecomposition of one client's personalized ridge, for exact LOO predictions.

    Parameters
    ----------
    design : numpy.ndarray
        ``A`` (n x D), the output layer's design rows, the last column all ones (the bias).
    targets : numpy.ndarray
        ``T`` (n x m), one-hot labels.
    w_global : numpy.ndarray
        ``W`` (D x m), the layer personalized towards.
    rule : {"relative", "standardized"}
        How ``ρ`` becomes the penalty (:class:`~flwr_analytic.analytic.solvers.Regularization`).

    """

    def __init__(
        self, design: np.ndarray, targets: np.ndarray, w_global: np.ndarray, rule: str = "relative"
    ) -> None:
        if rule not in LOO_RULES:
            raise ValueError(f"leave-one-out supports the rules {LOO_RULES}, got {rule!r}")
        a = np.asarray(design, dtype=np.float64)
        self.targets = np.asarray(targets, dtype=np.float64)
        residual = self.targets - a @ np.asarray(w_global, dtype=np.float64)  # R = T − AW
        n, dim = a.shape
        self.rule, self.n = rule, n
        if rule == "relative":
            x, self.scale, self.offset = a, float(np.einsum("ij,ij->", a, a)) / dim, 0.0
        else:
            unit = standardized_penalty(np.einsum("ij,ij->j", a, a), a.T @ a[:, -1], 1.0)[:-1]
            x = (a[:, :-1] - a[:, :-1].mean(axis=0)) / np.sqrt(unit)  # penalty 1 per column
            residual = residual - residual.mean(axis=0)
            self.scale, self.offset = 1.0, 1.0 / n  # the free bias: h_ii gains 1/n
        self.dual = n <= x.shape[1]
        if self.dual:  # XXᵀ = U diag(s) Uᵀ
            s, u = linalg.eigh(x @ x.T, driver="evd")
            self.basis, self.s = u, np.maximum(s, 0.0)
            self.basis_sq = u * u
        else:  # XᵀX = V diag(s) Vᵀ, Q = XV
            s, v = linalg.eigh(x.T @ x, driver="evd")
            self.basis, self.s = x @ v, np.maximum(s, 0.0)
            self.basis_sq = self.basis * self.basis
        self.residual = residual
        self.projected = self.basis.T @ residual  # UᵀR (dual) or QᵀR (primal)

    def penalty(self, rho: float) -> float:
        """``λ`` on the eigenbasis for relative ``ρ`` (``ρ·trace/D``; ``ρ`` standardized)."""
        return float(rho) * self.scale

    def predictions(self, rho: float, leverage: float = 0.0) -> np.ndarray:
        """Scores of every sample by the personalized layer fitted without it (n x m).

        ``leverage`` ``h̄ ∈ [0, 1)``: the anchor ``W`` was itself fitted with these samples (the
        global layer: mean leverage ``h̄ = df/N``, :func:`~flwr_analytic.analytic.solvers.
        effective_dof`). The composite fit ``Ŷ = H_λT + (I − H_λ)H_gT`` with ``H_g ≈ h̄I`` (the
        GCV approximation of the global hat matrix's client block) has ``1 − S_ii ≈ (1 − h_ii)
        (1 − h̄)``, so the residuals are divided by that product; ``h̄ = 0`` is exact LOO with ``W``
        held fixed.
        """
        lam = self.penalty(rho)
        if lam <= 0:
            raise ValueError(f"leave-one-out needs ρ > 0, got {rho!r}")
        if self.dual:
            c = lam / (self.s + lam)  # I − H on the eigenbasis
            error = self.basis @ (c[:, None] * self.projected)
            keep = self.basis_sq @ c - self.offset  # 1 − h_ii
        else:
            g = 1.0 / (self.s + lam)
            error = self.residual - self.basis @ (g[:, None] * self.projected)
            keep = 1.0 - self.offset - self.basis_sq @ g
        keep = np.maximum(keep * (1.0 - leverage), np.finfo(np.float64).tiny)
        return self.targets - error / keep[:, None]

    def path(self, grid: Sequence[float], leverage: float = 0.0) -> Iterator[np.ndarray]:
        """:meth:`predictions` for each ``ρ`` of ``grid``."""
        for rho in grid:
            yield self.predictions(rho, leverage)


__all__ = ["LOO_RULES", "LeaveOneOut"]
