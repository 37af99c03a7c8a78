"""FedACnnL / pFedACnnL client: a Flower ``ClientApp`` on the Message API.

Gu et al., "Analytic Personalized Federated Meta-Learning" (arXiv 2502.06915). In the training round
of layer ``l`` the client forwards its data through the received global layers ``< l`` and returns
the layer's sufficient statistics ``(G_k, B_k, n_k)``; it keeps its own statistics of the layers it
personalizes in ``context.state``. In the evaluation round it scores the global model and its
pFedACnnL model ``W_k = (G_k + λI)⁻¹(B_k + λW)``, solved in closed form from those kept statistics
(no extra communication). The maths is in :mod:`flwr_analytic.analytic`; this module adapts it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_analytic.analytic import AnalyticNetwork, LayerStatistics, personalize
from flwr_analytic.clients.fedacnnl_dp import dp_metrics, release_statistics
from flwr_analytic.config_checks import RunConfig
from flwr_analytic.data import ArrayDataset
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.fedacnnl.config import (
    NODE_CONFIG_KEYS,
    RUN_CONFIG,
    dp_config,
    resolve_run_config,
)
from flwr_analytic.fedacnnl.data import load_partition_from_config

#: ``load_partition(context) -> (train, test)``.
PartitionLoader = Callable[[Context], tuple[ArrayDataset, ArrayDataset]]

_STATE_STATS = "fedacnnl-stats-{}"
_STATE_DIGEST = "fedacnnl-digest-{}"
_CACHE: dict[tuple[Any, ...], tuple[ArrayDataset, ArrayDataset]] = {}
_CACHE_SIZE = 64


# ------------------------------------------------------------------------------ pure functions
def _check_data(net: AnalyticNetwork, data: ArrayDataset) -> None:
    if tuple(data.input_shape) != tuple(net.arch.input_shape):
        raise ValueError(
            f"data samples have shape {data.input_shape}, the model expects {net.arch.input_shape}"
        )
    if len(data) and int(data.y.max()) >= net.arch.num_classes:
        raise ValueError(f"labels exceed the model's {net.arch.num_classes} classes")


def layer_statistics(
    config: Mapping[str, Any], arrays: Mapping[str, np.ndarray], train: ArrayDataset
) -> tuple[AnalyticNetwork, LayerStatistics]:
    """Client half of one FedACnnL round: ``(G_k, B_k, n_k)`` of ``config["layer"]``.

    Parameters
    ----------
    config : mapping
        The strategy's train config (see :mod:`flwr_analytic.fedacnnl.protocol`).
    arrays : mapping of str to numpy.ndarray
        The global layers ``< layer`` as ``state_dict`` arrays.
    train : ArrayDataset
        The client's training data.

    Returns
    -------
    (AnalyticNetwork, LayerStatistics)
        The client's network (layers ``< layer`` installed) and the layer's statistics.

    """
    net = P.network_from_config(config)
    layer = int(config[P.LAYER])
    if not 0 <= layer < net.num_layers:
        raise ValueError(f"layer {layer} out of range 0..{net.num_layers - 1}")
    _check_data(net, train)
    P.install_layers(net, arrays, upto=layer)
    stats = net.statistics(layer, train.x, train.y, int(config[P.BATCH_SIZE]))
    return net, stats


def evaluate_global_and_personal(
    config: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    train: ArrayDataset,
    test: ArrayDataset,
    kept: Mapping[int, tuple[str, LayerStatistics]] | None = None,
    group_arrays: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, float], dict[int, tuple[str, LayerStatistics]]]:
    """Accuracy and loss of the global model and of the client's pFedACnnL model on ``test``.

    The personalized layers use the statistics the client kept from training when they were
    computed with the same global layers below (matching fingerprint); otherwise (e.g. the client
    was not sampled in that round) they are recomputed from ``train``. With ``group_arrays`` (the
    output layer of the client's group, group-wise runs) the group model and its personalization
    are scored too (``group-*``, ``group-personal-*``).

    Returns
    -------
    (metrics, statistics)
        ``global-*`` / ``personal-*`` accuracy, loss and correct counts, ``num-examples`` (test
        size), ``stats-reused``; and the statistics used per layer (to keep).

    """
    net = P.network_from_config(config)
    _check_data(net, test)
    if P.install_layers(net, arrays) != net.num_layers:
        raise KeyError("the evaluation message does not carry every layer of the model")
    reg = P.personal_regularization(config)
    which = str(config[P.PERSONALIZE_LAYERS])
    per_layer: list[LayerStatistics | None] = [None] * net.num_layers
    used: dict[int, tuple[str, LayerStatistics]] = {}
    reused = 0
    for layer in P.personalized_layers(net, which):
        digest = P.weights_digest(net, layer)
        if kept and layer in kept and kept[layer][0] == digest:
            stats = kept[layer][1]
            reused += 1
        else:
            stats = net.statistics(layer, train.x, train.y, int(config[P.BATCH_SIZE]))
        per_layer[layer] = stats
        used[layer] = (digest, stats)
    metrics: dict[str, float] = {P.NUM_EXAMPLES: len(test), "train-examples": len(train)}
    if len(test) == 0:
        prefixes = ["global", "personal"] + (["group", "group-personal"] if group_arrays else [])
        for prefix in prefixes:
            metrics.update(
                {f"{prefix}-accuracy": 0.0, f"{prefix}-loss": 0.0, f"{prefix}-correct": 0}
            )
    else:
        models = [
            ("global", net),
            ("personal", net.with_weights(personalize(net, per_layer, reg, which))),
        ]
        if group_arrays:
            group = net.with_weights(net.weights)  # type: ignore[arg-type]
            last = net.num_layers - 1
            P.install_layers(group, {**_state_of(net), **dict(group_arrays)}, upto=last + 1)
            models.append(("group", group))
            models.append(
                ("group-personal", group.with_weights(personalize(group, per_layer, reg, which)))
            )
        for prefix, model in models:
            res = model.evaluate(test.x, test.y)
            metrics[f"{prefix}-accuracy"] = float(res["accuracy"])
            metrics[f"{prefix}-loss"] = float(res["loss"])
            metrics[f"{prefix}-correct"] = int(res["correct"])
    metrics["stats-reused"] = reused
    return metrics, used


def _state_of(net: AnalyticNetwork) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in P.weights_state_dict(net).items()}


# ------------------------------------------------------------------------------ the app boundary
def resolved_context(context: Context, overrides: Mapping[str, Any] | None = None) -> Context:
    """``context`` with its run config resolved once into a :class:`RunConfig` (the app boundary).

    The run config is the node's, overridden by ``overrides`` (the app factory's ``run_config``),
    overridden by the ``dp-*`` keys of the node config (:data:`NODE_CONFIG_KEYS`: a SuperNode can
    enforce noise whatever the server asks). Everything below the handlers reads this
    :class:`RunConfig` and never resolves again. A context that is already resolved comes back as
    it is; otherwise the copy shares ``state``, so what the handlers keep there persists.

    Raises
    ------
    flwr_analytic.config_checks.ConfigError
        For an unknown key or a value that is not allowed (see
        :func:`~flwr_analytic.fedacnnl.resolve_run_config`).

    """
    node = {k: context.node_config[k] for k in NODE_CONFIG_KEYS if k in context.node_config}
    given = context.run_config
    extra = {**dict(overrides or {}), **node}
    if any(
        k not in given or type(given[k]) is not type(v) or given[k] != v for k, v in extra.items()
    ):
        given = {**dict(given), **extra}
    cfg = resolve_run_config(given)
    if cfg is context.run_config:
        return context
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=context.node_config,
        state=context.state,
        run_config=cfg,
        series_id=context.series_id,
    )


def _run_config(context: Context) -> RunConfig:
    """The :class:`RunConfig` of a context made by :func:`resolved_context`."""
    return cast(RunConfig, context.run_config)


def _partition(
    context: Context, load_partition: PartitionLoader, cache: bool
) -> tuple[ArrayDataset, ArrayDataset]:
    if not cache:
        return load_partition(context)
    key = (
        load_partition,  # the object itself: an id() could be reused after collection
        context.run_id,
        tuple((k, repr(v)) for k, v in context.run_config.items()),
        tuple(sorted((k, repr(v)) for k, v in context.node_config.items())),
    )
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = load_partition(context)
    return _CACHE[key]


def _set_threads(cfg: RunConfig) -> None:
    threads = int(cfg["client-threads"])
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _partition_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", -1))


# ------------------------------------------------------------------ statistics kept in the state
def kept_layer_statistics(context: Context) -> dict[int, tuple[str, LayerStatistics]]:
    """The layer statistics this node kept in ``context.state`` (:func:`keep_layer_statistics`).

    Returns
    -------
    dict of int to (str, LayerStatistics)
        Per layer: the digest of the global layers below it they were computed with, and the
        statistics.

    """
    out = {}
    for name in list(context.state.config_records.keys()):
        if not name.startswith(_STATE_DIGEST.format("")):
            continue
        layer = int(name.rsplit("-", 1)[1])
        stats_name = _STATE_STATS.format(layer)
        if stats_name in context.state.array_records:
            packed = _numpy(context.state.array_records[stats_name])
            out[layer] = (
                str(context.state.config_records[name]["digest"]),
                LayerStatistics.unpack(packed),
            )
    return out


def keep_layer_statistics(
    context: Context, layer: int, digest: str, stats: LayerStatistics
) -> None:
    """Keep this node's clean statistics of ``layer`` in ``context.state`` for its evaluation.

    ``digest`` (:func:`~flwr_analytic.fedacnnl.protocol.weights_digest`) names the global layers
    below ``layer`` they were computed with; the evaluation reuses them only when it matches.
    They never leave the node (the state is local).
    """
    context.state[_STATE_STATS.format(layer)] = _array_record(stats.pack())
    context.state[_STATE_DIGEST.format(layer)] = ConfigRecord({"digest": digest})


def _array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _message_records(msg: Message, require_arrays: bool) -> tuple[ConfigRecord, ArrayRecord]:
    """The message's config and arrays (by key, else the first record of each kind).

    Without arrays, a training message (layer 0 needs no global layers) gets an empty record; an
    evaluation message raises ``StopIteration`` as before.
    """
    content = msg.content
    config = (
        content[P.CONFIG_KEY]
        if P.CONFIG_KEY in content
        else next(iter(content.config_records.values()))
    )
    if P.ARRAYS_KEY in content.array_records:
        return config, content[P.ARRAYS_KEY]
    records = iter(content.array_records.values())
    return config, next(records) if require_arrays else next(records, ArrayRecord())


@dataclass(frozen=True)
class FedACnnLHandlers:
    """The ``@app.train()`` and ``@app.evaluate()`` handlers of a FedACnnL client app.

    Each call resolves the run config once (:func:`resolved_context` with :attr:`overrides`).

    Parameters
    ----------
    load_partition : PartitionLoader
        ``load_partition(context) -> (train, test)`` of this node; its context carries the
        resolved run config.
    cache : bool (default: True)
        Keep loaded partitions in memory between rounds (keyed by run and node config).
    overrides : mapping, optional
        Run-config entries that override the node's.

    """

    load_partition: PartitionLoader
    cache: bool = True
    overrides: Mapping[str, Any] | None = None

    def receive(
        self, msg: Message, context: Context, require_arrays: bool
    ) -> tuple[Context, RunConfig, ConfigRecord, dict[str, np.ndarray], ArrayDataset, ArrayDataset]:
        """What a handler needs of ``msg``: ``(context, cfg, config, arrays, train, test)``.

        The context with its run config resolved, that :class:`RunConfig`, the message's config and
        arrays, and this node's data; torch threads are set (``client-threads``).
        """
        context = resolved_context(context, self.overrides)
        cfg = _run_config(context)
        _set_threads(cfg)
        config, arrays = _message_records(msg, require_arrays=require_arrays)
        train, test = _partition(context, self.load_partition, self.cache)
        return context, cfg, config, _numpy(arrays), train, test

    def train(self, msg: Message, context: Context) -> Message:
        """Reply to a FedACnnL training message with the requested layer's packed statistics.

        The reply holds ``ArrayRecord`` ``"statistics"`` (``gram-triu``, ``cross``, ``count``) and
        ``MetricRecord`` ``"metrics"`` (``num-examples``, ``partition-id``, ``layer``,
        ``compute-time``). Statistics of a personalized layer are also kept in ``context.state``
        (run-config ``keep-statistics``). With ``dp-noise-multiplier > 0`` the released statistics
        are clipped and noised (the kept ones are clean).
        """
        start = time.perf_counter()
        context, cfg, config, arrays, train, _ = self.receive(msg, context, require_arrays=False)
        net, stats = layer_statistics(config, arrays, train)
        layer = int(config[P.LAYER])
        which = str(config.get(P.PERSONALIZE_LAYERS, "last"))
        if cfg["keep-statistics"] and layer in P.personalized_layers(net, which):
            keep_layer_statistics(context, layer, P.weights_digest(net, layer), stats)
        dp = dp_config(cfg)
        pid = _partition_id(context)
        stats = release_statistics(net, layer, train, stats, dp, cfg, pid, config)
        metrics = MetricRecord(
            {
                P.NUM_EXAMPLES: int(stats.count),
                P.PARTITION_ID: pid,
                P.LAYER: layer,
                "compute-time": time.perf_counter() - start,
                **dp_metrics(dp),
            }
        )
        packed = _array_record(stats.pack())
        content = RecordDict({P.STATISTICS_KEY: packed, P.METRICS_KEY: metrics})
        return Message(content=content, reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        """Reply to an evaluation message with global and pFedACnnL metrics on the local test set."""
        start = time.perf_counter()
        context, cfg, config, arrays, train, test = self.receive(msg, context, require_arrays=True)
        group = msg.content.array_records.get(P.GROUP_ARRAYS_KEY)
        kept = kept_layer_statistics(context)
        metrics, used = evaluate_global_and_personal(
            config, arrays, train, test, kept, _numpy(group) if group else None
        )
        if cfg["keep-statistics"]:
            for layer, (digest, stats) in used.items():
                keep_layer_statistics(context, layer, digest, stats)
        metrics[P.PARTITION_ID] = _partition_id(context)
        metrics["compute-time"] = time.perf_counter() - start
        return Message(content=RecordDict({P.METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)


def make_fedacnnl_client_app(
    load_partition: PartitionLoader | None = None,
    *,
    cache: bool = True,
    run_config: Mapping[str, Any] | None = None,
) -> ClientApp:
    """A FedACnnL / pFedACnnL :class:`~flwr.clientapp.ClientApp`.

    Parameters
    ----------
    load_partition : callable, optional
        ``load_partition(context) -> (train, test)`` :class:`~flwr_analytic.data.ArrayDataset`
        of this node (your own data loader); its context carries the resolved run config.
        Defaults to :func:`~flwr_analytic.fedacnnl.load_partition_from_config` (run config + node
        config).
    cache : bool (default: True)
        Keep loaded partitions in memory between rounds (keyed by run and node config).
    run_config : mapping, optional
        Run-config entries that override the node's (e.g. under ``run_simulation``, whose run
        config is empty); each is checked here against
        :data:`~flwr_analytic.fedacnnl.config.RUN_CONFIG`.

    Returns
    -------
    ClientApp
        With the ``@app.train()`` (layer statistics) and ``@app.evaluate()`` (global and
        personalized accuracy/loss) handlers of :class:`FedACnnLHandlers`; each resolves the run
        config once per message.

    """
    loader = load_partition or load_partition_from_config
    handlers = FedACnnLHandlers(loader, cache, RUN_CONFIG.check_overrides(run_config))
    app = ClientApp()
    app.train()(handlers.train)
    app.evaluate()(handlers.evaluate)
    return app


__all__ = [
    "FedACnnLHandlers",
    "PartitionLoader",
    "evaluate_global_and_personal",
    "keep_layer_statistics",
    "kept_layer_statistics",
    "layer_statistics",
    "make_fedacnnl_client_app",
    "resolved_context",
]
