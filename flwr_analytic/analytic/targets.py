"""Hidden-layer target schemes: how a hidden layer's weights come from its federated statistics.

Every scheme has a client half (:meth:`TargetScheme.targets`: the per-sample target ``t_n`` that enters
``B = AᵀT``, or none) and a server half (:meth:`TargetScheme.weights`: the layer's ``W`` (D x C_out)
from the summed statistics). Both halves depend only on labels, the shared seed and the summed
statistics, so the federated layer equals the centralized one for any partition.

Schemes
-------
``label-encoding``
    ACnnL / FedACnnL pseudo-labels (Zhuang et al. 2025; Gu et al., arXiv 2502.06915): ``T = f⁻¹(Y M)`` with
    ``Y`` one-hot, ``M`` a seeded ``c x C_out`` encoding (``identity`` tiling or random ``orthonormal``
    rows), repeated at every spatial position, ``f⁻¹`` the inverse activation where it exists; then
    ``W = (G + γI)⁻¹ B``. Since ``T = Y M``, ``W = W_lin M``: the layer's pre-activations have rank
    <= c (see ``../shared/design/analytic.md``).
``pca``
    Federated PCA: with ``n = G[-1,-1]``, ``μ = G[:-1,-1]/n``, ``Σ = G[:-1,:-1]/n − μμᵀ``, the top
    ``C_out/2`` eigenvectors ``v_j`` (eigenvalues ``λ_j``) give whitened filters ``w_j = v_j/√λ_j`` with
    bias ``−μ·w_j``, used in ``±`` pairs so a ReLU keeps both signs. Needs ``G`` only.
``label-pca``
    The first ``c`` channels are the label-regression solution ``(G + γI)⁻¹ AᵀY``, the remaining
    ``C_out − c`` channels PCA pairs; channels PCA cannot fill (an odd remainder, or more pairs
    than the ``D − 1`` input directions, as in a user's own model) are ``random-standardized``.
``random``
    The random-feature control: seeded Gaussian filters ``N(0, 1/(D−1))`` and biases, no statistics.
``random-standardized``
    Random features of the standardized input: ``w_j = r_j / σ`` (``r_j ~ N(0, I/(D−1))``, ``σ`` the
    per-input standard deviation from ``G``), bias ``−μ·w_j + b_j`` with ``b_j ~ N(0, 1)``; ``G`` only.
    With ReLU this approximates the arc-cosine kernel on standardized features (Cho & Saul 2009).
``zca-random`` / ``zca-pca`` / ``zca-kmeans``
    Filters on ZCA-whitened patches with the soft-threshold encoder ``max(0, cᵀx̃ − α)`` (Coates,
    Lee, Ng, AISTATS 2011; Coates & Ng, ICML 2011): seeded random unit filters, whitened
    principal directions, or federated Lloyd's k-means (``1 + iterations`` rounds for the layer:
    ``G`` first, then one round of per-centroid sums and counts per iteration, on the patches at
    a ``sample_stride`` grid of positions). See :mod:`flwr_analytic.analytic.whitening`; ZCA,
    random and PCA are closed-form in ``G`` (federated = centralized), k-means equals
    centralized Lloyd's iterations from the same seeded initialization.

The output layer is always the ridge solution onto one-hot labels (:class:`OneHotOutput`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from flwr_analytic.analytic.solvers import IllConditionedWarning, Regularization, ridge_solve
from flwr_analytic.analytic.statistics import LayerStatistics
from flwr_analytic.analytic.whitening import (
    Whitening,
    encoder_filters,
    random_unit_filters,
    whitened_pca_filters,
)

SCHEMES = (
    "label-encoding",
    "pca",
    "label-pca",
    "random",
    "random-standardized",
    "zca-kmeans",
    "zca-random",
    "zca-pca",
)
#: Variances at most this fraction of the largest one count as zero (constant / duplicated inputs).
ZERO_VARIANCE = 1e-10
ENCODINGS = ("orthonormal", "identity")
_EPS = 1e-6


def one_hot(y: np.ndarray, num_classes: int) -> np.ndarray:
    """``Y`` (N x c) with ``Y[n, y_n] = 1``."""
    y = np.asarray(y, dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {y.min()}..{y.max()}")
    out = np.zeros((len(y), num_classes))
    out[np.arange(len(y)), y] = 1.0
    return out


def inverse_activation(t: np.ndarray, activation: str) -> np.ndarray:
    """``f⁻¹(t)`` for invertible activations (tanh, sigmoid; clipped into range), ``t`` otherwise."""
    if activation == "tanh":
        return np.arctanh(np.clip(t, -1 + _EPS, 1 - _EPS))
    if activation == "sigmoid":
        t = np.clip(t, _EPS, 1 - _EPS)
        return np.log(t / (1 - t))
    return t


def encoding_matrix(num_classes: int, width: int, kind: str, seed: int) -> np.ndarray:
    """The seeded ``c x C_out`` label encoding ``M``.

    ``identity``: ``[I I ...]`` tiled to ``C_out`` columns; ``orthonormal``: the QR factor of a seeded
    Gaussian matrix, with orthogonal rows (``C_out >= c``) or orthonormal columns (``C_out < c``).
    """
    if kind == "identity":
        reps = -(-width // num_classes)
        return np.tile(np.eye(num_classes), (1, reps))[:, :width]
    if kind != "orthonormal":
        raise ValueError(f"unknown encoding {kind!r}; allowed: {', '.join(ENCODINGS)}")
    rng = np.random.default_rng(seed)
    if width >= num_classes:
        q, _ = np.linalg.qr(rng.standard_normal((width, num_classes)))
        return q.T * np.sqrt(width / num_classes)  # orthogonal rows, entries ~ 1/sqrt(c)
    q, _ = np.linalg.qr(rng.standard_normal((num_classes, width)))
    return q  # orthonormal columns


def pca_filters(stats: LayerStatistics, pairs: int) -> np.ndarray:
    """Whitened top-``pairs`` principal directions of the layer input, as ``±`` filter pairs.

    Returns ``W`` (D x 2·pairs): columns ``[w_1..w_p, −w_1..−w_p]`` with bias row ``∓μ·w_j``. Each
    eigenvector's sign is fixed (largest-magnitude entry positive) so the result does not depend on
    the eigen-solver's arbitrary sign, and hence not on how the data were partitioned.
    """
    g = stats.gram
    p = g.shape[0] - 1
    if pairs > p:
        raise ValueError(
            f"PCA can give at most {p} filter pairs for a layer of {p} inputs, asked {pairs}"
        )
    n = g[-1, -1]
    if n <= 0:
        raise ValueError("PCA filters need statistics of at least one sample")
    mu = g[:-1, -1] / n
    cov = g[:-1, :-1] / n - np.outer(mu, mu)
    evals, evecs = np.linalg.eigh((cov + cov.T) / 2)
    evals, evecs = evals[::-1][:pairs], evecs[:, ::-1][:, :pairs]
    top = np.argmax(np.abs(evecs), axis=0)
    evecs = evecs * np.sign(evecs[top, np.arange(pairs)])
    floor = max(float(evals[0]), 0.0) * 1e-12 + 1e-300
    w = evecs / np.sqrt(np.maximum(evals, floor))
    null = evals <= max(float(evals[0]), 0.0) * ZERO_VARIANCE
    if np.any(null):
        # Directions of (numerically) zero variance: constant or duplicated inputs. Whitening them
        # would multiply rounding noise (or test-time deviations) by up to 1e6; their filters are 0.
        warnings.warn(
            f"PCA: {int(null.sum())} of the {pairs} requested filter pairs are directions of "
            "zero variance (constant or duplicated inputs, or fewer samples than inputs); their "
            "filters are set to 0",
            IllConditionedWarning,
            stacklevel=2,
        )
        w[:, null] = 0.0
    half = np.vstack([w, -(mu @ w)[None, :]])
    return np.hstack([half, -half])


def random_filters(dim: int, width: int, seed: int) -> np.ndarray:
    """Seeded Gaussian ``W`` (D x C_out): weights ``N(0, 1/(D−1))``, biases ``N(0, 1/(D−1))``."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((dim, width)) / np.sqrt(max(dim - 1, 1))


