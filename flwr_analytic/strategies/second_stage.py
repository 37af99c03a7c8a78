"""A quadratic second stage on FedACnnL's head, and product-of-experts scoring (issue 15).

A wrapper in the shape of Flower's ``DifferentialPrivacyServerSideFixedClipping``: it takes a
:class:`~flwr_analytic.strategies.fedacnnl.FedACnnL` (or a wrapper of one), lets it train every layer,
then adds one training round and enriches the evaluation. The math is in
:mod:`flwr_analytic.analytic.second_stage`, :mod:`~flwr_analytic.analytic.quadratic_head` and
:mod:`~flwr_analytic.analytic.label_shift`; the wire format in
:mod:`flwr_analytic.fedacnnl.stage_protocol`.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flwr_analytic.analytic.aggregation import ClientKey
from flwr_analytic.analytic.quadratic_head import stage_dim
from flwr_analytic.analytic.second_stage import QuadraticStage
from flwr_analytic.analytic.solvers import ridge_solve
from flwr_analytic.analytic.statistics import LayerStatistics, StatisticsError
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.fedacnnl import stage_protocol as S
from flwr_analytic.strategies.availability import sample_available
from flwr_analytic.strategies.fedacnnl import FedACnnL
from flwr_analytic.strategies.fedacnnl_replies import error_reply
from flwr_analytic.strategies.wrapper import StrategyWrapper


def _num_partitions(metrics: Any) -> int | None:
    """The reply's ``num-partitions`` claim (``None``: not an integer > 0, i.e. not known)."""
    claimed = metrics.get(P.NUM_PARTITIONS)
    if isinstance(claimed, bool) or not isinstance(claimed, int | np.integer) or claimed <= 0:
        return None
    return int(claimed)


