"""Privacy accounting of Gaussian releases: Gaussian DP composition and the exact ``(ε, δ)`` curve.

A client that releases ``L`` layers, each with the Gaussian mechanism at noise multiplier
``z_l = σ_l / Δ_l`` (:mod:`~flwr_analytic.analytic.privacy.mechanism`), is ``(1/z_l)``-Gaussian
differentially private per layer, and the ``L`` releases compose exactly to one

    μ-GDP,   μ = √(Σ_l 1/z_l²)   (Dong, Roth & Su, "Gaussian differential privacy", JRSS-B 2022),

which is ``(ε, δ(ε))``-DP for every ``ε ≥ 0`` with the tight curve of the analytic Gaussian mechanism

    δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)   (Balle & Wang, ICML 2018, Thm. 8).

:func:`gaussian_epsilon` inverts it by bisection (``δ(ε)`` decreases in ``ε``), and
:func:`noise_multiplier_for` inverts the whole chain for a target ``(ε, δ)``. For comparison the
looser zCDP bound (Bun & Steinke, TCC 2016: ``ρ = μ²/2``, ``ε = ρ + 2√(ρ ln(1/δ))``) and the
classical single-release calibration ``σ ≥ Δ√(2 ln(1.25/δ))/ε`` (Dwork & Roth 2014, Thm. A.1, valid
for ``ε < 1``) are given too. FedACnnL: Gu et al., arXiv 2502.06915.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.special import ndtr


def gdp_mu(noise_multipliers: Sequence[float]) -> float:
    """``μ = √(Σ_l 1/z_l²)``: ``L`` Gaussian mechanisms (``σ_l = z_l Δ_l``) as one ``μ``-GDP."""
    zs = [float(z) for z in noise_multipliers]
    if any(z <= 0 for z in zs):
        return math.inf
    return math.sqrt(sum(1.0 / (z * z) for z in zs))


def gaussian_delta(epsilon: float, mu: float) -> float:
    """``δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)`` (Balle & Wang 2018; tight for μ-GDP)."""
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    a = -epsilon / mu
    # e^ε Φ(x) computed as exp(ε + log Φ(x)) to avoid overflow for large ε
    second = ndtr(a - mu / 2)
    term = math.exp(epsilon + math.log(second)) if second > 0 else 0.0
    return max(0.0, float(ndtr(a + mu / 2) - term))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Smallest ``ε`` with ``δ(ε) ≤ delta`` for μ-GDP (bisection on the exact curve)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    lo, hi = 0.0, 1.0
    while gaussian_delta(hi, mu) > delta:
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gaussian_delta(mid, mu) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def noise_multiplier_for(epsilon: float, delta: float, num_layers: int = 1) -> float:
    """The ``z`` (same for each of ``num_layers`` releases) that gives exactly ``(ε, δ)``-DP overall."""
    if math.isinf(epsilon):
        return 0.0
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    lo, hi = 1e-3, 1e3  # bisection on μ, monotone: larger μ -> larger ε
    for _ in range(200):
        mu = math.sqrt(lo * hi)
        if gaussian_epsilon(mu, delta) > epsilon:
            hi = mu
        else:
            lo = mu
    return math.sqrt(num_layers) / lo


def zcdp_epsilon(mu: float, delta: float) -> float:
    """Epsilon from zCDP (Bun & Steinke 2016): ``ρ = μ²/2``, ``ε = ρ + 2√(ρ ln(1/δ))`` (looser)."""
    rho = mu * mu / 2.0
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def classical_sigma_ratio(epsilon: float, delta: float) -> float:
    """Dwork & Roth (Thm. A.1, valid for ε < 1): ``z = √(2 ln(1.25/δ))/ε`` for one release."""
    return math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def privacy_report(
    noise_multipliers: Sequence[float], delta: float = 1e-5
) -> dict[str, float | list[float]]:
    """Per-layer and composed privacy of one client's releases at ``delta``.

    Returns ``noise-multipliers``, ``per-layer-epsilon`` (each layer alone), ``mu`` (GDP),
    ``epsilon`` (composed, exact), ``epsilon-zcdp`` (composed, zCDP bound) and ``delta``.
    """
    zs = [float(z) for z in noise_multipliers]
    mu = gdp_mu(zs)
    return {
        "noise-multipliers": zs,
        "per-layer-epsilon": [gaussian_epsilon(gdp_mu([z]), delta) for z in zs],
        "mu": mu,
        "epsilon": gaussian_epsilon(mu, delta),
        "epsilon-zcdp": zcdp_epsilon(mu, delta) if math.isfinite(mu) else math.inf,
        "delta": delta,
    }
