r"""ν-step meta federated learning strategy (Jamali, Saber and Bae, arXiv:2504.21327).

Paper: arxiv.org/abs/2504.21327 (generalizes Per-FedAvg, arxiv.org/abs/2002.07948).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flwr_analytic.config_checks import check_choice, check_number
from flwr_analytic.meta import HESSIAN_BATCH_POLICIES, MODES
from flwr_analytic.strategies.checkpoint import ResumableStartMixin
from flwr_analytic.strategies.history import RoundHistoryMixin, personalized_metrics_aggregation


class NuStepMetaFedAvg(ResumableStartMixin, RoundHistoryMixin, FedAvg):
    r"""ν-step meta federated averaging.

    Implementation based on https://arxiv.org/abs/2504.21327 (the algorithm is inferred from the
    abstract and Per-FedAvg, https://arxiv.org/abs/2002.07948).

    Every client ``i`` takes ``tau`` local meta-steps on the ν-step objective
    :math:`F_i(w) = f_i(\phi^\nu(w))`, :math:`\phi^{k+1} = \phi^k - \alpha \nabla f_i(\phi^k)`:

    .. math::
        u \leftarrow u - \beta (I - \alpha H_0) \cdots (I - \alpha H_{\nu-1})
        \nabla f_i(\phi^\nu(u); D')

    and the server averages the returned models weighted by the number of training examples
    (as FedAvg). ``nu=0`` is FedAvg with local SGD at rate ``beta``; ``nu=1`` with
    ``mode="first-order"`` or ``"hessian-free"`` is Per-FedAvg FO / HF.

    The strategy sends its settings inside the ``ConfigRecord`` of ``configure_train`` under the
    keys ``"local-algorithm"`` (``"meta"``), ``"meta-nu"``, ``"meta-alpha"``, ``"meta-beta"``,
    ``"meta-mode"``, ``"local-steps"``, ``"inner-batch-size"``, ``"outer-batch-size"``,
    ``"hessian-batch-size"``, ``"hessian-batches"`` and ``"hf-delta"``, and the test-time
    personalization settings inside that of ``configure_evaluate`` under ``"finetune-steps"``,
    ``"finetune-lr"`` (= ``alpha``) and ``"finetune-batch-size"``. The client (see
    :mod:`flwr_analytic.clients.meta_client`) runs
    :func:`flwr_analytic.meta.meta_train` and :func:`flwr_analytic.meta.personalization_curve`.

    Parameters
    ----------
    fraction_train : float (default: 1.0)
        Fraction of nodes used during training. In case `min_train_nodes`
        is larger than `fraction_train * total_connected_nodes`, `min_train_nodes`
        will still be sampled.
    fraction_evaluate : float (default: 1.0)
        Fraction of nodes used during validation. In case `min_evaluate_nodes`
        is larger than `fraction_evaluate * total_connected_nodes`,
        `min_evaluate_nodes` will still be sampled.
    min_train_nodes : int (default: 2)
        Minimum number of nodes used during training.
    min_evaluate_nodes : int (default: 2)
        Minimum number of nodes used during validation.
    min_available_nodes : int (default: 2)
        Minimum number of total nodes in the system.
    weighted_by_key : str (default: "num-examples")
        The key within each MetricRecord whose value is used as the weight when
        computing weighted averages for both ArrayRecords and MetricRecords.
    arrayrecord_key : str (default: "arrays")
        Key used to store the ArrayRecord when constructing Messages.
    configrecord_key : str (default: "config")
        Key used to store the ConfigRecord when constructing Messages.
    train_metrics_aggr_fn : Optional[callable] (default: None)
        Function with signature (list[RecordDict], str) -> MetricRecord,
        used to aggregate MetricRecords from training round replies.
        If `None`, defaults to `aggregate_metricrecords`, which performs a weighted
        average using the provided weight factor key.
    evaluate_metrics_aggr_fn : Optional[callable] (default: None)
        Function with signature (list[RecordDict], str) -> MetricRecord,
        used to aggregate MetricRecords from evaluation round replies.
        If `None`, defaults to `personalized_metrics_aggregation` (sample-weighted and
        per-client statistics of the personalized accuracy).
    nu : int (default: 1)
        Number of inner fine-tuning steps ν of the meta objective (0: FedAvg).
    alpha : float (default: 0.01)
        Inner step size α; also the rate of test-time fine-tuning.
    beta : float (default: 0.001)
        Outer (meta) step size β.
    mode : str (default: "first-order")
        ``"exact"`` (Hessian-vector products), ``"hessian-free"`` (finite-difference HVPs) or
        ``"first-order"`` (no Hessian terms).
    local_steps : int (default: 10)
        Local meta-steps τ per round.
    inner_batch_size : int (default: 32)
        Size of the inner batches ``D_k``.
    outer_batch_size : int (default: 32)
        Size of the outer batch ``D'``.
    hessian_batch_size : int (default: 32)
        Size of the Hessian batches ``D''_k``.
    hessian_batches : str (default: "independent")
        ``"independent"`` (fresh ``D''_k``, as Per-FedAvg) or ``"reuse"`` (``D''_k = D_k``).
    delta : float (default: 1e-3)
        Finite-difference step δ of ``mode="hessian-free"``.
    finetune_steps : int (default: 5)
        ``S``: clients report test accuracy after ``s = 0..S`` fine-tuning steps.
    finetune_batch_size : int (default: 32)
        Minibatch size of test-time fine-tuning.
    checkpoint_path : str or Path, optional (default: None)
        When set, ``start`` writes a checkpoint after every round (global arrays, server round,
        Python's ``random`` state, history) and resumes from it when restarted with the same
        configuration; see :class:`~flwr_analytic.strategies.checkpoint.ResumableStartMixin`.

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
        nu: int = 1,
        alpha: float = 0.01,
        beta: float = 0.001,
        mode: str = "first-order",
        local_steps: int = 10,
        inner_batch_size: int = 32,
        outer_batch_size: int = 32,
        hessian_batch_size: int = 32,
        hessian_batches: str = "independent",
        delta: float = 1e-3,
        finetune_steps: int = 5,
        finetune_batch_size: int = 32,
        checkpoint_path: str | Path | None = None,
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
        check_number("nu", nu, low=0, integer=True)
        check_choice("mode", mode, MODES)
        check_choice("hessian_batches", hessian_batches, HESSIAN_BATCH_POLICIES)
        check_number("alpha", alpha, low=0.0)  # α = 0: no inner adaptation (FedAvg)
        check_number("beta", beta, low=0.0, low_open=True)
        check_number("delta", delta, low=0.0, low_open=True)
        check_number("fraction_train", fraction_train, low=0.0, high=1.0, low_open=True)
        check_number("fraction_evaluate", fraction_evaluate, low=0.0, high=1.0)
        for key, value, low in (
            ("local_steps", local_steps, 1),
            ("inner_batch_size", inner_batch_size, 1),
            ("outer_batch_size", outer_batch_size, 1),
            ("hessian_batch_size", hessian_batch_size, 1),
            ("finetune_steps", finetune_steps, 0),
            ("finetune_batch_size", finetune_batch_size, 1),
        ):
            check_number(key, value, low=low, integer=True)
        self.nu = nu
        self.alpha = alpha
        self.beta = beta
        self.mode = mode
        self.local_steps = local_steps
        self.inner_batch_size = inner_batch_size
        self.outer_batch_size = outer_batch_size
        self.hessian_batch_size = hessian_batch_size
        self.hessian_batches = hessian_batches
        self.delta = delta
        self.finetune_steps = finetune_steps
        self.finetune_batch_size = finetune_batch_size
        self.checkpoint_path = checkpoint_path

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> NuStepMetaFedAvg settings:")
        log(INFO, "\t│\t├── nu: %s | mode: %s", self.nu, self.mode)
        log(
            INFO,
            "\t│\t├── alpha: %s | beta: %s | local steps: %s",
            self.alpha,
            self.beta,
            self.local_steps,
        )
        log(
            INFO,
            "\t│\t├── batches: inner %s | outer %s | hessian %s (%s)",
            self.inner_batch_size,
            self.outer_batch_size,
            self.hessian_batch_size,
            self.hessian_batches,
        )
        log(INFO, "\t│\t└── fine-tuning steps at test: %s", self.finetune_steps)
        super().summary()

    def train_config(self) -> dict[str, int | float | str]:
        """Return the kebab-case keys injected into every training ``ConfigRecord``."""
        return {
            "local-algorithm": "meta",
            "meta-nu": int(self.nu),
            "meta-alpha": float(self.alpha),
            "meta-beta": float(self.beta),
            "meta-mode": self.mode,
            "local-steps": int(self.local_steps),
            "inner-batch-size": int(self.inner_batch_size),
            "outer-batch-size": int(self.outer_batch_size),
            "hessian-batch-size": int(self.hessian_batch_size),
            "hessian-batches": self.hessian_batches,
            "hf-delta": float(self.delta),
        }

    def evaluate_config(self) -> dict[str, int | float]:
        """Return the kebab-case keys injected into every evaluation ``ConfigRecord``."""
        return {
            "finetune-steps": int(self.finetune_steps),
            "finetune-lr": float(self.alpha),
            "finetune-batch-size": int(self.finetune_batch_size),
        }

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of federated training."""
        for key, value in self.train_config().items():
            config[key] = value
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of federated (personalized) evaluation."""
        for key, value in self.evaluate_config().items():
            config[key] = value
        return super().configure_evaluate(server_round, arrays, config, grid)
