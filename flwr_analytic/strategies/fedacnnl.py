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
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from pathlib import Path
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
    add_client_statistics,
    merge,
    remove_client_statistics,
    ridge_solve,
    solve_output_layer,
)
from flwr_analytic.analytic.solvers import RULES
from flwr_analytic.config_checks import ConfigError, check_choice, check_number
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.models import Architecture, build_module
from flwr_analytic.strategies.checkpoint import (
    check_fingerprint,
    random_state,
    read_checkpoint,
    set_random_state,
    write_checkpoint,
)


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
        A layer is solved only from at least this many valid replies. Clients that fail (error
        reply), time out (no reply at the ``timeout`` of :meth:`start`) or disconnect are left out:
        the layer is solved from the clients that replied, i.e. it equals the centralized solution
        over exactly their data (with the same lower layers). With fewer valid replies the round is
        retried (``max_retries``), then the run stops with ``RuntimeError``.
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
    max_retries : int (default: 1)
        How many times a layer round that ended with fewer than ``min_valid_replies`` valid replies
        is retried. A retry is a new server round for the same layer, sent to connected nodes that
        have not yet given valid statistics of the layer (re-sampled up to the usual sample size;
        a retry does not wait for nodes to reconnect); the valid replies of the failed attempts
        are kept and summed with the new ones. When the retries are exhausted,
        :meth:`start` raises ``RuntimeError`` naming the layer and the number of valid replies; the
        layers solved so far stay in the strategy (and in the checkpoint).
    checkpoint_path : str or Path, optional (default: None)
        Where a checkpoint is written (atomically: ``<path>.tmp`` then ``os.replace``) after every
        solved layer and after :meth:`add_clients` / :meth:`remove_clients`: the solved layers, the
        summed statistics ``(G, B, n)`` of every solved layer (the output layer's are what
        :meth:`add_clients` / :meth:`remove_clients` need; the hidden layers' are kept for audit),
        the server round, Python's ``random`` state (Flower samples nodes with it), the history,
        and a fingerprint of the configuration (:meth:`config_fingerprint`). When the file exists,
        :meth:`start` resumes from it at the first unsolved layer, so a server restarted after
        layer ``l`` produces the same final model, bit for bit, as an uninterrupted run; a
        checkpoint of another configuration raises
        :class:`~flwr_analytic.strategies.checkpoint.CheckpointMismatchError` naming the keys that
        differ. A finished checkpoint resumes as a finished run (only evaluation runs): delete it
        to train again.

    Notes
    -----
    ``history`` holds one dict per round: ``round``, ``layer``, ``kind`` (``train``/``evaluate``),
    ``bytes-sent`` / ``bytes-received`` (tensor bytes to and from all clients), ``round-time``
    (seconds from ``configure_*`` to the end of ``aggregate_*``), the number of replies, the
    rejected ones with their reasons, and the aggregated metrics. Training entries also name the
    absent clients: ``missing-nodes`` / ``missing-partitions`` (no reply by the timeout, or
    disconnected) and ``failed-nodes`` / ``failed-partitions`` (error replies); partition ids are
    known once a node has replied in an earlier round, node ids always. ``partitions`` lists the
    partitions whose statistics were summed, ``num-carried`` the valid replies kept from a failed
    attempt at the same layer. The training ``MetricRecord`` of each round carries ``num-missing``,
    ``num-failed`` and the same lists. :meth:`add_clients` / :meth:`remove_clients` append
    ``add-clients`` / ``remove-clients`` entries.
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
        max_retries: int = 1,
        checkpoint_path: str | Path | None = None,
    ) -> None:
        # Fail at construction, naming the argument and what is allowed (ConfigError: ValueError).
        check_number("fraction_train", fraction_train, low=0.0, high=1.0, low_open=True)
        check_number("fraction_evaluate", fraction_evaluate, low=0.0, high=1.0)
        check_number("gamma", gamma, low=0.0)
        check_number("hidden_gamma", hidden_gamma, low=0.0)
        check_number("lam", lam, low=0.0, low_open=True)  # λ → 0 is the local model
        check_choice("gamma_rule", gamma_rule, RULES)
        check_choice("lam_rule", lam_rule, RULES)
        check_choice("personalize_layers", personalize_layers, ("last", "all"))
        check_choice("dtype", dtype, ("float64", "float32"))
        for key, value, low in (
            ("seed", seed, 0),
            ("batch_size", batch_size, 1),
            ("min_train_nodes", min_train_nodes, 0),
            ("min_evaluate_nodes", min_evaluate_nodes, 0),
            ("min_available_nodes", min_available_nodes, 0),
            ("min_valid_replies", min_valid_replies, 0),
            ("num_groups", num_groups, 0),
        ):
            check_number(key, value, low=low, integer=True)
        if not isinstance(architecture, Architecture):
            raise ConfigError(
                f"architecture: {architecture!r} is not allowed; must be an Architecture "
                "(flwr_analytic.models.get_architecture)"
            )
        try:
            P.personalized_layers(AnalyticNetwork(architecture, scheme), personalize_layers)
        except ValueError as exc:
            raise ConfigError(f"scheme: {exc}") from exc
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
        if isinstance(max_retries, bool) or int(max_retries) != max_retries or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        self.max_retries = int(max_retries)
        self.checkpoint_path = None if checkpoint_path in (None, "") else Path(checkpoint_path)
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
        #: summed statistics of every solved layer (the output layer's serve :meth:`add_clients`)
        self.layer_statistics: dict[int, LayerStatistics] = {}
        #: node id -> partition id, learned from replies (to name missing or failed clients)
        self.node_partitions: dict[int, int] = {}
        #: aggregated training metrics by server round; the last server round used
        self.train_metrics: dict[int, MetricRecord] = {}
        self.server_round = 0
        #: valid replies of a failed attempt at a layer, summed with those of its retry
        self._carry: tuple[int, list[tuple[tuple[int, int, int], LayerStatistics]]] | None = None
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

    def _resample(self, grid: Grid, answered: set[int]) -> list[int]:
        """Nodes of a retry: a sample of the connected nodes that have not answered validly yet.

        Tops the attempt up to the usual sample size; unlike :meth:`_sample` it does not wait
        for nodes to (re)connect, so a retry with every remaining node gone sends nothing and
        fails at once instead of blocking.
        """
        connected = list(grid.get_node_ids())
        wanted = max(int(len(connected) * self.fraction_train), self.min_train_nodes)
        pool = [n for n in connected if n not in answered]
        size = min(len(pool), max(0, wanted - len(answered)))
        return sorted(random.sample(pool, size))

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
        self.server_round = max(self.server_round, int(server_round))
        if self._carry is not None and self._carry[0] == layer:
            node_ids = self._resample(grid, {key[2] for key, _ in self._carry[1]})
        else:
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
            "sent-nodes": list(node_ids),
            "bytes-sent": arrays_nbytes(sent) * len(messages),
        }
        return messages

    def check_statistics(
        self,
        packed: Mapping[str, np.ndarray],
        num_examples: Any,
        layer: int,
        claimed_layer: Any = None,
    ) -> LayerStatistics:
        """Unpack and check one client's statistics of ``layer``; raise ``StatisticsError`` if bad.

        Checks, in order: the layer index the reply claims; the packed record (known keys only,
        the ``gram-triu`` triangle or a full ``gram``, sizes of layer ``l``'s ``D`` and ``m`` before
        any ``D x D`` allocation, integer count); then :meth:`LayerStatistics.validate` with every
        check that honest statistics of this layer pass: float64, finite, symmetric, non-negative
        diagonal, ``G[-1,-1] = n·L`` (``L`` design rows per sample: 1 for a dense layer, the output
        positions of a conv layer), positive semi-definite (Cauchy–Schwarz and a shifted Cholesky
        of the unit-diagonal scaling), and, when the targets are one-hot labels (output layer,
        ``label-pca`` label channels), a whole non-negative label histogram ``B[-1]`` summing to
        ``G[-1,-1]`` with ``|B_ic| <= sqrt(G_ii B[-1,c])``; finally that ``count`` equals the reply's
        ``num_examples``. Statistics of honest data pass in float64 and float32.
        """
        from flwr_analytic.models import ConvSpec  # noqa: PLC0415 - local: keeps the import list

        if claimed_layer is not None:
            if isinstance(claimed_layer, bool) or not isinstance(claimed_layer, int | np.integer):
                raise StatisticsError(
                    f"metric {P.LAYER!r} must be an integer, got {claimed_layer!r}"
                )
            if int(claimed_layer) != layer:
                raise StatisticsError(f"statistics of layer {claimed_layer}, expected {layer}")
        if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer):
            raise StatisticsError(
                f"{self.weighted_by_key} must be an integer, got {num_examples!r}"
            )
        dim, targets = self.net.design_dim(layer), self.net.num_targets(layer)
        stats = LayerStatistics.unpack(packed, dim=dim, targets=targets, strict=True)
        spec = self.net.arch.spec(layer)
        rows_per_sample = 1
        if isinstance(spec, ConvSpec):
            _, height, width = self.net.arch.input_shape_of(layer)
            side = 2 * spec.padding - spec.kernel_size + 1
            rows_per_sample = (height + side) * (width + side)
        one_hot = self.net.is_output(layer) or self.net.schemes[layer].name == "label-pca"
        stats.validate(
            dim,
            targets,
            rows_per_sample=rows_per_sample,
            label_classes=self.net.arch.num_classes if one_hot and targets else None,
            check_psd=True,
        )
        if int(num_examples) != stats.count:
            raise StatisticsError(f"{self.weighted_by_key}={num_examples} but count={stats.count}")
        return stats

    @staticmethod
    def order_key(partition_id: Any, node_id: int) -> tuple[int, int, int]:
        """Summation order: by ``partition-id`` (when known, >= 0), then by node id."""
        if partition_id is not None and int(partition_id) >= 0:
            return (0, int(partition_id), int(node_id))
        return (1, int(node_id), int(node_id))

    def _read_reply(self, msg: Message, layer: int) -> tuple[tuple[int, int, int], LayerStatistics]:
        """Check one training reply; return its sort key and statistics or raise ``StatisticsError``.

        A reply must hold exactly one ``ArrayRecord`` (the packed statistics, every array decodable
        as numpy) and one ``MetricRecord`` with integer ``num-examples`` (``weighted_by_key``) and
        ``layer``, and optionally an integer ``partition-id``; no other record. Then
        :meth:`check_statistics`. Any failure, including an unexpected exception while decoding a
        hostile record, becomes a ``StatisticsError`` naming the problem.
        """
        try:
            content = msg.content
            counts = (
                len(content.array_records),
                len(content.metric_records),
                len(content.config_records),
            )
            if counts != (1, 1, 0):
                raise StatisticsError(
                    "expected one ArrayRecord, one MetricRecord and no ConfigRecord, got "
                    f"{counts[0]}, {counts[1]} and {counts[2]}"
                )
            metrics = next(iter(content.metric_records.values()))
            for key in (self.weighted_by_key, P.LAYER):
                if key not in metrics:
                    raise StatisticsError(f"MetricRecord lacks {key!r}")
            partition = metrics.get(P.PARTITION_ID)
            if partition is not None and (
                isinstance(partition, bool) or not isinstance(partition, int | np.integer)
            ):
                raise StatisticsError(
                    f"metric {P.PARTITION_ID!r} must be an integer, got {partition!r}"
                )
            record = next(iter(content.array_records.values()))
            packed = {}
            for key, array in record.items():
                try:
                    packed[key] = array.numpy()
                except Exception as exc:  # noqa: BLE001 - hostile bytes: any decoder error
                    raise StatisticsError(f"array {key!r} cannot be decoded: {exc}") from exc
            stats = self.check_statistics(
                packed, metrics[self.weighted_by_key], layer, metrics[P.LAYER]
            )
            return self.order_key(partition, msg.metadata.src_node_id), stats
        except StatisticsError:
            raise
        except Exception as exc:  # noqa: BLE001 - never let a malformed reply stop the round
            raise StatisticsError(f"malformed reply ({type(exc).__name__}: {exc})") from exc

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
        entry["partitions"] = [key[1] for key, _ in keyed if key[0] == 0]
        if len(unique) < self.min_valid_replies:
            self._carry = (layer, keyed)
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
        self.layer_statistics[layer] = total
        self._carry = None
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
        entry = self._train_entry(server_round)
        valid: list[tuple[tuple[Any, ...], LayerStatistics]] = []
        received = 0
        replies = list(replies)
        failed: list[int] = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                failed.append(node)
                self._reject(entry, node, f"client error: {msg.error.reason}")
                continue
            received += sum(arrays_nbytes(r) for r in msg.content.array_records.values())
            try:
                valid.append(self._read_reply(msg, layer))
            except (StatisticsError, KeyError, ValueError, TypeError) as exc:
                self._reject(entry, node, str(exc))
        entry["bytes-received"] = received
        entry["num-replies"] = len(replies)
        for key, _ in valid:
            if key[0] == 0:
                self.node_partitions[int(key[2])] = int(key[1])
        replied = {int(msg.metadata.src_node_id) for msg in replies}
        num_missing = self._record_absent(entry, replied, len(replies), failed)
        if self._carry is not None and self._carry[0] == layer:
            entry["num-carried"] = len(self._carry[1])
            valid = [*self._carry[1], *valid]
        solved = self.solve_layer(valid, entry)
        arrays = self.global_arrays() if solved else None
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
        entry["solved"] = solved
        self.history.append(entry)
        return arrays, self._train_metrics(entry, layer, num_missing, len(failed))

    def _train_entry(self, server_round: int) -> dict[str, Any]:
        """The history entry of this training round (opened by ``configure_train``), timer on."""
        entry = self._pending or {
            "round": server_round,
            "kind": "train",
            "layer": self.net.solved_layers,
        }
        self._pending = None
        entry.setdefault("t0", time.perf_counter())
        entry.setdefault("bytes-sent", 0)
        return entry

    def _record_absent(
        self, entry: dict[str, Any], replied: set[int], num_replies: int, failed: list[int]
    ) -> int:
        """Name the failed and the missing clients of a training round in ``entry``.

        Missing: sent a message (``sent-nodes``) but no reply by the timeout. Returns their number;
        raises ``RuntimeError`` if there are some and ``accept_failures`` is False.
        """
        missing = sorted(set(entry.pop("sent-nodes", [])) - replied)
        num_missing = max(len(missing), entry.get("num-sent", num_replies) - num_replies)
        self._name_absent(entry, "failed", sorted(failed))
        if num_missing:
            entry["num-missing"] = num_missing
            self._name_absent(entry, "missing", missing)
            log(
                WARNING,
                "aggregate_train: %d replies missing (timeout or disconnect): partitions %s, "
                "nodes %s",
                num_missing,
                entry.get("missing-partitions", []),
                missing,
            )
            if not self.accept_failures:
                raise RuntimeError(f"{num_missing} replies missing (accept_failures=False)")
        return num_missing

    @staticmethod
    def _train_metrics(
        entry: dict[str, Any], layer: int, num_missing: int, num_failed: int
    ) -> MetricRecord:
        """The training round's ``MetricRecord`` (counts, bytes, time, absent clients by name)."""
        values: dict[str, Any] = {
            P.LAYER: layer,
            "num-clients": int(entry["num-valid"]),
            "num-rejected": len(entry.get("rejected", [])),
            "num-examples": int(entry.get("num-examples", 0)),
            "bytes-sent": int(entry["bytes-sent"]),
            "bytes-received": int(entry["bytes-received"]),
            "round-time": float(entry["round-time"]),
            "num-missing": int(num_missing),
            "num-failed": int(num_failed),
        }
        for kind in ("missing", "failed"):
            for who in ("nodes", "partitions"):
                if entry.get(f"{kind}-{who}"):
                    values[f"{kind}-{who}"] = [int(v) for v in entry[f"{kind}-{who}"]]
        return MetricRecord(values)

    def _name_absent(self, entry: dict[str, Any], kind: str, nodes: list[int]) -> None:
        """Record ``{kind}-nodes`` and the known ``{kind}-partitions`` of absent clients."""
        if not nodes:
            return
        entry[f"{kind}-nodes"] = nodes
        known = sorted(self.node_partitions[n] for n in nodes if n in self.node_partitions)
        if known:
            entry[f"{kind}-partitions"] = known

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

        Raises
        ------
        RuntimeError
            When a layer still has fewer than ``min_valid_replies`` valid replies after
            ``max_retries`` retries (the message names the layer and the replies; the solved layers
            are kept in the strategy and in the checkpoint).
        CheckpointMismatchError
            When ``checkpoint_path`` holds a checkpoint of another configuration.

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
        if self.checkpoint_path is not None and self.checkpoint_path.is_file():
            self.load_checkpoint(self.checkpoint_path, restore_random=True)
            result.train_metrics_clientapp.update(self.train_metrics)
            log(
                INFO,
                "Resuming from checkpoint %s: %d of %d layers solved, server round %d",
                self.checkpoint_path,
                self.net.solved_layers,
                self.net.num_layers,
                self.server_round,
            )
        t_start = time.time()
        current_round, attempts = self.server_round, 0
        while not self.finished:
            current_round += 1
            layer = self.net.solved_layers
            log(INFO, "")
            log(INFO, "[ROUND %s] layer %d/%d", current_round, layer + 1, self.net.num_layers)
            messages = self.configure_train(current_round, self.global_arrays(), train_config, grid)
            replies = grid.send_and_receive(messages=messages, timeout=timeout)
            arrays, metrics = self.aggregate_train(current_round, replies)
            if metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", metrics)
                result.train_metrics_clientapp[current_round] = metrics
                self.train_metrics[current_round] = metrics
            if arrays is not None:
                result.arrays, attempts = arrays, 0
                if self.checkpoint_path is not None:
                    self.save_checkpoint()
                continue
            attempts += 1
            if attempts > self.max_retries:
                raise RuntimeError(self._failure_message(layer, attempts))
            log(
                WARNING,
                "layer %d: %d valid replies < min_valid_replies=%d; retry %d of %d",
                layer,
                self.history[-1].get("num-valid", 0),
                self.min_valid_replies,
                attempts,
                self.max_retries,
            )
        result.arrays = self.global_arrays()  # also when resumed from a finished checkpoint
        final = current_round
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

    def _failure_message(self, layer: int, attempts: int) -> str:
        tried = [e for e in self.history if e.get("kind") == "train" and e.get("layer") == layer]
        last = tried[-1] if tried else {}
        absent = []
        for kind in ("missing", "failed"):
            if last.get(f"{kind}-partitions"):
                absent.append(f"{kind} partitions {last[f'{kind}-partitions']}")
            elif last.get(f"{kind}-nodes"):
                absent.append(f"{kind} nodes {last[f'{kind}-nodes']}")
        rounds = [int(e["round"]) for e in tried]
        kept = f"the {self.net.solved_layers} solved layers are kept in the strategy"
        if self.checkpoint_path is not None and self.net.solved_layers:
            kept += f" and in the checkpoint {self.checkpoint_path}"
        return (
            f"layer {layer} could not be solved: {last.get('num-valid', 0)} valid replies "
            f"(min_valid_replies={self.min_valid_replies}) after {attempts} attempts "
            f"(rounds {rounds}, max_retries={self.max_retries})"
            + (f"; last attempt: {', '.join(absent)}" if absent else "")
            + f"; {len(last.get('rejected', []))} replies rejected; {kept}"
        )

    # -------------------------------------------------------------------- checkpoint/resume
    CHECKPOINT_FORMAT = "flwr-analytic-fedacnnl-checkpoint/1"

    def config_fingerprint(self) -> dict[str, Any]:
        """The configuration that determines the solved layers (compared when resuming).

        Architecture, per-layer schemes, γ (output and hidden, and their rule), seed, dtype, batch
        size (summation order of the clients' batches, hence the last bits) and ``num_groups``.
        Not included: λ and the personalization settings (they only affect evaluation), sampling
        and fault-tolerance settings (they do not change the result of a layer), and the clients'
        data, which the server never sees.
        """
        return {
            "strategy": type(self).__name__,
            "architecture": P.architecture_to_json(self.architecture),
            "schemes": P.schemes_to_json(self.net),
            "gamma": float(self.gamma),
            "hidden-gamma": float(self.hidden_gamma),
            "gamma-rule": self.gamma_rule,
            "seed": int(self.seed),
            "dtype": self.dtype,
            "batch-size": int(self.batch_size),
            "num-groups": int(self.num_groups),
        }

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write the server state atomically to ``path`` (default: ``checkpoint_path``).

        The ``.npz`` holds ``weight-<l>`` (design-space ``W_l``, float64) of the solved layers,
        ``gram-<l>``, ``cross-<l>``, ``count-<l>`` of their summed statistics, ``group-weight-<g>``
        of group-wise output layers, and a JSON document: format, :meth:`config_fingerprint`,
        solved layers, server round, Python's ``random`` state, node → partition ids, groups,
        history and per-round training metrics.
        """
        target = Path(path) if path is not None else self.checkpoint_path
        if target is None:
            raise ValueError("no checkpoint path: pass one or set checkpoint_path")
        arrays: dict[str, np.ndarray] = {}
        for layer in range(self.net.solved_layers):
            arrays[f"weight-{layer}"] = np.asarray(self.net.weights[layer], dtype=np.float64)
        for layer, stats in self.layer_statistics.items():
            arrays[f"gram-{layer}"] = stats.gram
            arrays[f"cross-{layer}"] = stats.cross
            arrays[f"count-{layer}"] = np.asarray([stats.count], dtype=np.int64)
        for group, w in self.group_weights.items():
            arrays[f"group-weight-{group}"] = w
        meta = {
            "format": self.CHECKPOINT_FORMAT,
            "fingerprint": self.config_fingerprint(),
            "solved-layers": self.net.solved_layers,
            "statistics-layers": sorted(self.layer_statistics),
            "server-round": self.server_round,
            "random-state": random_state(),
            "node-partitions": {str(k): v for k, v in self.node_partitions.items()},
            "group-of-node": {str(k): v for k, v in self.group_of_node.items()},
            "history": self.history_records(),
            "train-metrics": {str(r): dict(m) for r, m in self.train_metrics.items()},
        }
        return write_checkpoint(target, arrays, meta)

    def load_checkpoint(self, path: str | Path, *, restore_random: bool = False) -> None:
        """Restore the server state saved by :meth:`save_checkpoint` (after checking it matches).

        ``restore_random=True`` (what :meth:`start` does) also restores Python's ``random`` state,
        so the nodes sampled after the restart are those an uninterrupted run would sample.

        Raises
        ------
        CheckpointMismatchError
            When the checkpoint was written with another configuration (naming the keys).

        """
        arrays, meta = read_checkpoint(path, self.CHECKPOINT_FORMAT)
        check_fingerprint(meta["fingerprint"], self.config_fingerprint(), path)
        self.reset()
        for layer in range(int(meta["solved-layers"])):
            self.net.set_layer(layer, arrays[f"weight-{layer}"])
        for layer in meta["statistics-layers"]:
            count = int(arrays[f"count-{layer}"][0])
            self.layer_statistics[int(layer)] = LayerStatistics(
                arrays[f"gram-{layer}"], arrays[f"cross-{layer}"], count
            )
        self.group_weights = {
            int(k.rsplit("-", 1)[1]): v for k, v in arrays.items() if k.startswith("group-weight-")
        }
        self.group_weights = {g: self.group_weights[g] for g in sorted(self.group_weights)}
        self.group_of_node = {int(k): int(v) for k, v in meta["group-of-node"].items()}
        self.node_partitions = {int(k): int(v) for k, v in meta["node-partitions"].items()}
        self.server_round = int(meta["server-round"])
        self.history = [dict(e) for e in meta["history"]]
        self.train_metrics = {
            int(r): MetricRecord(dict(m)) for r, m in meta["train-metrics"].items()
        }
        self._advance_free_layers()
        if restore_random:
            set_random_state(meta["random-state"])

    # ---------------------------------------------------------------- add / remove clients
    def _output_total(self) -> tuple[int, LayerStatistics]:
        layer = self.net.num_layers - 1
        if not self.finished or layer not in self.layer_statistics:
            raise RuntimeError(
                "adding or removing clients needs a trained model and its output-layer statistics "
                "(run start() or load_checkpoint() first)"
            )
        return layer, self.layer_statistics[layer]

    @staticmethod
    def _as_statistics(
        statistics: Iterable[LayerStatistics | Mapping[str, np.ndarray]],
    ) -> list[LayerStatistics]:
        return [
            s if isinstance(s, LayerStatistics) else LayerStatistics.unpack(dict(s))
            for s in statistics
        ]

    def add_clients(
        self, statistics: Iterable[LayerStatistics | Mapping[str, np.ndarray]]
    ) -> np.ndarray:
        """Join clients after training: re-solve the output layer from ``(G + ΣG_j, B + ΣB_j)``.

        Each item is a joining client's output-layer statistics (computed with the trained hidden
        layers, e.g. by the client app for the last layer), as :class:`LayerStatistics` or in the
        packed transport form. No round and no retraining:
        ``W = (G + ΣG_j + γI)⁻¹(B + ΣB_j)`` (:func:`~flwr_analytic.analytic.add_client_statistics`),
        which equals the output layer solved from all clients' statistics with the same hidden
        layers. The hidden layers are not updated (exact only for data-independent hidden layers:
        ``linear``/``random``, see :mod:`flwr_analytic.analytic.updates`). Group-wise output layers
        (``num_groups >= 2``) are left as they were. Writes the checkpoint when one is configured.

        Returns
        -------
        numpy.ndarray
            The new output layer ``W`` (D x c).

        """
        layer, total = self._output_total()
        joined = self._as_statistics(statistics)
        return self._update_output(layer, add_client_statistics(total, joined), "add", joined)

    def remove_clients(
        self, statistics: Iterable[LayerStatistics | Mapping[str, np.ndarray]]
    ) -> np.ndarray:
        """Unlearn clients: re-solve the output layer from ``(G − ΣG_k, B − ΣB_k)``.

        Each item is the output-layer statistics a leaving client uploaded (the client keeps them).
        The subtraction is checked (count stays >= 0, Gram stays PSD within tolerance; otherwise
        ``StatisticsError``, see :func:`~flwr_analytic.analytic.remove_client_statistics`). The
        result is exactly the model trained without those clients for a ``linear`` model or
        ``random``-scheme hidden layers; with data-dependent hidden layers (``label-pca``, ``pca``,
        ``label-encoding``) only the output layer *given the hidden layers* is exact: the hidden
        layers keep the removed clients' influence. Writes the checkpoint when one is configured.

        Returns
        -------
        numpy.ndarray
            The new output layer ``W`` (D x c).

        """
        layer, total = self._output_total()
        left = self._as_statistics(statistics)
        return self._update_output(layer, remove_client_statistics(total, left), "remove", left)

    def _update_output(
        self, layer: int, total: LayerStatistics, kind: str, changed: list[LayerStatistics]
    ) -> np.ndarray:
        w = solve_output_layer(self.net, total)
        self.layer_statistics[layer] = total
        if self.group_weights:
            log(WARNING, "%s clients: the group-wise output layers are not updated", kind)
        self.history.append(
            {
                "round": self.server_round,
                "kind": f"{kind}-clients",
                "layer": layer,
                "num-clients": len(changed),
                "num-examples-changed": int(sum(s.count for s in changed)),
                "num-examples": int(total.count),
            }
        )
        log(
            INFO,
            "%s %d clients: output layer re-solved from %d samples",
            kind,
            len(changed),
            total.count,
        )
        if self.checkpoint_path is not None:
            self.save_checkpoint()
        return w


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
