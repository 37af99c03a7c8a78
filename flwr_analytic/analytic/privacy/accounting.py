"""Privacy accounting of Gaussian releases through Google's ``dp-accounting`` library.

A client that releases ``L`` layers, each with the Gaussian mechanism at noise multiplier
``z_l = σ_l / Δ_l`` (:mod:`~flwr_analytic.analytic.privacy.mechanism`), is ``(1/z_l)``-Gaussian
differentially private per layer, and the ``L`` releases compose exactly to one

    μ-GDP,   μ = √(Σ_l 1/z_l²)   (Dong, Roth & Su, "Gaussian differential privacy", JRSS-B 2022),

that is, to one Gaussian mechanism of sensitivity 1 and noise ``1/μ`` (the same reduction that
``dp_accounting.pld.PLDAccountant`` applies to a self-composed ``GaussianDpEvent``). Its tight
``(ε, δ)`` curve is the analytic Gaussian mechanism's

    δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)   (Balle & Wang, ICML 2018, Thm. 8),

which ``dp-accounting`` evaluates and inverts exactly (``get_epsilon_gaussian``,
``get_sigma_gaussian``: log-space, Brent's method to 1e-12). The library's numerical accountants
agree (``tests/test_dp_accounting.py``, table in docs/privacy.md): the privacy-loss-distribution
accountant (Koskela et al., AISTATS 2020; Doroshenko et al., PETS 2022) lies within its grid above
the exact ``ε`` but takes 0.05 to 10 s per call at its default grid; the RDP accountant (Mironov,
CSF 2017) is an upper bound. For comparison the looser zCDP bound (Bun & Steinke, TCC 2016: ``ρ = μ²/2``,
``ε = ρ + 2√(ρ ln(1/δ))``) and the classical single-release calibration ``σ ≥ Δ√(2 ln(1.25/δ))/ε``
(Dwork & Roth 2014, Thm. A.1, valid for ``ε < 1``) are given too. FedACnnL: Gu et al.,
arXiv 2502.06915.

Neighbouring data sets differ by *replacing* one sample and ``Δ_l`` is that replace-one
sensitivity, so each release is a sensitivity-1 ``GaussianDpEvent(z_l)`` under the library's
default ``ADD_OR_REMOVE_ONE`` relation; its ``REPLACE_ONE`` relation would double ``Δ`` again.
``dp_accounting`` is imported on first use (its package import costs about 2 s).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def gdp_mu(noise_multipliers: Sequence[float]) -> float:
    """Gaussian-DP parameter of ``L`` composed Gaussian releases (Dong, Roth & Su 2022, Cor. 3.3).

    Parameters
    ----------
    noise_multipliers : sequence of float
        ``z_l = σ_l / Δ_l`` of each release; ``z_l ≤ 0`` means a release without noise.

    Returns
    -------
    float
        ``μ = √(Σ_l 1/z_l²)``, or ``inf`` if any release is not private.
    """
    zs = [float(z) for z in noise_multipliers]
    if any(z <= 0 for z in zs):
        return math.inf
    return math.sqrt(sum(1.0 / (z * z) for z in zs))


def gaussian_delta(epsilon: float, mu: float) -> float:
    """Tight ``δ(ε)`` of ``μ``-GDP (Balle & Wang, ICML 2018, Thm. 8), from ``dp-accounting``.

    Parameters
    ----------
    epsilon : float
        ``ε ≥ 0``.
    mu : float
        GDP parameter (:func:`gdp_mu`).

    Returns
    -------
    float
        ``Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)`` (the hockey-stick divergence of the Gaussian
        privacy loss at noise ``1/μ``, ``GaussianPrivacyLoss.get_delta_for_epsilon``).
    """
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss

    return float(GaussianPrivacyLoss(1.0 / mu).get_delta_for_epsilon(float(epsilon)))


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Smallest ``ε`` with ``δ(ε) ≤ delta`` for ``μ``-GDP (exact; Balle & Wang 2018).

    Parameters
    ----------
    mu : float
        GDP parameter (:func:`gdp_mu`); ``0`` is no release, ``inf`` a release without noise.
    delta : float
        Target ``δ`` in ``(0, 1)``.

    Returns
    -------
    float
        ``dp_accounting.get_epsilon_gaussian(1/μ, δ)``: ``ε`` of the Gaussian mechanism of
        sensitivity 1 and noise ``1/μ``.

    Raises
    ------
    ValueError
        If ``delta`` is not in ``(0, 1)``.
    """
    _check_delta(delta)
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    import dp_accounting

    return float(dp_accounting.get_epsilon_gaussian(1.0 / mu, delta))


