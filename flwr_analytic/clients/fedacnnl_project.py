"""FedACnnL in your own Flower project: handlers added to your ``ClientApp``, your ``load_data``.

Gu et al., "Analytic Personalized Federated Meta-Learning" (arXiv 2502.06915). The strategy's
messages are ``train.fedacnnl`` / ``evaluate.fedacnnl``, so :func:`add_fedacnnl_handlers` adds them
beside your FedAvg handlers; :func:`partition_from_load_data` calls the quickstart-style
``load_data(partition_id, num_partitions)``. See ``docs/bring-your-own-model.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp

from flwr_analytic.clients.fedacnnl_client import ACTION, FedACnnLHandlers, PartitionLoader
from flwr_analytic.fedacnnl import protocol as P


def add_fedacnnl_handlers(
    app: ClientApp,
    load_data: Callable[[int, int], tuple[Any, Any]] | None = None,
    *,
    model: P.ModelSource,
    load_partition: PartitionLoader | None = None,
    image_key: str | None = None,
    label_key: str | None = None,
    cache: bool = True,
) -> ClientApp:
    """Teach your project's ``ClientApp`` FedACnnL, next to the handlers it already has.

    Registers ``@app.train("fedacnnl")`` and ``@app.evaluate("fedacnnl")`` (:data:`ACTION`; the
    strategy's messages are ``train.fedacnnl`` / ``evaluate.fedacnnl``), so your FedAvg handlers
    keep working. Only this app's run-config keys are read; yours are left alone.

    Parameters
    ----------
    app : ClientApp
        Your client app.
    load_data : callable, optional
        Your ``load_data(partition_id, num_partitions) -> (trainloader, testloader)`` (the Flower
        quickstart's); called with the node config's ``partition-id`` and ``num-partitions``.
    model : torch.nn.Module or callable
        Your model (e.g. ``Net``), the one the server trains.
    load_partition : callable, optional
        Instead of ``load_data``: ``load_partition(context) -> (train, test)``.
    image_key, label_key : str, optional
        Keys of dict batches (default: flwr-datasets' ``img``/``image`` and ``label``).
    cache : bool (default: True)
        Keep the loaders between rounds.

    Returns
    -------
    ClientApp
        ``app`` itself.

    """
    load_partition = partition_loader(load_data, load_partition)
    handlers = FedACnnLHandlers(
        load_partition, cache, None, model, (image_key, label_key), own_keys_only=True
    )
    app.train(ACTION)(handlers.train)
    app.evaluate(ACTION)(handlers.evaluate)
    return app


def partition_loader(
    load_data: Callable[[int, int], tuple[Any, Any]] | None,
    load_partition: PartitionLoader | None,
) -> PartitionLoader:
    """The ``load_partition(context)`` of exactly one of ``load_data`` and ``load_partition``."""
    if (load_data is None) == (load_partition is None):
        raise ValueError(
            "give exactly one of load_data(partition_id, num_partitions) and load_partition(context)"
        )
    return load_partition or partition_from_load_data(load_data)


def partition_from_load_data(load_data: Callable[[int, int], tuple[Any, Any]]) -> PartitionLoader:
    """``load_partition(context)`` calling ``load_data(partition_id, num_partitions)``.

    The two numbers come from the node config (``partition-id``, ``num-partitions``), as in the
    Flower quickstart's client app.
    """

    def load_partition(context: Context) -> tuple[Any, Any]:
        node = context.node_config
        missing = [k for k in ("partition-id", "num-partitions") if k not in node]
        if missing:
            raise KeyError(f"the node config lacks {missing}, which load_data needs")
        return load_data(int(node["partition-id"]), int(node["num-partitions"]))

    return load_partition


__all__ = ["add_fedacnnl_handlers", "partition_from_load_data", "partition_loader"]
