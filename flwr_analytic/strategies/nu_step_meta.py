r"""ν-step meta federated learning strategy (Jamali, Saber and Bae, arXiv:2504.21327).

Paper: arxiv.org/abs/2504.21327 (generalizes Per-FedAvg, arxiv.org/abs/2002.07948).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any, TypedDict, Unpack

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flwr_analytic.config_checks import check_choice, check_number
from flwr_analytic.meta import HESSIAN_BATCH_POLICIES, MODES
from flwr_analytic.meta.protocol import encode_settings
from flwr_analytic.strategies.evaluation import personalized_metrics_aggregation


class FedAvgOptions(TypedDict, total=False):
    """Keyword arguments of Flower's :class:`~flwr.serverapp.strategy.FedAvg` (same defaults)."""

    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    weighted_by_key: str
    arrayrecord_key: str
    configrecord_key: str
    train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None
    evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None


def check_counts(minimum: int, **counts: Any) -> None:
    """Raise ``ConfigError`` (naming the argument) unless every count is an integer >= minimum."""
    for key, value in counts.items():
        check_number(key, value, low=minimum, integer=True)


class PersonalizedFedAvg(FedAvg):
    """FedAvg that sends local-training settings to the clients and evaluates personalized models.

    The base of :class:`NuStepMetaFedAvg` and :class:`~flwr_analytic.strategies.pfedme.PFedMe`.
    :meth:`configure_train` adds :meth:`train_config` to every training ``ConfigRecord`` and
    :meth:`configure_evaluate` adds :meth:`evaluate_config` (``finetune-steps``, ``finetune-lr`` =
    :meth:`finetune_rate`, ``finetune-batch-size``) to every evaluation ``ConfigRecord``: clients
    report their accuracy after test-time fine-tuning. Wrap it in
    :class:`~flwr_analytic.strategies.wrapper.SortedReplies` (node-id-ordered sums),
    :class:`~flwr_analytic.strategies.metering.Metered` (history) and
    :class:`~flwr_analytic.strategies.checkpointing.Checkpointed` (resume), as
    :func:`~flwr_analytic.strategies.meta_baselines.build_meta_strategy` does.

    Parameters
    ----------
    finetune_steps : int (default: 5)
        ``S``: clients report test accuracy after ``s = 0..S`` fine-tuning steps.
    finetune_batch_size : int (default: 32)
        Minibatch size of test-time fine-tuning.
    **fedavg : FedAvgOptions
        As in :class:`flwr.serverapp.strategy.FedAvg` (``fraction_train`` in ``(0, 1]``,
        ``fraction_evaluate`` in ``[0, 1]``); ``evaluate_metrics_aggr_fn`` defaults to
        :func:`~flwr_analytic.strategies.evaluation.personalized_metrics_aggregation`
        (sample-weighted and per-client statistics of the personalized accuracy).

    """

    #: Name of the strategy in :meth:`summary`.
    settings_title = "PersonalizedFedAvg"
    #: The clients' local update (a key of :data:`~flwr_analytic.meta.protocol.TRAIN_KEYS`) whose
    #: settings, read from attributes of the same names, :meth:`train_config` sends (None: none).
    local_algorithm: str | None = None

    def __init__(
        self,
        *,
        finetune_steps: int = 5,
        finetune_batch_size: int = 32,
        **fedavg: Unpack[FedAvgOptions],
    ) -> None:
        fedavg["evaluate_metrics_aggr_fn"] = (
            fedavg.get("evaluate_metrics_aggr_fn") or personalized_metrics_aggregation
        )
        super().__init__(**fedavg)
        # fail at construction, naming the argument and what is allowed (ConfigError: ValueError)
        check_number("fraction_train", self.fraction_train, low=0.0, high=1.0, low_open=True)
        check_number("fraction_evaluate", self.fraction_evaluate, low=0.0, high=1.0)
        check_number("finetune_steps", finetune_steps, low=0, integer=True)
        check_number("finetune_batch_size", finetune_batch_size, low=1, integer=True)
        self.finetune_steps = finetune_steps
        self.finetune_batch_size = finetune_batch_size

    def finetune_rate(self) -> float:
        """Step size of test-time fine-tuning, sent as ``finetune-lr`` (subclasses define it)."""
        raise NotImplementedError

    def settings(self) -> list[str]:
        """Lines describing the strategy's own settings, logged by :meth:`summary`."""
        return [f"fine-tuning steps at test: {self.finetune_steps}"]

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        rows = self.settings()
        log(INFO, "\t├──> %s settings:", self.settings_title)
        for k, row in enumerate(rows):
            log(INFO, "\t│\t%s── %s", "└" if k == len(rows) - 1 else "├", row)
        super().summary()

    def train_config(self) -> dict[str, int | float | str]:
        """Return the kebab-case keys injected into every training ``ConfigRecord``.

        ``local-algorithm`` and the settings of :attr:`local_algorithm`
        (:func:`~flwr_analytic.meta.protocol.encode_settings`); nothing without one.
        """
        if self.local_algorithm is None:
            return {}
        return encode_settings(self.local_algorithm, vars(self))

    def evaluate_config(self) -> dict[str, int | float]:
        """Return the kebab-case keys injected into every evaluation ``ConfigRecord``."""
        return {
            "finetune-steps": int(self.finetune_steps),
            "finetune-lr": float(self.finetune_rate()),
            "finetune-batch-size": int(self.finetune_batch_size),
        }

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of federated training."""
        config.update(self.train_config())
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure the next round of federated (personalized) evaluation."""
        config.update(self.evaluate_config())
        return super().configure_evaluate(server_round, arrays, config, grid)