def noise_multiplier_for(epsilon: float, delta: float, num_layers: int = 1) -> float:
    """The ``z``, the same for each of ``num_layers`` releases, that gives exactly ``(ε, δ)``-DP.

    ``L`` releases at ``z`` are ``(√L/z)``-GDP (Dong, Roth & Su 2022), one release at ``z/√L``,
    so ``z = √L σ₁`` with ``σ₁ = dp_accounting.get_sigma_gaussian(ε, δ)`` the analytic Gaussian
    calibration (Balle & Wang, ICML 2018) of a sensitivity-1 release.

    Parameters
    ----------
    epsilon : float
        Target ``ε > 0`` (``inf``: no noise, ``z = 0``).
    delta : float
        Target ``δ`` in ``(0, 1)``.
    num_layers : int, optional
        Number ``L ≥ 1`` of releases composed.

    Returns
    -------
    float
        The noise multiplier ``z = σ/Δ`` of each release.

    Raises
    ------
    ValueError
        If ``epsilon ≤ 0``, ``delta`` is not in ``(0, 1)`` or ``num_layers < 1``.
    """
    if math.isinf(epsilon):
        return 0.0
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    _check_delta(delta)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    import dp_accounting

    return math.sqrt(num_layers) * float(dp_accounting.get_sigma_gaussian(epsilon, delta))


def zcdp_epsilon(mu: float, delta: float) -> float:
    """``ε`` from zCDP (Bun & Steinke, TCC 2016, Prop. 1.3): ``ρ = μ²/2``, ``ρ + 2√(ρ ln(1/δ))``.

    Looser than :func:`gaussian_epsilon`; kept as the comparison a reader may know.
    """
    rho = mu * mu / 2.0
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def classical_sigma_ratio(epsilon: float, delta: float) -> float:
    """Dwork & Roth (2014, Thm. A.1, valid for ``ε < 1``): ``z = √(2 ln(1.25/δ))/ε``, one release."""
    return math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def privacy_report(
    noise_multipliers: Sequence[float], delta: float = 1e-5
) -> dict[str, float | list[float]]:
    """Per-layer and composed privacy of one client's releases at ``delta``.

    Parameters
    ----------
    noise_multipliers : sequence of float
        ``z_l`` of each released layer.
    delta : float, optional
        Target ``δ`` in ``(0, 1)``.

    Returns
    -------
    dict
        ``noise-multipliers``, ``per-layer-epsilon`` (each layer alone), ``mu`` (GDP, Dong, Roth
        & Su 2022), ``epsilon`` (composed, exact: :func:`gaussian_epsilon`), ``epsilon-zcdp``
        (composed, the zCDP bound of :func:`zcdp_epsilon`) and ``delta``.
    """
    zs = [float(z) for z in noise_multipliers]
    mu = gdp_mu(zs)
    single = {z: gaussian_epsilon(gdp_mu([z]), delta) for z in set(zs)}  # one call per distinct z
    return {
        "noise-multipliers": zs,
        "per-layer-epsilon": [single[z] for z in zs],
        "mu": mu,
        "epsilon": gaussian_epsilon(mu, delta),
        "epsilon-zcdp": zcdp_epsilon(mu, delta) if math.isfinite(mu) else math.inf,
        "delta": delta,
    }
