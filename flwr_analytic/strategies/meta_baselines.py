"""One factory for the ν-step meta strategy and its peers, driven by the app's run config.

``algorithm`` selects the strategy; the client code path is the same for all of them
(:mod:`flwr_analytic.clients.meta_client` dispatches on the ``"local-algorithm"`` config key):

========================  ==========================================================  ===========
algorithm                 strategy                                                    local update
========================  ==========================================================  ===========
``meta``                  :class:`NuStepMetaFedAvg` (``nu``, ``mode``)                ν-step meta
``per-fedavg-fo`` / -hf   :class:`NuStepMetaFedAvg` (ν = 1, first-order / hessian-free)  meta
``fedavg``                Flower ``FedAvg``, evaluated without fine-tuning            SGD
``fedavg-ft``             Flower ``FedAvg``, evaluated after ``finetune-steps``       SGD
``fedprox``               Flower ``FedProx`` (``proximal-mu``)                         SGD + prox
``pfedme``                :class:`PFedMe`                                              pFedMe
========================  ==========================================================  ===========

SGD-based peers use ``beta`` as their local rate (ν = 0 meta is then the same algorithm as FedAvg).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from flwr_analytic.meta.config import local_steps_for, resolve_run_config
from flwr_analytic.meta.protocol import encode_settings
from flwr_analytic.strategies.evaluation import personalized_metrics_aggregation
from flwr_analytic.strategies.metering import Metered
from flwr_analytic.strategies.nu_step_meta import NuStepMetaFedAvg
from flwr_analytic.strategies.pfedme import PFedMe
from flwr_analytic.strategies.utils import sampling_options
from flwr_analytic.strategies.wrapper import SortedReplies


def metered(strategy: Strategy) -> Metered:
    """``Metered(SortedReplies(strategy))``: a per-round history and node-id-ordered sums."""
    return Metered(SortedReplies(strategy))


def MeteredFedAvg(**kwargs: Any) -> Metered:  # noqa: N802 - kept name of the former class
    """Flower's ``FedAvg(**kwargs)``, metered (:func:`metered`); the former class's name."""
    return metered(FedAvg(**kwargs))


def MeteredFedProx(**kwargs: Any) -> Metered:  # noqa: N802 - kept name of the former class
    """Flower's ``FedProx(**kwargs)``, metered (:func:`metered`); the former class's name."""
    return metered(FedProx(**kwargs))


def build_meta_strategy(
    run_config: Mapping[str, Any] | None = None,
) -> tuple[Strategy, ConfigRecord, ConfigRecord]:
    """Strategy plus the extra train / evaluate configs for ``run_config["algorithm"]``.

    Parameters
    ----------
    run_config : mapping, optional
        Keys of :data:`flwr_analytic.meta.config.DEFAULT_RUN_CONFIG` to override.

    Returns
    -------
    (strategy, train_config, evaluate_config)
        The strategy, metered (:func:`metered`); pass the configs to
        ``strategy.start(train_config=..., evaluate_config=...)``. Wrap it in
        :class:`~flwr_analytic.strategies.checkpointing.Checkpointed` to resume after a crash.

    """
    cfg = resolve_run_config(run_config)
    algo = cfg["algorithm"]
    steps = local_steps_for(algo, cfg)
    bsz = int(cfg["batch-size"])
    ft_steps = 0 if algo == "fedavg" else int(cfg["finetune-steps"])
    common: dict[str, Any] = {
        **sampling_options(cfg),
        "evaluate_metrics_aggr_fn": personalized_metrics_aggregation,
    }
    finetune = {"finetune_steps": ft_steps, **cfg.kwargs("finetune-batch-size")}
    evaluate_config = ConfigRecord(
        {
            "finetune-steps": ft_steps,
            "finetune-lr": float(cfg["alpha"]),
            "finetune-batch-size": int(cfg["finetune-batch-size"]),
        }
    )
    train_config = ConfigRecord()
    strategy: Strategy
    if algo in ("meta", "per-fedavg-fo", "per-fedavg-hf"):
        nu, mode = int(cfg["nu"]), str(cfg["mode"])
        if algo != "meta":
            nu, mode = 1, ("first-order" if algo == "per-fedavg-fo" else "hessian-free")
        strategy = NuStepMetaFedAvg(
            **common,
            **finetune,
            **cfg.kwargs("alpha", "beta", "hessian-batches", delta="hf-delta"),
            nu=nu,
            mode=mode,
            local_steps=steps,
            inner_batch_size=bsz,
            outer_batch_size=bsz,
            hessian_batch_size=bsz,
        )
    elif algo == "pfedme":
        strategy = PFedMe(
            **common,
            **finetune,
            **cfg.kwargs(
                beta="pfedme-beta",
                lr="pfedme-lr",
                personal_lr="pfedme-personal-lr",
                lam="pfedme-lambda",
                inner_steps="pfedme-k",
                finetune_lr="alpha",
            ),
            local_steps=steps,
            batch_size=bsz,
        )
    else:
        sgd = {"lr": cfg["beta"], "local_steps": steps, "batch_size": bsz}
        train_config = ConfigRecord(encode_settings("sgd", sgd))
        if algo == "fedprox":
            strategy = FedProx(**common, **cfg.kwargs(proximal_mu="proximal-mu"))
        else:
            strategy = FedAvg(**common)
    return metered(strategy), train_config, evaluate_config
