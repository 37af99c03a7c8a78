"""Release policies: what the clients release per layer, and how the server checks and solves it.

A FedACnnL server (Gu et al., arXiv 2502.06915) receives one ``(G_k, B_k, n_k)`` per client and
layer, checks each, sums them in a fixed order, ``(G, B, n) = Σ_k (G_k, B_k, n_k)``, and solves the
layer. What may be checked, and how the sum is solved, depends on what the clients release:

:class:`ExactRelease`
    Exact statistics ``G_k = A_kᵀA_k``, ``B_k = A_kᵀT_k``: every check that honest data pass
    (symmetric positive semi-definite ``G_k``, ``G_k[-1, -1] = P n_k`` with ``P`` design rows per
    sample, a whole label histogram ``B_k[-1]`` for one-hot targets); the solve is the network's,
    ``W = (G + γI)⁻¹B`` for the output layer.
:class:`DPRelease`
    Gaussian-mechanism releases ``G̃_k = G_k + E_k``, ``B̃_k = B_k + E'_k`` with ``σ = zΔ``
    (:mod:`~flwr_analytic.analytic.privacy.mechanism`): only the checks noise cannot break, plus the
    clients' announced ``z`` and ``C``; the solve adds the public ridge
    ``γ_DP = (κ/2)·2σ√(K D)`` of the ``K`` contributors as a pseudo-client and to the ridge,

        W = (G̃ + γ_DP (2I − e_D e_Dᵀ) + γ I)⁻¹ B̃,

    and :meth:`DPRelease.report` gives each client's ``(ε, δ)`` over the released layers by Gaussian
    DP composition (Dong, Roth & Su, JRSS-B 2022) and the analytic Gaussian mechanism's exact curve
    (Balle & Wang, ICML 2018) (:mod:`~flwr_analytic.analytic.privacy.accounting`).

Both satisfy the :class:`ReleasePolicy` protocol the server core uses; neither imports Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from flwr_analytic.analytic.network import AnalyticNetwork
from flwr_analytic.analytic.privacy.accounting import privacy_report
from flwr_analytic.analytic.privacy.mechanism import (
    DP_CLIP_NORM,
    DP_DELTA,
    DP_NOISE_MULTIPLIER,
    DP_RIDGE_FACTOR,
    DP_TARGET_BOUND,
    DPConfig,
    dp_ridge,
    dp_system,
    validate_released,
)
from flwr_analytic.analytic.solvers import ridge_solve
from flwr_analytic.analytic.statistics import LayerStatistics, StatisticsError

#: Fingerprint key naming the release policy.
RELEASE_KEY = "release"


@runtime_checkable
class ReleasePolicy(Protocol):
    """What clients release, as the server sees it: per-reply checks, the solve, a privacy report.

    Attributes
    ----------
    name : str
        Short name of the policy (``"exact"``, ``"dp"``).

    """

    name: ClassVar[str]

    def check(
        self,
        stats: LayerStatistics,
        net: AnalyticNetwork,
        layer: int,
        metrics: Mapping[str, Any],
    ) -> None:
        """Raise :class:`StatisticsError` unless ``stats`` can be an honest release of ``layer``.

        ``metrics`` is the reply's metric record (announced parameters of the release).
        """
        ...

    def solve(
        self, net: AnalyticNetwork, layer: int, total: LayerStatistics, num_contributors: int
    ) -> np.ndarray:
        """Solve and install ``layer`` from the sum ``total`` of ``num_contributors`` releases."""
        ...

    def group_weights(
        self, net: AnalyticNetwork, total: LayerStatistics, num_contributors: int
    ) -> np.ndarray:
        """``W`` of a group-wise output layer from its group's sum (not installed)."""
        ...

    def details(self, net: AnalyticNetwork, layer: int, num_contributors: int) -> dict[str, Any]:
        """Extra history entries of a solve of ``layer`` from ``num_contributors`` releases."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """The policy's parameters, for the run's configuration fingerprint."""
        ...

    def report(self, released_layers: int) -> dict[str, Any] | None:
        """The clients' privacy after ``released_layers`` releases, or ``None``."""
        ...


