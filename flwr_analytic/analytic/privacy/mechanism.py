"""The Gaussian mechanism on a client's layer statistics, and the server's solve of noisy sums.

Each client clips every design row ``ã = [a, 1]`` to ``‖ã‖ ≤ C`` (scaling ``a``; the bias entry stays
1) and every target row to ``‖t‖ ≤ τ`` (one-hot labels: ``τ = 1``), computes its statistics
``G = ÃᵀÃ``, ``B = ÃᵀT``, ``n``, and adds Gaussian noise once per layer: ``N(0, σ²)`` on every entry
of the upper triangle of ``G`` except the count entry ``G[-1, -1]`` (mirrored, so ``G`` stays
symmetric) and on every entry of ``B``; ``n`` (and ``G[-1, -1]``) are released exactly. Neighbouring
data sets differ by *replacing* one sample (bounded DP), so ``n`` is public; one sample with ``P``
design rows (``P = 1`` FC, ``P`` = output positions for conv) changes the released vector by at most

    Δ = 2 P C √(C² + τ²)   (‖triu(ããᵀ)‖ ≤ ‖ã‖², ‖ãtᵀ‖_F = ‖ã‖‖t‖; the τ-term only if m > 0).

With ``σ = z Δ`` each layer's release is the Gaussian mechanism, ``(1/z)``-Gaussian DP (Dong, Roth &
Su, JRSS-B 2022; the ``(ε, δ)`` of ``L`` releases is in :mod:`~flwr_analytic.analytic.privacy.accounting`,
after Balle & Wang, ICML 2018).

The server sums ``K`` releases, ``ΣG̃ = ΣG + E`` with ``E`` a symmetric Gaussian (Wigner) matrix,
``‖E‖₂ ≈ 2σ√(K D)``, so ``ΣG̃`` may be indefinite. It adds the public ridge ``γ_DP = (κ/2)·2σ√(K D)``
twice (:func:`dp_system`): as a data-free pseudo-client ``(γ_DP I', 0, 0)`` (:func:`public_prior`,
``I'`` = identity without the count entry: the sum keeps a positive feature diagonal) and on top of the
layer's own ridge ``γ`` (:func:`dp_regularization`), so FedACnnL's solve (Gu et al., arXiv
2502.06915) becomes

    W = (ΣG̃ + γ_DP (2I − e_D e_Dᵀ) + γ I)⁻¹ ΣB̃,

positive definite w.h.p. whatever ``E``.

The noise is drawn from ``numpy.random.default_rng(SeedSequence([seed, partition + 1, layer]))``:
reproducible when ``seed`` is fixed — and then the seed must stay secret from the server, which could
otherwise regenerate and subtract the noise. Without a seed, fresh OS entropy is used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flwr_analytic.analytic.network import AnalyticNetwork
from flwr_analytic.analytic.solvers import Regularization
from flwr_analytic.analytic.statistics import LayerStatistics, merge

#: Config keys of differential privacy (kebab-case, as sent by the strategies / in run configs).
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
DP_CLIP_NORM = "dp-clip-norm"
DP_TARGET_BOUND = "dp-target-bound"
DP_SEED = "dp-seed"
#: Server-side keys (fingerprints of a DP run): ``κ`` of the public ridge and the reported ``δ``.
DP_RIDGE_FACTOR = "dp-ridge-factor"
DP_DELTA = "dp-delta"


@dataclass(frozen=True)
class DPConfig:
    """Gaussian-mechanism parameters of one client's per-layer release.

    Parameters
    ----------
    noise_multiplier : float
        ``z = σ / Δ`` (> 0); ``0`` disables DP.
    clip_norm : float
        ``C``: every design row ``[a, 1]`` is scaled to ``‖[a, 1]‖ ≤ C`` (must be > 1).
    target_bound : float (default: 1.0)
        ``τ``: every target row is scaled to ``‖t‖ ≤ τ`` (one-hot labels have norm 1).

    """

    noise_multiplier: float
    clip_norm: float
    target_bound: float = 1.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(
                f"{DP_NOISE_MULTIPLIER} must be a finite number >= 0, got {self.noise_multiplier}"
            )
        if self.enabled and not (np.isfinite(self.clip_norm) and self.clip_norm > 1):
            raise ValueError(
                f"{DP_CLIP_NORM} must be > 1 (rows [a, 1] have norm >= 1), got {self.clip_norm}"
            )
        if self.enabled and not (np.isfinite(self.target_bound) and self.target_bound > 0):
            raise ValueError(f"{DP_TARGET_BOUND} must be > 0, got {self.target_bound}")

    @property
    def enabled(self) -> bool:
        """Whether noise is added (``noise_multiplier > 0``)."""
        return self.noise_multiplier > 0

    def sensitivity(self, rows_per_sample: int = 1, targets: int = 1) -> float:
        """``Δ = 2 P C √(C² + τ²)`` (``√(C²)`` when the layer has no targets)."""
        c, tau = self.clip_norm, self.target_bound if targets else 0.0
        return 2.0 * rows_per_sample * c * math.sqrt(c * c + tau * tau)

    def sigma(self, rows_per_sample: int = 1, targets: int = 1) -> float:
        """Noise standard deviation ``σ = z Δ``."""
        return self.noise_multiplier * self.sensitivity(rows_per_sample, targets)


def rows_per_sample(net: AnalyticNetwork, layer: int) -> int:
    """Design rows one sample contributes to ``layer``: :meth:`AnalyticNetwork.rows_per_sample`."""
    return net.rows_per_sample(layer)


def clip_design_rows(rows: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale each row ``a`` (last axis) so that ``‖[a, 1]‖ ≤ C``: ``a ← a · min(1, √(C²−1)/‖a‖)``."""
    limit = math.sqrt(clip_norm * clip_norm - 1.0)
    norms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
    factor = torch.clamp(limit / torch.clamp(norms, min=1e-300), max=1.0)
    return rows * factor


