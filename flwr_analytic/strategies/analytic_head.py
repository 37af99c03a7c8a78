"""Analytic head for any backbone: a gradient strategy's run, then one closed-form head round.

A :class:`~flwr_analytic.strategies.wrapper.StrategyWrapper`: the wrapped strategy (FedAvg, FedProx,
any Message-API strategy) runs its own loop; then the final global model goes to the clients in
``train.analytic_head``, each replies with the float64 statistics ``G_k = A_kᵀA_k``,
``B_k = A_kᵀY_k`` of its head features (``A = [h, 1]``, ``h`` the head ``nn.Linear``'s input
captured on the client's own model, one-hot ``Y``), and the server solves

    W = (Σ_k G_k + γI)⁻¹ Σ_k B_k,

summed in partition order (:class:`~flwr_analytic.analytic.aggregation.SortedSum`): the ridge solution
on the pooled features of all clients, as FedACnnL's output layer (Gu et al., arXiv 2502.06915).
``evaluate.analytic_head`` then scores the new global head and each client's pFedACnnL head
``W_k = (G_k + λI)⁻¹(B_k + λW)``. The maths is in :mod:`flwr_analytic.analytic.head`; the client
half in :mod:`flwr_analytic.clients.analytic_head_client`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    Array,
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

from flwr_analytic.analytic import LayerStatistics, Regularization, StatisticsError
from flwr_analytic.analytic.aggregation import ClientKey, SortedSum
from flwr_analytic.analytic.head import (
    DTYPES,
    RandomFeatures,
    expansion_keys,
    head_keys,
    head_state,
    solve_head,
)
from flwr_analytic.analytic.personal_lambda import global_leverage
from flwr_analytic.clients.analytic_head_client import ACTION, EXPANSION_ACTIVATION, HEAD
from flwr_analytic.config_checks import check_choice, check_number
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.report import short_list
from flwr_analytic.strategies.availability import sample_available
from flwr_analytic.strategies.evaluation import aggregate_personalized_evaluation
from flwr_analytic.strategies.fedacnnl_replies import error_reply, evaluation_replies
from flwr_analytic.strategies.wrapper import StrategyWrapper

#: Phases of a run: the wrapped strategy's rounds, the head's training round, its evaluation.
PHASES = ("inner", "train", "evaluate", "done")


def decode_head_reply(
    msg: Message, dim: int, classes: int, weighted_by_key: str = P.NUM_EXAMPLES
) -> tuple[ClientKey, LayerStatistics]:
    """The reply's :class:`ClientKey` and checked statistics; ``StatisticsError`` otherwise.

    A reply holds one ``ArrayRecord`` (``LayerStatistics.pack()``, ``D = dim``, ``C = classes``)
    and one ``MetricRecord`` (integer ``num-examples`` equal to the count, optional integer
    ``partition-id``). The statistics must be those of one design row per sample and one-hot
    labels, with a positive semi-definite Gram (:meth:`LayerStatistics.validate`).
    """
    try:
        content = msg.content
        counts = (len(content.array_records), len(content.metric_records))
        if counts != (1, 1):
            raise StatisticsError(f"expected one ArrayRecord and one MetricRecord, got {counts}")
        metrics = next(iter(content.metric_records.values()))
        pid = metrics.get(P.PARTITION_ID)
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)):
            raise StatisticsError(f"metric {P.PARTITION_ID!r} must be an integer, got {pid!r}")
        packed = {k: a.numpy() for k, a in next(iter(content.array_records.values())).items()}
        stats = LayerStatistics.unpack(packed, dim=dim, targets=classes, strict=True)
        stats.validate(dim, classes, rows_per_sample=1, label_classes=classes, check_psd=True)
        if metrics.get(weighted_by_key) != stats.count:
            raise StatisticsError(
                f"{weighted_by_key} = {metrics.get(weighted_by_key)!r} but the statistics count "
                f"{stats.count} samples"
            )
        return ClientKey.of(pid, int(msg.metadata.src_node_id)), stats
    except StatisticsError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed reply never stops the round
        raise StatisticsError(f"malformed reply ({type(exc).__name__}: {exc})") from exc


class AnalyticHead(StrategyWrapper):
    r"""Run ``strategy``, then solve its model's head in closed form in one more round.

    The backbone may be anything (BatchNorm, residual blocks: models FedACnnL refuses); only the
    head, the module ``head`` of the client's model, must be an ``nn.Linear``. With the head's input
    features :math:`h` of client :math:`k`'s training data, :math:`A_k = [h, 1]` and one-hot
    :math:`Y_k`, the server solves

    .. math:: W = \Big(\sum_k A_k^\top A_k + \gamma I\Big)^{-1} \sum_k A_k^\top Y_k

    (the centralized ridge solution on the pooled features) and writes ``weight = W[:-1]ᵀ``,
    ``bias = W[-1]`` into the head's entries of the result's arrays. Each client then scores the
    global head and its pFedACnnL head :math:`W_k = (G_k + \lambda I)^{-1}(B_k + \lambda W)` (Gu et
    al., arXiv 2502.06915).

    Parameters
    ----------
    strategy : Strategy
        The gradient strategy (e.g. ``FedAvg(...)``), possibly wrapped.
    head : str (default: "fc3")
        Name of the head module (``model.named_modules()``); its ``weight`` (``C × F``) must be in
        the strategy's arrays.
    gamma, gamma_rule : float, {"relative", "absolute"} (default: 1e-6, "relative")
        Ridge ``γ`` of the global head (relative: ``γ = gamma · trace(ΣG)/D``).
    lam, lam_rule : float, {"relative", "absolute"} (default: 0.1, "relative")
        pFedACnnL's ``λ > 0`` (λ → ∞: the global head; λ → 0: the client's own ridge head).
    personal_lambda : {"fixed", "auto"} (default: "fixed")
        ``auto``: each client picks its own ``ρ ∈ {1e-4, 10^-3.75, …, 1e3, ∞}`` (∞: keep the global
        head) by exact leave-one-out on its training data, with no extra communication
        (:func:`~flwr_analytic.analytic.head.auto_personal_head`); the evaluation reports every
        client's choice (``personal-lambda``) and their distribution. ``lam`` is then unused.
    personal_recalibration : float (default: 0.0)
        ρ > 0: each client then recalibrates its head (``analytic.recalibration``; needs a bias).
    expansion : RandomFeatures, optional
        Solve the head on ``[h, φ(h), 1]`` with a seeded random-feature expansion ``φ`` (off by
        default). The head's entries become those of
        :class:`~flwr_analytic.analytic.head.ExpandedHead`: load the result into
        ``expand_head(Net(), head, expansion)``.
    dtype : {"float64", "float32"} (default: "float64")
        Precision of the clients' forward pass (the statistics are float64 either way).
    batch_size : int (default: 256)
        Client batch size of array data (a ``DataLoader`` keeps its own).
    fraction_train, fraction_evaluate : float (default: 1.0)
        Fractions of connected nodes in the head's rounds (``fraction_evaluate=0``: no evaluation).
    min_train_nodes, min_evaluate_nodes, min_available_nodes : int (default: 2)
        As FedAvg's.
    availability_timeout : float (default: 600)
        Seconds a head round waits for ``min_available_nodes``.
    min_valid_replies : int (default: 1)
        Fewest valid statistics to solve the head from (else ``RuntimeError``).
    weighted_by_key : str (default: "num-examples")
        The replies' sample count.
    evaluate_metrics_aggr_fn : callable, optional
        Default :func:`~flwr_analytic.strategies.evaluation.aggregate_personalized_evaluation`.

    Notes
    -----
    :meth:`start` returns the wrapped strategy's ``Result`` with ``arrays`` holding the solved head,
    and the head round ``r`` (the last round + 1, :attr:`head_round`) in
    ``train_metrics_clientapp[r]`` (``num-clients``, ``num-examples``, ``num-rejected``,
    ``num-failed``, ``num-missing``, ``head-dim``, ``solve-time``), ``evaluate_metrics_clientapp[r]``
    (``global-`` / ``personal-`` ``accuracy`` and ``loss``, per client too) and, with an
    ``evaluate_fn``, ``evaluate_metrics_serverapp[r]``. :attr:`statistics` holds ``(ΣG, ΣB, Σn)``,
    :attr:`weights` ``W``. The head's rounds pass through every wrapper outside this one.
    """

    def __init__(
        self,
        strategy: Strategy,
        head: str = "fc3",
        *,
        gamma: float = 1e-6,
        gamma_rule: str = "relative",
        lam: float = 0.1,
        lam_rule: str = "relative",
        personal_lambda: str = "fixed",
        personal_recalibration: float = 0.0,
        expansion: RandomFeatures | None = None,
        dtype: str = "float64",
        batch_size: int = 256,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        availability_timeout: float = 600.0,
        min_valid_replies: int = 1,
        weighted_by_key: str = P.NUM_EXAMPLES,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
    ) -> None:
        super().__init__(strategy)
        self.head = head
        check_number("lam", lam, low=0.0, low_open=True)  # pFedACnnL needs λ > 0
        self.gamma, self.lam = Regularization(gamma, gamma_rule), Regularization(lam, lam_rule)
        self.personal_lambda = check_choice(
            "personal_lambda", personal_lambda, P.PERSONAL_LAMBDA_MODES
        )
        self.recalibration = float(
            check_number("personal_recalibration", personal_recalibration, low=0)
        )
        check_choice("dtype", dtype, sorted(DTYPES))
        check_number("batch_size", batch_size, low=1, integer=True)
        check_number("fraction_train", fraction_train, low=0.0, high=1.0, low_open=True)
        check_number("fraction_evaluate", fraction_evaluate, low=0.0, high=1.0)
        check_number("min_valid_replies", min_valid_replies, low=1, integer=True)
        self.expansion, self.dtype, self.batch_size = expansion, dtype, int(batch_size)
        self.sampling = {
            "train": (float(fraction_train), int(min_train_nodes)),
            "evaluate": (float(fraction_evaluate), int(min_evaluate_nodes)),
            "available": int(min_available_nodes),
            "timeout": float(availability_timeout),
            "needed": int(min_valid_replies),
        }
        self.weighted_by_key = weighted_by_key
        self.evaluate_metrics_aggr_fn = (
            evaluate_metrics_aggr_fn or aggregate_personalized_evaluation
        )
        self.reset()

    def reset(self) -> None:
        """Forget the head round: the next :meth:`start` runs the wrapped strategy first."""
        self.phase, self.last_round, self.head_round = "inner", 0, 0
        self.statistics: LayerStatistics | None = None
        self.weights: np.ndarray | None = None
        self.owners: dict[int, int] = {}
        self.details: dict[str, Any] = {}
        self._arrays: dict[str, Array] = {}
        self._sent, self._dim, self._classes, self._bias = 0, 0, 0, True

    # ------------------------------------------------------------------------------ the run
    def summary(self) -> None:
        """The wrapped strategy's summary and the head round's settings."""
        self.strategy.summary()
        lam = (
            "λ per client (leave-one-out)"
            if self.personal_lambda == "auto"
            else f"λ {self.lam.value:g} ({self.lam.rule})"
        )
        log(INFO, "\t└──> then an analytic head %r: γ %g (%s), %s, expansion %s, %s",
            self.head, self.gamma.value, self.gamma.rule, lam, self.expansion,
            self.dtype)  # fmt: skip

    def run_loop(
        self,
        driver: Strategy,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """The wrapped strategy's loop, then the head's training and evaluation round.

        Arguments as Flower's ``Strategy.start``; the head's rounds go through ``driver`` (the
        outermost wrapper), so ``Metered`` records them too.
        """
        self.reset()
        kwargs: dict[str, Any] = {"timeout": timeout, "train_config": train_config}
        kwargs.update(evaluate_config=evaluate_config, evaluate_fn=evaluate_fn)
        if initial_arrays is not None:
            kwargs["initial_arrays"] = initial_arrays
        if num_rounds is not None:
            kwargs["num_rounds"] = num_rounds
        result = super().run_loop(driver, grid, **kwargs)
        arrays = result.arrays if len(result.arrays) else initial_arrays
        if arrays is None or not len(arrays):
            raise RuntimeError("the wrapped strategy returned no model: no head to solve")
        self.head_round = rnd = (
            max(self.last_round, max(result.train_metrics_clientapp, default=0)) + 1
        )
        log(INFO, "")
        log(INFO, "[ROUND %s] analytic head %r", rnd, self.head)
        self.phase = "train"
        messages = list(driver.configure_train(rnd, arrays, ConfigRecord(), grid))
        replies = grid.send_and_receive(messages=messages, timeout=timeout)
        solved, metrics = driver.aggregate_train(rnd, replies)
        if solved is None:
            raise RuntimeError(f"analytic head {self.head!r}: not solved")
        result.arrays = solved
        if metrics is not None:
            result.train_metrics_clientapp[rnd] = metrics
        self.phase = "evaluate"
        messages = list(driver.configure_evaluate(rnd, solved, ConfigRecord(), grid))
        replies = grid.send_and_receive(messages=messages, timeout=timeout) if messages else []
        agg = driver.aggregate_evaluate(rnd, replies)
        if agg is not None:
            log(INFO, "\t└──> analytic head: global accuracy %.4f, personalized %.4f",
                agg.get("global-accuracy", float("nan")),
                agg.get("personal-accuracy", float("nan")))  # fmt: skip
            result.evaluate_metrics_clientapp[rnd] = agg
        if evaluate_fn is not None:
            res = evaluate_fn(rnd, solved)
            if res is not None:
                result.evaluate_metrics_serverapp[rnd] = res
        self.phase = "done"
        return result

    # ------------------------------------------------------------------- training round
    def _prepare(self, arrays: ArrayRecord) -> tuple[int, int]:
        """Keep the model's arrays (+ the expansion's); return the head's ``(D, C)``."""
        kw, kb = head_keys(self.head)
        if kw not in arrays:
            raise KeyError(
                f"head {self.head!r}: {kw!r} is not in the model's arrays "
                f"({short_list(list(arrays.keys()))})"
            )
        shape = arrays[kw].numpy().shape
        if len(shape) != 2:
            raise ValueError(f"head {self.head!r}: {kw!r} has shape {shape}, not an nn.Linear's")
        classes, features = shape
        self._arrays = dict(arrays.items())
        self._bias = kb in arrays
        dim = features + 1
        if self.expansion is not None:
            rw, rb = self.expansion.draw(features)
            ew, eb = expansion_keys(self.head)
            self._arrays.update({ew: Array(rw), eb: Array(rb)})
            dim += self.expansion.width
        return dim, classes

    def _config(self, server_round: int) -> ConfigRecord:
        config = ConfigRecord({HEAD: self.head, P.DTYPE: self.dtype, P.SERVER_ROUND: server_round})
        config[P.BATCH_SIZE] = self.batch_size
        config[EXPANSION_ACTIVATION] = self.expansion.activation if self.expansion else "none"
        return config

    def _messages(
        self, grid: Grid, kind: str, arrays: ArrayRecord, config: ConfigRecord
    ) -> list[Message]:
        fraction, minimum = self.sampling[kind]
        nodes = sample_available(
            grid, fraction, minimum, self.sampling["available"], timeout=self.sampling["timeout"],
            needed=self.sampling["needed"], what=f"analytic head {kind}",
        )  # fmt: skip
        content = RecordDict({P.ARRAYS_KEY: arrays, P.CONFIG_KEY: config})
        category = MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
        message_type = f"{category}.{ACTION}"
        return [Message(content, dst_node_id=n, message_type=message_type) for n in nodes]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's messages; in the head round, the global model to every node."""
        if self.phase != "train":
            self.last_round = max(self.last_round, server_round)
            return self.strategy.configure_train(server_round, arrays, config, grid)
        self._dim, self._classes = self._prepare(arrays)
        messages = self._messages(
            grid, "train", ArrayRecord(self._arrays), self._config(server_round)
        )
        self._sent = len(messages)
        log(INFO, "analytic head %r: statistics of D = %d (features + bias) from %d nodes",
            self.head, self._dim, len(messages))  # fmt: skip
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's aggregation; in the head round, sum the statistics and solve."""
        if self.phase != "train":
            return self.strategy.aggregate_train(server_round, replies)
        total, rejected, failed, num_replies = SortedSum(self._dim, self._classes), [], 0, 0
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                if error_reply(msg)[0] == "unavailable":
                    continue
                num_replies, failed = num_replies + 1, failed + 1
                rejected.append((node, f"client error: {msg.error.reason}"))
                continue
            num_replies += 1
            try:
                total.add(*decode_head_reply(msg, self._dim, self._classes, self.weighted_by_key))
            except StatisticsError as exc:
                rejected.append((node, str(exc)))
        rejected += [(key.node, reason) for key, reason in total.close()]
        for node, reason in rejected:
            log(WARNING, "analytic head: rejected reply from node %d: %s", node, reason)
        if len(total.keys) < self.sampling["needed"]:
            raise RuntimeError(
                f"analytic head {self.head!r}: {len(total.keys)} valid replies < "
                f"min_valid_replies={self.sampling['needed']} ({len(rejected)} rejected)"
            )
        self.owners = {key.partition: key.node for key in total.keys if key.known}
        t0 = time.perf_counter()
        self.statistics = total.total()
        self.weights = solve_head(self.statistics, self.gamma, self._bias)
        solve_time = time.perf_counter() - t0
        solved = dict(self._arrays)
        solved.update(
            {k: Array(v) for k, v in head_state(self.head, self.weights, self._bias).items()}
        )
        self.details = {
            "partitions": [key.partition for key in total.keys if key.known],
            "rejected": rejected,
            "gamma": self.gamma.amount(self.statistics.gram),
        }
        metrics = MetricRecord(
            {
                "num-clients": len(total.keys),
                "num-examples": int(self.statistics.count),
                "num-rejected": len(rejected) - failed,
                "num-failed": failed,
                "num-missing": max(0, self._sent - num_replies),
                "head-dim": self._dim,
                "solve-time": solve_time,
            }
        )
        return ArrayRecord(solved), metrics

    # ----------------------------------------------------------------- evaluation round
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's messages; in the head round, the solved model and ``λ``."""
        if self.phase == "inner":
            self.last_round = max(self.last_round, server_round)
            return self.strategy.configure_evaluate(server_round, arrays, config, grid)
        if self.phase != "evaluate" or self.sampling["evaluate"][0] == 0.0:
            return []
        cfg = self._config(server_round)

        def leverage() -> float:  # the global head's h̄ (sent with personal_lambda="auto")
            stats = self.statistics
            return 0.0 if stats is None else global_leverage(stats, self.gamma, self._bias)

        if self.recalibration and not self._bias:
            raise ValueError(f"personal_recalibration needs a head with a bias ({self.head!r})")
        lam, mode = self.lam, self.personal_lambda
        cfg.update(P.evaluate_settings(lam.value, lam.rule, mode, leverage, self.recalibration))
        return self._messages(grid, "evaluate", arrays, cfg)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The wrapped strategy's; in the head round, global and pFedACnnL metrics by partition."""
        if self.phase == "inner":
            return self.strategy.aggregate_evaluate(server_round, replies)
        replies = list(replies)
        if not replies:
            return None
        good, rejected = evaluation_replies(self.owners, replies)
        for node, reason in rejected:
            log(WARNING, "analytic head evaluation: rejected reply from node %d: %s", node, reason)
        return self.evaluate_metrics_aggr_fn(good, self.weighted_by_key) if good else None


__all__ = ["AnalyticHead", "PHASES", "decode_head_reply"]
