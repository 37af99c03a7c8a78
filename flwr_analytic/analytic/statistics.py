"""Per-layer sufficient statistics of a least-squares layer and their transport form.

For a layer with design matrix ``A`` (one row per design row: an FC layer's input ``[h, 1]``, or a conv
layer's im2col patch ``[p, 1]`` at one output position) and target ``T``, a client holds

    G = AᵀA  (D x D, symmetric PSD),   B = AᵀT  (D x m),   n = number of samples,

with ``D`` = input width + 1 (the trailing 1 is the bias column, so ``G[-1, -1]`` is the number of
design rows). Statistics of disjoint data sets merge by summation: ``Σ_k G_k = AᵀA`` of the pooled
rows, which is why FedACnnL equals centralized training (Gu et al., arXiv 2502.06915; Zhuang et al.,
ACnnL, Information Sciences 2025). Everything is stored in float64.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

#: Keys of the packed (transport) form, as Flower record keys (kebab-case).
GRAM_KEY = "gram-triu"
CROSS_KEY = "cross"
COUNT_KEY = "count"


class StatisticsError(ValueError):
    """Statistics that cannot be summed or solved: wrong shape, non-finite, asymmetric, bad count."""


@dataclass
class LayerStatistics:
    """Sufficient statistics ``(G, B, n)`` of one layer on one data set.

    Attributes
    ----------
    gram : numpy.ndarray
        ``G = AᵀA``, float64 ``(D, D)``, symmetric positive semi-definite.
    cross : numpy.ndarray
        ``B = AᵀT``, float64 ``(D, m)``; ``m = 0`` when the layer needs no target (e.g. PCA filters).
    count : int
        Number of samples ``n`` that contributed (not design rows: a conv layer has several rows per
        sample; those are ``G[-1, -1]``).

    """

    gram: np.ndarray
    cross: np.ndarray
    count: int

    @classmethod
    def zeros(cls, dim: int, targets: int) -> LayerStatistics:
        """Empty statistics of a layer with design width ``dim`` and ``targets`` target columns."""
        return cls(np.zeros((dim, dim)), np.zeros((dim, targets)), 0)

    @property
    def dim(self) -> int:
        """Design width ``D`` (input features + 1 for the bias)."""
        return int(self.gram.shape[0])

    @property
    def targets(self) -> int:
        """Number of target columns ``m``."""
        return int(self.cross.shape[1])

    @property
    def rows(self) -> float:
        """Number of design rows, ``G[-1, -1] = 1ᵀ1``."""
        return float(self.gram[-1, -1])

    def __add__(self, other: LayerStatistics) -> LayerStatistics:
        if (other.dim, other.targets) != (self.dim, self.targets):
            raise StatisticsError(
                f"cannot add statistics of shape D={other.dim}, m={other.targets} to "
                f"D={self.dim}, m={self.targets}"
            )
        return LayerStatistics(
            self.gram + other.gram, self.cross + other.cross, self.count + other.count
        )

    def validate(
        self,
        dim: int | None = None,
        targets: int | None = None,
        *,
        symmetry_tol: float = 1e-10,
    ) -> LayerStatistics:
        """Check shapes, dtype, finiteness, symmetry and counts; return ``self`` or raise.

        Parameters
        ----------
        dim, targets : int, optional
            Expected ``D`` and ``m``.
        symmetry_tol : float
            Largest allowed ``max|G − Gᵀ| / max(1, max|G|)``.

        Raises
        ------
        StatisticsError
            Naming the first problem found.

        """
        g, b = self.gram, self.cross
        if (
            not isinstance(g, np.ndarray)
            or g.ndim != 2
            or g.shape[0] != g.shape[1]
            or g.shape[0] < 1
        ):
            raise StatisticsError(f"gram must be a square 2-D array, got shape {np.shape(g)}")
        if not isinstance(b, np.ndarray) or b.ndim != 2 or b.shape[0] != g.shape[0]:
            raise StatisticsError(f"cross must have shape ({g.shape[0]}, m), got {np.shape(b)}")
        if dim is not None and g.shape[0] != dim:
            raise StatisticsError(f"gram is {g.shape[0]}x{g.shape[0]}, expected D={dim}")
        if targets is not None and b.shape[1] != targets:
            raise StatisticsError(f"cross has {b.shape[1]} target columns, expected {targets}")
        for name, arr in (("gram", g), ("cross", b)):
            if arr.dtype != np.float64:
                raise StatisticsError(f"{name} must be float64, got {arr.dtype}")
            if not np.all(np.isfinite(arr)):
                raise StatisticsError(f"{name} has non-finite values (NaN or Inf)")
        scale = max(1.0, float(np.max(np.abs(g))))
        asym = float(np.max(np.abs(g - g.T))) / scale
        if asym > symmetry_tol:
            raise StatisticsError(f"gram is not symmetric (relative asymmetry {asym:.2e})")
        count = self.count
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
            raise StatisticsError(f"count must be a non-negative integer, got {count!r}")
        if np.any(np.diag(g) < -1e-12 * scale):
            raise StatisticsError("gram has a negative diagonal entry: not AᵀA of any data")
        rows = self.rows
        if count == 0 and rows != 0:
            raise StatisticsError(f"count is 0 but the gram holds {rows:g} design rows")
        if count > 0 and (rows < count or rows != round(rows) or round(rows) % count != 0):
            raise StatisticsError(
                f"count {count} is inconsistent with {rows:g} design rows (G[-1,-1] must be a "
                "whole multiple of the sample count)"
            )
        return self

    def pack(self) -> dict[str, np.ndarray]:
        """Transport form: the upper triangle of ``G`` (row-major), ``B`` and ``n``.

        Sends ``D(D+1)/2 + D·m + 1`` numbers instead of ``D² + D·m + 1``.
        """
        iu = np.triu_indices(self.dim)
        return {
            GRAM_KEY: np.ascontiguousarray(self.gram[iu]),
            CROSS_KEY: np.ascontiguousarray(self.cross),
            COUNT_KEY: np.asarray([self.count], dtype=np.int64),
        }

    @classmethod
    def unpack(cls, packed: dict[str, np.ndarray]) -> LayerStatistics:
        """Inverse of :meth:`pack`; raises :class:`StatisticsError` on a malformed record."""
        missing = {GRAM_KEY, CROSS_KEY, COUNT_KEY} - set(packed)
        if missing:
            raise StatisticsError(f"packed statistics miss {sorted(missing)}")
        tri = np.asarray(packed[GRAM_KEY])
        if tri.ndim != 1:
            raise StatisticsError(f"{GRAM_KEY} must be 1-D, got shape {tri.shape}")
        dim = int(round((np.sqrt(8 * tri.size + 1) - 1) / 2))
        if dim * (dim + 1) // 2 != tri.size or dim < 1:
            raise StatisticsError(f"{GRAM_KEY} has {tri.size} entries: not a triangle D(D+1)/2")
        if tri.dtype != np.float64:
            raise StatisticsError(f"{GRAM_KEY} must be float64, got {tri.dtype}")
        gram = np.zeros((dim, dim))
        iu = np.triu_indices(dim)
        gram[iu] = tri
        gram.T[iu] = tri
        count = np.asarray(packed[COUNT_KEY])
        if count.size != 1 or not np.issubdtype(count.dtype, np.integer):
            raise StatisticsError(f"{COUNT_KEY} must be one integer, got {count!r}")
        cross = np.asarray(packed[CROSS_KEY])
        return cls(gram, cross, int(count.reshape(-1)[0]))


def merge(statistics: Iterable[LayerStatistics]) -> LayerStatistics:
    """Sum statistics in the order given (sort them first for bit-reproducible results)."""
    total: LayerStatistics | None = None
    for stats in statistics:
        total = stats if total is None else total + stats
    if total is None:
        raise StatisticsError("no statistics to merge")
    return LayerStatistics(total.gram.copy(), total.cross.copy(), total.count)
