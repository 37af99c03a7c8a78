"""Secure aggregation (SecAgg+) of FedACnnL statistics: a fixed-point encoding whose mean is the sum.

FedACnnL / pFedACnnL (Gu et al., arXiv 2502.06915) only need the *sums* ``Σ_k G_k``, ``Σ_k B_k``,
``Σ_k n_k`` of the clients' layer statistics, so the server can receive them through secure
aggregation and never hold one client's statistics. Flower's SecAgg+ (``flwr`` ``SecAggPlusWorkflow`` /
``secaggplus_mod``; protocol of Bell, Bonawitz, Gascón, Lepoint & Raykova, CCS 2020, after Bonawitz
et al., CCS 2017) sums integer vectors under pairwise masks. Its client mod clips every entry to
``[−c, c]``, maps it to ``{0, …, Q}`` (``Q`` = ``quantization_range``) and the server gets the
*weighted mean* ``Σ_k w_k x_k / Σ_k w_k`` with ``w_k`` = ``num_examples / max_weight``.

:class:`SecAggEncoding` makes that mean carry the sum of the statistics: each client sends
``x_k = [triu(G_k)/s, B_k/s, n_k/s_n]`` with public scales ``s``, ``s_n``, the weight
``num_examples = 1`` (``max_weight = 1``, so every ``w_k = 1`` exactly), and the values already
rounded to the quantization grid ``2c/Q`` (round to nearest: the mod's stochastic rounding then leaves
them unchanged, so the result is deterministic). The server multiplies the mean by the number of
summed clients ``K`` and the scales. Each entry of the recovered sum is off by at most

    ε_G = K · s · c / Q   (G and B),      ε_n = K · s_n · c / Q   (count; rounded to an integer),

and the solved layer ``W = (G + γI)⁻¹B`` by at most (:func:`solve_perturbation_bound`)

    ‖W − W'‖_F ≤ (‖δB‖_F + ‖δG + δγ I‖₂ ‖W'‖_F) / (λ_min(G' + γ'I) − ‖δG + δγ I‖₂),

with ``‖δG‖₂ ≤ D ε_G``, ``‖δB‖_F ≤ √(D m) ε_G``, ``|δγ| ≤ ρ ε_G`` for the relative ridge rule (from
``W − W' = (G + γI)⁻¹(E W' − δB)`` and Weyl's inequality). No Flower imports here; the Flower adapters
are :mod:`flwr_analytic.clients.fedacnnl_secagg` and :mod:`flwr_analytic.strategies.fedacnnl_secagg`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flwr_analytic.analytic.solvers import Regularization
from flwr_analytic.analytic.statistics import LayerStatistics, StatisticsError

#: Config keys of secure aggregation (kebab-case, as sent by the strategies / in run configs).
SECAGG_SCALE = "secagg-scale"
SECAGG_COUNT_SCALE = "secagg-count-scale"
SECAGG_CLIPPING_RANGE = "secagg-clipping-range"
SECAGG_QUANTIZATION_RANGE = "secagg-quantization-range"


class SecAggRangeError(ValueError):
    """A client's scaled statistics exceed the SecAgg+ clipping range (would be silently clipped)."""


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
