"""Design matrices of FC and conv layers, accumulated batch by batch into :class:`LayerStatistics`.

A layer's design matrix has one row per (sample, output position): an FC layer has one row ``[h, 1]``
per sample; a conv layer with kernel ``k`` has one im2col patch row ``[p, 1]`` (``p`` of length
``C_in·k²``, as :func:`torch.nn.functional.unfold` gives) per output position. The whole matrix is never
held: each batch's rows are folded into ``G = AᵀA`` with a symmetric rank-k update (BLAS ``syrk``,
half the flops of a general ``AᵀA``; float32 batches use torch's GEMM) and into ``B = AᵀT``.
Targets are per *sample* and shared by all
of a sample's positions (the paper's pseudo-labels are repeated at every spatial position), so

    B = Σ_n (Σ_pos a_{n,pos}) t_nᵀ,

one small product per batch instead of one per row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.linalg.blas import dsyrk

from flwr_analytic.analytic.statistics import LayerStatistics, StatisticsError
from flwr_analytic.models.architectures import ConvGeometry

#: float32 design rows are multiplied in groups of at least this many (wide layers, small batches).
FLUSH_ROWS = 2048
#: ``result`` mirrors the upper triangle of ``PᵀP`` in column blocks of this width (no D x D copies).
MIRROR_BLOCK = 512


class StatisticsAccumulator:
    """Streams batches of design rows into float64 ``G``, ``B`` and ``n``.

    Parameters
    ----------
    dim : int
        Design width ``D`` (input features + 1).
    targets : int
        Target columns ``m`` (0 for layers that need only ``G``).
    compute_dtype : {"float64", "float32"}
        Precision of each batch's product. ``float64`` is exact to rounding (use it when the
        federated result must equal the centralized one to 1e-9); ``float32`` is about twice as fast
        on CPUs, adds each batch product into the float64 sum, and has a relative Gram error ~1e-7.

    """

    def __init__(self, dim: int, targets: int, compute_dtype: str = "float64") -> None:
        if compute_dtype not in ("float64", "float32"):
            raise ValueError(f"compute_dtype must be 'float64' or 'float32', got {compute_dtype!r}")
        self.dim = dim
        self.targets = targets
        self.compute_dtype = compute_dtype
        p = dim - 1
        # Upper triangle of PᵀP, Fortran order so syrk updates it in place.
        self._ptp = np.zeros((p, p), order="F")
        self._psum = np.zeros(p)
        self._rows = 0
        self._cross = np.zeros((dim, targets))
        self._count = 0
        self._pending: list[torch.Tensor] = []  # float32 rows not yet in the product
        self._pending_rows = 0

    def _flush(self) -> None:
        """Fold the pending float32 rows into ``G`` with one GEMM (its product added in float64)."""
        if self._pending:
            rows = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._ptp += (rows.T @ rows).numpy()
            self._pending, self._pending_rows = [], 0

    def add_patches(self, patches: torch.Tensor, targets: np.ndarray | torch.Tensor | None) -> None:
        """Add a batch of design rows grouped by sample.

        Parameters
        ----------
        patches : torch.Tensor
            ``(N, L, D − 1)``: sample ``n`` contributes the ``L`` design rows ``patches[n, j]`` (the
            bias entry 1 is implicit). FC layers have ``L = 1``; see :func:`conv_rows` for conv layers.
        targets : array-like or None
            ``(N, m)`` per-sample targets, repeated over the ``L`` rows; ``None`` when ``m = 0``.

        """
        n, positions, _ = patches.shape
        sample_sums = self._add_gram(patches)
        if self.targets:
            if targets is None:
                raise StatisticsError(f"layer needs {self.targets} target columns, got none")
            t = np.asarray(targets, dtype=np.float64)
            if t.shape != (n, self.targets):
                raise StatisticsError(
                    f"targets have shape {t.shape}, expected ({n}, {self.targets})"
                )
            self._cross[:-1] += sample_sums.T @ t
            self._cross[-1] += positions * t.sum(axis=0)

    def _add_gram(self, patches: torch.Tensor) -> np.ndarray:
        """Fold ``(N, L, D − 1)`` rows into ``G`` and ``n``; returns the per-sample row sums (N, p)."""
        n, positions, p = patches.shape
        if p != self.dim - 1:
            raise StatisticsError(f"patches have {p} features, layer expects {self.dim - 1}")
        dtype = torch.float64 if self.compute_dtype == "float64" else torch.float32
        tensor = patches.to(dtype).reshape(n * positions, p).contiguous()
        rows = tensor.numpy()
        # rows.T is Fortran-ordered (p, R): syrk computes (rows.T)(rows.T)ᵀ = rowsᵀrows, no copy.
        if self.compute_dtype == "float64":
            dsyrk(1.0, rows.T, beta=1.0, c=self._ptp, trans=0, lower=0, overwrite_c=1)
        else:
            # torch's float32 GEMM: for tall, narrow batches (conv patches, R ≫ p) OpenBLAS's
            # ssyrk measured 0.93 s against 0.05 s here (36k x 108 rows, 2 cores). Short batches
            # of wide rows wait for FLUSH_ROWS rows: one D x D product and float64 sum per flush.
            self._pending.append(tensor)
            self._pending_rows += tensor.shape[0]
            if self._pending_rows >= FLUSH_ROWS:
                self._flush()
        sample_sums = rows.reshape(n, positions, p).sum(axis=1, dtype=np.float64)  # (N, p)
        self._psum += sample_sums.sum(axis=0)
        self._rows += n * positions
        self._count += n
        return sample_sums

    def add_assigned(self, patches: torch.Tensor, assigned: torch.Tensor) -> None:
        """Add design rows ``(N, L, D − 1)``, each row with its own one-hot target.

        Row ``r`` (of the ``N·L``, sample-major) has target ``e_{assigned[r]}``: ``B[:-1, k]`` gets
        the sum of the rows assigned to ``k`` and ``B[-1, k]`` their count (the k-means
        statistics of :mod:`flwr_analytic.analytic.whitening`); ``G`` and ``n`` as usual.
        """
        n, positions, p = patches.shape
        self._add_gram(patches)
        rows = patches.reshape(n * positions, p).double()
        sums = torch.zeros(self.targets, p, dtype=torch.float64)
        sums.index_add_(0, assigned.long(), rows)
        self._cross[:-1] += sums.numpy().T
        self._cross[-1] += np.bincount(assigned.numpy(), minlength=self.targets)

    def add_rows(self, rows: torch.Tensor, targets: np.ndarray | torch.Tensor | None) -> None:
        """Add FC design rows ``(N, D − 1)`` (one row per sample) and targets ``(N, m)``."""
        self.add_patches(rows.reshape(rows.shape[0], 1, -1), targets)

    def result(self) -> LayerStatistics:
        """The accumulated statistics (a copy; accumulation may continue)."""
        self._flush()
        p = self.dim - 1
        gram = np.empty((self.dim, self.dim))
        for j in range(0, p, MIRROR_BLOCK):  # G := upper triangle of PᵀP, mirrored, by row blocks
            e = min(j + MIRROR_BLOCK, p)
            block, right = self._ptp[j:e, j:e], self._ptp[j:e, e:]
            gram[j:e, j:e] = np.triu(block) + np.triu(block, 1).T
            gram[j:e, e:p] = right
            gram[e:p, j:e] = right.T
        gram[:p, -1] = self._psum
        gram[-1, :p] = self._psum
        gram[-1, -1] = self._rows
        return LayerStatistics(gram, self._cross.copy(), self._count)


def contrast_normalize(patches: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-row contrast normalization ``p ← (p − p̄)/√(var(p) + ε)`` over the last axis.

    The design rows of a conv layer with ``contrast`` set (the same map as
    :class:`~flwr_analytic.models.ContrastConv2d`; Coates, Lee, Ng, AISTATS 2011).
    """
    centred = patches - patches.mean(-1, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)