class NuStepMetaFedAvg(PersonalizedFedAvg):
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
    **fedavg : FedAvgOptions
        ``fraction_train``, ``fraction_evaluate``, ``min_train_nodes``, ``min_evaluate_nodes``,
        ``min_available_nodes``, ``weighted_by_key``, ``arrayrecord_key``, ``configrecord_key``,
        ``train_metrics_aggr_fn`` and ``evaluate_metrics_aggr_fn``: as in
        :class:`PersonalizedFedAvg`.

    """

    settings_title = "NuStepMetaFedAvg"
    local_algorithm = "meta"

    # pylint: disable=too-many-arguments,too-many-locals
    def __init__(
        self,
        *,
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
        **fedavg: Unpack[FedAvgOptions],
    ) -> None:
        super().__init__(
            finetune_steps=finetune_steps, finetune_batch_size=finetune_batch_size, **fedavg
        )
        check_number("nu", nu, low=0, integer=True)
        check_choice("mode", mode, MODES)
        check_choice("hessian_batches", hessian_batches, HESSIAN_BATCH_POLICIES)
        check_number("alpha", alpha, low=0.0)  # α = 0: no inner adaptation (FedAvg)
        check_number("beta", beta, low=0.0, low_open=True)
        check_number("delta", delta, low=0.0, low_open=True)
        check_counts(
            1,
            local_steps=local_steps,
            inner_batch_size=inner_batch_size,
            outer_batch_size=outer_batch_size,
            hessian_batch_size=hessian_batch_size,
        )
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

    def finetune_rate(self) -> float:
        """Step size of test-time fine-tuning: the inner step size ``alpha``."""
        return self.alpha

    def settings(self) -> list[str]:
        """Lines describing the strategy's own settings, logged by :meth:`summary`."""
        return [
            f"nu: {self.nu} | mode: {self.mode}",
            f"alpha: {self.alpha} | beta: {self.beta} | local steps: {self.local_steps}",
            f"batches: inner {self.inner_batch_size} | outer {self.outer_batch_size} | "
            f"hessian {self.hessian_batch_size} ({self.hessian_batches})",
            *super().settings(),
        ]
