"""Client half of :class:`~flwr_analytic.strategies.analytic_head.AnalyticHead`: your model, any backbone.

After any gradient strategy (FedAvg, FedProx, ...) the server sends the final global model with the
message ``train.analytic_head``. The client loads it into its own ``nn.Module`` (BatchNorm, residual
blocks: anything; only the head must be an ``nn.Linear``), runs its training data through it in eval
mode, captures the head's input features ``h`` with a forward pre-hook and replies with the float64
statistics ``G_k = A_kᵀA_k``, ``B_k = A_kᵀY_k`` of ``A = [h, 1]`` and one-hot ``Y`` (kept in
``context.state`` too). In ``evaluate.analytic_head`` it scores the global head ``W`` the server
solved and its pFedACnnL head ``W_k = (G_k + λI)⁻¹(B_k + λW)`` (Gu et al., arXiv 2502.06915) on its
test data. The maths is in :mod:`flwr_analytic.analytic.head`; this module adapts it to Flower.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from threadpoolctl import threadpool_limits
from torch import nn

from flwr_analytic.analytic import LayerStatistics, recalibrate
from flwr_analytic.analytic.head import (
    auto_personal_head,
    backbone_digest,
    evaluate_heads,
    expansion_keys,
    head_design,
    head_keys,
    head_matrix,
    head_module,
    head_statistics,
    personal_head,
    prepared_model,
)
from flwr_analytic.clients.fedacnnl_client import PartitionLoader, guarded_reply
from flwr_analytic.clients.fedacnnl_local import ClientData, as_client_data, num_samples
from flwr_analytic.clients.fedacnnl_project import partition_loader
from flwr_analytic.fedacnnl import protocol as P

#: The action of the head's messages: ``train.analytic_head``, ``evaluate.analytic_head``.
ACTION = "analytic_head"
#: ``ConfigRecord`` keys of the head's messages (besides ``batch-size``, ``dtype``, ``lam``, ...).
HEAD = "head"
EXPANSION_ACTIVATION = "expansion-activation"

_STATE_STATS = "analytic-head-stats"
_STATE_DIGEST = "analytic-head-digest"
_CACHE: dict[tuple[Any, ...], tuple[ClientData, ClientData]] = {}
_CACHE_SIZE = 64

Expansion = tuple[torch.Tensor, torch.Tensor] | None


def _partition_id(context: Context) -> int:
    return int(context.node_config.get(P.PARTITION_ID, -1))


def _threads(context: Context) -> int:
    """``client-threads`` of the run config (default 1; ``0``: leave torch and BLAS alone)."""
    return int(context.run_config.get("client-threads", 1))


@dataclass(frozen=True)
class AnalyticHeadHandlers:
    """The ``train.analytic_head`` / ``evaluate.analytic_head`` handlers of a client app.

    Parameters
    ----------
    load_partition : PartitionLoader
        ``load_partition(context) -> (train, test)`` of this node.
    model : torch.nn.Module or callable
        Your model (e.g. ``Net``); a module is copied for every message.
    head : str
        Name of the head ``nn.Linear`` (e.g. ``"fc3"``); the server's messages must name the same.
    keys : (str or None, str or None)
        Image and label keys of dict batches (default: flwr-datasets' names).
    cache : bool (default: True)
        Keep the loaders between rounds (by run and node config).

    """

    load_partition: PartitionLoader
    model: P.ModelSource
    head: str = "fc3"
    keys: tuple[str | None, str | None] = (None, None)
    cache: bool = True

    def data(self, context: Context) -> tuple[ClientData, ClientData]:
        """The node's ``(train, test)`` (cached by run id and node config)."""
        key = (self.load_partition, context.run_id, tuple(sorted(context.node_config.items())))
        if not self.cache or key not in _CACHE:
            train, test = self.load_partition(context)
            loaded = (as_client_data(train, *self.keys), as_client_data(test, *self.keys))
            if not self.cache:
                return loaded
            if len(_CACHE) >= _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = loaded
        return _CACHE[key]

    def receive(
        self, msg: Message
    ) -> tuple[ConfigRecord, dict[str, np.ndarray], nn.Module, Expansion, str]:
        """``(config, arrays, model, expansion, activation)`` of a head message.

        The model is this node's, with the message's backbone loaded (every entry but the head's
        weight and bias and the expansion, strictly), in eval mode and the message's ``dtype``.
        """
        config = msg.content[P.CONFIG_KEY]
        arrays = {k: v.numpy() for k, v in msg.content[P.ARRAYS_KEY].items()}
        if str(config[HEAD]) != self.head:
            raise ValueError(
                f"the server solves head {config[HEAD]!r}, this client app captures {self.head!r} "
                "(add_analytic_head_handlers(..., head=...))"
            )
        module = copy.deepcopy(self.model) if isinstance(self.model, nn.Module) else self.model()
        head_module(module, self.head)  # the head exists and is an nn.Linear
        skip = set(head_keys(self.head)) | set(expansion_keys(self.head))
        backbone = {k: torch.tensor(v) for k, v in arrays.items() if k not in skip}
        missing, unexpected = module.load_state_dict(backbone, strict=False)
        missing = [k for k in missing if k not in skip]
        if missing or unexpected:
            raise KeyError(
                f"the message's arrays do not fit this node's model: missing {missing}, "
                f"unexpected {list(unexpected)}"
            )
        kw, kb = expansion_keys(self.head)
        expansion = (torch.tensor(arrays[kw]), torch.tensor(arrays[kb])) if kw in arrays else None
        activation = str(config.get(EXPANSION_ACTIVATION, "relu"))
        return config, arrays, prepared_model(module, str(config[P.DTYPE])), expansion, activation

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
        threads = _threads(context)
        if threads <= 0:
            return guarded_reply(handler, msg, context)
        torch.set_num_threads(threads)
        with threadpool_limits(threads, user_api="blas"):
            return guarded_reply(handler, msg, context)

    def statistics(
        self,
        model: nn.Module,
        train: ClientData,
        config: ConfigRecord,
        expansion: Expansion,
        activation: str,
    ) -> LayerStatistics:
        """``(G_k, B_k, n_k)`` of this node's training data (float64)."""
        classes = head_module(model, self.head).out_features
        batch_size = int(config[P.BATCH_SIZE])
        return head_statistics(
            model, self.head, train, classes, expansion, activation, batch_size=batch_size
        )

    def train_reply(self, msg: Message, context: Context) -> Message:
        """Reply with the packed statistics (``statistics``) and ``metrics``.

        ``metrics``: ``num-examples`` (``n_k``), ``partition-id``, ``num-partitions``,
        ``compute-time``. The statistics are also kept in ``context.state`` with the digest of the
        backbone they were computed with (:func:`~flwr_analytic.analytic.head.backbone_digest`).
        """
        start = time.perf_counter()
        config, arrays, model, expansion, activation = self.receive(msg)
        train, _ = self.data(context)
        stats = self.statistics(model, train, config, expansion, activation)
        packed = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in stats.pack().items()})
        context.state[_STATE_STATS] = packed
        context.state[_STATE_DIGEST] = ConfigRecord({"digest": backbone_digest(arrays, self.head)})
        metrics = MetricRecord(
            {
                P.NUM_EXAMPLES: int(stats.count),
                P.PARTITION_ID: _partition_id(context),
                P.NUM_PARTITIONS: int(context.node_config.get(P.NUM_PARTITIONS, 0)),
                "compute-time": time.perf_counter() - start,
            }
        )
        content = RecordDict({P.STATISTICS_KEY: packed, P.METRICS_KEY: metrics})
        return Message(content=content, reply_to=msg)

    def evaluate_reply(self, msg: Message, context: Context) -> Message:
        """Reply with the global and pFedACnnL head's accuracy and loss on the test data.

        The personalized head ``W_k = (G_k + λI)⁻¹(B_k + λW)`` uses the statistics kept from the
        training round when the backbone digest matches (``stats-reused = 1``), else recomputes them.
        """
        start = time.perf_counter()
        config, arrays, model, expansion, activation = self.receive(msg)
        train, test = self.data(context)
        kept = kept_head_statistics(context)
        reused = int(kept is not None and kept[0] == backbone_digest(arrays, self.head))
        if kept is not None and reused:
            stats = kept[1]
        else:
            stats = self.statistics(model, train, config, expansion, activation)
        w = head_matrix(arrays, self.head)
        bias = head_keys(self.head)[1] in arrays
        batch_size = int(config[P.BATCH_SIZE])
        metrics: dict[str, Any] = {"train-examples": num_samples(train)}
        if P.personal_lambda_mode(config) == "auto":  # this client's own ρ, by leave-one-out
            design, labels = head_design(model, self.head, train, expansion, activation, batch_size)
            leverage = float(config.get(P.GLOBAL_LEVERAGE, 0.0))
            choice = auto_personal_head(design, labels, stats, w, bias, leverage=leverage)
            personal, metrics[P.PERSONAL_LAMBDA] = choice.weights, float(choice.rho)
        else:
            personal = personal_head(stats, w, P.personal_regularization(config), bias)
        recalibration = P.personal_recalibration(config)  # then the client's own recalibration
        if recalibration is not None:
            if not bias:
                raise ValueError(f"personal-recalibration needs a head with a bias ({self.head!r})")
            personal = recalibrate(stats.gram, stats.cross, personal, recalibration)
        heads = {"global": w, "personal": personal}
        scores = evaluate_heads(model, self.head, test, heads, expansion, activation, batch_size)
        for name, res in scores.items():
            metrics[P.NUM_EXAMPLES] = int(res["num-examples"])
            metrics[f"{name}-accuracy"] = float(res["accuracy"])
            metrics[f"{name}-loss"] = float(res["loss"])
            metrics[f"{name}-correct"] = int(res["correct"])
        metrics["stats-reused"] = reused
        metrics[P.PARTITION_ID] = _partition_id(context)
        metrics["compute-time"] = time.perf_counter() - start
        return Message(content=RecordDict({P.METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)


def kept_head_statistics(context: Context) -> tuple[str, LayerStatistics] | None:
    """The ``(backbone digest, statistics)`` this node kept from its last head training round."""
    if _STATE_STATS not in context.state or _STATE_DIGEST not in context.state:
        return None
    packed = {k: v.numpy() for k, v in context.state[_STATE_STATS].items()}
    return str(context.state[_STATE_DIGEST]["digest"]), LayerStatistics.unpack(packed)


def add_analytic_head_handlers(
    app: ClientApp,
    load_data: Callable[[int, int], tuple[Any, Any]] | None = None,
    *,
    model: P.ModelSource,
    head: str = "fc3",
    load_partition: PartitionLoader | None = None,
    image_key: str | None = None,
    label_key: str | None = None,
    cache: bool = True,
) -> ClientApp:
    """Teach your project's ``ClientApp`` the analytic head, next to its own handlers.

    Registers ``@app.train("analytic_head")`` and ``@app.evaluate("analytic_head")``
    (:data:`ACTION`), so your FedAvg handlers keep serving ``train`` / ``evaluate``.

    Parameters
    ----------
    app : ClientApp
        Your client app.
    load_data : callable, optional
        Your ``load_data(partition_id, num_partitions) -> (trainloader, testloader)``; called with
        the node config's ``partition-id`` and ``num-partitions``.
    model : torch.nn.Module or callable
        Your model (e.g. ``Net``): any backbone, with the head an ``nn.Linear``.
    head : str (default: "fc3")
        The head's module name (``model.named_modules()``), e.g. ``"fc"`` or ``"classifier.1"``.
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
    head_module(model if isinstance(model, nn.Module) else model(), head)  # fail at build time
    handlers = AnalyticHeadHandlers(load_partition, model, head, (image_key, label_key), cache)
    app.train(ACTION)(handlers.train)
    app.evaluate(ACTION)(handlers.evaluate)
    return app


__all__ = [
    "ACTION",
    "EXPANSION_ACTIVATION",
    "HEAD",
    "AnalyticHeadHandlers",
    "add_analytic_head_handlers",
    "kept_head_statistics",
]
