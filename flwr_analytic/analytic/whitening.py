"""Whitened-patch filter banks from federated statistics: ZCA, random / PCA filters, k-means.

Coates, Lee, Ng, "An Analysis of Single-Layer Networks in Unsupervised Feature Learning"
(AISTATS 2011): contrast-normalize small patches, ZCA-whiten them, learn many filters on the
whitened patches, encode with a rectifier, pool, and train a linear classifier. Every step before
the classifier is a function of the patch statistics FedACnnL clients already send:

- **ZCA.** With the bias-augmented patch Gram ``G = Σ [x, 1]ᵀ[x, 1]`` over ``n`` patch rows:
  ``μ = G[:-1, -1]/n``, ``C = G[:-1, :-1]/n − μμᵀ = U Λ Uᵀ``, and
  ``Z = U (Λ + εI)^{-1/2} Uᵀ`` with ``ε = eps · tr(C)/d``. A whitened patch is ``x̃ = Z(x − μ)``.
  ``G`` is a sum over clients, so federated ZCA equals centralized ZCA for any partition.
- **Filters** ``c_j`` in whitened space (``K × d``): seeded random unit vectors (``random``), the
  whitened principal directions in ``±`` pairs (``pca``), or Lloyd's k-means (``kmeans``).
- **Encoder** (soft threshold, Coates & Ng, ICML 2011): ``f_j(x) = max(0, c_jᵀx̃ − α)``: a conv
  layer with ReLU whose design weights are ``w_j = Z c_j`` and bias ``−μᵀZc_j − α``. With the
  polarity split (same paper) the filters are ``[c; −c]``: features ``max(0, cᵀx̃ − α)`` and
  ``max(0, −cᵀx̃ − α)``, ``2K`` channels from ``K`` learned filters (:func:`encoder_filters`).
- **Federated Lloyd's iteration.** The assignment ``argmax_k c_kᵀx̃ − ½‖c_k‖²`` is affine in the
  raw patch, ``argmax_k [x, 1]·a_k`` with ``a_k = [Zc_k; −μᵀZc_k − ½‖c_k‖²]``. With the one-hot
  assignment as each patch row's target, a client's ``B = Σ [x, 1] e_{k(x)}ᵀ`` holds, per
  centroid, the sum of its patches (rows ``:-1``) and their count (last row); the server's update
  ``c_k ← Z(B[:-1, k]/B[-1, k] − μ)`` (an empty cluster keeps its centroid) therefore equals
  centralized Lloyd's iteration on the pooled patches, from the same seeded initialization.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from flwr_analytic.analytic.statistics import LayerStatistics

FILTER_SOURCES = ("random", "pca", "kmeans")


@dataclass(frozen=True)
class Whitening:
    """ZCA whitening ``x̃ = Z(x − μ)`` of a layer's design rows (from their Gram)."""

    mean: np.ndarray
    zca: np.ndarray
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray

    @classmethod
    def from_statistics(cls, stats: LayerStatistics, eps: float) -> Whitening:
        """``μ``, ``Z = U(Λ + εI)^{-1/2}Uᵀ`` with ``ε = eps·tr(C)/d`` (see the module docstring)."""
        g = stats.gram
        n = g[-1, -1]
        if n <= 0:
            raise ValueError("ZCA whitening needs statistics of at least one patch")
        mu = g[:-1, -1] / n
        cov = g[:-1, :-1] / n - np.outer(mu, mu)
        evals, evecs = np.linalg.eigh((cov + cov.T) / 2)
        evals = np.maximum(evals, 0.0)
        floor = eps * max(float(evals.mean()), 1e-300)
        zca = (evecs / np.sqrt(evals + floor)) @ evecs.T
        return cls(mu, zca, evals[::-1].copy(), evecs[:, ::-1].copy())

    def design(self, filters: np.ndarray, offset: np.ndarray | float) -> np.ndarray:
        """Design weights (D x K) of ``x ↦ c_jᵀZ(x − μ) − offset_j`` for filters ``c`` (K x d)."""
        w = self.zca @ filters.T
        return np.vstack([w, -(self.mean @ w) - offset])


def encoder_filters(filters: np.ndarray, polarity: bool) -> np.ndarray:
    """The encoder's filters: ``c`` (K x d), or with the polarity split ``[c; −c]`` (2K x d)."""
    return np.vstack([filters, -filters]) if polarity else filters


