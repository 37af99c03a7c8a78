"""Privacy for analytic federated learning: secure-aggregation encoding and differential privacy.

FedACnnL / pFedACnnL (Gu et al., arXiv 2502.06915) only ever need the *sums* ``Σ_k G_k``,
``Σ_k B_k``, ``Σ_k n_k`` of the clients' layer statistics, so two standard protections apply
(no Flower imports here; the Flower adapters are :mod:`flwr_analytic.clients.fedacnnl_secagg`,
:mod:`flwr_analytic.strategies.fedacnnl_secagg` and :mod:`flwr_analytic.strategies.fedacnnl_dp`).

Secure aggregation (SecAgg+)
    Flower's SecAgg+ sums integer vectors under pairwise masks. Its client mod clips every entry to
    ``[−c, c]``, maps it to ``{0, …, Q}`` (``Q`` = ``quantization_range``) and the server gets
    the *weighted mean* ``Σ_k w_k x_k / Σ_k w_k`` with ``w_k`` = ``num_examples / max_weight``.
    :class:`SecAggEncoding` makes that mean carry the sum of the statistics: each client sends
    ``x_k = [triu(G_k)/s, B_k/s, n_k/s_n]`` with public scales ``s``, ``s_n``, the weight
    ``num_examples = 1`` (``max_weight = 1``, so every ``w_k = 1`` exactly), and the values already
    rounded to the quantization grid ``2c/Q`` (round to nearest: the mod's stochastic rounding then
    leaves them unchanged, so the result is deterministic). The server multiplies the mean by the
    number of summed clients ``K`` and the scales. Each entry of the recovered sum is off by at most

        ε_G = K · s · c / Q   (G and B),      ε_n = K · s_n · c / Q   (count; rounded to an integer),

    and the solved layer ``W = (G + γI)⁻¹B`` by at most (:func:`solve_perturbation_bound`)

        ‖W − W'‖_F ≤ (‖δB‖_F + ‖δG + δγ I‖₂ ‖W'‖_F) / (λ_min(G' + γ'I) − ‖δG + δγ I‖₂),

    with ``‖δG‖₂ ≤ D ε_G``, ``‖δB‖_F ≤ √(D m) ε_G``, ``|δγ| ≤ ρ ε_G`` for the relative ridge rule.

Differential privacy (optional)
    Each client clips every design row ``ã = [a, 1]`` to ``‖ã‖ ≤ C`` (scaling ``a``, the bias entry
    stays 1) and every target row to ``‖t‖ ≤ τ`` (one-hot labels: τ = 1), computes its statistics,
    and adds Gaussian noise once per layer: ``N(0, σ²)`` on every entry of the upper triangle of
    ``G`` except the count entry ``G[-1, -1]`` (mirrored, so ``G`` stays symmetric) and on every
    entry of ``B``; ``n`` (and ``G[-1, -1]``) are released exactly. Neighbouring data sets differ by
    *replacing* one sample (bounded DP), so ``n`` is public; one sample with ``P`` design rows
    (``P = 1`` FC, ``P`` = output positions for conv) changes the released vector by at most

        Δ = 2 P C √(C² + τ²)   (‖triu(ããᵀ)‖ ≤ ‖ã‖², ‖ãtᵀ‖_F = ‖ã‖‖t‖; τ-term only if m > 0).

    With ``σ = z Δ`` each layer's release is the Gaussian mechanism, i.e. ``(1/z)``-Gaussian DP; ``L``
    released layers compose to ``μ = √(Σ_l 1/z_l²)``-GDP (Dong, Roth & Su, 2022), which is
    ``(ε, δ(ε))``-DP for every ε with the exact (analytic Gaussian mechanism) curve

        δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)   (Balle & Wang, ICML 2018, Thm. 8),

    tighter than the classical ``σ ≥ Δ√(2 ln(1.25/δ))/ε`` (Dwork & Roth, 2014, Thm. A.1) and than
    zCDP (``ρ = μ²/2``, Bun & Steinke 2016), which is reported too. The noisy Gram may be
    indefinite: the server adds the public ridge ``γ_DP = 2σ√(K D)`` (≈ the spectral norm of the
    summed symmetric noise, a Wigner matrix) so the system stays positive definite w.h.p.

The noise is drawn from ``numpy.random.default_rng(SeedSequence([seed, partition, layer]))``:
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
from scipy.special import ndtr

from flwr_analytic.analytic.design import StatisticsAccumulator, conv_rows
from flwr_analytic.analytic.network import AnalyticNetwork, batches
from flwr_analytic.analytic.solvers import Regularization
from flwr_analytic.analytic.statistics import LayerStatistics, StatisticsError, merge
from flwr_analytic.models import ConvSpec

#: Config keys of the privacy features (kebab-case, as sent by the strategies / in run configs).
SECAGG_SCALE = "secagg-scale"
SECAGG_COUNT_SCALE = "secagg-count-scale"
SECAGG_CLIPPING_RANGE = "secagg-clipping-range"
SECAGG_QUANTIZATION_RANGE = "secagg-quantization-range"
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
DP_CLIP_NORM = "dp-clip-norm"
DP_TARGET_BOUND = "dp-target-bound"
DP_SEED = "dp-seed"


class SecAggRangeError(ValueError):
    """A client's scaled statistics exceed the SecAgg+ clipping range (would be silently clipped)."""


