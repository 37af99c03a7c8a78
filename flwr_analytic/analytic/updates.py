"""Adding and removing clients after training, from the output layer's summed statistics.

FedACnnL (Gu et al., arXiv 2502.06915) solves the output layer in closed form from sums over clients,

    W = (G + γI)⁻¹ B,    G = Σ_k G_k,   B = Σ_k B_k,   n = Σ_k n_k,

so a client set can change after training without any new round: a joining client ``j`` sends
``(G_j, B_j, n_j)`` of the output layer (computed with the trained hidden layers) and the server solves
again from ``(G + G_j, B + B_j, n + n_j)``; a leaving client ``k`` ("unlearning") resends the statistics
it uploaded and the server solves from ``(G − G_k, B − B_k, n − n_k)``. With the ``relative`` ridge
rule, ``γ = ρ · trace(G)/D`` is recomputed from the updated ``G``, as in a fresh run.

What is exact
-------------
* **Output layer given the hidden layers: always exact.** The updated ``W`` equals the output layer a run
  with the new client set would solve *with the same hidden layers* (up to float64 rounding: ``G − G_k``
  is not bitwise ``Σ_{i≠k} G_i``).
* **The whole model** only when the hidden layers do not depend on the clients' data: a ``linear`` model
  (no hidden layer) or hidden layers with the ``random`` scheme (filters drawn from the seed). Then
  removing client ``k`` gives the model trained without ``k`` and adding ``j`` the model trained with it.
* **Data-dependent hidden layers** (``label-pca``, ``pca``, ``label-encoding``, ``random-standardized``):
  the hidden layers were fitted from every original client's statistics and keep the influence of a
  removed client (and lack that of a new one); only the output layer is updated. Exact unlearning of
  such a model needs a new run of every layer from the first data-dependent one.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from flwr_analytic.analytic.network import AnalyticNetwork
from flwr_analytic.analytic.solvers import ridge_solve
from flwr_analytic.analytic.statistics import LayerStatistics, StatisticsError, merge

#: Default tolerance of the PSD check after a subtraction, relative to ``max|G|``.
PSD_TOL = 1e-9


def _checked(total: LayerStatistics, clients: Iterable[LayerStatistics]) -> list[LayerStatistics]:
    out = []
    for i, stats in enumerate(clients):
        try:
            stats.validate(total.dim, total.targets)
        except StatisticsError as exc:
            raise StatisticsError(f"client statistics #{i}: {exc}") from exc
        out.append(stats)
    if not out:
        raise StatisticsError("no client statistics given")
    return out


def add_client_statistics(
    total: LayerStatistics, clients: Iterable[LayerStatistics]
) -> LayerStatistics:
    """``(G + Σ_j G_j, B + Σ_j B_j, n + Σ_j n_j)``: the aggregate with the clients ``j`` joined.

    Parameters
    ----------
    total : LayerStatistics
        The server's summed statistics of a layer.
    clients : iterable of LayerStatistics
        The joining clients' statistics of the same layer (validated: shape, dtype, finiteness,
        symmetry, count).

    Returns
    -------
    LayerStatistics
        A new aggregate (``total`` is not modified).

    Raises
    ------
    StatisticsError
        When a client's statistics are malformed or of another shape.

    """
    return merge([total, *_checked(total, clients)])


def remove_client_statistics(
    total: LayerStatistics, clients: Iterable[LayerStatistics], *, psd_tol: float = PSD_TOL
) -> LayerStatistics:
    """``(G − Σ_k G_k, B − Σ_k B_k, n − Σ_k n_k)``: the aggregate without the clients ``k``.

    The result is checked: the sample count and the design rows ``G[-1, -1]`` must stay ``>= 0`` and
    ``G − Σ G_k`` must stay positive semi-definite, ``λ_min >= −psd_tol · max(1, max|G|)`` (a Gram of
    real data is PSD; a negative eigenvalue beyond rounding means the statistics were never part of
    ``total``). Tiny negative eigenvalues within the tolerance are rounding and are kept as they are.

    Parameters
    ----------
    total : LayerStatistics
        The server's summed statistics of a layer.
    clients : iterable of LayerStatistics
        The leaving clients' statistics, exactly as they were uploaded.
    psd_tol : float (default: 1e-9)
        Relative tolerance of the PSD check.

    Raises
    ------
    StatisticsError
        When a client's statistics are malformed, or the subtraction leaves a negative count, a
        negative number of design rows or an indefinite Gram (naming which).

    """
    removed = merge(_checked(total, clients))
    count = int(total.count) - int(removed.count)
    if count < 0:
        raise StatisticsError(
            f"removing {removed.count} samples from an aggregate of {total.count}: the count would "
            "be negative (these statistics are not part of the aggregate)"
        )
    gram = total.gram - removed.gram
    cross = total.cross - removed.cross
    gram = (gram + gram.T) / 2.0
    scale = max(1.0, float(np.max(np.abs(total.gram))))
    if gram[-1, -1] < -psd_tol * scale:
        raise StatisticsError(f"removal leaves {gram[-1, -1]:g} design rows (< 0)")
    lam_min = float(np.linalg.eigvalsh(gram)[0]) if gram.size else 0.0
    if lam_min < -psd_tol * scale:
        raise StatisticsError(
            f"removal leaves an indefinite Gram (smallest eigenvalue {lam_min:.3e} < "
            f"-{psd_tol:g}·{scale:.3e}): these statistics are not part of the aggregate"
        )
    return LayerStatistics(gram, cross, count)


def solve_output_layer(net: AnalyticNetwork, total: LayerStatistics) -> np.ndarray:
    """Re-solve the (already solved) output layer of ``net`` from ``total`` and install it.

    ``W = (G + γI)⁻¹ B`` with ``net.output_reg`` (Cholesky), exactly as :meth:`AnalyticNetwork.solve`
    does for the output layer; hidden layers are left unchanged.

    Returns
    -------
    numpy.ndarray
        The new output layer ``W`` (D x c).

    """
    layer = net.num_layers - 1
    if net.solved_layers < layer:
        raise RuntimeError(
            f"the hidden layers must be solved first ({net.solved_layers} of {layer} are)"
        )
    if total.count <= 0:
        raise StatisticsError("no sample left to solve the output layer from")
    total.validate(net.design_dim(layer), net.num_targets(layer))
    w = ridge_solve(total.gram, total.cross, net.output_reg)
    net.set_layer(layer, w)
    return w


__all__ = ["PSD_TOL", "add_client_statistics", "remove_client_statistics", "solve_output_layer"]