def random_unit_filters(count: int, dim: int, seed: int) -> np.ndarray:
    """``count`` seeded Gaussian directions of unit norm (K x d)."""
    c = np.random.default_rng(seed).standard_normal((count, dim))
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def whitened_pca_filters(white: Whitening, count: int, seed: int) -> np.ndarray:
    """The top principal directions in whitened space as ``±`` pairs, then random ones.

    In whitened space the principal directions are ``U``'s columns (variance ``λ/(λ + ε)``); at
    most ``d`` pairs exist, the remaining ``count − 2d`` filters are :func:`random_unit_filters`.
    """
    dim = white.zca.shape[0]
    pairs = min(count // 2, dim)
    top = white.eigenvectors[:, :pairs].T
    top = top * np.sign(top[np.arange(pairs), np.argmax(np.abs(top), axis=1)])[:, None]
    rest = count - 2 * pairs
    parts = [top, -top] + ([random_unit_filters(rest, dim, seed)] if rest else [])
    return np.vstack(parts)


def assignment_design(white: Whitening, centroids: np.ndarray) -> np.ndarray:
    """``A`` (D x K) with ``[x, 1]·A[:, k] = c_kᵀx̃ − ½‖c_k‖²``: ``argmax_k`` is the nearest centroid."""
    return white.design(centroids, 0.5 * np.sum(centroids**2, axis=1))


def lloyd_update(white: Whitening, centroids: np.ndarray, stats: LayerStatistics) -> np.ndarray:
    """One Lloyd's iteration from summed assignment statistics (see the module docstring).

    ``B[:-1, k]`` is the sum of the raw patches nearest to centroid ``k``, ``B[-1, k]`` their
    count; ``c_k ← Z(B[:-1, k]/B[-1, k] − μ)``, and a centroid with no patch keeps its place.
    """
    sums, counts = stats.cross[:-1], stats.cross[-1]
    moved = counts > 0
    out = centroids.copy()
    means = sums[:, moved] / counts[moved]
    out[moved] = (white.zca @ (means - white.mean[:, None])).T
    return out


@dataclass
class KMeansFit:
    """The server's state while a ``zca-kmeans`` layer is fitted: whitening, centroids, iteration.

    Round 0 of the layer gives ``G`` (the whitening) and the seeded initial centroids
    (:func:`random_unit_filters`); every further round brings the clients' assignment statistics
    under :meth:`assignment` and is one :meth:`step`.
    """

    white: Whitening
    centroids: np.ndarray
    iteration: int = 0

    @classmethod
    def start(cls, stats: LayerStatistics, count: int, eps: float, seed: int) -> KMeansFit:
        """Whitening from the patch Gram and ``count`` seeded unit centroids."""
        white = Whitening.from_statistics(stats, eps)
        return cls(white, random_unit_filters(count, white.zca.shape[0], seed))

    def assignment(self) -> np.ndarray:
        """The design weights whose row-wise ``argmax`` assigns a patch (:func:`assignment_design`)."""
        return assignment_design(self.white, self.centroids)

    def step(self, stats: LayerStatistics) -> None:
        """One Lloyd's iteration (:func:`lloyd_update`)."""
        self.centroids = lloyd_update(self.white, self.centroids, stats)
        self.iteration += 1


@dataclass
class AssignmentRound:
    """A client's view of a k-means round: the server's assignment weights and the iteration.

    Stands in for :class:`KMeansFit` in ``AnalyticNetwork.kmeans`` on a client, which needs only
    :meth:`assignment` to compute its per-centroid sums and counts.
    """

    weights: np.ndarray
    iteration: int

    def assignment(self) -> np.ndarray:
        """The server's assignment design weights (D x K)."""
        return self.weights


def kmeans_state(net_or_fit: object) -> dict[str, np.ndarray]:
    """Checkpoint arrays of a network's k-means in progress (``{}`` when there is none)."""
    fit = getattr(net_or_fit, "kmeans", net_or_fit)
    if not isinstance(fit, KMeansFit):
        return {}
    white = fit.white
    return {
        "kmeans-mean": white.mean,
        "kmeans-zca": white.zca,
        "kmeans-eigenvalues": white.eigenvalues,
        "kmeans-eigenvectors": white.eigenvectors,
        "kmeans-centroids": fit.centroids,
        "kmeans-iteration": np.asarray([fit.iteration], dtype=np.int64),
    }


def kmeans_restore(arrays: Mapping[str, np.ndarray]) -> KMeansFit | None:
    """Inverse of :func:`kmeans_state`."""
    if "kmeans-centroids" not in arrays:
        return None
    white = Whitening(
        np.asarray(arrays["kmeans-mean"]),
        np.asarray(arrays["kmeans-zca"]),
        np.asarray(arrays["kmeans-eigenvalues"]),
        np.asarray(arrays["kmeans-eigenvectors"]),
    )
    iteration = int(np.asarray(arrays["kmeans-iteration"])[0])
    return KMeansFit(white, np.array(arrays["kmeans-centroids"], dtype=np.float64), iteration)
