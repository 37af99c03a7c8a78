"""pFedMe strategy (Dinh, Tran and Nguyen, NeurIPS 2020) on the Message API.

Paper: arxiv.org/abs/2006.08848
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flwr_analytic.config_checks import check_number
from flwr_analytic.strategies.checkpoint import ResumableStartMixin
from flwr_analytic.strategies.history import RoundHistoryMixin, personalized_metrics_aggregation


class PFedMe(ResumableStartMixin, RoundHistoryMixin, FedAvg):
    r"""Personalized FL with Moreau envelopes.

    Implementation based on https://arxiv.org/abs/2006.08848 (Algorithm 1).

    Each client solves :math:`\theta_i \approx \arg\min_\theta f_i(\theta) +
    \frac{\lambda}{2}\|\theta - w_i\|^2` with ``K`` gradient steps per local step and updates
    :math:`w_i \leftarrow w_i - \eta\lambda(w_i - \theta_i)`
    (:func:`flwr_analytic.meta.pfedme_train`); the server mixes
    :math:`w \leftarrow (1-\beta) w + \beta \sum_i p_i w_i` with ``p_i`` proportional to the
    number of training examples (``beta = 1`` is plain averaging).

    Settings are sent in the training ``ConfigRecord`` under ``"local-algorithm"`` (``"pfedme"``),
    ``"pfedme-lr"``, ``"pfedme-personal-lr"``, ``"pfedme-lambda"``, ``"pfedme-k"``,
    ``"local-steps"`` and ``"batch-size"``; evaluation uses ``"finetune-steps"``,
    ``"finetune-lr"`` and ``"finetune-batch-size"``.

    Parameters
    ----------
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes,
    weighted_by_key, arrayrecord_key, configrecord_key, train_metrics_aggr_fn :
        As in :class:`flwr.serverapp.strategy.FedAvg`.
    evaluate_metrics_aggr_fn : Optional[callable] (default: None)
        Defaults to `personalized_metrics_aggregation`.
    beta : float (default: 1.0)
        Server mixing weight β.
    lr : float (default: 0.005)
        Local update rate η of ``w_i``.
    personal_lr : float (default: 0.09)
        Step size of the ``K`` inner steps on ``theta``.
    lam : float (default: 15.0)
        Moreau-envelope weight λ.
    inner_steps : int (default: 5)
        ``K``.
    local_steps : int (default: 20)
        Local steps (batches) per round.
    batch_size : int (default: 20)
        Minibatch size.
    finetune_steps : int (default: 5)
        Test-time fine-tuning steps ``S``.
    finetune_lr : float (default: 0.01)
        Test-time fine-tuning rate.
    finetune_batch_size : int (default: 32)
        Test-time fine-tuning minibatch size.

    """

    # pylint: disable=too-many-arguments,too-many-positional-arguments,too-many-locals
    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        beta: float = 1.0,
        lr: float = 0.005,
        personal_lr: float = 0.09,
        lam: float = 15.0,
        inner_steps: int = 5,
        local_steps: int = 20,
        batch_size: int = 20,
        finetune_steps: int = 5,
        finetune_lr: float = 0.01,
        finetune_batch_size: int = 32,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn or personalized_metrics_aggregation,
        )
        # fail at construction, naming the argument and what is allowed (ConfigError: ValueError)
        for key, value in (("beta", beta), ("lr", lr), ("personal_lr", personal_lr)):
            check_number(key, value, low=0.0, low_open=True)
        check_number("lam", lam, low=0.0)
        check_number("finetune_lr", finetune_lr, low=0.0)
        check_number("fraction_train", fraction_train, low=0.0, high=1.0, low_open=True)
        check_number("fraction_evaluate", fraction_evaluate, low=0.0, high=1.0)
        for key, value, low in (
            ("inner_steps", inner_steps, 1),
            ("local_steps", local_steps, 1),
            ("batch_size", batch_size, 1),
            ("finetune_steps", finetune_steps, 0),
            ("finetune_batch_size", finetune_batch_size, 1),
        ):
            check_number(key, value, low=low, integer=True)
        self.beta = beta
        self.lr = lr
        self.personal_lr = personal_lr
        self.lam = lam
        self.inner_steps = inner_steps
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.finetune_steps = finetune_steps
        self.finetune_lr = finetune_lr
        self.finetune_batch_size = finetune_batch_size
        self._global: ArrayRecord | None = None

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> pFedMe settings:")
        log(
            INFO,
            "\t│\t├── beta: %s | lr: %s | personal lr: %s",
            self.beta,
            self.lr,
            self.personal_lr,
        )
        log(
            INFO,
            "\t│\t└── lambda: %s | K: %s | local steps: %s",
            self.lam,
            self.inner_steps,
            self.local_steps,
        )
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of federated training (and remember ``w``)."""
        self._global = arrays
        config["local-algorithm"] = "pfedme"
        config["pfedme-lr"] = float(self.lr)
        config["pfedme-personal-lr"] = float(self.personal_lr)
        config["pfedme-lambda"] = float(self.lam)
        config["pfedme-k"] = int(self.inner_steps)
        config["local-steps"] = int(self.local_steps)
        config["batch-size"] = int(self.batch_size)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the client models and mix with the previous global model."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self._global is None or self.beta == 1.0:
            return arrays, metrics
        mixed = ArrayRecord(
            {
                key: Array(
                    (
                        (1.0 - self.beta) * self._global[key].numpy()
                        + self.beta * arrays[key].numpy()
                    ).astype(arrays[key].numpy().dtype)
                )
                for key in arrays.keys()
            }
        )
        return mixed, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of federated (personalized) evaluation."""
        config["finetune-steps"] = int(self.finetune_steps)
        config["finetune-lr"] = float(self.finetune_lr)
        config["finetune-batch-size"] = int(self.finetune_batch_size)
        return super().configure_evaluate(server_round, arrays, config, grid)
