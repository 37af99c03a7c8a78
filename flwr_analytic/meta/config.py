"""Run configuration of the ν-step meta app and equal-budget bookkeeping (no Flower imports).

The keys mirror ``[tool.flwr.app.config]`` of ``apps/meta/pyproject.toml``; a run config given by
Flower overrides them key by key (:func:`resolve_run_config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr_analytic.config_checks import check_choice, check_keys, check_number
from flwr_analytic.meta.meta_gradient import step_cost

ALGORITHMS = (
    "meta",
    "fedavg",
    "fedavg-ft",
    "per-fedavg-fo",
    "per-fedavg-hf",
    "fedprox",
    "pfedme",
)

DEFAULT_RUN_CONFIG: dict[str, Any] = {
    # which method: one of ALGORITHMS
    "algorithm": "meta",
    "num-server-rounds": 3,
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "min-nodes": 2,
    # data and model
    "dataset": "digits",
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.1,
    "min-partition-size": 20,
    "test-fraction": 0.25,
    "model": "cnn",
    "seed": 0,
    # nu-step meta learning (also Per-FedAvg with nu = 1)
    "nu": 2,
    "mode": "exact",
    "alpha": 0.05,
    "beta": 0.05,
    "hessian-batches": "independent",
    "hf-delta": 1e-3,
    # local work: local-steps, or (when grad-budget > 0) as many steps as fit the budget
    "local-steps": 10,
    "grad-budget": 0,
    "batch-size": 32,
    # peers
    "proximal-mu": 0.01,
    "pfedme-lambda": 15.0,
    "pfedme-k": 5,
    "pfedme-lr": 0.005,
    "pfedme-personal-lr": 0.09,
    "pfedme-beta": 1.0,
    # test-time personalization: accuracy after s = 0..finetune-steps SGD steps at rate alpha
    "finetune-steps": 5,
    "finetune-batch-size": 32,
    # evaluate every k rounds (and in the last); cap test samples per client (0: all)
    "evaluate-every": 1,
    "eval-test-cap": 0,
    # per-round history JSON ("" to skip)
    "history-path": "meta_history.json",
    # server checkpoint after every round; a restarted run with the same config resumes ("" = none)
    "checkpoint-path": "",
}


def resolve_run_config(run_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults overridden by ``run_config``, checked by :func:`check_run_config`.

    Unknown keys are kept (callers may carry extra entries) but each one issues a ``UserWarning``
    naming the closest known key (a likely typo: ``nuu`` -> ``nu``). A value that is not allowed
    raises :class:`~flwr_analytic.config_checks.ConfigError` (a ``ValueError``) naming the key and
    the allowed values.
    """
    given = dict(run_config or {})
    check_keys(given, DEFAULT_RUN_CONFIG, "meta run-config", action="warn")
    cfg = {**DEFAULT_RUN_CONFIG, **given}
    check_run_config(cfg)
    return cfg


def check_run_config(cfg: Mapping[str, Any]) -> None:
    """Fail at start on a value that cannot work, naming the key and the allowed values.

    ν >= 0 steps; step sizes α >= 0 (inner, α = 0 is FedAvg), β > 0 (outer), the peers' rates > 0
    and penalties >= 0 (Jamali et al., arXiv 2504.21327); fractions, sizes, counts, the dataset,
    partitioner, model, algorithm and modes.
    """
    from flwr_analytic.data import PARTITIONERS
    from flwr_analytic.meta.local_training import HESSIAN_BATCH_POLICIES
    from flwr_analytic.meta.meta_gradient import MODES
    from flwr_analytic.meta.task import DATASET_INFO
    from flwr_analytic.models.architectures import ARCHITECTURES

    check_choice("algorithm", cfg["algorithm"], ALGORITHMS)
    check_choice("dataset", cfg["dataset"], DATASET_INFO)
    check_choice("partitioner", cfg["partitioner"], PARTITIONERS)
    check_choice("model", cfg["model"], ARCHITECTURES)
    check_choice("mode", cfg["mode"], MODES)
    check_choice("hessian-batches", cfg["hessian-batches"], HESSIAN_BATCH_POLICIES)
    check_number("fraction-train", cfg["fraction-train"], low=0.0, high=1.0, low_open=True)
    check_number("fraction-evaluate", cfg["fraction-evaluate"], low=0.0, high=1.0)
    check_number("dirichlet-alpha", cfg["dirichlet-alpha"], low=0.0, low_open=True)
    check_number("test-fraction", cfg["test-fraction"], low=0.0, high=1.0, high_open=True)
    check_number("alpha", cfg["alpha"], low=0.0)
    for key in ("beta", "hf-delta", "pfedme-lr", "pfedme-personal-lr", "pfedme-beta"):
        check_number(key, cfg[key], low=0.0, low_open=True)
    for key in ("proximal-mu", "pfedme-lambda", "grad-budget"):
        check_number(key, cfg[key], low=0.0)
    for key, low in (
        ("num-server-rounds", 0),
        ("min-nodes", 1),
        ("min-partition-size", 0),
        ("seed", 0),
        ("nu", 0),
        ("local-steps", 1),
        ("batch-size", 1),
        ("pfedme-k", 1),
        ("finetune-steps", 0),
        ("finetune-batch-size", 1),
        ("evaluate-every", 1),
        ("eval-test-cap", 0),
    ):
        check_number(key, cfg[key], low=low, integer=True)


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