def one_hot_classes(net: AnalyticNetwork, layer: int) -> int | None:
    """Classes of ``layer``'s one-hot targets (output layer, ``label-pca`` channels), else ``None``.

    The bias row of such a ``B = AᵀT`` is the label histogram times ``P``.
    """
    one_hot = net.is_output(layer) or net.schemes[layer].name == "label-pca"
    return net.arch.num_classes if one_hot and net.num_targets(layer) else None


@dataclass(frozen=True)
class ExactRelease:
    """Clients release their exact statistics ``(A_kᵀA_k, A_kᵀT_k, n_k)``."""

    name: ClassVar[str] = "exact"

    def check(
        self,
        stats: LayerStatistics,
        net: AnalyticNetwork,
        layer: int,
        metrics: Mapping[str, Any],
    ) -> None:
        """Every check honest exact statistics of ``layer`` pass (``metrics`` is not used).

        :meth:`LayerStatistics.validate` with ``D`` and ``m`` of the layer, ``G[-1, -1] = P n``
        (:meth:`AnalyticNetwork.rows_per_sample`), the label histogram and Cauchy–Schwarz bounds
        of ``B`` when its targets are one-hot, and the PSD checks of ``G``.
        """
        stats.validate(
            net.design_dim(layer),
            net.num_targets(layer),
            rows_per_sample=net.rows_per_sample(layer),
            label_classes=one_hot_classes(net, layer),
            check_psd=True,
        )

    def solve(
        self, net: AnalyticNetwork, layer: int, total: LayerStatistics, num_contributors: int
    ) -> np.ndarray:
        """``net.solve(layer, total)``: the scheme's rule, ``(G + γI)⁻¹B`` for the output layer."""
        return net.solve(layer, total)

    def group_weights(
        self, net: AnalyticNetwork, total: LayerStatistics, num_contributors: int
    ) -> np.ndarray:
        """``W = (G + γI)⁻¹B`` of the group's sum with the network's output ridge."""
        return ridge_solve(total.gram, total.cross, net.output_reg)

    def details(self, net: AnalyticNetwork, layer: int, num_contributors: int) -> dict[str, Any]:
        """``{}``: an exact solve has no parameters of its own."""
        return {}

    def fingerprint(self) -> dict[str, Any]:
        """``{"release": "exact"}``."""
        return {RELEASE_KEY: self.name}

    def report(self, released_layers: int) -> dict[str, Any] | None:
        """``None``: exact statistics carry no formal privacy guarantee."""
        return None


