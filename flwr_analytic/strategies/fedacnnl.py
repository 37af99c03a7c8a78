"""FedACnnL and pFedACnnL as a Flower Message-API strategy.

Gu et al., "Analytic Personalized Federated Meta-Learning", arXiv 2502.06915. FedACnnL trains a
network layer by layer without gradients: in the round of layer ``l`` every sampled client returns
``(G_k, B_k, n_k)`` of the layer computed with the global layers ``< l``; the server sums them in a
fixed order and solves ``W_l`` in closed form. Because sums of statistics equal the statistics of the
pooled data, the global model equals the centralized analytic network. pFedACnnL personalizes each
client's output layer in closed form, ``W_k = (G_k + λI)⁻¹(B_k + λW)``, from statistics the client
already has; the evaluation round reports both models.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from flwr_analytic.analytic import (
    AnalyticNetwork,
    LayerStatistics,
    Regularization,
    StatisticsError,
    TargetScheme,
    merge,
    ridge_solve,
)
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.models import Architecture, build_module


def arrays_nbytes(record: ArrayRecord | None) -> int:
    """Bytes of the tensors in ``record`` (serialized ``Array.data``; framing not counted)."""
    return 0 if record is None else int(sum(len(a.data) for a in record.values()))


def _summary(values: np.ndarray, weights: np.ndarray, prefix: str) -> dict[str, float]:
    return {
        f"{prefix}": float(np.sum(values * weights) / np.sum(weights)),
        f"{prefix}-client-mean": float(np.mean(values)),
        f"{prefix}-client-std": float(np.std(values)),
        f"{prefix}-client-min": float(np.min(values)),
        f"{prefix}-client-p10": float(np.percentile(values, 10)),
    }


def aggregate_personalized_evaluation(
    records: list[RecordDict], weighted_by_key: str = P.NUM_EXAMPLES
) -> MetricRecord:
    """Aggregate the clients' global and pFedACnnL metrics.

    For ``m`` in ``global-accuracy``, ``global-loss``, ``personal-accuracy``, ``personal-loss``:
    ``m`` (sample-weighted mean over clients), ``m-client-mean``, ``m-client-std`` (population),
    ``m-client-min``, ``m-client-p10`` (10th percentile), and ``m-clients`` (per-client values,
    ordered by ``partition-id``, listed in ``client-ids``). Also ``num-clients``, ``num-examples``
    and ``num-stats-reused`` (clients that personalized from the statistics kept in their
    ``context.state`` rather than recomputing them). Clients with an empty test set are left out.
    """
    rows = [next(iter(r.metric_records.values())) for r in records]
    rows = [m for m in rows if float(m[weighted_by_key]) > 0]
    rows.sort(key=lambda m: float(m.get(P.PARTITION_ID, -1)))
    if not rows:
        return MetricRecord({"num-clients": 0, "num-examples": 0})
    n = np.array([float(m[weighted_by_key]) for m in rows])
    out: dict[str, Any] = {"num-clients": len(rows), "num-examples": int(n.sum())}
    keys = ["global-accuracy", "global-loss", "personal-accuracy", "personal-loss"]
    group_keys = ["group-accuracy", "group-loss", "group-personal-accuracy", "group-personal-loss"]
    keys += [k for k in group_keys if all(k in m for m in rows)]
    for key in keys:
        values = np.array([float(m[key]) for m in rows])
        out.update(_summary(values, n, key))
        out[f"{key}-clients"] = [float(v) for v in values]
    out["client-ids"] = [int(m.get(P.PARTITION_ID, -1)) for m in rows]
    out["num-stats-reused"] = int(sum(int(m.get("stats-reused", 0)) for m in rows))
    return MetricRecord(out)


# pylint: disable=too-many-instance-attributes
class FedACnnL(Strategy):
    """Federated analytic CNN learning (FedACnnL) with pFedACnnL personalization.

    Implementation based on https://arxiv.org/abs/2502.06915 (Gu et al., "Analytic Personalized
    Federated Meta-Learning").

    One training round per layer that needs statistics (layers with the ``random`` scheme are
    drawn from the seed without a round). In the round of layer ``l`` the strategy sends the global
    layers ``< l`` (float64 ``state_dict`` slices) and a ``ConfigRecord`` with ``layer``,
    ``architecture``, ``scheme``, ``seed``, ``dtype``, ``batch-size`` and ``server-round``; each client
    replies with the packed statistics of layer ``l`` and ``num-examples``. Every reply is checked
    (:meth:`LayerStatistics.validate`); a bad one is logged and skipped. The valid statistics are
    summed in ``partition-id`` order (node id when a reply has none), so the result does not depend
    on sampling or arrival order, and the layer is solved. After the last layer the full model is
    evaluated by the clients: global and pFedACnnL accuracy/loss (see
    :func:`aggregate_personalized_evaluation`).

    Parameters
    ----------
    architecture : Architecture
        The network (``flwr_analytic.models.get_architecture``); the final ``ArrayRecord`` loads into
        ``build_module(architecture)``.
    scheme : str, TargetScheme or a sequence of them (default: "label-pca")
        Hidden-layer target scheme, one for all hidden layers or one per hidden layer
        (``"label-pca"``, ``"pca"``, ``"label-encoding"``, ``"random"``, ``"random-standardized"``).
    gamma : float (default: 1e-6)
        Ridge γ of the output layer, ``W = (ΣG_k + γI)⁻¹ ΣB_k``.
    hidden_gamma : float (default: 1e-2)
        Ridge of hidden layers that regress onto targets (label-encoding, label channels).
    gamma_rule : {"relative", "absolute"} (default: "relative")
        ``relative``: the ridge is ``gamma · trace(G)/D`` (scale-free); ``absolute``: ``gamma``.
    lam : float (default: 0.1)
        pFedACnnL's λ: ``W_k = (G_k + λI)⁻¹(B_k + λW)``; λ → ∞ is the global model, λ → 0 the
        local ridge model. Must be > 0.
    lam_rule : {"relative", "absolute"} (default: "relative")
        ``relative``: ``λ = lam · trace(G_k)/D`` per client; ``absolute``: ``λ = lam``.
    personalize_layers : {"last", "all"} (default: "last")
        Personalize only the output layer (the paper), or every layer that regresses onto labels.
    seed : int (default: 0)
        Seed of label encodings and random filters (sent to every client).
    dtype : {"float64", "float32"} (default: "float64")
        Precision of the clients' forward pass and batch products (sums are float64). ``float64``
        makes the federated model equal the centralized one to rounding.
    batch_size : int (default: 256)
        Client batch size when streaming statistics (memory only; results do not depend on it).
    fraction_train : float (default: 1.0)
        Fraction of nodes used during training. In case `min_train_nodes`
        is larger than `fraction_train * total_connected_nodes`, `min_train_nodes`
        will still be sampled.
    fraction_evaluate : float (default: 1.0)
        Fraction of nodes used during validation. In case `min_evaluate_nodes`
        is larger than `fraction_evaluate * total_connected_nodes`,
        `min_evaluate_nodes` will still be sampled. ``0.0`` skips federated evaluation.
    min_train_nodes : int (default: 2)
        Minimum number of nodes used during training.
    min_evaluate_nodes : int (default: 2)
        Minimum number of nodes used during validation.
    min_available_nodes : int (default: 2)
        Minimum number of total nodes in the system.
    min_valid_replies : int (default: 1)
        A layer is solved only from at least this many valid replies; otherwise the run stops with
        ``RuntimeError`` (replies missing at the ``timeout`` of :meth:`start` count as failures).
    accept_failures : bool (default: True)
        Continue when some replies fail or are rejected; ``False`` stops the run at the first one.
    weighted_by_key : str (default: "num-examples")
        The key of each reply's MetricRecord holding its sample count (the weight of evaluation
        averages; in training it must equal the statistics' ``count``).
    arrayrecord_key : str (default: "arrays")
        Key used to store the ArrayRecord when constructing Messages.
    configrecord_key : str (default: "config")
        Key used to store the ConfigRecord when constructing Messages.
    evaluate_metrics_aggr_fn : Optional[callable] (default: None)
        Function with signature (list[RecordDict], str) -> MetricRecord aggregating evaluation
        replies. If `None`, defaults to :func:`aggregate_personalized_evaluation`.
    num_groups : int (default: 0)
        Group-wise models (paper v1: clients with similar data share a model). With ``>= 2``, after
        the output layer's round the server clusters the clients by their label distributions
        (the bias row of the output layer's ``B_k`` is the client's label histogram, so no extra
        data is sent; seeded k-means++) and solves one output layer per group from the group's
        summed statistics (hidden layers stay global). Evaluation then also reports ``group-*`` and
        ``group-personal-*`` metrics next to the single global model's. ``0``/``1``: off.

    Notes
    -----
    ``history`` holds one dict per round: ``round``, ``layer``, ``kind`` (``train``/``evaluate``),
    ``bytes-sent`` / ``bytes-received`` (tensor bytes to and from all clients), ``round-time``
    (seconds from ``configure_*`` to the end of ``aggregate_*``), the number of replies, the
    rejected ones with their reasons, and the aggregated metrics.
    """

    # pylint: disable=too-many-arguments,too-many-locals
    def __init__(
        self,
        architecture: Architecture,
        scheme: str | TargetScheme | Sequence[str | TargetScheme] = "label-pca",
        *,
        gamma: float = 1e-6,
        hidden_gamma: float = 1e-2,
        gamma_rule: str = "relative",
        lam: float = 0.1,
        lam_rule: str = "relative",
        personalize_layers: str = "last",
        seed: int = 0,
        dtype: str = "float64",
        batch_size: int = 256,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        min_valid_replies: int = 1,
        accept_failures: bool = True,
        weighted_by_key: str = P.NUM_EXAMPLES,
        arrayrecord_key: str = P.ARRAYS_KEY,
        configrecord_key: str = P.CONFIG_KEY,
        evaluate_metrics_aggr_fn: (Callable[[list[RecordDict], str], MetricRecord] | None) = None,
        num_groups: int = 0,
    ) -> None:
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train}")
        if not 0.0 <= fraction_evaluate <= 1.0:
            raise ValueError(f"fraction_evaluate must be in [0, 1], got {fraction_evaluate}")
        if lam <= 0:
            raise ValueError(f"lam must be > 0 (λ → 0 is the local model), got {lam}")
        Regularization(lam, lam_rule)  # validates the rule
        P.personalized_layers(AnalyticNetwork(architecture, scheme), personalize_layers)
        self.architecture = architecture
        self.scheme = scheme
        self.gamma, self.hidden_gamma, self.gamma_rule = gamma, hidden_gamma, gamma_rule
        self.lam, self.lam_rule = lam, lam_rule
        self.personalize_layers = personalize_layers
        self.seed, self.dtype, self.batch_size = seed, dtype, batch_size
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = 0 if fraction_evaluate == 0.0 else min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.min_valid_replies = max(1, min_valid_replies)
        self.accept_failures = accept_failures
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.evaluate_metrics_aggr_fn = (
            evaluate_metrics_aggr_fn or aggregate_personalized_evaluation
        )
        self.num_groups = int(num_groups)
        self.reset()

    # ------------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Start over: a fresh server-side network (no layer solved) and an empty history."""
        self.net = AnalyticNetwork(
            self.architecture,
            self.scheme,
            hidden_reg=Regularization(self.hidden_gamma, self.gamma_rule),
            output_reg=Regularization(self.gamma, self.gamma_rule),
            seed=self.seed,
            dtype=self.dtype,
        )
        self.history: list[dict[str, Any]] = []
        self._pending: dict[str, Any] | None = None
        #: group-wise output layers (``num_groups >= 2``): node id -> group, group -> ``W``
        self.group_of_node: dict[int, int] = {}
        self.group_weights: dict[int, np.ndarray] = {}
        self._advance_free_layers()

    def _advance_free_layers(self) -> None:
        """Solve the layers that need no statistics (``random`` filters) following the solved ones."""
        while self.net.solved_layers < self.net.num_layers and not self.net.needs_statistics(
            self.net.solved_layers
        ):
            self.net.solve(self.net.solved_layers, None)

    @property
    def num_rounds(self) -> int:
        """Training rounds FedACnnL needs: one per layer fitted from statistics."""
        return sum(self.net.needs_statistics(layer) for layer in range(self.net.num_layers))

    @property
    def finished(self) -> bool:
        """Whether every layer is solved."""
        return self.net.solved_layers == self.net.num_layers

    def global_arrays(self) -> ArrayRecord:
        """The solved layers as a float64 ``ArrayRecord`` of the ``SpecNet`` ``state_dict``.

        Once :attr:`finished`, ``build_module(arch).load_state_dict(record.to_torch_state_dict())``
        loads it.
        """
        return ArrayRecord(P.weights_state_dict(self.net))

    def initial_arrays(self) -> ArrayRecord:
        """An ``ArrayRecord`` of a fresh ``build_module(arch)`` (its values are not used)."""
        return ArrayRecord(build_module(self.architecture).state_dict())

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        arch = self.architecture
        log(INFO, "\t├──> FedACnnL (arXiv 2502.06915): %s, %d layers", arch.name, arch.num_layers)
        log(INFO, "\t│\t├──Training rounds (one per fitted layer): %d", self.num_rounds)
        log(INFO, "\t│\t├──Schemes: %s", [s.name for s in self.net.schemes])
        log(
            INFO,
            "\t│\t├──γ: output %g, hidden %g (%s) | λ: %g (%s), personalize %s",
            self.gamma,
            self.hidden_gamma,
            self.gamma_rule,
            self.lam,
            self.lam_rule,
            self.personalize_layers,
        )
        log(
            INFO, "\t│\t└──seed %d, dtype %s, batch size %d", self.seed, self.dtype, self.batch_size
        )
        log(INFO, "\t├──> Sampling:")
        log(
            INFO,
            "\t│\t├──Fraction: train (%.2f) | evaluate ( %.2f)",
            self.fraction_train,
            self.fraction_evaluate,
        )
        log(
            INFO,
            "\t│\t├──Minimum nodes: train (%d) | evaluate (%d)",
            self.min_train_nodes,
            self.min_evaluate_nodes,
        )
        log(INFO, "\t│\t└──Minimum available nodes: %d", self.min_available_nodes)

    # ---------------------------------------------------------------------------- messages
    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        num_nodes = int(len(list(grid.get_node_ids())) * fraction)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, minimum))
        return sorted(node_ids)

    def _config(self, config: ConfigRecord | None, server_round: int) -> ConfigRecord:
        out = ConfigRecord(dict(config or {}))
        out.update(P.network_config(self.net, self.batch_size))
        out[P.SERVER_ROUND] = server_round
        out[P.PERSONALIZE_LAYERS] = self.personalize_layers
        return out

    def _messages(
        self, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int], message_type: str
    ) -> list[Message]:
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [
            Message(content=content, message_type=message_type, dst_node_id=node_id)
            for node_id in node_ids
        ]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask the sampled nodes for the statistics of the next unsolved layer.

        ``arrays`` is ignored: the strategy sends its own solved layers ``< l`` (the global model is
        the strategy's state). Returns no message once every layer is solved.
        """
        if self.finished:
            return []
        layer = self.net.solved_layers
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes)
        cfg = self._config(config, server_round)
        cfg[P.LAYER] = layer
        sent = self.global_arrays()
        messages = self._messages(sent, cfg, node_ids, MessageType.TRAIN)
        log(
            INFO,
            "configure_train: layer %d/%d (D=%d), sampled %d nodes",
            layer + 1,
            self.net.num_layers,
            self.net.design_dim(layer),
            len(node_ids),
        )
        self._pending = {
            "round": server_round,
            "kind": "train",
            "layer": layer,
            "t0": time.perf_counter(),
            "num-sent": len(messages),
            "bytes-sent": arrays_nbytes(sent) * len(messages),
        }
        return messages

    def check_statistics(
        self,
        packed: dict[str, np.ndarray],
        num_examples: Any,
        layer: int,
        claimed_layer: Any = None,
    ) -> LayerStatistics:
        """Unpack and check one client's statistics of ``layer``; raise ``StatisticsError`` if bad.

        Checks the packed form, shape ``(D, m)`` of the layer, dtype, finiteness, symmetry, that
        ``count`` equals the reply's ``num_examples`` and that the reply is for ``layer``.
        """
        if claimed_layer is not None and int(claimed_layer) != layer:
            raise StatisticsError(f"statistics of layer {claimed_layer}, expected {layer}")
        stats = LayerStatistics.unpack(packed)
        stats.validate(self.net.design_dim(layer), self.net.num_targets(layer))
        if isinstance(num_examples, list) or int(num_examples) != stats.count:
            raise StatisticsError(f"{self.weighted_by_key}={num_examples} but count={stats.count}")
        return stats

    @staticmethod
    def order_key(partition_id: Any, node_id: int) -> tuple[int, int, int]:
        """Summation order: by ``partition-id`` (when known, >= 0), then by node id."""
        if partition_id is not None and int(partition_id) >= 0:
            return (0, int(partition_id), int(node_id))
        return (1, int(node_id), int(node_id))

    def _read_reply(self, msg: Message, layer: int) -> tuple[tuple[int, int, int], LayerStatistics]:
        """Check one training reply; return its sort key and statistics or raise ``StatisticsError``."""
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            raise StatisticsError(
                f"expected one ArrayRecord and one MetricRecord, got {len(content.array_records)} "
                f"and {len(content.metric_records)}"
            )
        metrics = next(iter(content.metric_records.values()))
        if self.weighted_by_key not in metrics:
            raise StatisticsError(f"MetricRecord lacks {self.weighted_by_key!r}")
        record = next(iter(content.array_records.values()))
        stats = self.check_statistics(
            {k: v.numpy() for k, v in record.items()},
            metrics[self.weighted_by_key],
            layer,
            metrics.get(P.LAYER),
        )
        return self.order_key(metrics.get(P.PARTITION_ID), msg.metadata.src_node_id), stats

    def solve_layer(
        self, valid: list[tuple[tuple[int, int, int], LayerStatistics]], entry: dict[str, Any]
    ) -> bool:
        """Sum checked statistics in key order (dropping duplicate partitions) and solve the layer.

        Returns whether the layer was solved (at least ``min_valid_replies`` statistics).
        """
        layer = self.net.solved_layers
        seen: set[tuple[int, int]] = set()
        unique = []
        keyed: list[tuple[tuple[int, int, int], LayerStatistics]] = []
        for key, stats in sorted(valid, key=lambda kv: kv[0]):
            if key[:2] in seen:
                self._reject(entry, key[2], f"duplicate partition-id {key[1]}")
                continue
            seen.add(key[:2])
            unique.append(stats)
            keyed.append((key, stats))
        entry["num-valid"] = len(unique)
        if len(unique) < self.min_valid_replies:
            log(
                WARNING,
                "layer %d has %d valid replies (< %d): not solved",
                layer,
                len(unique),
                self.min_valid_replies,
            )
            return False
        total = merge(unique)
        self.net.solve(layer, total)
        self._advance_free_layers()
        entry["num-examples"] = int(total.count)
        if self.num_groups >= 2 and self.net.is_output(layer):
            entry["groups"] = self._solve_groups(keyed)
        return True

    def _solve_groups(
        self, keyed: list[tuple[tuple[int, int, int], LayerStatistics]]
    ) -> list[list[int]]:
        """Cluster clients by label distribution; solve one output layer per group.

        Returns the members of each group (partition ids, or node ids when unknown).
        """
        from scipy.cluster.vq import kmeans2

        hist = np.array([stats.cross[-1] / max(stats.rows, 1.0) for _, stats in keyed])
        k = min(self.num_groups, len(keyed))
        _, labels = kmeans2(hist, k, minit="++", seed=np.random.default_rng(self.seed))
        self.group_of_node, self.group_weights, members = {}, {}, []
        for g in range(k):
            group = [(key, stats) for (key, stats), lab in zip(keyed, labels) if lab == g]
            if not group:
                continue
            total = merge(stats for _, stats in group)
            self.group_weights[g] = ridge_solve(total.gram, total.cross, self.net.output_reg)
            for key, _ in group:
                self.group_of_node[key[2]] = g
            members.append([key[1] for key, _ in group])
        self.group_weights = {g: self.group_weights[g] for g in sorted(self.group_weights)}
        log(
            INFO,
            "group-wise output layers: %d groups of sizes %s",
            len(members),
            [len(m) for m in members],
        )
        return members

    def group_arrays(self, group: int) -> ArrayRecord:
        """The output layer of ``group`` as float64 ``state_dict`` entries."""
        net = self.net.with_weights([*self.net.weights[:-1], self.group_weights[group]])
        layer = self.net.num_layers - 1
        state = P.weights_state_dict(net)
        return ArrayRecord({k: state[k] for k in P.layer_keys(layer)})

    def _reject(self, entry: dict[str, Any], node: int, reason: str) -> None:
        log(WARNING, "Rejected reply from node %d: %s", node, reason)
        entry.setdefault("rejected", []).append({"node-id": node, "reason": reason})
        if not self.accept_failures:
            raise RuntimeError(f"reply from node {node} rejected (accept_failures=False): {reason}")

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check, sum (in ``partition-id`` order) and solve; return the model with the new layer.

        Returns ``(None, metrics)`` when fewer than ``min_valid_replies`` replies were valid.
        """
        layer = self.net.solved_layers
        entry = self._pending or {"round": server_round, "kind": "train", "layer": layer}
        self._pending = None
        entry.setdefault("t0", time.perf_counter())
        entry.setdefault("bytes-sent", 0)
        valid: list[tuple[tuple[Any, ...], LayerStatistics]] = []
        received = 0
        replies = list(replies)
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                self._reject(entry, node, f"client error: {msg.error.reason}")
                continue
            received += sum(arrays_nbytes(r) for r in msg.content.array_records.values())
            try:
                valid.append(self._read_reply(msg, layer))
            except (StatisticsError, KeyError, ValueError, TypeError) as exc:
                self._reject(entry, node, str(exc))
        entry["bytes-received"] = received
        entry["num-replies"] = len(replies)
        num_missing = max(0, entry.get("num-sent", len(replies)) - len(replies))
        if num_missing:
            entry["num-missing"] = num_missing
            log(WARNING, "aggregate_train: %d replies missing (timeout)", num_missing)
            if not self.accept_failures:
                raise RuntimeError(f"{num_missing} replies missing (accept_failures=False)")
        arrays = self.global_arrays() if self.solve_layer(valid, entry) else None
        entry["round-time"] = time.perf_counter() - entry.pop("t0")
        log(
            INFO,
            "aggregate_train: layer %d from %d/%d replies (%d rejected), %.2f s",
            layer,
            entry["num-valid"],
            len(replies),
            len(entry.get("rejected", [])),
            entry["round-time"],
        )
        self.history.append(entry)
        metrics = MetricRecord(
            {
                P.LAYER: layer,
                "num-clients": int(entry["num-valid"]),
                "num-rejected": len(entry.get("rejected", [])),
                "num-examples": int(entry.get("num-examples", 0)),
                "bytes-sent": int(entry["bytes-sent"]),
                "bytes-received": int(received),
                "round-time": float(entry["round-time"]),
            }
        )
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the full global model and λ for evaluation (no message before the last layer)."""
        if self.fraction_evaluate == 0.0 or not self.finished:
            return []
        node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        cfg = self._config(config, server_round)
        cfg[P.LAM] = float(self.lam)
        cfg[P.LAM_RULE] = self.lam_rule
        sent = self.global_arrays()
        messages = []
        extra = 0
        for node_id in node_ids:
            content = RecordDict({self.arrayrecord_key: sent, self.configrecord_key: cfg})
            group = self.group_of_node.get(node_id)
            if group is not None:
                content[P.GROUP_ARRAYS_KEY] = self.group_arrays(group)
                extra += arrays_nbytes(content[P.GROUP_ARRAYS_KEY])
            messages.append(
                Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node_id)
            )
        log(INFO, "configure_evaluate: sampled %d nodes", len(node_ids))
        self._pending = {
            "round": server_round,
            "kind": "evaluate",
            "t0": time.perf_counter(),
            "num-sent": len(messages),
            "bytes-sent": arrays_nbytes(sent) * len(messages) + extra,
        }
        return messages

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """Aggregate global and pFedACnnL metrics of the valid replies (in ``partition-id`` order)."""
        entry = self._pending or {"round": server_round, "kind": "evaluate", "bytes-sent": 0}
        self._pending = None
        entry.setdefault("t0", time.perf_counter())
        replies = list(replies)
        good = []
        for msg in replies:
            if msg.has_error():
                self._reject(entry, int(msg.metadata.src_node_id), msg.error.reason)
                continue
            good.append(msg.content)
        metrics = self.evaluate_metrics_aggr_fn(good, self.weighted_by_key) if good else None
        entry["num-replies"] = len(replies)
        entry["bytes-received"] = 0
        entry["round-time"] = time.perf_counter() - entry.pop("t0")
        if metrics is not None:
            metrics["bytes-sent"] = int(entry["bytes-sent"])
            metrics["bytes-received"] = 0
            metrics["round-time"] = float(entry["round-time"])
            entry["metrics"] = dict(metrics)
        self.history.append(entry)
        return metrics

    # -------------------------------------------------------------------------------- loop
    # pylint: disable=too-many-arguments,too-many-positional-arguments
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run FedACnnL: one training round per fitted layer, then one evaluation round.

        Parameters
        ----------
        grid : Grid
            The Grid instance used to send/receive Messages from nodes executing a ClientApp.
        initial_arrays : ArrayRecord, optional
            Accepted for compatibility with other strategies; the analytic model starts from no
            weights, so only its keys are checked against the architecture.
        num_rounds : int, optional
            Defaults to :attr:`num_rounds` (one per fitted layer). A smaller value raises
            ``ValueError``; a larger one is logged and capped (there is nothing left to train).
        timeout : float (default: 3600)
            Timeout in seconds for waiting for node responses in each round.
        train_config, evaluate_config : ConfigRecord, optional
            Extra entries sent with every training / evaluation message.
        evaluate_fn : Callable[[int, ArrayRecord], Optional[MetricRecord]], optional
            Centralized evaluation, called once with the finished global model (earlier rounds
            hold an incomplete network that cannot predict).

        Returns
        -------
        Result
            ``arrays``: the final global model; ``train_metrics_clientapp[r]``: the layer, clients,
            bytes and time of round ``r``; ``evaluate_metrics_clientapp[R]`` and
            ``evaluate_metrics_serverapp[R]`` for the last round ``R``.

        """
        self.reset()
        needed = self.num_rounds
        if num_rounds is None or num_rounds <= 0:
            num_rounds = needed
        if num_rounds < needed:
            raise ValueError(
                f"FedACnnL needs {needed} rounds (one per fitted layer of {self.architecture.name}); "
                f"num_rounds={num_rounds}"
            )
        if num_rounds > needed:
            log(WARNING, "num_rounds=%d > %d fitted layers: running %d", num_rounds, needed, needed)
        if initial_arrays is not None and len(initial_arrays):
            expected = set(build_module(self.architecture).state_dict())
            if set(initial_arrays.keys()) != expected:
                raise ValueError("initial_arrays do not match the architecture's state_dict keys")
        log(INFO, "Starting %s strategy:", self.__class__.__name__)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        t_start = time.time()
        for current_round in range(1, needed + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", current_round, needed)
            messages = self.configure_train(current_round, self.global_arrays(), train_config, grid)
            replies = grid.send_and_receive(messages=messages, timeout=timeout)
            arrays, metrics = self.aggregate_train(current_round, replies)
            if metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", metrics)
                result.train_metrics_clientapp[current_round] = metrics
            if arrays is None:
                raise RuntimeError(
                    f"layer {self.net.solved_layers} could not be solved in round {current_round}: "
                    f"too few valid replies (see the log)"
                )
            result.arrays = arrays
        final = needed
        replies = grid.send_and_receive(
            messages=self.configure_evaluate(final, result.arrays, evaluate_config, grid),
            timeout=timeout,
        )
        agg = self.aggregate_evaluate(final, replies)
        if agg is not None:
            log(INFO, "\t└──> Aggregated evaluation MetricRecord: %s", agg)
            result.evaluate_metrics_clientapp[final] = agg
        if evaluate_fn is not None:
            res = evaluate_fn(final, result.arrays)
            log(INFO, "Global evaluation: %s", res)
            if res is not None:
                result.evaluate_metrics_serverapp[final] = res
        log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
        return result

    def history_records(self) -> list[dict[str, Any]]:
        """The per-round history as JSON-serializable dicts."""
        return [_jsonable(e) for e in self.history]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


__all__ = ["FedACnnL", "aggregate_personalized_evaluation", "arrays_nbytes"]
