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

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

#: Keys of the packed (transport) form, as Flower record keys (kebab-case).
GRAM_KEY = "gram-triu"
CROSS_KEY = "cross"
COUNT_KEY = "count"
#: Alternative to :data:`GRAM_KEY`: the full ``D x D`` matrix (accepted, checked for symmetry).
FULL_GRAM_KEY = "gram"

#: Default relative tolerance of the Cauchy–Schwarz checks ``|G_ij| <= sqrt(G_ii G_jj)(1 + tol)``
#: (float32 client products carry relative errors ~1e-5; a forged entry is off by far more).
CAUCHY_SCHWARZ_TOL = 1e-3
#: Default shift of the PSD check: the Cholesky factorization of ``C + τI`` must succeed, where
#: ``C = S⁻¹GS⁻¹`` (``S = diag(sqrt(G_ii))``) has a unit diagonal, i.e. ``λ_min(C) > −τ``.
PSD_SHIFT = 1e-2
#: The Cholesky PSD check runs for ``D`` up to this size (``D³/3`` flops; above it only the
#: ``O(D²)`` checks run).
PSD_CHECK_MAX_DIM = 2048
#: Elements per block of the ``O(D²)`` checks (bounds their temporary memory to ~32 MB).
_BLOCK_ELEMENTS = 1 << 22


class StatisticsError(ValueError):
    """Statistics that cannot be summed or solved: wrong shape, non-finite, asymmetric, bad count."""


@functools.lru_cache(maxsize=4)
def upper_mask(dim: int) -> np.ndarray:
    """Read-only boolean ``(D, D)`` mask of the upper triangle (diagonal included).

    Boolean-mask indexing visits ``G`` in row-major order, so ``G[mask]`` is the same packed vector
    as ``G[np.triu_indices(D)]``, several times faster and without two ``D(D+1)/2`` int64 index
    arrays (537 MB for ``D = 8193``); cached per ``D``.
    """
    mask = np.triu(np.ones((dim, dim), dtype=bool))
    mask.setflags(write=False)
    return mask


