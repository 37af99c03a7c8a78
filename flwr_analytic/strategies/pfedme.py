"""pFedMe strategy (Dinh, Tran and Nguyen, NeurIPS 2020) on the Message API.

Paper: arxiv.org/abs/2006.08848
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Unpack

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from flwr_analytic.config_checks import check_number
from flwr_analytic.strategies.nu_step_meta import FedAvgOptions, PersonalizedFedAvg, check_counts


class PFedMe(PersonalizedFedAvg):
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
    **fedavg : FedAvgOptions
        As in :class:`~flwr_analytic.strategies.nu_step_meta.PersonalizedFedAvg` (Flower's
        ``FedAvg`` arguments; ``evaluate_metrics_aggr_fn`` defaults to
        ``personalized_metrics_aggregation``).

    """

    settings_title = "pFedMe"
    local_algorithm = "pfedme"

    # pylint: disable=too-many-arguments,too-many-locals
    def __init__(
        self,
        *,
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
        **fedavg: Unpack[FedAvgOptions],
    ) -> None:
        super().__init__(
            finetune_steps=finetune_steps, finetune_batch_size=finetune_batch_size, **fedavg
        )
        for key, value in (("beta", beta), ("lr", lr), ("personal_lr", personal_lr)):
            check_number(key, value, low=0.0, low_open=True)
        check_number("lam", lam, low=0.0)
        check_number("finetune_lr", finetune_lr, low=0.0)
        check_counts(1, inner_steps=inner_steps, local_steps=local_steps, batch_size=batch_size)
        self.beta = beta
        self.lr = lr
        self.personal_lr = personal_lr
        self.lam = lam
        self.inner_steps = inner_steps
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.finetune_lr = finetune_lr
        self._global: ArrayRecord | None = None

    def finetune_rate(self) -> float:
        """Step size of test-time fine-tuning: ``finetune_lr``."""
        return self.finetune_lr

    def settings(self) -> list[str]:
        """Lines describing the strategy's own settings, logged by :meth:`summary`."""
        return [
            f"beta: {self.beta} | lr: {self.lr} | personal lr: {self.personal_lr}",
            f"lambda: {self.lam} | K: {self.inner_steps} | local steps: {self.local_steps}",
        ]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of federated training (and remember ``w``)."""
        self._global = arrays
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
