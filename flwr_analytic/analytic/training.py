"""Training loops over an :class:`AnalyticNetwork`: centralized, federated (simulated), personalized.

FedACnnL (Gu et al., arXiv 2502.06915): for each layer ``l`` in order, every client ``k`` computes
``(G_k, B_k, n_k)`` with the shared layers ``< l``; the server sums them in a fixed order and solves.
pFedACnnL: client ``k`` then solves ``W_{k,l} = (G_k + λI)⁻¹(B_k + λW_l)`` from the statistics it
already has: no extra communication. These loops have no Flower in them; the Flower strategy and
client app run the same steps over the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from flwr_analytic.analytic.network import AnalyticNetwork
from flwr_analytic.analytic.solvers import Regularization, personalized_solve
from flwr_analytic.analytic.statistics import LayerStatistics, merge

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
        Floats uploaded per layer round by all clients together (packed triangles).

    """

    client_statistics: list[list[LayerStatistics | None]] = field(default_factory=list)
    upload_floats: list[int] = field(default_factory=list)


def fit_centralized(
    net: AnalyticNetwork, x: np.ndarray, y: np.ndarray, batch_size: int = 256
) -> AnalyticNetwork:
    """Train every layer on the pooled data (the reference the federated run must equal)."""
    for layer in range(net.solved_layers, net.num_layers):
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
        per_client = [
            net.statistics(layer, x, y, bs) for (x, y), bs in zip(clients, sizes, strict=True)
        ]
        net.solve(layer, merge(s for s in per_client if s.count > 0))
        for kept, stats in zip(fit.client_statistics, per_client, strict=True):
            kept.append(stats)
        fit.upload_floats.append(sum(sum(a.size for a in s.pack().values()) for s in per_client))
    return fit


def personalize(
    net: AnalyticNetwork,
    statistics: Sequence[LayerStatistics | None],
    reg: Regularization,
    layers: str = "last",
) -> list[np.ndarray]:
    """pFedACnnL: one client's personalized weights from the statistics it sent.

    ``W_{k,l} = (G_k + λI)⁻¹(B_k + λ W_l)`` for the layers that regress onto targets: the output
    layer (``layers="last"``), and with ``layers="all"`` also label-encoding hidden layers and the
    label channels of label-pca layers. PCA and random filters stay global: they are not a regression
    onto the client's labels.
    """
    if layers not in PERSONALIZE:
        raise ValueError(f"layers must be one of {PERSONALIZE}, got {layers!r}")
    out = [np.asarray(w).copy() for w in net.weights]  # type: ignore[arg-type]
    chosen = range(net.num_layers) if layers == "all" else [net.num_layers - 1]
    for layer in chosen:
        stats = statistics[layer]
        m = net.num_targets(layer)
        if stats is None or stats.count == 0 or m == 0:
            continue
        w_global = out[layer]
        out[layer][:, :m] = personalized_solve(stats.gram, stats.cross, w_global[:, :m], reg)
    return out