# ============================================================================ secure aggregation
@dataclass(frozen=True)
class SecAggEncoding:
    """Fixed-point encoding of layer statistics for Flower's SecAgg+ (see the module docstring).

    Parameters
    ----------
    scale : float
        Public ``s``: clients send ``G_k / s`` and ``B_k / s``; every entry must satisfy
        ``|·| ≤ s · clipping_range`` on every client (checked: :class:`SecAggRangeError`).
    count_scale : float (default: 2**20)
        Public ``s_n`` for the sample count (``n_k ≤ s_n · clipping_range``).
    clipping_range : float (default: 1.0)
        SecAgg+'s ``c``, a power of two.
    quantization_range : int (default: 2**30)
        SecAgg+'s ``Q``, a power of two ``≤ 2**30`` (the mod rounds into int32). With both powers
        of two, grid values ``q·2c/Q − c`` survive the mod's float arithmetic exactly, so its
        stochastic rounding never moves them. The modulus must exceed ``K · Q``.

    """

    scale: float
    count_scale: float = float(2**20)
    clipping_range: float = 1.0
    quantization_range: int = 2**30

    def __post_init__(self) -> None:
        for name in ("scale", "count_scale", "clipping_range"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        q = int(self.quantization_range)
        if not 2 <= q < 2**31 or q & (q - 1):
            raise ValueError(
                "quantization_range must be a power of two in [2, 2**30] (int32 in the SecAgg+ "
                f"mod; exact grid), got {self.quantization_range}"
            )
        if math.frexp(self.clipping_range)[0] != 0.5:
            raise ValueError(
                f"clipping_range must be a power of two (exact grid), got {self.clipping_range}"
            )

    @property
    def step(self) -> float:
        """Grid spacing ``2c/Q`` of one client's (scaled) entries."""
        return 2.0 * self.clipping_range / self.quantization_range

    def _to_grid(self, x: np.ndarray, name: str, scale: float, key: str) -> np.ndarray:
        c = self.clipping_range
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        if not np.isfinite(peak):
            raise SecAggRangeError(f"{name} has non-finite values")
        if peak > c:
            raise SecAggRangeError(
                f"{name} / {key} reaches {peak:.4g} > clipping range {c:g}: SecAgg+ would clip it. "
                f"Set {key} >= {peak * scale / c:.6g} (a public bound on every client's |{name}|)."
            )
        q = np.rint((x + c) / self.step)  # integer grid index in [0, Q]
        return q * self.step - c

    def encode(self, stats: LayerStatistics) -> list[np.ndarray]:
        """Client side: ``[triu(G)/s, B/s, [n/s_n]]`` on the quantization grid (float64)."""
        iu = np.triu_indices(stats.dim)
        return [
            self._to_grid(stats.gram[iu] / self.scale, "gram", self.scale, SECAGG_SCALE),
            self._to_grid(stats.cross / self.scale, "cross", self.scale, SECAGG_SCALE),
            self._to_grid(
                np.asarray([float(stats.count)]) / self.count_scale,
                "count",
                self.count_scale,
                SECAGG_COUNT_SCALE,
            ),
        ]

    def entry_tolerance(self, num_clients: int) -> tuple[float, float]:
        """Worst-case error ``(ε_G, ε_n)`` of one entry of the decoded sum of ``num_clients``.

        Round-to-nearest moves each client's entry by at most half a step, ``c/Q``, i.e.
        ``s·c/Q`` in statistics units; ``K`` clients add up (floating-point dequantization adds a
        relative ~1e-15, covered by the factor 1.001).
        """
        half = self.clipping_range / self.quantization_range
        return (
            1.001 * num_clients * self.scale * half,
            1.001 * num_clients * self.count_scale * half,
        )

    def decode(
        self, mean: Sequence[np.ndarray], num_clients: int, *, rows_per_sample: int | None = None
    ) -> LayerStatistics:
        """Server side: the statistics sum from SecAgg+'s mean of ``num_clients`` encodings.

        ``G[-1, -1]`` (the number of design rows, an integer) is rounded to the nearest integer
        (``rows_per_sample · n`` when given); the count is rounded too. Raises
        :class:`StatisticsError` when the tolerance is too coarse to recover them.
        """
        if len(mean) != 3:
            raise StatisticsError(f"expected 3 arrays [gram-triu, cross, count], got {len(mean)}")
        k = int(num_clients)
        if k < 1:
            raise StatisticsError(f"num_clients must be >= 1, got {num_clients}")
        tri = np.asarray(mean[0], dtype=np.float64) * k * self.scale
        cross = np.asarray(mean[1], dtype=np.float64) * k * self.scale
        count_f = float(np.asarray(mean[2], dtype=np.float64).reshape(-1)[0]) * k * self.count_scale
        eps_g, eps_n = self.entry_tolerance(k)
        if eps_n >= 0.5:
            raise StatisticsError(
                f"{SECAGG_COUNT_SCALE}={self.count_scale:g} is too coarse to recover the count of "
                f"{k} clients (error up to {eps_n:.3g} >= 0.5)"
            )
        count = int(round(count_f))
        dim = int(round((np.sqrt(8 * tri.size + 1) - 1) / 2))
        if dim * (dim + 1) // 2 != tri.size:
            raise StatisticsError(f"gram-triu has {tri.size} entries: not a triangle D(D+1)/2")
        gram = np.zeros((dim, dim))
        iu = np.triu_indices(dim)
        gram[iu] = tri
        gram.T[iu] = tri
        rows = gram[-1, -1]
        if rows_per_sample is not None:
            gram[-1, -1] = float(rows_per_sample * count)
        elif eps_g < 0.5:
            gram[-1, -1] = float(round(rows))
        return LayerStatistics(gram, cross, count)


def solve_perturbation_bound(
    gram: np.ndarray,
    w: np.ndarray,
    reg: Regularization,
    eps_gram: float,
    eps_cross: float | None = None,
) -> float:
    """Bound on ``‖W − W_exact‖_F`` for ``W = (G + γI)⁻¹B`` solved from entrywise-perturbed sums.

    Parameters
    ----------
    gram : numpy.ndarray
        The perturbed ``G'`` that was solved (``D x D``).
    w : numpy.ndarray
        Its solution ``W'`` (``D x m``).
    reg : Regularization
        The ridge rule (relative: ``γ = ρ trace(G)/D`` moves by at most ``ρ ε_G``).
    eps_gram, eps_cross : float
        Entrywise bounds ``max|δG|``, ``max|δB|`` (``eps_cross`` defaults to ``eps_gram``).

    Returns
    -------
    float
        ``(‖δB‖_F + ‖E‖₂ ‖W'‖_F) / (λ_min(G' + γ'I) − ‖E‖₂)`` with ``E = δG + δγ I``,
        ``‖E‖₂ ≤ D ε_G + |δγ|``, ``‖δB‖_F ≤ √(D m) ε_B``; ``inf`` if the denominator is ≤ 0.
        From ``W − W' = (G + γI)⁻¹(E W' − δB)`` and Weyl's inequality.

    """
    dim, m = w.shape
    eps_cross = eps_gram if eps_cross is None else eps_cross
    gamma = reg.amount(gram)
    dgamma = reg.value * eps_gram if reg.rule == "relative" else 0.0
    e_norm = dim * eps_gram + dgamma
    lam_min = float(np.linalg.eigvalsh(gram + gamma * np.eye(dim))[0])
    denom = lam_min - e_norm
    if denom <= 0:
        return math.inf
    return (math.sqrt(dim * m) * eps_cross + e_norm * float(np.linalg.norm(w))) / denom


# ========================================================================= differential privacy
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
    """Design rows one sample contributes to ``layer`` (1 for FC, output positions for conv)."""
    spec = net.arch.spec(layer)
    if not isinstance(spec, ConvSpec):
        return 1
    _, h, w = net.arch.input_shape_of(layer)
    k, p = spec.kernel_size, spec.padding
    return (h + 2 * p - k + 1) * (w + 2 * p - k + 1)


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


@torch.no_grad()
def clipped_statistics(
    net: AnalyticNetwork,
    layer: int,
    x: np.ndarray,
    y: np.ndarray,
    dp: DPConfig,
    batch_size: int = 256,
) -> LayerStatistics:
    """``(G, B, n)`` of ``layer`` from clipped design rows and targets (as :meth:`statistics`)."""
    spec = net.arch.spec(layer)
    acc = StatisticsAccumulator(net.design_dim(layer), net.num_targets(layer), net.dtype)
    y = np.asarray(y)
    if len(y) != len(x):
        raise StatisticsError(f"{len(x)} samples but {len(y)} labels")
    for sl in batches(len(y), batch_size):
        h = net.layer_input(layer, x[sl])
        t = net.layer_targets(layer, y[sl]) if acc.targets else None
        if t is not None:
            t = clip_target_rows(np.asarray(t, dtype=np.float64), dp.target_bound)
        if isinstance(spec, ConvSpec):
            patches = conv_rows(h, spec.kernel_size, spec.padding)
        else:
            patches = torch.flatten(h, 1)[:, None, :]
        acc.add_patches(clip_design_rows(patches.to(torch.float64), dp.clip_norm), t)
    return acc.result()


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
    sigma = dp.sigma(rows_per_sample(net, layer), net.num_targets(layer))
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


def solve_noisy_layer(
    net: AnalyticNetwork,
    layer: int,
    released: Sequence[LayerStatistics],
    sigma: float,
    ridge_factor: float = 2.0,
) -> np.ndarray:
    """Server solve of ``layer`` from ``K`` noisy releases (as :class:`DPFedACnnL` does).

    ``γ_DP = (κ/2) · 2σ√(K D)``; the sum gets :func:`public_prior` and the layer's ridge
    :func:`dp_regularization`. Installs and returns ``W``.
    """
    dim, targets = net.design_dim(layer), net.num_targets(layer)
    gamma = ridge_factor / 2.0 * dp_ridge(sigma, len(released), dim)
    noisy = merge(released)
    total = merge([noisy, public_prior(dim, targets, gamma)])
    attr = "output_reg" if net.is_output(layer) else "hidden_reg"
    base = getattr(net, attr)
    setattr(net, attr, dp_regularization(base, noisy.gram, gamma))
    try:
        return net.solve(layer, total)
    finally:
        setattr(net, attr, base)


def validate_released(
    stats: LayerStatistics, dim: int | None = None, targets: int | None = None
) -> LayerStatistics:
    """Checks that hold for honest *noisy* statistics (DP): shape, dtype, finite, symmetric, count.

    Unlike :meth:`LayerStatistics.validate` it accepts negative diagonal entries and an indefinite
    ``G`` (Gaussian noise produces both); ``G[-1, -1]`` is not noised and must still be a whole
    multiple of the count.
    """
    g = stats.gram
    if not isinstance(g, np.ndarray) or g.ndim != 2 or g.shape[0] != g.shape[1] or g.size == 0:
        raise StatisticsError(f"gram must be a square 2-D array, got shape {np.shape(g)}")
    if dim is not None and g.shape[0] != dim:
        raise StatisticsError(f"gram is {g.shape[0]}x{g.shape[0]}, expected D={dim}")
    b = stats.cross
    if not isinstance(b, np.ndarray) or b.ndim != 2 or b.shape[0] != g.shape[0]:
        raise StatisticsError(f"cross must have shape ({g.shape[0]}, m), got {np.shape(b)}")
    if targets is not None and b.shape[1] != targets:
        raise StatisticsError(f"cross has {b.shape[1]} target columns, expected {targets}")
    for name, arr in (("gram", g), ("cross", b)):
        if arr.dtype != np.float64:
            raise StatisticsError(f"{name} must be float64, got {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise StatisticsError(f"{name} has non-finite values (NaN or Inf)")
    if not np.array_equal(g, g.T):
        raise StatisticsError("gram is not symmetric")
    count = stats.count
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
        raise StatisticsError(f"count must be a non-negative integer, got {count!r}")
    rows = float(g[-1, -1])
    if (count == 0 and rows != 0) or (
        count > 0 and (rows < count or rows != round(rows) or round(rows) % count != 0)
    ):
        raise StatisticsError(f"count {count} is inconsistent with {rows:g} design rows")
    return stats


# ------------------------------------------------------------------------------- accounting
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


def dp_from_config(run_config: Mapping[str, Any]) -> DPConfig:
    """The client's :class:`DPConfig` from its run config (disabled when the keys are absent)."""
    return DPConfig(
        noise_multiplier=float(run_config.get(DP_NOISE_MULTIPLIER, 0.0) or 0.0),
        clip_norm=float(run_config.get(DP_CLIP_NORM, 0.0) or 0.0),
        target_bound=float(run_config.get(DP_TARGET_BOUND, 1.0) or 1.0),
    )
