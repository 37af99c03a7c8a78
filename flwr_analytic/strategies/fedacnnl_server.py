"""Server side of the FedACnnL app: build the strategy from the run config, run it, save results.

``apps/fedacnnl/fedacnnl_app/server_app.py`` only calls :func:`make_fedacnnl_server_app`
(Gu et al., arXiv 2502.06915).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy

from flwr_analytic.analytic.privacy.release import DPRelease
from flwr_analytic.fedacnnl.config import dp_config, resolve_run_config
from flwr_analytic.fedacnnl.data import (
    architecture_for,
    data_fingerprint,
    load_cached_dataset,
    scheme_for,
    split_from_config,
)
from flwr_analytic.models import build_module
from flwr_analytic.report import accuracy_table, lambda_line, write_accuracy_png
from flwr_analytic.strategies.checkpointing import Checkpointed
from flwr_analytic.strategies.fedacnnl import FedACnnL
from flwr_analytic.strategies.metering import Metered
from flwr_analytic.strategies.second_stage import SecondStage
from flwr_analytic.strategies.utils import arrays_digest, jsonable, sampling_options


def build_fedacnnl_strategy(cfg: Mapping[str, Any]) -> FedACnnL:
    """The :class:`FedACnnL` the (resolved) run config asks for (not yet wrapped).

    ``aggregation`` (``sorted`` | ``streaming``) and ``dp-noise-multiplier > 0`` (release policy
    :class:`~flwr_analytic.analytic.privacy.release.DPRelease`: the checks and public ridge for
    clients that release Gaussian-noised statistics with the same ``dp-*`` parameters) combine.
    """
    cfg = resolve_run_config(cfg)
    dp = dp_config(cfg)
    return FedACnnL(
        architecture_for(cfg),
        scheme_for(cfg),
        **cfg.kwargs("gamma", "hidden-gamma", "gamma-rule", "lam", "lam-rule", "personal-lambda"),
        **cfg.kwargs("personal-recalibration", "personalize-layers", "seed", "dtype", "mirror"),
        **cfg.kwargs("batch-size", "num-groups"),
        **cfg.kwargs("aggregation", "max-in-flight", "availability-timeout"),
        **sampling_options(cfg),
        release=DPRelease(dp) if dp.enabled else None,
    )


def wrap_fedacnnl_strategy(strategy: Strategy, cfg: Mapping[str, Any]) -> Strategy:
    """``Metered(strategy)``, inside ``Checkpointed`` when ``checkpoint-path`` is set.

    With ``second-stage = k > 0`` the strategy is first wrapped in :class:`SecondStage`
    (``scoring-temperature``, ``scoring-weight``).

    The checkpoint's fingerprint adds the data keys (:func:`~flwr_analytic.fedacnnl.data.data_fingerprint`)
    to the strategy's: a checkpoint of another data set, split or partitioner is refused.
    """
    if cfg["second-stage"]:
        strategy = SecondStage(
            strategy,
            int(cfg["second-stage"]),
            float(cfg["scoring-temperature"]),
            float(cfg["scoring-weight"]),
        )
    wrapped: Strategy = Metered(strategy)
    if cfg["checkpoint-path"]:
        wrapped = Checkpointed(
            wrapped, str(cfg["checkpoint-path"]), fingerprint=data_fingerprint(cfg)
        )
    return wrapped


def pooled_test_evaluation(cfg: Mapping[str, Any], num_partitions: int):
    """``evaluate_fn`` scoring the global model on the pooled client test sets (server-side data)."""
    cfg = resolve_run_config(cfg)
    arch = architecture_for(cfg)
    split = split_from_config(cfg, num_partitions)
    data_split = "all" if cfg["partitioner"] == "precomputed" else str(cfg["data-split"])
    data = load_cached_dataset(str(cfg["dataset"]), str(cfg["data-path"]), data_split)
    index = np.concatenate(split.test)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        module = build_module(arch).double().eval()
        module.load_state_dict(arrays.to_torch_state_dict())
        correct = 0
        with torch.no_grad():
            for start in range(0, len(index), 2048):
                rows = index[start : start + 2048]
                pred = module(torch.as_tensor(data.x[rows], dtype=torch.float64)).argmax(1)
                correct += int((pred.numpy() == data.y[rows]).sum())
        return MetricRecord({"accuracy": correct / max(1, len(index)), "num-examples": len(index)})

    return evaluate_fn


def run_fedacnnl(
    grid: Grid, run_config: Mapping[str, Any] | None = None
) -> tuple[Result, dict[str, Any]]:
    """Run FedACnnL + pFedACnnL on ``grid`` as the run config says; write ``results-path``.

    Returns
    -------
    (Result, summary)
        Flower's result and the JSON-able summary: run config, architecture, per-round history
        (layer, clients, bytes sent/received, wall time), the aggregated evaluation (global and
        personalized accuracy/loss: weighted, client mean/std/min/p10, per client), totals, the
        SHA-256 of the final model, ``report-png`` (the per-client accuracy chart written next
        to ``results-path``, see :func:`write_report`; ``None`` without one) and, with
        ``dp-noise-multiplier > 0``, the privacy report.

    Notes
    -----
    Logs the table of global vs personalized accuracy (:func:`~flwr_analytic.report.accuracy_table`)
    at the end, and with per-client λ how many clients chose each ρ.

    """
    cfg = resolve_run_config(run_config)
    random.seed(int(cfg["seed"]))  # Flower samples nodes with the global `random`
    strategy = wrap_fedacnnl_strategy(build_fedacnnl_strategy(cfg), cfg)
    evaluate_fn = None
    if cfg["centralized-eval"]:
        evaluate_fn = pooled_test_evaluation(cfg, len(list(grid.get_node_ids())))
    t0 = time.perf_counter()
    result = strategy.start(
        grid,
        num_rounds=int(cfg["num-server-rounds"]) or None,
        timeout=float(cfg["round-timeout"]),
        evaluate_fn=evaluate_fn,
    )
    wall = time.perf_counter() - t0
    history = strategy.history_records()
    final = max(result.evaluate_metrics_clientapp, default=None)
    evaluation = dict(result.evaluate_metrics_clientapp[final]) if final else {}
    central = result.evaluate_metrics_serverapp.get(final) if final else None
    summary = {
        "run-config": cfg,
        "architecture": strategy.architecture.name,
        "layers": strategy.architecture.num_layers,
        "num-nodes": len(list(grid.get_node_ids())),
        "rounds": history,
        "evaluate": evaluation,
        "centralized-evaluate": dict(central) if central else None,
        "global-accuracy": evaluation.get("global-accuracy"),
        "personal-accuracy": evaluation.get("personal-accuracy"),
        "second-stage-accuracy": evaluation.get("second-stage-accuracy"),
        "product-accuracy": evaluation.get("product-accuracy"),
        "wall-time": wall,
        "bytes-sent": int(sum(e.get("bytes-sent", 0) for e in history)),
        "bytes-received": int(sum(e.get("bytes-received", 0) for e in history)),
        "model-sha256": arrays_digest(result.arrays),
        # per layer: exactly which partitions were summed; who holds which partition; conflicts
        "layer-partitions": {
            int(e["layer"]): e.get("partitions", [])
            for e in history
            if e["kind"] == "train" and not e.get("second-stage")
        },
        "partition-owners": strategy.server.owners.state(),
    }
    privacy = strategy.privacy()  # each client's (ε, δ) over the released layers (DP)
    if privacy is not None:
        summary["privacy"] = privacy
    for line in ["", *accuracy_table(evaluation)] if evaluation else []:
        log(INFO, "%s", line)
    if lambda_line(evaluation):  # per-client λ (run config personal-lambda = "auto")
        log(INFO, "%s", lambda_line(evaluation))
    results = Path(str(cfg["results-path"])) if cfg["results-path"] else None
    summary["report-png"] = (
        write_report(evaluation, results.with_suffix(".png")) if results else None
    )
    summary = jsonable(summary)
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(summary, indent=2))
    if cfg["model-path"]:
        path = Path(str(cfg["model-path"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result.arrays.to_torch_state_dict(), path)
    return result, summary


def write_report(evaluation: Mapping[str, Any], path: Path) -> Path | None:
    """Write the per-client accuracy chart to ``path``; ``None`` when it cannot be drawn.

    It cannot without per-client evaluation values (``fraction-evaluate = 0``) or without
    matplotlib (a development dependency: ``pip install -e '.[dev]'``); both are logged.
    """
    if "client-ids" not in evaluation:
        log(INFO, "No per-client evaluation: no report chart")
        return None
    try:
        png = write_accuracy_png(evaluation, path)
    except ImportError as exc:  # matplotlib is not a runtime dependency
        log(WARNING, "No report chart (%s); pip install matplotlib to get one", exc)
        return None
    log(INFO, "Per-client accuracy chart: %s", png)
    return png


def make_fedacnnl_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A :class:`~flwr.serverapp.ServerApp` running :func:`run_fedacnnl` with the run config.

    ``overrides`` replace run-config keys (e.g. under ``run_simulation``, whose run config is empty).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_fedacnnl(grid, {**dict(context.run_config), **dict(overrides or {})})

    return app
