"""Local recalibration of a client's output layer from the statistics it holds (our addition).

pFedACnnL (Gu et al., arXiv 2502.06915) personalizes the whole output layer,
``W_k = (G_k + λI)⁻¹(B_k + λW)``: ``D·m`` free entries (D = 9,601 on the CIFAR-10 recipe) fitted
on a few hundred samples. Under label skew (Dirichlet clients) most of what a client needs is
smaller: its own class prior and its own confusions among the few classes it holds. The
recalibration fits only an ``(m+1) x m`` map ``V`` on the head's scores ``s(x) = [a(x)W, 1]``:

    ``min_V ||T − A W̃ V||² + λ||V_s − I||²``,  ``W̃ = [W, e_D]`` (D x (m+1)),  ``V = [V_s; vᵀ]``

(``A``: the client's design rows, whose last column is the ones column, ``A e_D = 1``; ``e_D``
the last unit vector; the bias row ``v`` is free). The normal equations need only the client's
``G = AᵀA`` and ``B = AᵀT``, the statistics it already keeps for pFedACnnL — no pass over data
and no communication:

    ``(W̃ᵀ G W̃ + Λ) V = W̃ᵀ B + Λ [I; 0]``,  ``Λ = diag(λ, …, λ, 0)``,  ``λ = ρ·trace(WᵀGW)/m``

and the recalibrated layer is ``W̃ V`` (D x m): ``A (W̃ V) = [AW, 1] V``, the same shape as ``W``,
so the client's model does not change. ``v`` is a label-shift correction (the client's prior,
Saerens, Latinne & Decaestecker, Neural Computation 2002); ``V_s`` is matrix scaling (Guo, Pleiss,
Sun & Weinberger, ICML 2017) with the squared loss, fitted on the client's training data and shrunk
towards the identity (``ρ → ∞``: ``W`` plus the mean residual in the bias row).

The scores on the client's own samples are optimistic (``W`` was fitted with them), but ``V`` has
``m(m+1)`` entries, not ``D·m``. ρ = 0.01 was chosen on a development split
(``benchmarks/auto_lambda_cifar.py``: CIFAR-10, 20 clients Dirichlet(0.1), each client's training
data cut 80/20, standardized auto λ): 85.29% without, 88.43% with the recalibration; a ``V`` fitted
on the scored samples themselves (in-sample) reaches 89.36%. On test it helps where the features are
weak and the clients' heads stay near the global one (CIFAR-10 Dirichlet(0.1): 87.30% → 89.16%) and
hurts where auto λ already personalizes strongly (MNIST Dirichlet(0.1): 99.54% → 99.37%): off by
default.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

#: The recalibration's ρ (``λ = ρ·trace(WᵀGW)/m``); chosen on the development split above.
DEFAULT_RHO = 0.01


def recalibrate(gram: np.ndarray, cross: np.ndarray, w: np.ndarray, rho: float) -> np.ndarray:
    """The client's layer ``W̃V`` recalibrated on its statistics (see the module docstring).

    ``(W̃ᵀGW̃ + Λ) V = W̃ᵀB + Λ[I; 0]`` by Cholesky, ``W̃ = [W, e_D]``, ``Λ = diag(λ, …, λ, 0)``,
    ``λ = ρ·trace(WᵀGW)/m`` (float64).

    Parameters
    ----------
    gram : numpy.ndarray
        The client's ``G = AᵀA`` (D x D); the design's last column must be the ones column.
    cross : numpy.ndarray
        The client's ``B = AᵀT`` (D x m).
    w : numpy.ndarray
        The layer to recalibrate (D x m): the global one or the client's ``W_k``.
    rho : float
        Shrinkage of ``V_s`` towards ``I`` (> 0, finite).

    Returns
    -------
    numpy.ndarray
        ``W̃V`` (D x m, float64); ``w`` unchanged when the client has no samples (``G_DD = 0``).

    """
    gram, cross, w = (np.asarray(a, dtype=np.float64) for a in (gram, cross, w))
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"the recalibration's rho must be finite and > 0, got {rho!r}")
    d = gram.shape[0]
    if gram.shape != (d, d) or w.ndim != 2 or w.shape[0] != d or cross.shape != w.shape:
        raise ValueError(
            f"shapes do not fit: gram {gram.shape}, cross {cross.shape}, weights {w.shape} "
            "(expected D x D, D x m, D x m)"
        )
    count = gram[-1, -1]  # Σ 1·1 over the ones column
    if count <= 0:
        return w.copy()
    m = w.shape[1]
    w_tilde = np.hstack([w, np.eye(d, 1, -(d - 1))])  # [W, e_D]
    system = w_tilde.T @ gram @ w_tilde  # [s, 1]ᵀ[s, 1]
    scale = np.trace(system[:m, :m]) / m
    lam = rho * (scale if scale > 0 else 1.0)
    penalty = np.r_[np.full(m, lam), 0.0]
    system[np.diag_indices(m + 1)] += penalty
    rhs = w_tilde.T @ cross + penalty[:, None] * np.eye(m + 1, m)  # W̃ᵀB + Λ[I; 0]
    v = scipy.linalg.cho_solve(scipy.linalg.cho_factor(system, lower=True), rhs)
    return w_tilde @ v


__all__ = ["DEFAULT_RHO", "recalibrate"]
