"""FedACnnL / pFedACnnL for projects on Flower's legacy API (``flwr.client.NumPyClient``).

A thin adapter over the same client functions as the Message-API app
(:mod:`flwr_analytic.clients.fedacnnl_client`; Gu et al., arXiv 2502.06915). Use it with
:class:`flwr_analytic.strategies.fedacnnl_legacy.FedACnnLLegacy`. Parameters are lists of numpy
arrays: the server sends the ``state_dict`` tensors of the solved layers in order
(``[weight_0, bias_0, weight_1, bias_1, ...]``); ``fit`` returns the packed statistics
``[gram-triu, cross, count]`` of the requested layer. A layer without bias sends a zero bias, so
the list is always pairs. The same model and data support as the Message-API app: your own
``torch.nn.Module`` (``model=Net``) and ``DataLoader``s (or ``ArrayDataset``s).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient

from flwr_analytic.analytic import LayerStatistics
from flwr_analytic.analytic.statistics import COUNT_KEY, CROSS_KEY, GRAM_KEY
from flwr_analytic.clients.fedacnnl_client import keep_layer_statistics, kept_layer_statistics
from flwr_analytic.clients.fedacnnl_local import (
    ClientData,
    as_client_data,
    evaluate_global_and_personal,
    layer_statistics,
)
from flwr_analytic.fedacnnl import protocol as P

#: Order of the packed statistics in a legacy ``fit`` result.
PACKED_ORDER = (GRAM_KEY, CROSS_KEY, COUNT_KEY)


def pack_to_list(stats: LayerStatistics) -> list[np.ndarray]:
    """Packed statistics as the legacy list ``[gram-triu, cross, count]``."""
    packed = stats.pack()
    return [packed[k] for k in PACKED_ORDER]


def list_to_packed(arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_to_list`."""
    if len(arrays) != len(PACKED_ORDER):
        raise ValueError(f"expected {len(PACKED_ORDER)} arrays {PACKED_ORDER}, got {len(arrays)}")
    return dict(zip(PACKED_ORDER, arrays, strict=True))


class FedACnnLNumPyClient(NumPyClient):
    """A legacy ``NumPyClient`` running the FedACnnL client half and pFedACnnL evaluation.

    Parameters
    ----------
    train, test : ArrayDataset, LoaderData or DataLoader
        This client's data (a ``DataLoader`` of dict batches with flwr-datasets' keys, or of
        ``(x, y)`` tuples; wrap it in ``LoaderData`` to name other keys).
    partition_id : int (default: -1)
        Reported with every result; the strategy sums statistics in this order (-1: unknown).
    context : Context, optional
        The node's context (``client_fn(context)``); its ``state`` keeps the statistics of the
        personalized layers between rounds. Without it they are recomputed at evaluation.
    model : torch.nn.Module or callable, optional
        Your model, when the server trains it (``FedACnnLLegacy(Net(), input_shape=...)``).

    """

    def __init__(
        self,
        train: ClientData,
        test: ClientData,
        partition_id: int = -1,
        context: Context | None = None,
        model: P.ModelSource | None = None,
    ) -> None:
        self.train = as_client_data(train)
        self.test = as_client_data(test)
        self.model = model
        self.partition_id = int(partition_id)
        self.node_context = context

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        """Return nothing: the analytic model has no local parameters before the first round."""
        return []

    def fit_statistics(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[int, LayerStatistics]:
        """``(layer, statistics)`` of ``config["layer"]`` computed with the sent layers.

        The statistics of a personalized layer are also kept in the node's context.
        """
        net, stats = layer_statistics(config, parameters, self.train, self.model)
        layer = int(config[P.LAYER])
        which = str(config.get(P.PERSONALIZE_LAYERS, "last"))
        if self.node_context is not None and layer in P.personalized_layers(net, which):
            keep_layer_statistics(self.node_context, layer, P.weights_digest(net, layer), stats)
        return layer, stats

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Return the packed statistics of ``config["layer"]`` computed with the sent layers."""
        layer, stats = self.fit_statistics(parameters, config)
        metrics = {P.PARTITION_ID: self.partition_id, P.LAYER: layer}
        return pack_to_list(stats), int(stats.count), metrics

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        """Return the pFedACnnL loss, the test size and global/personalized accuracy and loss."""
        kept = kept_layer_statistics(self.node_context) if self.node_context is not None else None
        metrics, _ = evaluate_global_and_personal(
            config, parameters, self.train, self.test, kept, model=self.model
        )
        metrics[P.PARTITION_ID] = self.partition_id
        return float(metrics["personal-loss"]), int(metrics[P.NUM_EXAMPLES]), metrics