def _check_cauchy_schwarz(
    values: np.ndarray,
    bound: np.ndarray,
    margins: tuple[float, float],
    claim: str,
    names: tuple[str, str],
    offset: int = 0,
) -> None:
    """Raise :class:`StatisticsError` where ``|values|`` exceeds its Cauchy–Schwarz ``bound``.

    ``margins = (tol, slack)``: an entry fails when ``|v| > bound (1 + tol) + slack``. The message
    starts with ``claim`` and names the worst entry and the product under its root with the
    templates ``names`` (``{i}``: row + ``offset``, ``{j}``: column), e.g. ``"G[{i},{j}]"``.
    """
    tol, slack = margins
    excess = np.abs(values) - bound * (1 + tol) - slack
    if np.any(excess > 0):
        i, j = np.unravel_index(int(np.argmax(excess)), excess.shape)
        entry, product = (name.format(i=offset + int(i), j=int(j)) for name in names)
        raise StatisticsError(
            f"{claim}: |{entry}| = {abs(values[i, j]):.6g} exceeds sqrt({product}) = "
            f"{bound[i, j]:.6g} (Cauchy–Schwarz)"
        )


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
        rows_per_sample: int | None = None,
        label_classes: int | None = None,
        check_psd: bool = False,
        cs_tol: float = CAUCHY_SCHWARZ_TOL,
        psd_shift: float = PSD_SHIFT,
        psd_max_dim: int = PSD_CHECK_MAX_DIM,
        noisy: bool = False,
    ) -> LayerStatistics:
        """Check that ``(G, B, n)`` can be the statistics of some data; return ``self`` or raise.

        Always checked: shapes, dtype (float64), finiteness, symmetry of ``G``, a non-negative
        integer count, a non-negative diagonal, and that ``G[-1, -1] = 1ᵀ1`` (the bias column of
        ones, so the number of design rows) is a whole multiple ``>= n`` of the count.

        ``noisy=True`` is for statistics released with additive noise (differential privacy:
        ``G̃ = G + E``, ``B̃ = B + E'`` with Gaussian ``E`` on every entry but ``G[-1, -1]``): it skips
        the non-negative diagonal check, which noise breaks; ``G[-1, -1]`` is released exactly and
        still checked against the count.

        Optional checks, for statistics received from an untrusted client:

        - ``rows_per_sample``: ``G[-1, -1] = n · L`` exactly (``L = 1`` for an FC layer, the number
          of output positions of a conv layer).
        - ``label_classes``: the targets are the first ``m`` columns of a one-hot encoding over
          ``label_classes`` classes (output layer, label channels of ``label-pca``), so the bias row
          ``B[-1] = 1ᵀT`` is the label histogram times ``L``: whole, ``>= 0``, summing to ``G[-1,-1]``
          (``<=`` when ``m < label_classes``); and ``|B_ic| <= sqrt(G_ii · B[-1, c])``
          (Cauchy–Schwarz over the rows of class ``c``) when ``check_psd``.
        - ``check_psd``: necessary conditions for ``G = AᵀA``: ``|G_ij| <= sqrt(G_ii G_jj)(1 + tol)``
          (every 2x2 principal minor ``>= 0``) and, for ``D <= psd_max_dim``, a Cholesky factorization
          of ``C + τI`` with ``C = S⁻¹GS⁻¹``, ``S = diag(sqrt(G_ii))`` (unit diagonal), which exists
          iff ``λ_min(C) > −τ``: a clearly negative eigenvalue is rejected while the rounding of
          honest float32 products (``|ΔC_ij| ≲ 1e-5``) is not.

        Parameters
        ----------
        dim, targets : int, optional
            Expected ``D`` and ``m``.
        symmetry_tol : float
            Largest allowed ``max|G − Gᵀ| / max(1, max|G|)``; ``0`` demands exact symmetry.
        rows_per_sample : int, optional
            Design rows per sample ``L``.
        label_classes : int, optional
            Number of classes when ``B``'s targets are one-hot labels.
        check_psd : bool
            Run the positive-semi-definiteness checks.
        cs_tol, psd_shift, psd_max_dim : float, float, int
            Tolerances of the PSD checks (see :data:`CAUCHY_SCHWARZ_TOL`, :data:`PSD_SHIFT`,
            :data:`PSD_CHECK_MAX_DIM`).
        noisy : bool
            Noised statistics: no sign check of the diagonal; ``label_classes`` and ``check_psd``
            (which noise breaks too) are then not allowed.

        Raises
        ------
        StatisticsError
            Naming the first problem found.
        ValueError
            ``noisy`` together with ``label_classes`` or ``check_psd``.

        """
        if noisy and (check_psd or label_classes is not None):
            raise ValueError("noisy statistics cannot pass the label-histogram or PSD checks")
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
        scale = max(1.0, float(g.max()), -float(g.min()))
        step = max(1, _BLOCK_ELEMENTS // g.shape[0])  # row blocks: no D x D temporaries
        asym_abs = max(
            float(np.max(np.abs(g[i : i + step] - g[:, i : i + step].T)))
            for i in range(0, g.shape[0], step)
        )
        asym = asym_abs / scale
        if asym > symmetry_tol or (symmetry_tol <= 0 and asym_abs > 0):
            raise StatisticsError(f"gram is not symmetric (relative asymmetry {asym:.2e})")
        count = self.count
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
            raise StatisticsError(f"count must be a non-negative integer, got {count!r}")
        diag = np.diag(g)
        if not noisy and np.any(diag < -1e-12 * scale):
            raise StatisticsError("gram has a negative diagonal entry: not AᵀA of any data")
        rows = self.rows
        if count == 0 and rows != 0:
            raise StatisticsError(f"count is 0 but the gram holds {rows:g} design rows")
        if count > 0 and (rows < count or rows != round(rows) or round(rows) % count != 0):
            raise StatisticsError(
                f"count {count} is inconsistent with {rows:g} design rows (G[-1,-1] must be a "
                "whole multiple of the sample count)"
            )
        if rows_per_sample is not None and rows != count * rows_per_sample:
            raise StatisticsError(
                f"bias entry G[-1,-1] = {rows:g} design rows, expected count {count} x "
                f"{rows_per_sample} rows per sample = {count * rows_per_sample}"
            )
        if label_classes is not None:
            self._check_label_row(label_classes, rows_per_sample)
        if check_psd:
            self._check_psd(cs_tol, psd_shift, psd_max_dim, label_classes is not None)
        return self

    def _check_label_row(self, label_classes: int, rows_per_sample: int | None) -> None:
        """``B[-1]`` of one-hot targets: whole per-class row counts summing to ``G[-1, -1]``."""
        hist, rows = self.cross[-1], self.rows
        if self.targets > label_classes:
            raise StatisticsError(
                f"cross has {self.targets} label columns but there are {label_classes} classes"
            )
        step = 1 if rows_per_sample is None else rows_per_sample
        if np.any(hist < 0) or np.any(hist != np.round(hist)) or np.any(np.round(hist) % step):
            raise StatisticsError(
                "bias row of cross (the label histogram B[-1]) must hold whole, non-negative "
                f"row counts (multiples of {step}), got {hist.tolist()}"
            )
        total = float(hist.sum())
        if total > rows or (self.targets == label_classes and total != rows):
            raise StatisticsError(
                f"label histogram B[-1] sums to {total:g} but G[-1,-1] holds {rows:g} design rows"
            )

    def _check_psd(self, tol: float, shift: float, max_dim: int, labels: bool) -> None:
        """Necessary conditions for ``G = AᵀA`` (and ``B = AᵀY`` with one-hot ``Y``)."""
        g = self.gram
        root = np.sqrt(np.maximum(np.diag(g), 0.0))
        slack = 1e-12 * max(1.0, float(g.max()), -float(g.min()))
        step = max(1, _BLOCK_ELEMENTS // max(1, self.dim))  # rows per block: O(block) memory
        for start in range(0, self.dim, step):
            rows = slice(start, min(start + step, self.dim))
            _check_cauchy_schwarz(
                g[rows],
                np.outer(root[rows], root),
                (tol, slack),
                "gram is not positive semi-definite",
                ("G[{i},{j}]", "G[{i},{i}]·G[{j},{j}]"),
                start,
            )
        if labels:
            _check_cauchy_schwarz(
                self.cross,
                np.outer(root, np.sqrt(np.maximum(self.cross[-1], 0.0))),
                (tol, slack),
                "cross is not AᵀY of one-hot labels",
                ("B[{i},{j}]", "G[{i},{i}]·B[-1,{j}]"),
            )
        if self.dim > max_dim:
            return
        inv = np.divide(1.0, root, out=np.zeros_like(root), where=root > 0)
        corr = g * inv[:, None]
        corr *= inv[None, :]
        corr[np.diag_indices_from(corr)] += shift
        try:
            np.linalg.cholesky(corr)
        except np.linalg.LinAlgError:
            lam = float(np.linalg.eigvalsh(corr)[0]) - shift
            raise StatisticsError(
                "gram is not positive semi-definite: its unit-diagonal scaling has eigenvalue "
                f"{lam:.3g} < -{shift:g}"
            ) from None

    def pack(self) -> dict[str, np.ndarray]:
        """Transport form: the upper triangle of ``G`` (row-major), ``B`` and ``n``.

        Sends ``D(D+1)/2 + D·m + 1`` numbers instead of ``D² + D·m + 1``.
        """
        return {
            GRAM_KEY: np.ascontiguousarray(self.gram[upper_mask(self.dim)]),
            CROSS_KEY: np.ascontiguousarray(self.cross),
            COUNT_KEY: np.asarray([self.count], dtype=np.int64),
        }

    @classmethod
    def unpack(
        cls,
        packed: Mapping[str, np.ndarray],
        *,
        dim: int | None = None,
        targets: int | None = None,
        strict: bool = False,
    ) -> LayerStatistics:
        """Inverse of :meth:`pack`; raises :class:`StatisticsError` on a malformed record.

        ``G`` comes from :data:`GRAM_KEY` (the packed upper triangle) or, as an alternative,
        :data:`FULL_GRAM_KEY` (the full matrix, kept as sent so :meth:`validate` checks its
        symmetry); exactly one of them must be present.

        Parameters
        ----------
        packed : mapping
            The transport record.
        dim, targets : int, optional
            Expected ``D`` and ``m``, checked from the arrays' sizes *before* a ``D x D`` matrix is
            allocated (a hostile record cannot make the server allocate a huge matrix).
        strict : bool
            Reject keys other than the known ones.

        """
        keys = set(packed)
        grams = sorted(keys & {GRAM_KEY, FULL_GRAM_KEY})
        missing = sorted({CROSS_KEY, COUNT_KEY} - keys) + ([] if grams else [GRAM_KEY])
        if missing:
            raise StatisticsError(f"packed statistics miss {missing}")
        if len(grams) > 1:
            raise StatisticsError(f"packed statistics hold both {grams}: send exactly one")
        extra = sorted(keys - {GRAM_KEY, FULL_GRAM_KEY, CROSS_KEY, COUNT_KEY})
        if strict and extra:
            raise StatisticsError(
                f"packed statistics hold unknown keys {extra}; allowed: "
                f"{GRAM_KEY} (or {FULL_GRAM_KEY}), {CROSS_KEY}, {COUNT_KEY}"
            )
        arrays = {k: packed[k] for k in (*grams, CROSS_KEY, COUNT_KEY)}
        for key, value in arrays.items():
            if not isinstance(value, np.ndarray):
                raise StatisticsError(f"{key} must be a numpy array, got {type(value).__name__}")
        cross, count = arrays[CROSS_KEY], arrays[COUNT_KEY]
        if cross.ndim != 2:
            raise StatisticsError(f"{CROSS_KEY} must be 2-D (D, m), got shape {cross.shape}")
        wrong_rows = dim is not None and cross.shape[0] != dim
        if wrong_rows or (targets is not None and cross.shape[1] != targets):
            raise StatisticsError(
                f"{CROSS_KEY} has shape {cross.shape}, expected ({dim}, {targets}) "
                "(D x target columns)"
            )
        if grams[0] == FULL_GRAM_KEY:
            gram = arrays[FULL_GRAM_KEY]
            if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 1:
                raise StatisticsError(f"{FULL_GRAM_KEY} must be a square matrix, got {gram.shape}")
            if dim is not None and gram.shape[0] != dim:
                raise StatisticsError(f"{FULL_GRAM_KEY} is {gram.shape}, expected D={dim}")
            if gram.dtype != np.float64:
                raise StatisticsError(f"{FULL_GRAM_KEY} must be float64, got {gram.dtype}")
            gram = np.array(gram, dtype=np.float64)
        else:
            tri = arrays[GRAM_KEY]
            if tri.ndim != 1:
                raise StatisticsError(f"{GRAM_KEY} must be 1-D, got shape {tri.shape}")
            if dim is not None and tri.size != dim * (dim + 1) // 2:
                raise StatisticsError(
                    f"{GRAM_KEY} has {tri.size} entries, expected D(D+1)/2 = {dim * (dim + 1) // 2}"
                    f" for D={dim}"
                )
            size = int(round((np.sqrt(8 * tri.size + 1) - 1) / 2))
            if size * (size + 1) // 2 != tri.size or size < 1:
                raise StatisticsError(f"{GRAM_KEY} has {tri.size} entries: not a triangle D(D+1)/2")
            if tri.dtype != np.float64:
                raise StatisticsError(f"{GRAM_KEY} must be float64, got {tri.dtype}")
            gram = np.zeros((size, size))
            iu = np.triu_indices(size)
            gram[iu] = tri
            gram.T[iu] = tri
        if count.size != 1 or count.ndim > 1 or not np.issubdtype(count.dtype, np.integer):
            raise StatisticsError(
                f"{COUNT_KEY} must be one integer, got dtype {count.dtype}, shape {count.shape}"
            )
        return cls(gram, cross, int(count.reshape(-1)[0]))


def merge(statistics: Iterable[LayerStatistics]) -> LayerStatistics:
    """Sum statistics in the order given (sort them first for bit-reproducible results)."""
    total: LayerStatistics | None = None
    for stats in statistics:
        total = stats if total is None else total + stats
    if total is None:
        raise StatisticsError("no statistics to merge")
    return LayerStatistics(total.gram.copy(), total.cross.copy(), total.count)
