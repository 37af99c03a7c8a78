"""DP accounting (issue 13): :mod:`flwr_analytic.analytic.privacy.accounting` against Google's
``dp-accounting`` and a closed-form reference kept here.

A client releasing ``L`` layers with the Gaussian mechanism at noise multiplier ``z`` each is, by
Gaussian-DP composition (Dong, Roth & Su, JRSS-B 2022), exactly one Gaussian mechanism at ``z/√L``
(``μ = √L/z``), whose tight ``(ε, δ)`` curve is the analytic Gaussian mechanism's (Balle & Wang,
ICML 2018, Thm. 8)::

    δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2).

Three independent computations are checked on a table of ``(z, L, δ)``:

- the reference: that formula inverted by Brent's method, a few lines below;
- ``dp_accounting.pld.PLDAccountant`` (Meiser & Mohammadi, CCS 2018; Koskela et al., AISTATS
  2020; Doroshenko et al., PETS 2022): the privacy-loss distribution, composed numerically. With
  ``pessimistic_estimate`` (the default) every privacy loss is rounded *up* to the grid of width
  ``h = GRID``, so the PLD's ``δ(ε)`` is at most the true ``δ(ε − h)`` per composed PLD: the PLD's
  ``ε`` lies in ``[ε_exact, ε_exact + k·h]`` for ``k`` composed PLDs (``k = 1`` for ``L`` equal
  layers: the library folds a self-composed Gaussian into one at ``z/√L``), plus the ``e^-50``
  truncated tail mass, negligible here;
- ``dp_accounting.rdp.RdpAccountant`` (Mironov, CSF 2017): an upper bound, so
  ``ε_exact ≤ ε_PLD ≤ ε_RDP``, and the zCDP conversion ``ρ + 2√(ρ ln(1/δ))`` (Bun & Steinke,
  TCC 2016) is looser still.

``pytest -s tests/test_dp_accounting.py`` prints the table (recorded in docs/privacy.md).
"""

from __future__ import annotations

import math

import dp_accounting as dpa
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr

from flwr_analytic.analytic.privacy import (
    gaussian_delta,
    gaussian_epsilon,
    gdp_mu,
    noise_multiplier_for,
    privacy_report,
)

ZS = (0.5, 1.0, 2.0, 5.0, 10.0)
LAYERS = (1, 3, 5, 10)
DELTAS = (1e-5, 1e-6)
GRID = 1e-3  # PLD value_discretization_interval h: ε_PLD − ε_exact ∈ [0, h] per composed PLD
EXACT = 1e-9  # relative agreement of two exact computations (both invert to ~1e-12)


def reference_delta(eps: float, mu: float) -> float:
    """Balle & Wang (ICML 2018), Thm. 8, with ``e^ε Φ(x)`` as ``exp(ε + log Φ(x))``."""
    return float(ndtr(-eps / mu + mu / 2) - math.exp(eps + log_ndtr(-eps / mu - mu / 2)))


def reference_epsilon(mu: float, delta: float) -> float:
    """Smallest ``ε ≥ 0`` with ``reference_delta(ε, μ) ≤ δ`` (the curve decreases in ``ε``)."""
    if reference_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while reference_delta(hi, mu) > delta:
        hi *= 2.0
    return brentq(lambda e: reference_delta(e, mu) - delta, 0.0, hi, xtol=1e-14, rtol=1e-15)


def reference_noise_multiplier(eps: float, delta: float, layers: int) -> float:
    """``z = √L/μ`` with ``μ`` solving ``reference_epsilon(μ, δ) = ε`` (``ε`` increases in ``μ``)."""
    mu = brentq(lambda m: reference_epsilon(m, delta) - eps, 1e-3, 1e3, xtol=1e-14, rtol=1e-15)
    return math.sqrt(layers) / mu


def pld_epsilon(event: dpa.DpEvent, delta: float, relation=None) -> float:
    relation = relation or dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    accountant = PLDAccountant(relation, value_discretization_interval=GRID)
    return accountant.compose(event).get_epsilon(delta)


def gaussians(z: float, layers: int) -> dpa.DpEvent:
    return dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z), layers)


@pytest.fixture(scope="module")
def table() -> list[dict[str, float]]:
    rows = []
    for z in ZS:
        for layers in LAYERS:
            pld = PLDAccountant(value_discretization_interval=GRID).compose(gaussians(z, layers))
            rdp = RdpAccountant().compose(gaussians(z, layers))
            for delta in DELTAS:
                report = privacy_report([z] * layers, delta)
                rows.append(
                    {
                        "z": z,
                        "L": layers,
                        "delta": delta,
                        "mu": report["mu"],
                        "exact": reference_epsilon(math.sqrt(layers) / z, delta),
                        "ours": report["epsilon"],
                        "pld": pld.get_epsilon(delta),
                        "rdp": rdp.get_epsilon(delta),
                        "zcdp": report["epsilon-zcdp"],
                    }
                )
    return rows


def test_epsilon_table_matches_dp_accounting(table):
    print(f"\nε of L Gaussian releases at noise multiplier z (PLD grid h = {GRID:g})")
    print("| z | L | δ | μ | ε exact | ε ours | ε PLD | PLD − exact | ε RDP | ε zCDP |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['z']:g} | {r['L']} | {r['delta']:.0e} | {r['mu']:.4f} | {r['exact']:.6f} "
            f"| {r['ours']:.6f} | {r['pld']:.6f} | {r['pld'] - r['exact']:.1e} | {r['rdp']:.4f} "
            f"| {r['zcdp']:.4f} |"
        )
    worst = max((r["pld"] - r["exact"]) / r["exact"] for r in table)
    print(f"max relative PLD − exact: {worst:.1e}")
    for r in table:
        assert r["mu"] == pytest.approx(math.sqrt(r["L"]) / r["z"], rel=1e-15)
        assert r["ours"] == pytest.approx(r["exact"], rel=EXACT), r
        assert r["exact"] - 1e-12 <= r["pld"] <= r["exact"] + GRID, r
        assert r["pld"] <= r["rdp"] <= r["zcdp"], r  # exact ≤ PLD ≤ RDP ≤ zCDP conversion


