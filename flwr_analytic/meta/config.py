"""Run configuration of the ν-step meta app and equal-budget bookkeeping (no Flower imports).

The keys mirror ``[tool.flwr.app.config]`` of ``apps/meta/pyproject.toml``; a run config given by
Flower overrides them key by key (:func:`resolve_run_config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
}


def resolve_run_config(run_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults overridden by ``run_config`` (unknown keys are kept)."""
    cfg = dict(DEFAULT_RUN_CONFIG)
    cfg.update(dict(run_config or {}))
    if cfg["algorithm"] not in ALGORITHMS:
        allowed = ", ".join(ALGORITHMS)
        raise ValueError(f"unknown algorithm {cfg['algorithm']!r}; allowed: {allowed}")
    return cfg


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
