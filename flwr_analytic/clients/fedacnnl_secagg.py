"""FedACnnL client half under Flower's SecAgg+ (``secaggplus_mod``): the server sees only the sum.

FedACnnL (Gu et al., arXiv 2502.06915) needs only ``Σ_k (G_k, B_k, n_k)``. This legacy
``NumPyClient`` returns its layer statistics in the fixed-point form of
:class:`~flwr_analytic.analytic.privacy.SecAggEncoding` (``[triu(G)/s, B/s, [n/s_n]]`` on SecAgg+'s
quantization grid) with ``num_examples = 1``, so that SecAgg+'s weighted mean is ``(1/K) Σ_k x_k``.
Run it in a ``ClientApp(client_fn=..., mods=[secaggplus_mod])`` (:func:`make_secagg_client_app`)
against :class:`~flwr_analytic.strategies.fedacnnl_secagg.FedACnnLSecAgg` in a
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``. Nothing identifying leaves the client
in the clear: the reply's metrics hold only the layer index (no ``partition-id``, no count).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Context

from flwr_analytic.analytic.privacy import (
    SECAGG_CLIPPING_RANGE,
    SECAGG_COUNT_SCALE,
    SECAGG_QUANTIZATION_RANGE,
    SECAGG_SCALE,
    SecAggEncoding,
)
from flwr_analytic.clients.fedacnnl_client import resolved_context
from flwr_analytic.clients.fedacnnl_legacy import FedACnnLNumPyClient
from flwr_analytic.data import ArrayDataset
from flwr_analytic.fedacnnl import protocol as P


def encoding_from_config(config: Mapping[str, Any]) -> SecAggEncoding:
    """The :class:`SecAggEncoding` of a fit config (``secagg-*`` keys sent by the strategy)."""
    if SECAGG_SCALE not in config:
        raise KeyError(f"the fit config lacks {SECAGG_SCALE!r}: is the server FedACnnLSecAgg?")
    return SecAggEncoding(
        scale=float(config[SECAGG_SCALE]),
        count_scale=float(config[SECAGG_COUNT_SCALE]),
        clipping_range=float(config[SECAGG_CLIPPING_RANGE]),
        quantization_range=int(config[SECAGG_QUANTIZATION_RANGE]),
    )


class FedACnnLSecAggClient(FedACnnLNumPyClient):
    """A FedACnnL ``NumPyClient`` whose ``fit`` returns SecAgg+-ready statistics.

    Made as :class:`~flwr_analytic.clients.fedacnnl_legacy.FedACnnLNumPyClient` (``train``,
    ``test``, ``partition_id``, ``context``), but ``partition_id`` is reported with evaluation
    metrics only, never with statistics; the context keeps the statistics of personalized layers
    for evaluation.
    """

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Encoded statistics of ``config["layer"]``, weight 1, metrics ``{"layer": l}``."""
        encoding = encoding_from_config(config)
        layer, stats = self.fit_statistics(parameters, config)
        return encoding.encode(stats), 1, {P.LAYER: layer}


def make_secagg_client_app(
    load_partition: Callable[[Context], tuple[ArrayDataset, ArrayDataset]] | None = None,
    *,
    run_config: Mapping[str, Any] | None = None,
):  # noqa: ANN201 - flwr.client.ClientApp
    """A legacy ``ClientApp`` running :class:`FedACnnLSecAggClient` behind ``secaggplus_mod``.

    Parameters
    ----------
    load_partition : callable, optional
        ``load_partition(context) -> (train, test)``; defaults to the run-config loader
        (:func:`~flwr_analytic.fedacnnl.load_partition_from_config`).
    run_config : mapping, optional
        Run-config entries overriding the node's (e.g. under ``run_simulation``); the run config
        is resolved once per ``client_fn`` call
        (:func:`~flwr_analytic.clients.fedacnnl_client.resolved_context`).

    """
    from flwr.client import ClientApp
    from flwr.client.mod import secaggplus_mod

    from flwr_analytic.fedacnnl.config import RUN_CONFIG
    from flwr_analytic.fedacnnl.data import load_partition_from_config

    loader = load_partition or load_partition_from_config
    overrides = RUN_CONFIG.check_overrides(run_config)

    def client_fn(context: Context):  # noqa: ANN202
        context = resolved_context(context, overrides)
        train, test = loader(context)
        pid = int(context.node_config.get("partition-id", -1))
        return FedACnnLSecAggClient(train, test, pid, context).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
