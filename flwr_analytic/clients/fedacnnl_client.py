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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from threadpoolctl import threadpool_limits

from flwr_analytic.analytic import LayerStatistics
from flwr_analytic.clients.fedacnnl_dp import dp_metrics, release_statistics
from flwr_analytic.clients.fedacnnl_local import (
    ClientData,
    as_client_data,
    evaluate_global_and_personal,
    layer_statistics,
)
from flwr_analytic.config_checks import ConfigError, RunConfig
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.fedacnnl import stage_protocol as S
from flwr_analytic.fedacnnl.config import (
    NODE_CONFIG_KEYS,
    RUN_CONFIG,
    dp_config,
    resolve_run_config,
)
from flwr_analytic.fedacnnl.data import load_partition_from_config

#: ``load_partition(context) -> (train, test)``: ``ArrayDataset``s or the user's ``DataLoader``s.
PartitionLoader = Callable[[Context], tuple[ClientData, ClientData]]
#: The action name of FedACnnL's messages (``train.fedacnnl``, ``evaluate.fedacnnl``).
ACTION = "fedacnnl"
#: Run-config keys the client handlers read (the rest of a client's settings come in messages).
CLIENT_KEYS = ("client-threads", "keep-statistics", *NODE_CONFIG_KEYS)

_STATE_STATS = "fedacnnl-stats-{}"
_STATE_DIGEST = "fedacnnl-digest-{}"
_CACHE: dict[tuple[Any, ...], tuple[ClientData, ClientData]] = {}
_CACHE_SIZE = 64


# ------------------------------------------------------------------------------ the app boundary
def resolved_context(
    context: Context, overrides: Mapping[str, Any] | None = None, own_keys_only: bool = False
) -> Context:
    """``context`` with its run config resolved once into a :class:`RunConfig` (the app boundary).

    The run config is the node's, overridden by ``overrides`` (the app factory's ``run_config``),
    overridden by the node config's keys in :data:`NODE_CONFIG_KEYS` (a SuperNode's own
    ``data-path``, threads, and noise it enforces whatever the server asks); any other run-config
    key in a node config is refused. Everything below the handlers reads this
    :class:`RunConfig` and never resolves again. A context that is already resolved comes back as
    it is; otherwise the copy shares ``state``, so what the handlers keep there persists. With
    ``own_keys_only`` (handlers added to a user's project, whose run config holds its own keys such
    as ``lr``, ``dataset`` or ``seed``) only the keys a client reads (:data:`CLIENT_KEYS`) are taken;
    everything else comes with the server's messages.

    Raises
    ------
    flwr_analytic.config_checks.ConfigError
        For an unknown key or a value that is not allowed (see
        :func:`~flwr_analytic.fedacnnl.resolve_run_config`).

    """
    refused = sorted(
        k for k in context.node_config if k in RUN_CONFIG.keys and k not in NODE_CONFIG_KEYS
    )
    if refused:
        raise ConfigError(
            f"node config: {refused} set run-config keys a node cannot override (the server's "
            f"run config decides them); a node may set {', '.join(NODE_CONFIG_KEYS)}"
        )
    node = {k: context.node_config[k] for k in NODE_CONFIG_KEYS if k in context.node_config}
    given = context.run_config
    if own_keys_only and not isinstance(given, RunConfig):
        given = {k: v for k, v in given.items() if k in CLIENT_KEYS}
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
    context: Context,
    load_partition: PartitionLoader,
    cache: bool,
    keys: tuple[str | None, str | None] = (None, None),
) -> tuple[ClientData, ClientData]:
    if not cache:
        train, test = load_partition(context)
        return as_client_data(train, *keys), as_client_data(test, *keys)
    key = (
        load_partition,  # the object itself: an id() could be reused after collection
        context.run_id,
        tuple((k, repr(v)) for k, v in context.run_config.items()),
        tuple(sorted((k, repr(v)) for k, v in context.node_config.items())),
    )
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        train, test = load_partition(context)
        _CACHE[key] = (as_client_data(train, *keys), as_client_data(test, *keys))
    return _CACHE[key]