class SecondStage(StrategyWrapper):
    r"""FedACnnL plus a closed-form quadratic second stage and product-of-experts scoring.

    After the wrapped strategy solves its output layer from the summed head statistics
    :math:`G = \sum_k A_k^\top A_k` of :math:`a = [h, 1]`, the server builds the stage of the ``k``
    leading whitened principal components of ``h`` (a function of :math:`G` alone,
    :class:`~flwr_analytic.analytic.second_stage.QuadraticStage`),
    :math:`z = (h - \bar h)P`, :math:`q = (z_i z_j)_{i \le j}`, and runs one more round: every
    client sends the statistics of :math:`a_2 = [h, q, 1]` and the server solves

    .. math:: W_2 = \Big(\sum_k A_{2k}^\top A_{2k} + \gamma I\Big)^{-1} \sum_k A_{2k}^\top T_k

    (the wrapped strategy's output ridge rule), equal to the centralized head for any partition.
    In the evaluation every client scores the second-stage head :math:`f = a_2 W_2` and the
    product of experts (Saerens et al., Neural Computation 2002, for the label shift)

    .. math:: \log\mathrm{softmax}(T f) + \log(\pi_k / \pi) + w \log\mathrm{softmax}(T s_k),

    :math:`s_k = [h, 1] W_k` its pFedACnnL head, :math:`\pi_k` its smoothed label frequencies (the
    bias row of its own :math:`B_k`), :math:`\pi` the pooled ones (sent by the server: the bias row of
    :math:`\sum_k B_k`). Reported as ``second-stage-*`` and ``product-*`` next to ``global-*`` and
    ``personal-*``; the exported model (``global_arrays``) stays the wrapped strategy's.

    Parameters
    ----------
    strategy : Strategy
        A ``FedACnnL`` (or a wrapper of one) with a dense output layer, exact statistics (no DP
        release) and ``personalize_layers="last"``.
    components : int (default: 80)
        ``k``: ``k(k+1)/2`` quadratic features (80: 3,240, the Fashion-MNIST choice).
    temperature : float (default: 7.0)
        ``T > 0`` of the scoring.
    weight : float (default: 0.5)
        ``w >= 0``: the pFedACnnL expert's weight (0: the label-shifted second stage alone).

    Notes
    -----
    The round's ``Σ A₂ᵀA₂`` is summed in partition order, one reply unpacked at a time (server
    memory ``O(D₂²)`` beyond the packed replies); each claim is checked against the partition's
    owner from the layers' rounds (``PartitionOwners``), each partition counted once. Fewer than
    ``min_valid_replies`` valid replies leave the second stage out with a warning: the first-stage
    model and its evaluation are kept.
    A checkpointed run (``Checkpointed``) resumes the layers; the second stage's round is re-run.
    """

    def __init__(
        self,
        strategy: Strategy,
        components: int = 80,
        temperature: float = 7.0,
        weight: float = 0.5,
    ) -> None:
        super().__init__(strategy)
        inner = self.innermost()
        if not isinstance(inner, FedACnnL):
            raise TypeError(f"SecondStage wraps a FedACnnL strategy, got {type(inner).__name__}")
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ValueError(f"components must be an integer >= 1, got {components!r}")
        self.settings = S.scoring_settings(temperature, weight)
        if inner.release.name != "exact":
            raise ValueError(f"the second stage needs exact statistics, not {inner.release.name!r}")
        if inner.personalize_layers != "last":
            raise ValueError("the second stage scores with personalize_layers='last' only")
        last = inner.net.num_layers - 1
        if inner.net.arch.conv_geometry(last) is not None:
            raise ValueError("the second stage needs a dense output layer")
        width = inner.net.design_dim(last) - 1
        if components > width:
            raise ValueError(f"components={components} > {width} head features")
        self.components = components
        self._clear()

    def _clear(self) -> None:
        self.stage: QuadraticStage | None = None
        self.weights: np.ndarray | None = None
        self.skipped: str | None = None
        self._connected: set[int] | None = None

    def reset(self) -> None:
        """Start over: the wrapped strategy's reset, and no second stage."""
        self.strategy.reset()
        self._clear()

    @property
    def pooled(self) -> np.ndarray:
        """The pooled class counts: the bias row of the output layer's summed ``B``."""
        inner = self.innermost()
        return np.array(inner.server.layer_statistics[inner.net.num_layers - 1].cross[-1])

    @property
    def num_rounds(self) -> int:
        """The wrapped strategy's rounds and the second stage's."""
        return self.strategy.num_rounds + 1

    @property
    def finished(self) -> bool:
        """Every layer and the second stage solved (or left out)."""
        return self.strategy.finished and (self.weights is not None or self.skipped is not None)

    def summary(self) -> None:
        """The wrapped strategy's summary and the second stage's settings."""
        self.strategy.summary()
        log(INFO, "\t└──> Second stage (one more round): k %d, scoring T %g, w %g", self.components,
            self.settings[S.TEMPERATURE], self.settings[S.WEIGHT])  # fmt: skip

    # ------------------------------------------------------------------------------ training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's rounds; then the second stage's: the stage and layers ``< L``."""
        if not self.strategy.finished:
            return self.strategy.configure_train(server_round, arrays, config, grid)
        if self.finished:
            return []
        inner = self.innermost()
        net, last = inner.net, inner.net.num_layers - 1
        if self.stage is None:
            total = inner.server.layer_statistics[last]
            self.stage = QuadraticStage.from_gram(total.gram, self.components)
        node_ids = sample_available(
            grid, inner.fraction_train, inner.min_train_nodes, inner.min_available_nodes,
            what="second stage", timeout=inner.availability_timeout,
            known=inner.server.node_partitions, needed=inner.server.min_valid_replies,
        )  # fmt: skip
        self._connected = set(grid.get_node_ids())
        cfg = ConfigRecord(dict(config or {}))
        cfg.update(P.network_config(net, inner.batch_size))
        cfg.update({P.SERVER_ROUND: server_round, P.LAYER: last, S.SECOND_STAGE: self.components})
        sent = ArrayRecord({**P.weights_state_dict(net, last), **S.stage_arrays(self.stage)})
        content = RecordDict({inner.arrayrecord_key: sent, inner.configrecord_key: cfg})
        record = self.history.open(server_round, "train", layer=last, **{S.SECOND_STAGE: True})
        record.num_sent = len(node_ids)
        kind = inner.message_type(MessageType.TRAIN)
        return [Message(content, dst_node_id=n, message_type=kind) for n in node_ids]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's layers; then check, sum (partition order) and solve ``W₂``."""
        if not self.strategy.finished:
            return self.strategy.aggregate_train(server_round, replies)
        inner = self.innermost()
        record = self.history.open(server_round, "train")
        dim, classes = stage_dim(inner.net, self.stage), inner.net.arch.num_classes
        owners, last = inner.server.owners, inner.net.num_layers - 1
        candidates: list[tuple[ClientKey, Message]] = []
        replied = 0
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error() and error_reply(msg)[0] == "unavailable":
                continue  # a node that is gone: missing, not a reply
            replied += 1
            if msg.has_error():
                self._reject(record, node, f"client error: {msg.error.reason}")
                continue
            metrics = next(iter(msg.content.metric_records.values()), {})
            if metrics.get(S.SECOND_STAGE) != self.components:
                self._reject(record, node, "not the second stage's statistics")
                continue
            key = ClientKey.of(metrics.get(P.PARTITION_ID), node)
            try:  # the partition's owner since the layers' rounds (ownership.PartitionOwners)
                note = owners.check(key, _num_partitions(metrics), last, self._connected)
            except StatisticsError as exc:
                self._reject(record, node, str(exc))
                continue
            if note:
                log(WARNING, "%s", note)
            candidates.append((key, msg))
        total = LayerStatistics(np.zeros((dim, dim)), np.zeros((dim, classes)), 0)
        partitions: list[int] = []
        summed: list[ClientKey] = []
        seen: set[tuple[int, int]] = set()
        for key, msg in sorted(candidates, key=lambda kv: kv[0]):  # partition order
            if (key.rank, key.partition) in seen:  # the smaller node id was kept
                self._reject(record, key.node, f"duplicate partition-id {key.partition}")
                continue
            seen.add((key.rank, key.partition))
            try:
                stats = self._check(msg, dim, classes)
            except StatisticsError as exc:
                self._reject(record, key.node, str(exc))
                continue
            total.gram += stats.gram
            total.cross += stats.cross
            total.count += int(stats.count)
            partitions.append(key.partition)
            summed.append(key)
            del stats
        owners.bind(summed, last)
        num_valid = len(partitions)
        record.num_replies = replied
        record.details.update({"partitions": partitions, "num-valid": num_valid})
        if num_valid < inner.server.min_valid_replies:
            self.skipped = f"{num_valid} valid replies < min_valid_replies"
            log(WARNING, "second stage left out: %s (the first-stage model is kept)", self.skipped)
            record.details["solved"] = False
            return None, MetricRecord({"num-valid": num_valid})
        self.weights = ridge_solve(total.gram, total.cross, inner.net.output_reg)
        record.details["solved"] = True
        log(INFO, "second stage: W₂ (%d x %d) from %d clients, %d samples", dim, classes,
            num_valid, total.count)  # fmt: skip
        return inner.global_arrays(), MetricRecord(
            {"num-valid": num_valid, "num-examples": int(total.count)}
        )

    def _reject(self, record: Any, node: int, reason: str) -> None:
        log(WARNING, "Rejected second-stage reply from node %d: %s", node, reason)
        record.reject(node, reason)
        if not self.innermost().accept_failures:
            raise RuntimeError(f"reply from node {node} rejected (accept_failures=False): {reason}")

    @staticmethod
    def _check(msg: Message, dim: int, classes: int) -> LayerStatistics:
        """Unpack one reply's ``[h, q, 1]`` statistics strictly; ``StatisticsError`` says why."""
        metrics = next(iter(msg.content.metric_records.values()))
        num = metrics.get(P.NUM_EXAMPLES)
        if isinstance(num, bool) or not isinstance(num, int | np.integer):
            raise StatisticsError(f"num-examples must be an integer, got {num!r}")
        record = msg.content.array_records.get(P.STATISTICS_KEY)
        if record is None:
            raise StatisticsError(f"the reply has no {P.STATISTICS_KEY!r} arrays")
        packed = {k: v.numpy() for k, v in record.items()}
        stats = LayerStatistics.unpack(packed, dim=dim, targets=classes, strict=True)
        stats.validate(dim, classes, label_classes=classes)
        if int(num) != stats.count:
            raise StatisticsError(f"num-examples={num} but count={stats.count}")
        return stats

    # ---------------------------------------------------------------------------- evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """After the second stage: the wrapped evaluation plus the stage, ``W₂``, ``π`` and T, w."""
        if not self.finished:
            return []
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        if self.weights is None:
            return messages
        extra = ArrayRecord(S.stage_arrays(self.stage, self.weights, self.pooled))
        key = self.innermost().configrecord_key
        for msg in messages:
            msg.content[S.STAGE_ARRAYS_KEY] = extra
            msg.content[key].update({**self.settings, S.SECOND_STAGE: self.components})
        return messages

    def checkpoint_fingerprint(self) -> dict[str, Any]:
        """The wrapped strategy's fingerprint (the second stage is re-run after a resume)."""
        return self.strategy.checkpoint_fingerprint()


__all__ = ["SecondStage"]
