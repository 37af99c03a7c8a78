"""FedACnnL and pFedACnnL as a Flower Message-API strategy.

Gu et al., "Analytic Personalized Federated Meta-Learning", arXiv 2502.06915. The math and the state
live in :class:`~flwr_analytic.analytic.server.LayerwiseServer` (no Flower); this module speaks
Flower: it samples nodes, builds messages, decodes replies and records rounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from logging import DEBUG, INFO, WARNING
from typing import Any, Unpack

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import nn

from flwr_analytic.analytic import StatisticsError, TargetScheme
from flwr_analytic.analytic.privacy.release import ReleasePolicy
from flwr_analytic.analytic.server import ANALYTIC_DEFAULTS, AnalyticOptions, LayerwiseServer
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.models import Architecture, TracedArchitecture, as_architecture
from flwr_analytic.report import short_list
from flwr_analytic.strategies.availability import sample_available
from flwr_analytic.strategies.evaluation import aggregate_personalized_evaluation
from flwr_analytic.strategies.fedacnnl_checks import check_fedacnnl_arguments
from flwr_analytic.strategies.fedacnnl_replies import (
    accept_reply,
    error_reply,
    evaluation_replies,
    failure_message,
    name_absent,
    round_metrics,
)
from flwr_analytic.strategies.layerwise_loop import run_layerwise
from flwr_analytic.strategies.records import RoundLog, RoundRecord
from flwr_analytic.strategies.streaming import ReplyStream
from flwr_analytic.strategies.utils import retry_sample


class FedACnnL(Strategy):
    r"""Federated analytic CNN learning (FedACnnL) with pFedACnnL personalization.

    Implementation based on https://arxiv.org/abs/2502.06915 (Gu et al.).

    One training round per layer fitted from statistics. In the round of layer :math:`l` the
    sampled clients receive the solved layers :math:`< l` and reply with
    :math:`(G_k, B_k, n_k)` of layer :math:`l`; every reply is checked, the valid ones are summed
    and the layer is solved in closed form,

    .. math:: W_l = \Big(\sum_k G_k + \gamma I\Big)^{-1} \sum_k B_k

    (output layer; hidden layers follow their target scheme). The sum equals the pooled data's
    statistics, so the model equals centralized training for any partition. After the last layer
    the clients evaluate the global model and pFedACnnL's
    :math:`W_k = (G_k + \lambda I)^{-1}(B_k + \lambda W)`, computed from statistics they hold.

    Parameters
    ----------
    architecture : torch.nn.Module, Architecture or TracedArchitecture
        Your model (e.g. the quickstart's ``Net()``, traced by ``models.trace_model``; the result
        keeps your parameter names) or a built-in one (loads into ``architecture.build_module()``).
    input_shape : tuple of int, optional
        Shape of one sample, e.g. ``(3, 32, 32)``; required with a ``torch.nn.Module``.
    scheme : str, TargetScheme or a sequence of them (default: "label-pca")
        Hidden-layer target scheme(s): ``label-pca`` … ``zca-kmeans`` (``analytic.targets.SCHEMES``).
    gamma, hidden_gamma : float (default: 1e-6, 1e-2)
        Ridge of the output layer and of hidden layers that regress onto targets.
    gamma_rule, lam_rule : {"relative", "absolute", "standardized"} (default: "relative")
        ``relative`` scales the ridge / λ by ``trace(G)/D`` (``solvers.Regularization``).
    lam : float (default: 0.1)
        pFedACnnL's λ (> 0; λ → ∞ is the global model, λ → 0 the local ridge model).
    personal_lambda, personal_recalibration : {"fixed", "auto"}, float (default: "fixed", 0.0)
        ``auto``: each client picks its output layer's ρ (``lam_rule``) by exact leave-one-out
        (``analytic.personal_lambda``; ``lam`` unused). Recalibration ρ > 0: each client then
        refits its layer on its own scores (``analytic.recalibration``: prior and confusions).
    personalize_layers : {"last", "all"} (default: "last")
        Personalize the output layer (the paper) or every layer that regresses onto labels.
    seed : int (default: 0)
        Seed of label encodings and random filters (sent to every client).
    dtype : {"float64", "float32"} (default: "float64")
        Precision of the clients' forward pass (sums are float64).
    batch_size : int (default: 256)
        Client batch size when streaming statistics (memory only).
    fraction_train, fraction_evaluate : float (default: 1.0)
        Fractions of connected nodes sampled (at least ``min_*_nodes``); ``fraction_evaluate=0``
        skips federated evaluation.
    min_train_nodes, min_evaluate_nodes, min_available_nodes : int (default: 2)
        Minimum nodes per round and connected.
    availability_timeout : float (default: 600)
        Seconds a round waits for ``min_available_nodes``; then it goes on with the connected
        nodes if at least ``min_valid_replies`` are, else ``NodesUnavailableError`` names them.
    min_valid_replies : int (default: 1)
        A layer is solved only from at least this many valid replies; absent, failing or rejected
        clients are left out (the layer equals the centralized one over the others' data).
    max_retries : int (default: 1)
        Retries of a layer with too few valid replies (a new round to connected nodes without
        valid statistics; valid replies are kept). Then ``RuntimeError`` names the layer.
    accept_failures : bool (default: True)
        ``False`` stops the run at the first failed, rejected or missing reply.
    aggregation : {"sorted", "streaming"} (default: "sorted")
        ``sorted`` sums in partition order (bit-reproducible); ``streaming`` adds each reply as it
        arrives (server memory ``O(D²)`` for any number of clients; equal to rounding).
    release : ReleasePolicy, optional
        Exact statistics (default) or ``analytic.privacy.release.DPRelease`` (Gaussian noise).
    num_groups : int (default: 0)
        ``>= 2``: after the output layer's round, clients are clustered by label distribution and
        one output layer is solved per group (hidden layers stay global).
    max_in_flight, pull_interval : int, float (default: 64, 0.05)
        Streaming: messages pushed at a time (``0``: all at once); seconds between two pulls.
    weighted_by_key, arrayrecord_key, configrecord_key : str
        Record keys (defaults ``num-examples``, ``arrays``, ``config``).
    evaluate_metrics_aggr_fn : callable, optional
        ``(list[RecordDict], str) -> MetricRecord``; default ``aggregate_personalized_evaluation``.
    action : str (default: "fedacnnl")
        Messages are ``train.<action>`` / ``evaluate.<action>`` (``"default"``: ``train``), so a
        project's client app serves them next to its own (``clients.add_fedacnnl_handlers``).

    Notes
    -----
    ``history`` (``records.RoundLog``) holds one record per round: the layer, ``num-valid``,
    ``partitions`` summed, ``rejected`` (node, reason), ``missing-*`` / ``failed-*``, ``num-carried``;
    ``metering.Metered`` adds bytes and times, ``checkpointing.Checkpointed`` resumes after a crash.
    """

    def __init__(
        self,
        architecture: Architecture | TracedArchitecture | nn.Module,
        scheme: str | TargetScheme | Sequence[str | TargetScheme] = "label-pca",
        *,
        input_shape: tuple[int, ...] | None = None,
        lam: float = 0.1,
        lam_rule: str = "relative",
        personal_lambda: str = "fixed",
        personal_recalibration: float = 0.0,
        personalize_layers: str = "last",
        batch_size: int = 256,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        availability_timeout: float = 600.0,
        max_retries: int = 1,
        accept_failures: bool = True,
        max_in_flight: int = 64,
        pull_interval: float = 0.05,
        weighted_by_key: str = P.NUM_EXAMPLES,
        arrayrecord_key: str = P.ARRAYS_KEY,
        configrecord_key: str = P.CONFIG_KEY,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        action: str = "fedacnnl",
        **analytic: Unpack[AnalyticOptions],
    ) -> None:
        architecture = as_architecture(architecture, input_shape)
        check_fedacnnl_arguments({**locals(), **ANALYTIC_DEFAULTS, **analytic})
        self.server = LayerwiseServer(architecture, scheme, **analytic)
        self.architecture, self.scheme = architecture, scheme
        self.lam, self.lam_rule, self.personal_lambda = lam, lam_rule, personal_lambda
        self.personal_recalibration = float(personal_recalibration)
        self.personalize_layers, self.batch_size = personalize_layers, batch_size
        self.fraction_train, self.fraction_evaluate = fraction_train, fraction_evaluate
        self.min_train_nodes, self.min_available_nodes = min_train_nodes, min_available_nodes
        self.availability_timeout = float(availability_timeout)
        self.min_evaluate_nodes = 0 if fraction_evaluate == 0.0 else min_evaluate_nodes
        self.max_retries, self.accept_failures = int(max_retries), accept_failures
        self.max_in_flight, self.pull_interval = int(max_in_flight), float(pull_interval)
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key, self.configrecord_key = arrayrecord_key, configrecord_key
        self.evaluate_metrics_aggr_fn = (
            evaluate_metrics_aggr_fn or aggregate_personalized_evaluation
        )
        self.action = action
        self.reset()

    def message_type(self, category: str) -> str:
        """``category`` (``train`` / ``evaluate``) qualified by :attr:`action`."""
        return category if self.action == "default" else f"{category}.{self.action}"

    def reset(self) -> None:
        """Start over: no layer solved, an empty history."""
        self.server.reset()
        self.history = RoundLog()
        self.evaluated = False
        self._attempts: dict[int, int] = {}
        self._sent: dict[int, list[int]] = {}
        self._connected: set[int] | None = None

    net = property(lambda self: self.server.net, doc="The server's ``AnalyticNetwork``.")

    @property
    def num_rounds(self) -> int:
        """Training rounds needed: one per layer fitted from statistics."""
        return self.server.num_rounds

    @property
    def finished(self) -> bool:
        """Whether every layer is solved."""
        return self.server.finished

    @property
    def release(self) -> ReleasePolicy:
        """The release policy (exact or DP statistics)."""
        return self.server.release

    def global_arrays(self) -> ArrayRecord:
        """The solved layers as a float64 ``ArrayRecord`` of the ``SpecNet`` ``state_dict``."""
        return ArrayRecord(P.weights_state_dict(self.net))

    def group_arrays(self, group: int) -> ArrayRecord:
        """The output layer of ``group`` as float64 ``state_dict`` entries."""
        return ArrayRecord(P.output_layer_state(self.net, self.server.group_weights[group]))

    def summary(self) -> None:
        """Log the configuration of the strategy."""
        arch, s = self.architecture, self.server
        log(INFO, "\t├──> FedACnnL (arXiv 2502.06915): %s, %d layers", arch.name, arch.num_layers)
        log(INFO, "\t│\t├──Training rounds (one per fitted layer): %d", self.num_rounds)
        log(INFO, "\t│\t├──Schemes %s | γ: output %g, hidden %g (%s) | λ: %g (%s, %s), personalize %s",
            [x.summary() for x in self.net.schemes], s.gamma, s.hidden_gamma, s.gamma_rule, self.lam,
            self.lam_rule, self.personal_lambda, self.personalize_layers)  # fmt: skip
        log(INFO, "\t│\t└──aggregation %s, release %s, groups %d, seed %d, dtype %s%s",
            s.aggregation, s.release.name, s.num_groups, s.seed, s.dtype, ", mirror" * s.mirror)  # fmt: skip
        log(INFO, "\t└──> Sampling: fraction train %.2f / evaluate %.2f, min nodes %d / %d / %d",
            self.fraction_train, self.fraction_evaluate, self.min_train_nodes,
            self.min_evaluate_nodes, self.min_available_nodes)  # fmt: skip

    def _config(self, config: ConfigRecord | None, server_round: int) -> ConfigRecord:
        out = ConfigRecord(dict(config or {}))
        out.update(P.network_config(self.net, self.batch_size))
        out[P.SERVER_ROUND] = server_round
        out[P.PERSONALIZE_LAYERS] = self.personalize_layers
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask the sampled nodes for the statistics of the next unsolved layer.

        ``arrays`` is ignored: the strategy sends its own solved layers ``< l``.
        """
        if self.finished:
            return []
        layer = self.server.layer
        if self.server.carried:
            answered = {key.node for key in self.server.open_layer().keys}
            node_ids = retry_sample(grid, answered, self.fraction_train, self.min_train_nodes)
        else:
            node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes,
                                    f"layer {layer + 1}/{self.net.num_layers}")  # fmt: skip
        cfg = self._config(config, server_round)
        cfg[P.LAYER] = layer
        extra_cfg, extra_arrays = P.round_content(self.net)  # a k-means layer's round
        cfg.update(extra_cfg)
        arrays_sent = ArrayRecord({**P.weights_state_dict(self.net), **extra_arrays})
        content = RecordDict({self.arrayrecord_key: arrays_sent, self.configrecord_key: cfg})
        record = self.history.open(server_round, "train", layer=layer, **extra_cfg)  # k-means stage
        record.num_sent = len(node_ids)
        self._sent[server_round], self._connected = node_ids, set(grid.get_node_ids())
        log(DEBUG, "configure_train: layer %d/%d (D=%d), sampled %d nodes",
            layer + 1, self.net.num_layers, self.net.design_dim(layer), len(node_ids))  # fmt: skip
        return [
            Message(content, dst_node_id=n, message_type=self.message_type(MessageType.TRAIN))
            for n in node_ids
        ]

    def _sample(self, grid: Grid, fraction: float, minimum: int, what: str) -> list[int]:
        return sample_available(grid, fraction, minimum, self.min_available_nodes, what=what,
                                timeout=self.availability_timeout, known=self.server.node_partitions,
                                needed=self.server.min_valid_replies)  # fmt: skip

    def _reject(self, record: RoundRecord, node: int, reason: str) -> None:
        log(WARNING, "Rejected reply from node %d: %s", node, reason)
        record.reject(node, reason)
        if not self.accept_failures:
            raise RuntimeError(f"reply from node {node} rejected (accept_failures=False): {reason}")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply, add it to the layer's sum and solve; return the model so far.

        Returns ``(None, metrics)`` when fewer than ``min_valid_replies`` replies were valid; after
        ``max_retries`` such attempts at one layer, raises ``RuntimeError`` naming it.
        """
        t0, layer = time.perf_counter(), self.server.layer
        record, carried = self.history.open(server_round, "train"), self.server.carried
        record.details["layer"] = layer
        failed, failed_pids, replied, compute, check_time, num_replies = [], {}, set(), [], 0.0, 0
        for msg in replies:
            t_msg, node = time.perf_counter(), int(msg.metadata.src_node_id)
            kind, pid = error_reply(msg) if msg.has_error() else ("ok", None)
            if kind == "unavailable":  # the SuperLink's word for a node that is gone: missing
                continue
            replied.add(node)
            num_replies += 1
            if kind == "failed":
                failed.append(node)
                failed_pids.update({} if pid is None else {node: pid})
                self._reject(record, node, f"client error: {msg.error.reason}")
                continue
            try:
                metrics, _ = accept_reply(self.server, msg, self._connected, self.weighted_by_key)
            except StatisticsError as exc:
                self._reject(record, node, str(exc))
                continue
            compute.append(float(metrics.get("compute-time", 0.0)))
            del msg
            check_time += time.perf_counter() - t_msg
        record.num_replies = num_replies
        if carried:
            record.details["num-carried"] = carried
        t_solve = time.perf_counter()
        outcome = self.server.close_layer()
        for key, reason in outcome.duplicates:
            self._reject(record, key.node, reason)
        absent = name_absent(record, self._sent.pop(server_round, []), replied, failed,
                             {**self.server.node_partitions, **failed_pids})  # fmt: skip
        if absent["num-missing"]:
            log(WARNING, "layer %d/%d: %d replies missing (timeout or disconnect): "
                "partitions %s, nodes %s", layer + 1, self.net.num_layers, absent["num-missing"],
                short_list(absent.get("missing-partitions", [])),
                short_list(absent.get("missing-nodes", [])))  # fmt: skip
            if not self.accept_failures:
                raise RuntimeError(
                    f"{absent['num-missing']} replies missing (accept_failures=False)"
                )
        timings = {"compute": compute, "check": check_time, "solve": time.perf_counter() - t_solve}
        extra = self.release.details(self.net, layer, outcome.num_valid)
        metrics = round_metrics(record, outcome, absent, timings, extra)
        if outcome.groups is not None:
            log(INFO, "group-wise output layers: %d groups of sizes %s",
                len(outcome.groups), short_list([len(g) for g in outcome.groups]))  # fmt: skip
        log(DEBUG, "aggregate_train: layer %d/%d from %d/%d replies (%d rejected), %.2f s",
            layer + 1, self.net.num_layers, outcome.num_valid, record.num_replies,
            metrics["num-rejected"], time.perf_counter() - t0)  # fmt: skip
        if outcome.solved:
            return self.global_arrays(), metrics
        self._attempts[layer] = self._attempts.get(layer, 0) + 1
        if self._attempts[layer] > self.max_retries:
            raise RuntimeError(failure_message(
                self.history, layer, self.server.min_valid_replies, self.max_retries,
                self.net.solved_layers, self.net.num_layers))  # fmt: skip
        log(WARNING, "layer %d/%d: %d valid replies < min_valid_replies=%d; retry %d of %d",
            layer + 1, self.net.num_layers, outcome.num_valid, self.server.min_valid_replies,
            self._attempts[layer], self.max_retries)  # fmt: skip
        return None, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Once every layer is solved (and once only): the global model, λ and group layers."""
        if self.fraction_evaluate == 0.0 or not self.finished or self.evaluated:
            return []
        node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, "evaluation")
        cfg, sent, messages = self._config(config, server_round), self.global_arrays(), []
        settings = (self.lam, self.lam_rule, self.personal_lambda, self.server.output_leverage)
        cfg.update(P.evaluate_settings(*settings, self.personal_recalibration))
        for node_id in node_ids:
            content = RecordDict({self.arrayrecord_key: sent, self.configrecord_key: cfg})
            group = self.server.group_of_node.get(node_id)
            if group is not None:
                content[P.GROUP_ARRAYS_KEY] = self.group_arrays(group)
            kind = self.message_type(MessageType.EVALUATE)
            messages.append(Message(content, dst_node_id=node_id, message_type=kind))
        self.history.open(server_round, "evaluate").num_sent = len(messages)
        self.evaluated = True
        log(INFO, "configure_evaluate: sampled %d nodes", len(node_ids))
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate global and pFedACnnL metrics of the valid replies (by ``partition-id``)."""
        replies = list(replies)
        if not replies:
            return None
        record = self.history.open(server_round, "evaluate")
        record.num_replies = len(replies)
        good, rejected = evaluation_replies(self.server.owners, replies)
        for node, reason in rejected:
            self._reject(record, node, reason)
        metrics = self.evaluate_metrics_aggr_fn(good, self.weighted_by_key) if good else None
        record.metrics = dict(metrics) if metrics is not None else {}
        return metrics

    def start(self, grid: Grid, *args: Any, **kwargs: Any) -> Result:
        """Run FedACnnL: one round per fitted layer (plus retries), then evaluation.

        Arguments as Flower's ``Strategy.start`` (``initial_arrays`` only checked, ``num_rounds``
        the fitted layers by default), run by :func:`~.layerwise_loop.run_layerwise`: Flower's
        loop cannot express FedACnnL (fixed rounds, ``evaluate_fn`` on incomplete models).
        """
        return run_layerwise(self, grid, *args, **kwargs)

    def reply_grid(self, grid: Grid) -> Grid:
        """The grid the loop talks to: ``grid``, or a :class:`ReplyStream` over it (streaming)."""
        if self.server.aggregation == "streaming":
            return ReplyStream(grid, self.pull_interval, self.max_in_flight)
        return grid

    def privacy(self) -> dict[str, Any] | None:
        """The release policy's report (DP: each client's ``(ε, δ)``), ``None`` when exact."""
        released = sum(1 for r in self.history if r.kind == "train")
        return self.release.report(released or self.num_rounds)

    def checkpoint_fingerprint(self) -> dict[str, Any]:
        """What determines the solved layers (:meth:`LayerwiseServer.fingerprint`) + batch size."""
        return {"strategy": "FedACnnL", **self.server.fingerprint(), "batch-size": self.batch_size}

    def checkpoint_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The server state and the history, for :class:`Checkpointed`."""
        arrays, meta = self.server.state()
        return arrays, {**meta, "history": self.history.as_dicts(), "evaluated": self.evaluated}

    def restore_checkpoint_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_state`."""
        self.reset()
        self.server.restore(arrays, meta)
        self.history.load(meta["history"])
        self.evaluated = bool(meta.get("evaluated", False))

    def add_clients(self, statistics: Iterable[Any], *, remove: bool = False) -> np.ndarray:
        """Join clients after training: ``W = (G + ΣG_j + γI)⁻¹(B + ΣB_j)`` (no round).

        Each item: a client's output-layer statistics (``LayerStatistics`` or packed). Exact for
        the output layer given the hidden layers; group layers not updated (``remove=True``: undo).
        """
        w, details = self.server.update_output(statistics, remove=remove)
        kind = "remove-clients" if remove else "add-clients"
        self.history.open(max((r.round for r in self.history), default=0), kind).details = details
        if self.server.group_weights:
            log(WARNING, "%s: the group-wise output layers are not updated", kind)
        log(INFO, "%s: %d clients, output layer re-solved", kind, details["num-clients"])
        return w

    def remove_clients(self, statistics: Iterable[Any]) -> np.ndarray:
        """Unlearn clients: ``W = (G − ΣG_k + γI)⁻¹(B − ΣB_k)``, checked (``StatisticsError``).

        Exactly the model without them for ``linear`` / ``random`` hidden layers; with
        data-dependent hidden layers only the output layer given the hidden layers is exact.
        """
        return self.add_clients(statistics, remove=True)


__all__ = ["FedACnnL", "aggregate_personalized_evaluation"]