def guarded_reply(
    handler: Callable[[Message, Context], Message], msg: Message, context: Context
) -> Message:
    """``handler(msg, context)``, or an error reply whose reason names this node's partition.

    Any failure (a data loader, a model, bad input) gives the reason
    :func:`~flwr_analytic.fedacnnl.protocol.client_error_reason` (``partition-id=<k>: ...``).
    """
    try:
        return handler(msg, context)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, with its partition
        reason = P.client_error_reason(_partition_id(context), exc)
        error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
        return Message(error, reply_to=msg)


def _set_threads(cfg: RunConfig) -> None:
    threads = int(cfg["client-threads"])
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _blas_threads(cfg: RunConfig) -> AbstractContextManager[Any]:
    """``client-threads`` for BLAS too (the Gram products, ``dsyrk``), while a handler works.

    Without it OpenBLAS uses every core in each of the clients a simulation runs side by side.
    """
    threads = int(cfg["client-threads"])
    return threadpool_limits(threads, user_api="blas") if threads > 0 else nullcontext()


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
        Keep loaded partitions (or the user's loaders) between rounds (by run and node config).
    overrides : mapping, optional
        Run-config entries that override the node's.
    model : torch.nn.Module or callable, optional
        The node's own model when the server trains a user's model (e.g. ``Net``).
    keys : (str or None, str or None)
        Image and label keys of dict batches (default: flwr-datasets' names, see
        :data:`~flwr_analytic.data.batches.IMAGE_KEYS`).
    own_keys_only : bool (default: False)
        Read only this app's run-config keys (in a user's project, which has its own).

    """

    load_partition: PartitionLoader
    cache: bool = True
    overrides: Mapping[str, Any] | None = None
    model: P.ModelSource | None = None
    keys: tuple[str | None, str | None] = (None, None)
    own_keys_only: bool = False

    def receive(
        self, msg: Message, context: Context, require_arrays: bool
    ) -> tuple[Context, RunConfig, ConfigRecord, dict[str, np.ndarray], ClientData, ClientData]:
        """What a handler needs of ``msg``: ``(context, cfg, config, arrays, train, test)``.

        The context with its run config resolved, that :class:`RunConfig`, the message's config and
        arrays, and this node's data; torch threads are set (``client-threads``).
        """
        context = resolved_context(context, self.overrides, self.own_keys_only)
        cfg = _run_config(context)
        _set_threads(cfg)
        config, arrays = _message_records(msg, require_arrays=require_arrays)
        train, test = _partition(context, self.load_partition, self.cache, self.keys)
        return context, cfg, config, _numpy(arrays), train, test

    def train(self, msg: Message, context: Context) -> Message:
        """:meth:`train_reply`, or an error reply naming this node's partition."""
        return self._guarded(self.train_reply, msg, context)

    def evaluate(self, msg: Message, context: Context) -> Message:
        """:meth:`evaluate_reply`, or an error reply naming this node's partition."""
        return self._guarded(self.evaluate_reply, msg, context)

    @staticmethod
    def _guarded(
        handler: Callable[[Message, Context], Message], msg: Message, context: Context
    ) -> Message:
        """Run ``handler``; any failure becomes an error reply naming the partition.

        A data loader, a model or bad input that fails gives the reason
        :func:`~flwr_analytic.fedacnnl.protocol.client_error_reason`, so the server can name the
        failed partition and not only the node.
        """
        return guarded_reply(handler, msg, context)

    def train_reply(self, msg: Message, context: Context) -> Message:
        """Reply to a FedACnnL training message with the requested layer's packed statistics.

        The reply holds ``ArrayRecord`` ``"statistics"`` (``gram-triu``, ``cross``, ``count``) and
        ``MetricRecord`` ``"metrics"`` (``num-examples``, ``partition-id``, ``layer``,
        ``compute-time``). Statistics of a personalized layer are also kept in ``context.state``
        (run-config ``keep-statistics``). With ``dp-noise-multiplier > 0`` the released statistics
        are clipped and noised (the kept ones are clean).
        """
        start = time.perf_counter()
        context, cfg, config, arrays, train, _ = self.receive(msg, context, require_arrays=False)
        layer, stage, dp = int(config[P.LAYER]), config.get(S.SECOND_STAGE), dp_config(cfg)
        if stage is not None and dp.enabled:  # refused before any work
            raise ValueError("this node releases DP statistics; the second stage has no DP")
        with _blas_threads(cfg):
            net, stats = layer_statistics(config, arrays, train, self.model)
            which = str(config.get(P.PERSONALIZE_LAYERS, "last"))
            keep = cfg["keep-statistics"] and stage is None
            if keep and layer in P.personalized_layers(net, which):
                keep_layer_statistics(context, layer, P.weights_digest(net, layer), stats)
            pid = _partition_id(context)
            if stage is None:
                stats = release_statistics(net, layer, train, stats, dp, cfg, pid, config)
        metrics = MetricRecord(
            {
                P.NUM_EXAMPLES: int(stats.count),
                P.PARTITION_ID: pid,
                P.NUM_PARTITIONS: int(context.node_config.get(P.NUM_PARTITIONS, 0)),
                P.LAYER: layer,
                **({P.STAGE: net.stage} if net.stage else {}),
                **({S.SECOND_STAGE: int(stage)} if stage is not None else {}),
                "compute-time": time.perf_counter() - start,
                **dp_metrics(dp),
            }
        )
        packed = _array_record(stats.pack())
        content = RecordDict({P.STATISTICS_KEY: packed, P.METRICS_KEY: metrics})
        return Message(content=content, reply_to=msg)

    def evaluate_reply(self, msg: Message, context: Context) -> Message:
        """Reply to an evaluation message with global and pFedACnnL metrics on the local test set."""
        start = time.perf_counter()
        context, cfg, config, arrays, train, test = self.receive(msg, context, require_arrays=True)
        group = msg.content.array_records.get(P.GROUP_ARRAYS_KEY)
        stage = msg.content.array_records.get(S.STAGE_ARRAYS_KEY)
        kept = kept_layer_statistics(context)
        with _blas_threads(cfg):
            metrics, used = evaluate_global_and_personal(
                config, arrays, train, test, kept, _numpy(group) if group else None, self.model,
                _numpy(stage) if stage else None,
            )  # fmt: skip
        if cfg["keep-statistics"]:
            for layer, (digest, stats) in used.items():
                keep_layer_statistics(context, layer, digest, stats)
        metrics[P.PARTITION_ID] = _partition_id(context)
        metrics[P.NUM_PARTITIONS] = int(context.node_config.get(P.NUM_PARTITIONS, 0))
        metrics["compute-time"] = time.perf_counter() - start
        return Message(content=RecordDict({P.METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)


def make_fedacnnl_client_app(
    load_partition: PartitionLoader | None = None,
    *,
    model: P.ModelSource | None = None,
    cache: bool = True,
    run_config: Mapping[str, Any] | None = None,
) -> ClientApp:
    """A FedACnnL / pFedACnnL :class:`~flwr.clientapp.ClientApp`.

    Parameters
    ----------
    load_partition : callable, optional
        ``load_partition(context) -> (train, test)`` of this node: ``ArrayDataset``s or your own
        ``DataLoader``s (its context carries the resolved run config). Defaults to
        :func:`~flwr_analytic.fedacnnl.load_partition_from_config` (run config + node config).
    model : torch.nn.Module or callable, optional
        Your model, when the server trains it (``FedACnnL(Net(), input_shape=...)``).
    cache : bool (default: True)
        Keep loaded partitions in memory between rounds (keyed by run and node config).
    run_config : mapping, optional
        Run-config entries that override the node's (e.g. under ``run_simulation``, whose run
        config is empty); each is checked here against
        :data:`~flwr_analytic.fedacnnl.config.RUN_CONFIG`.

    Returns
    -------
    ClientApp
        With the train (layer statistics) and evaluate (global and personalized accuracy/loss)
        handlers of :class:`FedACnnLHandlers`, for the default action and :data:`ACTION`; each
        resolves the run config once per message.

    """
    loader = load_partition or load_partition_from_config
    handlers = FedACnnLHandlers(loader, cache, RUN_CONFIG.check_overrides(run_config), model)
    app = ClientApp()
    for action in ("default", ACTION):
        app.train(action)(handlers.train)
        app.evaluate(action)(handlers.evaluate)
    return app


__all__ = [
    "ACTION",
    "guarded_reply",
    "FedACnnLHandlers",
    "PartitionLoader",
    "evaluate_global_and_personal",
    "keep_layer_statistics",
    "kept_layer_statistics",
    "layer_statistics",
    "make_fedacnnl_client_app",
    "resolved_context",
]
