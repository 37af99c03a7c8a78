"""Run configuration of the ν-step meta app and equal-budget bookkeeping (no Flower imports).

The keys mirror ``[tool.flwr.app.config]`` of ``apps/meta/pyproject.toml``; a run config given by
Flower overrides them key by key (:func:`resolve_run_config`); unknown keys fail.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr_analytic.config_checks import (
    ConfigTable,
    Interval,
    Options,
    Param,
    RunConfig,
    Text,
)
from flwr_analytic.data import PARTITIONERS
from flwr_analytic.data.loaders import SPLITS
from flwr_analytic.meta.local_training import HESSIAN_BATCH_POLICIES
from flwr_analytic.meta.meta_gradient import MODES, step_cost
from flwr_analytic.meta.task import DATASET_SHAPES
from flwr_analytic.models.architectures import ARCHITECTURES

ALGORITHMS = (
    "meta",
    "fedavg",
    "fedavg-ft",
    "per-fedavg-fo",
    "per-fedavg-hf",
    "fedprox",
    "pfedme",
)

_INT0, _INT1 = Interval(int, 0), Interval(int, 1)
_NONNEG, _POS = Interval(float, 0), Interval(float, 0, closed="right")

#: Every run-config key of the meta app: default, allowed values, one-line help. Step sizes
#: α >= 0 (inner; α = 0 is FedAvg), β > 0 (outer), the peers' rates > 0 and penalties >= 0
#: (Jamali et al., arXiv 2504.21327). The defaults (12 rounds of 10 local ν = 2 exact meta-steps,
#: α = 0.1, β = 0.2, fine-tuning for ν = 2 steps at test) show ν-step meta-learning in about a
#: minute on digits with 10 clients (``flwr run apps/meta --federation-config "num-supernodes=10"``):
#: the meta-learned global model at ~45-80% test accuracy, ~93% after ν = 2 fine-tuning steps.
RUN_CONFIG = ConfigTable(
    (
        Param("algorithm", "meta", Options(ALGORITHMS), "which method"),
        Param("num-server-rounds", 12, _INT0, "federated rounds"),
        Param("fraction-train", 1.0, Interval(float, 0, 1, "right"), "share of nodes trained"),
        Param("fraction-evaluate", 1.0, Interval(float, 0, 1), "share of nodes evaluated"),
        Param("min-nodes", 2, _INT1, "nodes needed to start a round"),
        Param("dataset", "digits", Options(DATASET_SHAPES), "data set"),
        Param("data-split", "train", Options(SPLITS), "which split of the data set to partition"),
        Param("partitioner", "dirichlet", Options(PARTITIONERS), "how the data is split"),
        Param("dirichlet-alpha", 0.1, _POS, "Dirichlet concentration of the label split"),
        Param("min-partition-size", 20, _INT0, "resample the split until every part has this"),
        Param("test-fraction", 0.25, Interval(float, 0, 1, "left"), "local test share"),
        Param("model", "cnn", Options(ARCHITECTURES), "architecture"),
        Param("seed", 0, _INT0, "seed of split, model and batches"),
        Param("nu", 2, _INT0, "ν inner steps of the meta-gradient (Per-FedAvg: 1)"),
        Param("mode", "exact", Options(MODES), "how the meta-gradient's Hessian term is formed"),
        Param("alpha", 0.1, _NONNEG, "inner step size α (also the fine-tuning rate)"),
        Param("beta", 0.2, _POS, "outer step size β (the SGD peers' local rate)"),
        Param("hessian-batches", "independent", Options(HESSIAN_BATCH_POLICIES), "HVP batches"),
        Param("hf-delta", 1e-3, _POS, "finite-difference step of the hessian-free mode"),
        Param("local-steps", 10, _INT1, "local steps per round (when grad-budget is 0)"),
        Param("grad-budget", 0, _NONNEG, "> 0: local gradient-equivalents per round instead"),
        Param("batch-size", 32, _INT1, "local batch size"),
        Param("proximal-mu", 0.01, _NONNEG, "FedProx proximal term μ"),
        Param("pfedme-lambda", 15.0, _NONNEG, "pFedMe regularization λ"),
        Param("pfedme-k", 5, _INT1, "pFedMe inner steps K"),
        Param("pfedme-lr", 0.005, _POS, "pFedMe local rate"),
        Param("pfedme-personal-lr", 0.09, _POS, "pFedMe personal rate"),
        Param("pfedme-beta", 1.0, _POS, "pFedMe server mixing β"),
        Param("finetune-steps", 2, _INT0, "evaluate after s = 0..finetune-steps SGD steps (ν)"),
        Param("finetune-batch-size", 32, _INT1, "fine-tuning batch size"),
        Param("evaluate-every", 1, _INT1, "evaluate every k rounds (and in the last)"),
        Param("eval-test-cap", 0, _INT0, "test samples per client (0: all)"),
        Param("history-path", "meta_history.json", Text(), 'per-round JSON ("" = none)'),
        Param("checkpoint-path", "", Text(), 'checkpoint after every round ("" = none)'),
    ),
    where="meta run-config",
)

#: Defaults of every key (derived from :data:`RUN_CONFIG`; ``--run-config`` overrides them).
DEFAULT_RUN_CONFIG: dict[str, Any] = RUN_CONFIG.defaults


def resolve_run_config(run_config: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults overridden by ``run_config``, every key and value checked by :data:`RUN_CONFIG`.

    Idempotent: a :class:`~flwr_analytic.config_checks.RunConfig` of this table comes back as is.

    Raises
    ------
    flwr_analytic.config_checks.UnknownKeyError
        (a ``KeyError``) for a key not in the table, naming the closest known key (a likely typo:
        ``nuu`` -> ``nu``).
    flwr_analytic.config_checks.ConfigError
        (a ``ValueError``) for a value that is not allowed, naming the key and the allowed values.

    """
    return RUN_CONFIG.resolve(run_config)


def step_cost_of(algorithm: str, cfg: Mapping[str, Any]) -> float:
    """Gradient-equivalents of one local step of ``algorithm`` (an exact HVP counts 2)."""
    if algorithm == "meta":
        return step_cost(int(cfg["nu"]), str(cfg["mode"]))
    if algorithm == "per-fedavg-fo":
        return step_cost(1, "first-order")
    if algorithm == "per-fedavg-hf":
        return step_cost(1, "hessian-free")
    if algorithm == "pfedme":
        return float(cfg["pfedme-k"])
    if algorithm in ("fedavg", "fedavg-ft", "fedprox"):
        return 1.0
    raise ValueError(f"unknown algorithm {algorithm!r}")


def local_steps_for(algorithm: str, cfg: Mapping[str, Any]) -> int:
    """Return the local steps τ of ``algorithm`` under ``cfg``.

    ``local-steps``, or ``round(grad-budget / step cost)`` (at least 1) when ``grad-budget > 0``, so
    that every method spends the same local gradient work.
    """
    budget = float(cfg.get("grad-budget", 0) or 0)
    if budget <= 0:
        return int(cfg["local-steps"])
    return max(1, round(budget / step_cost_of(algorithm, cfg)))