def clip_target_rows(t: np.ndarray, bound: float) -> np.ndarray:
    """Scale each target row to ``‖t‖ ≤ τ``."""
    norms = np.linalg.norm(t, axis=1, keepdims=True)
    return t * np.minimum(1.0, bound / np.maximum(norms, 1e-300))


def clipped_statistics(
    net: AnalyticNetwork,
    layer: int,
    x: np.ndarray,
    y: np.ndarray,
    dp: DPConfig,
    batch_size: int = 256,
) -> LayerStatistics:
    """``(G, B, n)`` of ``layer`` from clipped design rows and targets (as :meth:`statistics`).

    :meth:`AnalyticNetwork.statistics` with :func:`clip_design_rows` (in float64) and
    :func:`clip_target_rows` applied to every batch.
    """
    return net.statistics(
        layer,
        x,
        y,
        batch_size,
        rows=lambda patches: clip_design_rows(patches.to(torch.float64), dp.clip_norm),
        targets=lambda t: clip_target_rows(np.asarray(t, dtype=np.float64), dp.target_bound),
    )


def noise_rng(seed: int | None, partition_id: int, layer: int) -> np.random.Generator:
    """The client's noise generator: ``SeedSequence([seed, partition_id + 1, layer])``.

    ``seed=None`` (or negative): fresh OS entropy (not reproducible, and nothing for the server to
    guess). A fixed seed must be kept from the server.
    """
    if seed is None or int(seed) < 0:
        return np.random.default_rng()
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(partition_id) + 1, layer]))


def add_gaussian_noise(
    stats: LayerStatistics, sigma: float, rng: np.random.Generator
) -> LayerStatistics:
    """Noisy copy: ``N(0, σ²)`` on the upper triangle of ``G`` (mirrored) except ``G[-1,-1]``, on ``B``.

    ``n`` and ``G[-1, -1]`` (the number of design rows) are released unchanged.
    """
    dim = stats.dim
    iu = np.triu_indices(dim)
    noise = rng.standard_normal(iu[0].size) * sigma
    noise[-1] = 0.0  # (D-1, D-1) is the last upper-triangle entry: the count, released exactly
    gram = stats.gram.copy()
    gram[iu] += noise
    gram.T[iu] = gram[iu]
    cross = stats.cross + rng.standard_normal(stats.cross.shape) * sigma
    return LayerStatistics(gram, cross, stats.count)


def private_statistics(
    net: AnalyticNetwork,
    layer: int,
    x: np.ndarray,
    y: np.ndarray,
    dp: DPConfig,
    *,
    seed: int | None,
    partition_id: int,
    batch_size: int = 256,
) -> LayerStatistics:
    """A client's DP release of ``layer``: clipped statistics plus Gaussian noise ``σ = zΔ``."""
    stats = clipped_statistics(net, layer, x, y, dp, batch_size)
    sigma = dp.sigma(net.rows_per_sample(layer), net.num_targets(layer))
    return add_gaussian_noise(stats, sigma, noise_rng(seed, partition_id, layer))