def test_unequal_layers_compose_like_the_library():
    """GDP composition ``μ = √(Σ 1/z_l²)`` for unequal ``z_l`` against the PLD's convolution."""
    zs = [0.8, 1.5, 3.0, 6.0]
    event = dpa.ComposedDpEvent([dpa.GaussianDpEvent(z) for z in zs])
    for delta in DELTAS:
        exact = reference_epsilon(gdp_mu(zs), delta)
        report = privacy_report(zs, delta)
        assert report["epsilon"] == pytest.approx(exact, rel=EXACT)
        assert exact - 1e-12 <= pld_epsilon(event, delta) <= exact + len(zs) * GRID
        single = [reference_epsilon(1 / z, delta) for z in zs]
        assert report["per-layer-epsilon"] == pytest.approx(single, rel=EXACT)
        assert max(single) < report["epsilon"] < sum(single)  # better than basic composition


@pytest.mark.parametrize("layers", [1, 3, 10])
def test_noise_multiplier_for_matches_calibration(layers):
    """The inverse against the reference and ``calibrate_dp_mechanism`` on the PLD and RDP."""
    delta = 1e-5
    for eps in (0.5, 1.0, 4.0):
        z = noise_multiplier_for(eps, delta, num_layers=layers)
        assert z == pytest.approx(reference_noise_multiplier(eps, delta, layers), rel=EXACT)
        z_pld = dpa.calibrate_dp_mechanism(
            lambda: PLDAccountant(value_discretization_interval=GRID),
            lambda s: gaussians(s, layers),
            eps,
            delta,
            bracket_interval=dpa.ExplicitBracketInterval(0.99 * z, 1.01 * z),
            tol=1e-7,
        )
        # the PLD overstates ε by ≤ h, so it asks for slightly more noise (≤ 0.1% here)
        assert z - 1e-6 <= z_pld <= z * (1 + 1e-3), (eps, z, z_pld)
        z_rdp = dpa.calibrate_dp_mechanism(
            RdpAccountant, lambda s: gaussians(s, layers), eps, delta
        )
        assert z_rdp > z_pld
        assert privacy_report([z] * layers, delta)["epsilon"] == pytest.approx(eps, rel=1e-9)


def test_replace_one_sensitivity_is_already_in_z():
    """``z = σ/Δ`` with ``Δ`` the replace-one sensitivity: a sensitivity-1 Gaussian event.

    dp-accounting's ``REPLACE_ONE`` relation would double the sensitivity of a
    ``GaussianDpEvent`` (replace = remove + add), i.e. account for ``z/2``: wrong here.
    """
    for z in (1.0, 4.0):
        ours = gaussian_epsilon(gdp_mu([z]), 1e-5)
        assert pld_epsilon(dpa.GaussianDpEvent(z), 1e-5) == pytest.approx(ours, abs=GRID)
        replace = pld_epsilon(dpa.GaussianDpEvent(z), 1e-5, dpa.NeighboringRelation.REPLACE_ONE)
        assert replace == pytest.approx(gaussian_epsilon(gdp_mu([z / 2]), 1e-5), abs=GRID)


def test_edge_cases_and_round_trip():
    for mu in (0.01, 0.3, 1.0, 2.5, 10.0):
        eps = gaussian_epsilon(mu, 1e-5)
        assert eps == pytest.approx(reference_epsilon(mu, 1e-5), rel=EXACT)
        assert gaussian_delta(eps, mu) == pytest.approx(1e-5, rel=1e-6)
        assert gaussian_delta(1.0, mu) == pytest.approx(reference_delta(1.0, mu), rel=1e-12)
    assert gaussian_epsilon(0.0, 1e-5) == 0.0 and gaussian_epsilon(math.inf, 1e-5) == math.inf
    assert gaussian_delta(1.0, 0.0) == 0.0 and gaussian_delta(1.0, math.inf) == 1.0
    assert gdp_mu([1.0, 0.0]) == math.inf and privacy_report([0.0], 1e-5)["epsilon"] == math.inf
    assert noise_multiplier_for(math.inf, 1e-5) == 0.0
    for bad in (0.0, 1.0, -1e-5):
        with pytest.raises(ValueError, match="delta"):
            gaussian_epsilon(1.0, bad)
    with pytest.raises(ValueError, match="epsilon"):
        noise_multiplier_for(0.0, 1e-5)


def test_large_mu_against_high_precision():
    """At ``μ = 100`` the two terms of ``δ(ε)`` cancel in double precision; the library's
    log-space evaluation matches a 60-digit one (the former hand-written bisection was 1.0 off)."""
    mpmath = pytest.importorskip("mpmath")  # a dependency of dp-accounting
    mpmath.mp.dps = 60
    mu, delta = mpmath.mpf(100), mpmath.mpf("1e-5")

    def excess(e):
        return mpmath.ncdf(-e / mu + mu / 2) - mpmath.exp(e) * mpmath.ncdf(-e / mu - mu / 2) - delta

    exact = float(mpmath.findroot(excess, 5425.0))
    assert gaussian_epsilon(100.0, 1e-5) == pytest.approx(exact, rel=1e-10)
