"""Training loops over an :class:`AnalyticNetwork`: centralized, federated (simulated), personalized.

FedACnnL (Gu et al., arXiv 2502.06915): for each layer ``l`` in order, every client ``k`` computes
``(G_k, B_k, n_k)`` with the shared layers ``< l``; the server sums them in a fixed order and solves.
pFedACnnL: client ``k`` then solves ``W_{k,l} = (G_k + λI)⁻¹(B_k + λW_l)`` from the statistics it
already has: no extra communication. These loops have no Flower in them; the Flower strategy and
client app run the same steps over the network. A client may choose its own output-layer λ by
cross-validation on its own data (:mod:`~flwr_analytic.analytic.personal_lambda`, our addition):
:func:`choose_output_lambda`, then ``personalize(..., output=choice)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flwr_analytic.analytic.mirror import with_mirrors
from flwr_analytic.analytic.network import AnalyticNetwork
from flwr_analytic.analytic.personal_lambda import AutoLambda, LambdaChoice, global_leverage
from flwr_analytic.analytic.recalibration import recalibrate
from flwr_analytic.analytic.solvers import Regularization, personalized_solve
from flwr_analytic.analytic.statistics import LayerStatistics, merge
from flwr_analytic.data.batches import iter_batches

PERSONALIZE = ("last", "all")


@dataclass
class FederatedFit:
    """What a simulated FedACnnL run produced.

    Attributes
    ----------
    client_statistics : list[list[LayerStatistics | None]]
        ``client_statistics[k][l]``: what client ``k`` sent for layer ``l`` (kept client-side for
        personalization; ``None`` for layers fitted without statistics).
    upload_floats : list[int]
        Floats uploaded per layer by all clients together (packed triangles; every round of a
        several-round layer).

    """

    client_statistics: list[list[LayerStatistics | None]] = field(default_factory=list)
    upload_floats: list[int] = field(default_factory=list)
    output_statistics: LayerStatistics | None = None

    def global_leverage(self, net: AnalyticNetwork) -> float:
        """The output layer's mean leverage ``h̄ = df/N`` (what a server sends for auto λ).

        :func:`~flwr_analytic.analytic.personal_lambda.global_leverage` of the summed statistics
        the output layer was solved from (``0`` before it was).
        """
        if self.output_statistics is None:
            return 0.0
        last = net.num_layers - 1
        return global_leverage(self.output_statistics, net.output_reg, net.arch.has_bias(last))


def fit_centralized(
    net: AnalyticNetwork, x: np.ndarray, y: np.ndarray, batch_size: int = 256
) -> AnalyticNetwork:
    """Train every layer on the pooled data (the reference the federated run must equal)."""
    for layer in range(net.solved_layers, net.num_layers):
        while net.solved_layers == layer:  # one pass per round of the layer (k-means: several)
            stats = net.statistics(layer, x, y, batch_size) if net.needs_statistics(layer) else None
            net.solve(layer, stats)
    return net


def fit_federated(
    net: AnalyticNetwork,
    clients: Sequence[tuple[np.ndarray, np.ndarray]],
    batch_size: int | Sequence[int] = 256,
) -> FederatedFit:
    """FedACnnL on in-memory clients: per layer, sum the clients' statistics in order and solve.

    Parameters
    ----------
    net : AnalyticNetwork
        The network to train (modified in place).
    clients : sequence of (x, y)
        Each client's training data, in the order statistics are summed.
    batch_size : int or sequence of int
        Client batch size (one per client to show the result does not depend on it).

    """
    sizes = [batch_size] * len(clients) if isinstance(batch_size, int) else list(batch_size)
    fit = FederatedFit(client_statistics=[[] for _ in clients])
    for layer in range(net.num_layers):
        if not net.needs_statistics(layer):
            net.solve(layer, None)
            for kept in fit.client_statistics:
                kept.append(None)
            fit.upload_floats.append(0)
            continue
        floats = 0
        while net.solved_layers == layer:  # one round per call (k-means layers take several)
            per_client = [
                net.statistics(layer, x, y, bs) for (x, y), bs in zip(clients, sizes, strict=True)
            ]
            total = merge(s for s in per_client if s.count > 0)
            net.solve(layer, total)
            if net.is_output(layer):
                fit.output_statistics = total
            floats += sum(sum(a.size for a in s.pack().values()) for s in per_client)
        for kept, stats in zip(fit.client_statistics, per_client, strict=True):
            kept.append(stats)
        fit.upload_floats.append(floats)
    return fit


def personalize(
    net: AnalyticNetwork,
    statistics: Sequence[LayerStatistics | None],
    reg: Regularization,
    layers: str = "last",
    *,
    output: LambdaChoice | None = None,
    recalibration: float | None = None,
) -> list[np.ndarray]:
    """pFedACnnL: one client's personalized weights from the statistics it sent.

    ``W_{k,l} = (G_k + λI)⁻¹(B_k + λ W_l)`` for the layers that regress onto targets: the output
    layer (``layers="last"``), and with ``layers="all"`` also label-encoding hidden layers and the
    label channels of label-pca layers. PCA and random filters stay global: they are not a regression
    onto the client's labels.

    Parameters
    ----------
    net : AnalyticNetwork
        The global network (every layer solved).
    statistics : sequence of LayerStatistics or None
        The client's ``(G_k, B_k, n_k)`` per layer (``None``: layer kept global).
    reg : Regularization
        λ of every personalized layer, or of the hidden ones only when ``output`` is given.
    layers : {"last", "all"}
        Which layers are personalized.
    output : LambdaChoice, optional
        The client's own output-layer λ (:func:`choose_output_lambda`): the output layer is
        ``output.weights`` (``W_k(ρ*)``, or the global layer for ``ρ* = ∞``).
    recalibration : float, optional
        ρ of the output layer's local recalibration, applied last
        (:func:`~flwr_analytic.analytic.recalibration.recalibrate`; needs the output layer's
        statistics and bias); ``None``: none.

    """
    if layers not in PERSONALIZE:
        raise ValueError(f"layers must be one of {PERSONALIZE}, got {layers!r}")
    out = [np.asarray(w).copy() for w in net.weights]  # type: ignore[arg-type]
    last = net.num_layers - 1
    chosen = range(net.num_layers) if layers == "all" else [last]
    for layer in chosen:
        stats = statistics[layer]
        m = net.num_targets(layer)
        if layer == last and output is not None:
            if output.weights.shape != out[last].shape:
                raise ValueError(
                    f"output weights {output.weights.shape} do not fit the layer {out[last].shape}"
                )
            out[last] = np.array(output.weights, dtype=np.float64)
            continue
        if stats is None or stats.count == 0 or m == 0:
            continue
        w_global = out[layer]
        out[layer][:, :m] = personalized_solve(stats.gram, stats.cross, w_global[:, :m], reg)
    if recalibration is not None:
        stats = statistics[last]
        if stats is None or not net.arch.has_bias(last):
            raise ValueError("recalibration needs the output layer's statistics and its bias")
        out[last] = recalibrate(stats.gram, stats.cross, out[last], recalibration)
    return out


@torch.no_grad()
def output_design(
    net: AnalyticNetwork, x: Any, y: np.ndarray | None = None, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """The output layer's design rows ``A`` (n x D) and labels of ``(x, y)`` or a data source.

    Row ``n`` is ``[h(x_n), 1]``: the input of the (dense) output layer, ``x_n`` forwarded through
    the solved layers below, flattened, with the bias entry, as in the statistics
    ``G = AᵀA``, ``B = AᵀT`` (:meth:`AnalyticNetwork.statistics`; a mirrored network's rows are
    those of every sample and its mirror, in that order per batch). float64; memory ``n·D``.

    Parameters
    ----------
    net : AnalyticNetwork
        Every layer below the output solved.
    x, y : array-like, or a data source and ``None``
        Samples and labels, or any source of :func:`~flwr_analytic.data.batches.iter_batches`.
    batch_size : int
        Samples per forward pass (array sources).

    """
    last = net.num_layers - 1
    if net.arch.conv_geometry(last) is not None:
        raise ValueError("the output layer is a convolution: its design rows are patches")
    rows, labels = [], []
    source = iter_batches((x, y) if y is not None else x, batch_size)
    for xb, yb in with_mirrors(source) if net.mirror else source:
        h = torch.flatten(net.layer_input(last, xb), 1)
        rows.append(h.to(torch.float64).numpy())
        labels.append(np.asarray(yb, dtype=np.int64))
    dim = net.design_dim(last)
    a = np.concatenate(rows) if rows else np.zeros((0, dim - 1))
    y_all = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    return np.hstack([a, np.ones((len(a), 1))]), y_all


def choose_output_lambda(
    net: AnalyticNetwork,
    x: Any,
    y: np.ndarray | None = None,
    *,
    policy: AutoLambda | None = None,
    statistics: LayerStatistics | None = None,
    w_output: np.ndarray | None = None,
    batch_size: int = 256,
    leverage: float = 0.0,
) -> LambdaChoice:
    """A client's own output-layer λ by exact leave-one-out on its training data ``(x, y)``.

    :func:`~flwr_analytic.analytic.personal_lambda.select_lambda` on :func:`output_design`.

    Parameters
    ----------
    net : AnalyticNetwork
        The global network (every layer solved).
    x, y : array-like, or a data source and ``None``
        The client's training data.
    policy : AutoLambda, optional
        Grid, λ rule and ``z`` (default ``AutoLambda()``: relative ρ).
    statistics : LayerStatistics, optional
        The client's output-layer statistics; the final ``W_k(ρ*)`` is solved from them (so it
        equals :func:`personalize` at ``ρ*``); default: from the design rows.
    w_output : numpy.ndarray, optional
        The output layer to personalize (default the network's, e.g. a group's instead).
    batch_size : int
        Samples per forward pass.
    leverage : float
        The global output layer's mean leverage ``h̄`` (:meth:`FederatedFit.global_leverage`, or
        the ``global-leverage`` a server sent); ``0``: no correction.

    """
    policy = policy or AutoLambda()
    a, labels = output_design(net, x, y, batch_size)
    w = np.asarray(net.weights[-1] if w_output is None else w_output, dtype=np.float64)
    gram = None if statistics is None else statistics.gram
    cross = None if statistics is None else statistics.cross
    return policy.select(a, labels, w, gram=gram, cross=cross, leverage=leverage)