def dp_ridge(sigma: float, num_clients: int, dim: int) -> float:
    """Public ridge ``2σ√(K D)``: the expected spectral norm of the summed symmetric noise."""
    return 2.0 * sigma * math.sqrt(num_clients * dim)


def public_prior(dim: int, targets: int, gamma: float) -> LayerStatistics:
    """Statistics of a public pseudo-client ``(γ I', 0, 0)``, ``I'`` = identity without the count entry.

    Added to a sum of noisy statistics it keeps the feature diagonal positive (the sum then passes
    the exact-data checks); it holds no data and no count.
    """
    gram = np.eye(dim) * float(gamma)
    gram[-1, -1] = 0.0
    return LayerStatistics(gram, np.zeros((dim, targets)), 0)


def dp_regularization(reg: Regularization, noisy_gram: np.ndarray, gamma: float) -> Regularization:
    """The ridge for a noisy sum: ``reg``'s amount on ``noisy_gram`` plus the public ``γ_DP``.

    Together with :func:`public_prior` the solved system is
    ``ΣG̃ + γ_DP (2I − e_D e_Dᵀ) + γ I``: every direction, including the bias, gets at least
    ``γ_DP ≈ ‖E‖₂``, which keeps it positive definite w.h.p. whatever the noise ``E``.
    """
    return Regularization(reg.amount(noisy_gram) + float(gamma), "absolute")


def dp_system(
    net: AnalyticNetwork, layer: int, total: LayerStatistics, gamma: float
) -> tuple[LayerStatistics, Regularization]:
    """The system the server solves for ``layer`` from a noisy sum ``total`` and public ``γ_DP``.

    Returns
    -------
    (LayerStatistics, Regularization)
        ``total`` + :func:`public_prior` ``(γ_DP)``, and :func:`dp_regularization` of the layer's own
        ridge rule (``net.output_reg`` or ``net.hidden_reg``) on ``total.gram``: pass both to
        ``net.solve(layer, stats, reg=reg)`` (or :func:`~flwr_analytic.analytic.ridge_solve`).

    """
    dim, targets = net.design_dim(layer), net.num_targets(layer)
    base = net.output_reg if net.is_output(layer) else net.hidden_reg
    return total + public_prior(dim, targets, gamma), dp_regularization(base, total.gram, gamma)


def solve_noisy_layer(
    net: AnalyticNetwork,
    layer: int,
    released: Sequence[LayerStatistics],
    sigma: float,
    ridge_factor: float = 2.0,
) -> np.ndarray:
    """Server solve of ``layer`` from ``K`` noisy releases (as ``DPRelease.solve`` does).

    ``γ_DP = (κ/2) · 2σ√(K D)``; the sum gets :func:`public_prior` and the layer's ridge
    :func:`dp_regularization` (:func:`dp_system`). Installs and returns ``W``; the network's ridge
    attributes are not changed.
    """
    gamma = ridge_factor / 2.0 * dp_ridge(sigma, len(released), net.design_dim(layer))
    stats, reg = dp_system(net, layer, merge(released), gamma)
    return net.solve(layer, stats, reg=reg)


def validate_released(
    stats: LayerStatistics, dim: int | None = None, targets: int | None = None
) -> LayerStatistics:
    """Checks that hold for honest *noisy* statistics (DP): shape, dtype, finite, symmetric, count.

    :meth:`LayerStatistics.validate` with ``noisy=True`` and exact symmetry (the noise is mirrored):
    it accepts negative diagonal entries and an indefinite ``G`` (Gaussian noise produces both);
    ``G[-1, -1]`` is not noised and must still be a whole multiple of the count.
    """
    return stats.validate(dim, targets, symmetry_tol=0.0, noisy=True)


def dp_from_config(run_config: Mapping[str, Any]) -> DPConfig:
    """The client's :class:`DPConfig` from its run config (disabled when the keys are absent)."""
    return DPConfig(
        noise_multiplier=float(run_config.get(DP_NOISE_MULTIPLIER, 0.0) or 0.0),
        clip_norm=float(run_config.get(DP_CLIP_NORM, 0.0) or 0.0),
        target_bound=float(run_config.get(DP_TARGET_BOUND, 1.0) or 1.0),
    )