def grid_positions(patches: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """The rows of ``patches`` (N, H·W, p) at positions ``(i, j)`` with ``i, j ≡ 0 (mod stride)``.

    A data-independent subsample (the same on every client), so statistics over it stay a sum over
    samples and federated equals centralized.
    """
    keep = torch.zeros(height, width, dtype=torch.bool)
    keep[::stride, ::stride] = True
    return patches[:, keep.reshape(-1), :]


def conv_rows(x: torch.Tensor, kernel_size: int | ConvGeometry, padding: int = 0) -> torch.Tensor:
    """im2col of a batch in one copy: ``(N, C, H, W)`` -> ``(N, L, C·kh·kw)``.

    Row ``[n, (i, j)]`` is the patch under output position ``(i, j)``, flattened channel-major like
    ``Conv2d.weight`` and :func:`torch.nn.functional.unfold` (which this equals up to a transpose).
    ``kernel_size`` and ``padding`` give a square stride-1 kernel; a
    :class:`~flwr_analytic.models.ConvGeometry` gives any kernel, stride, padding and dilation:
    patch ``(i, j)`` reads rows ``s_h·i + d_h·a`` and columns ``s_w·j + d_w·b`` of the padded input.
    """
    if isinstance(kernel_size, ConvGeometry):
        geo = kernel_size
    else:
        geo = ConvGeometry.of(x.shape[1], kernel_size, 1, padding)
    (kh, kw), (st_h, st_w), (ph, pw), (dh, dw) = geo.kernel, geo.stride, geo.padding, geo.dilation
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    n, c, h, w = x.shape
    ho, wo = (h - dh * (kh - 1) - 1) // st_h + 1, (w - dw * (kw - 1) - 1) // st_w + 1
    sn, sc, sh, sw = x.stride()
    view = x.as_strided(
        (n, ho, wo, c, kh, kw), (sn, sh * st_h, sw * st_w, sc, sh * dh, sw * dw), x.storage_offset()
    )
    return view.reshape(n, ho * wo, c * kh * kw)


def weight_to_conv(
    w: np.ndarray, in_channels: int, kernel_size: int | tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Map a solved design-space matrix ``W`` (D x C_out) to ``Conv2d`` weight and bias.

    ``weight = W[:-1].T.reshape(C_out, C_in, kh, kw)``, ``bias = W[-1]``.
    """
    c_out = w.shape[1]
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    return w[:-1].T.reshape(c_out, in_channels, kh, kw), w[-1].copy()


def conv_to_weight(weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Inverse of :func:`weight_to_conv`: stack ``Conv2d`` weight and bias into ``W`` (D x C_out)."""
    c_out = weight.shape[0]
    return np.vstack([weight.reshape(c_out, -1).T, bias[None, :]])


def without_bias(stats: LayerStatistics) -> LayerStatistics:
    """Statistics of a bias-free layer: the bias border of ``G`` zeroed (the count stays).

    ``G`` becomes block diagonal, so the ridge solution's weight rows are the bias-free least
    squares ``(G_xx + γI)⁻¹ B_x`` and PCA reads uncentred moments; the bias row is then set to 0.
    """
    gram = stats.gram.copy()
    gram[:-1, -1] = 0.0
    gram[-1, :-1] = 0.0
    return LayerStatistics(gram, stats.cross, stats.count)


def design_to_params(w: np.ndarray, geometry: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(weight, bias)`` of a ``Conv2d`` (``geometry`` given) or ``Linear`` from ``W`` (D x out)."""
    if geometry is not None:
        return weight_to_conv(w, geometry.in_channels, geometry.kernel)
    return w[:-1].T, w[-1]


def params_to_design(weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Inverse of :func:`design_to_params` (a missing bias is a zero row)."""
    bias = np.zeros(weight.shape[0]) if bias is None else bias
    if weight.ndim == 4:
        return conv_to_weight(weight, bias)
    return np.vstack([weight.T, bias[None, :]])