@dataclass(frozen=True)
class DPRelease:
    """Clients release Gaussian-noised statistics (:func:`~.mechanism.private_statistics`).

    Parameters
    ----------
    dp : DPConfig
        The clients' noise multiplier ``z``, clip norm ``C`` and target bound ``τ`` (public); DP must
        be enabled (``z > 0``).
    delta : float (default: 1e-5)
        The ``δ`` at which :meth:`report` gives ``ε``, in ``(0, 1)``.
    ridge_factor : float (default: 2.0)
        ``κ`` of the public ridge ``γ_DP = (κ/2)·2σ√(K D)`` (``0`` disables it: plain solve).

    """

    dp: DPConfig
    delta: float = 1e-5
    ridge_factor: float = 2.0
    name: ClassVar[str] = "dp"

    def __post_init__(self) -> None:
        if not self.dp.enabled:
            raise ValueError(
                f"DPRelease needs {DP_NOISE_MULTIPLIER} > 0 (use ExactRelease without DP)"
            )
        if not (0 < self.delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if not (math.isfinite(self.ridge_factor) and self.ridge_factor >= 0):
            raise ValueError(f"ridge_factor must be >= 0, got {self.ridge_factor}")
        object.__setattr__(self, "delta", float(self.delta))
        object.__setattr__(self, "ridge_factor", float(self.ridge_factor))

    def check(
        self,
        stats: LayerStatistics,
        net: AnalyticNetwork,
        layer: int,
        metrics: Mapping[str, Any],
    ) -> None:
        """The reply announces our ``z`` and ``C``; ``stats`` pass :func:`~.validate_released`.

        ``metrics`` must hold ``dp-noise-multiplier`` and ``dp-clip-norm`` equal to ours (relative
        tolerance 1e-12): a client with another noise level (or none) would void the accounting.
        """
        for key, mine in (
            (DP_NOISE_MULTIPLIER, self.dp.noise_multiplier),
            (DP_CLIP_NORM, self.dp.clip_norm),
        ):
            theirs = metrics.get(key)
            try:
                same = theirs is not None and math.isclose(float(theirs), mine, rel_tol=1e-12)
            except (TypeError, ValueError):
                same = False
            if not same:
                raise StatisticsError(f"reply announces {key}={theirs}, the server expects {mine}")
        validate_released(stats, net.design_dim(layer), net.num_targets(layer))
        # G[-1,-1] (the bias entry) is released exactly: n_k · L design rows
        rows = net.rows_per_sample(layer)
        if stats.rows != stats.count * rows:
            raise StatisticsError(
                f"bias entry G[-1,-1] = {stats.rows:g} design rows, expected count "
                f"{stats.count} x {rows} rows per sample = {stats.count * rows}"
            )

    def sigma(self, net: AnalyticNetwork, layer: int) -> float:
        """The clients' noise standard deviation ``σ = zΔ`` for ``layer``."""
        return self.dp.sigma(net.rows_per_sample(layer), net.num_targets(layer))

    def ridge(self, net: AnalyticNetwork, layer: int, num_contributors: int) -> float:
        """The public ridge ``γ_DP = (κ/2)·2σ√(K D)`` of a sum of ``K`` releases of ``layer``."""
        sigma = self.sigma(net, layer)
        return self.ridge_factor / 2.0 * dp_ridge(sigma, num_contributors, net.design_dim(layer))

    def solve(
        self, net: AnalyticNetwork, layer: int, total: LayerStatistics, num_contributors: int
    ) -> np.ndarray:
        """Solve and install ``layer`` with the public prior and ridge (:func:`~.dp_system`).

        ``κ = 0``: ``net.solve(layer, total)`` (the noisy sum must then pass the exact checks).
        """
        if self.ridge_factor == 0:
            return net.solve(layer, total)
        gamma = self.ridge(net, layer, num_contributors)
        stats, reg = dp_system(net, layer, total, gamma)
        return net.solve(layer, stats, reg=reg)

    def group_weights(
        self, net: AnalyticNetwork, total: LayerStatistics, num_contributors: int
    ) -> np.ndarray:
        """``W`` of a group's output layer: the same prior and ridge with ``K`` = its contributors."""
        layer = net.num_layers - 1
        if self.ridge_factor == 0:
            return ridge_solve(total.gram, total.cross, net.output_reg)
        stats, reg = dp_system(net, layer, total, self.ridge(net, layer, num_contributors))
        return ridge_solve(stats.gram, stats.cross, reg)

    def details(self, net: AnalyticNetwork, layer: int, num_contributors: int) -> dict[str, Any]:
        """``dp-ridge`` (``γ_DP``) and ``dp-sigma`` (``σ``) of the solve; ``{}`` without a ridge.

        Empty when ``κ = 0`` or ``num_contributors < 1`` (no public ridge is added then).
        """
        if self.ridge_factor == 0 or num_contributors < 1:
            return {}
        return {
            "dp-ridge": self.ridge(net, layer, num_contributors),
            "dp-sigma": self.sigma(net, layer),
        }

    def fingerprint(self) -> dict[str, Any]:
        """The release and all its public parameters."""
        return {
            RELEASE_KEY: self.name,
            DP_NOISE_MULTIPLIER: self.dp.noise_multiplier,
            DP_CLIP_NORM: self.dp.clip_norm,
            DP_TARGET_BOUND: self.dp.target_bound,
            DP_RIDGE_FACTOR: self.ridge_factor,
            DP_DELTA: self.delta,
        }

    def report(self, released_layers: int) -> dict[str, Any] | None:
        """Each client's privacy over ``released_layers`` releases (:func:`~.privacy_report`).

        Plus ``released-layers``, ``clip-norm`` and ``target-bound``.
        """
        report: dict[str, Any] = privacy_report(
            [self.dp.noise_multiplier] * released_layers, self.delta
        )
        report["released-layers"] = released_layers
        report["clip-norm"] = self.dp.clip_norm
        report["target-bound"] = self.dp.target_bound
        return report