def standardized_random_filters(stats: LayerStatistics, width: int, seed: int) -> np.ndarray:
    """Random ReLU features of the standardized layer input (``random-standardized``)."""
    g = stats.gram
    n = g[-1, -1]
    if n <= 0:
        raise ValueError("random-standardized filters need statistics of at least one sample")
    mu = g[:-1, -1] / n
    var = np.maximum(np.diag(g)[:-1] / n - mu**2, 0.0)
    sigma = np.sqrt(var + 1e-12 * max(float(var.max()), 1e-300))
    rng = np.random.default_rng(seed)
    r = rng.standard_normal((g.shape[0] - 1, width)) / np.sqrt(g.shape[0] - 1)
    w = r / sigma[:, None]
    # constant inputs carry no information; 1/σ would amplify any test-time deviation by ~1e6
    w[var <= max(float(var.max()), 0.0) * ZERO_VARIANCE] = 0.0
    return np.vstack([w, (rng.standard_normal(width) - mu @ w)[None, :]])


@dataclass(frozen=True)
class TargetScheme:
    """A hidden-layer target scheme (see the module docstring).

    Parameters
    ----------
    name : str
        The scheme, one of :data:`SCHEMES`.
    encoding : {"orthonormal", "identity"}
        Label encoding ``M`` of ``label-encoding``.
    zca_eps : float
        ``zca-*``: whitening offset ``ε`` relative to the mean patch variance (0.1: Coates et al.).
    threshold : float
        ``zca-*``: the encoder's ``α`` (``max(0, cᵀx̃ − α)``); 0.25 as in Coates & Ng (2011).
    iterations : int
        ``zca-kmeans``: Lloyd's iterations (each one federated round).
    sample_stride : int
        ``zca-kmeans``: k-means sees the patches at every ``sample_stride``-th row and column.
    polarity : bool
        ``zca-kmeans`` / ``zca-random``: the polarity split of Coates & Ng (ICML 2011): the
        layer's ``C_out`` channels are ``C_out/2`` learned filters ``c`` and their negations,
        features ``max(0, cᵀx̃ − α)`` and ``max(0, −cᵀx̃ − α)`` (``C_out`` must be even). A conv
        whose second half of filters negates the first computes one GEMM of half the width
        (:class:`~flwr_analytic.models.ContrastConv2d`).

    """

    name: str = "label-pca"
    encoding: str = "orthonormal"
    zca_eps: float = 0.1
    threshold: float = 0.25
    iterations: int = 5
    sample_stride: int = 6
    polarity: bool = False

    def __post_init__(self) -> None:
        if self.name not in SCHEMES:
            raise ValueError(f"unknown target scheme {self.name!r}; allowed: {', '.join(SCHEMES)}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {self.encoding!r}; allowed: {', '.join(ENCODINGS)}")
        if not (self.zca_eps > 0 and np.isfinite(self.zca_eps)):
            raise ValueError(f"zca_eps must be a finite number > 0, got {self.zca_eps!r}")
        if not np.isfinite(self.threshold):
            raise ValueError(f"threshold must be finite, got {self.threshold!r}")
        if int(self.iterations) != self.iterations or self.iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {self.iterations!r}")
        if int(self.sample_stride) != self.sample_stride or self.sample_stride < 1:
            raise ValueError(f"sample_stride must be an integer >= 1, got {self.sample_stride!r}")
        if self.polarity and self.name not in ("zca-kmeans", "zca-random"):
            raise ValueError(
                f"polarity applies to zca-kmeans and zca-random, not {self.name!r}"
                + (" (its filters already come in ± pairs)" if self.name == "zca-pca" else "")
            )

    def filter_count(self, width: int) -> int:
        """Filters learned for ``width`` channels: ``width``, or ``width/2`` with :attr:`polarity`."""
        if not self.polarity:
            return width
        if width % 2:
            raise ValueError(f"polarity needs an even number of channels (c, −c), got {width}")
        return width // 2

    @property
    def rounds(self) -> int:
        """Statistics rounds the layer takes (``1 + iterations`` for ``zca-kmeans``, else 1)."""
        return 1 + int(self.iterations) if self.name == "zca-kmeans" else 1

    @property
    def needs_statistics(self) -> bool:
        """Whether a federated round is needed for this layer (``random`` needs none)."""
        return self.name != "random"

    def num_targets(self, width: int, num_classes: int, stage: int = 0) -> int:
        """Target columns ``m`` a client must send in ``B`` (at round ``stage`` of the layer)."""
        if self.name == "label-encoding":
            return width
        if self.name == "label-pca":
            return min(num_classes, width)
        if self.name == "zca-kmeans" and stage > 0:
            return self.filter_count(width)
        return 0

    def summary(self) -> str:
        """One line for logs: the name, and for ``zca-*`` the encoder (``α``, polarity split)."""
        if not self.name.startswith("zca-"):
            return self.name
        return f"{self.name} (α {self.threshold:g}" + (", polarity)" if self.polarity else ")")

    def describe(self) -> dict:
        """JSON-able; the ``zca-*`` options only for ``zca-*`` schemes (older ones stay unchanged)."""
        out: dict = {"name": self.name, "encoding": self.encoding}
        if self.name.startswith("zca-"):
            out.update(zca_eps=self.zca_eps, threshold=self.threshold)
            if self.polarity:  # only when set: older descriptions (and fingerprints) hold
                out.update(polarity=True)
        if self.name == "zca-kmeans":
            out.update(iterations=self.iterations, sample_stride=self.sample_stride)
        return out

    def targets(
        self, y: np.ndarray, num_classes: int, width: int, activation: str, seed: int
    ) -> np.ndarray | None:
        """Client half: per-sample targets ``t_n`` (N x m), or ``None`` when ``m = 0``."""
        if self.name == "label-encoding":
            m = encoding_matrix(num_classes, width, self.encoding, seed)
            return inverse_activation(one_hot(y, num_classes) @ m, activation)
        if self.name == "label-pca":
            return one_hot(y, num_classes)[:, : self.num_targets(width, num_classes)]
        return None

    def weights(
        self, stats: LayerStatistics | None, dim: int, width: int, reg: Regularization, seed: int
    ) -> np.ndarray:
        """Server half: the layer's ``W`` (D x C_out) from the summed statistics."""
        if self.name == "random":
            return random_filters(dim, width, seed)
        if stats is None:
            raise ValueError(f"scheme {self.name!r} needs the layer's statistics")
        if self.name == "label-encoding":
            return ridge_solve(stats.gram, stats.cross, reg)
        if self.name == "random-standardized":
            return standardized_random_filters(stats, width, seed)
        if self.name in ("zca-random", "zca-pca"):
            white = Whitening.from_statistics(stats, self.zca_eps)
            dim_in, count = white.zca.shape[0], self.filter_count(width)
            filters = (
                random_unit_filters(count, dim_in, seed)
                if self.name == "zca-random"
                else whitened_pca_filters(white, count, seed)
            )
            return white.design(encoder_filters(filters, self.polarity), self.threshold)
        if self.name == "zca-kmeans":
            raise ValueError("zca-kmeans is fitted over several rounds: use KMeansFit")
        if self.name == "pca":
            if width % 2:
                raise ValueError(f"pca needs an even number of channels (± pairs), got {width}")
            return pca_filters(stats, width // 2)
        label = ridge_solve(stats.gram, stats.cross, reg)
        rest = width - label.shape[1]
        pairs = min(rest // 2, dim - 1)
        parts = [label] + ([pca_filters(stats, pairs)] if pairs else [])
        if rest > 2 * pairs:  # an odd width, or more channels than PCA directions
            parts.append(standardized_random_filters(stats, rest - 2 * pairs, seed))
        return np.hstack(parts)
