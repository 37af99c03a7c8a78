"""Server side of the ν-step meta app; :func:`run_meta_in_process` runs it without Ray."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy

from flwr_analytic.grid import InProcessGrid
from flwr_analytic.meta.config import resolve_run_config
from flwr_analytic.meta.task import build_model
from flwr_analytic.strategies.checkpointing import Checkpointed
from flwr_analytic.strategies.meta_baselines import build_meta_strategy
from flwr_analytic.strategies.wrapper import EvaluateRounds, StrategyWrapper

#: Work counters that clients report as floats; their mean over clients doing the same work is a
#: whole number, which :class:`WholeCounters` hands to the loop as an ``int``.
WHOLE_COUNTERS = ("grad-evals", "hvp-evals", "grad-equivalents", "samples-processed", "local-steps")


class WholeCounters(StrategyWrapper):
    """The training metrics with whole-number :data:`WHOLE_COUNTERS` as ``int``.

    Flower's weighted mean turns equal counts into floats such as ``29.999999999999996``, which
    its end-of-run table prints as ``3.0000e+01``; this prints ``30``. Other values are untouched,
    and so is the per-round history (``Metered``) inside it.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped aggregation; whole-number counters as ``int``."""
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        for key in WHOLE_COUNTERS if metrics is not None else ():
            value = metrics.get(key)
            if isinstance(value, float) and math.isfinite(value):
                if abs(value - round(value)) <= 1e-9 * max(1.0, abs(value)):
                    metrics[key] = round(value)
        return arrays, metrics


def run_meta(
    grid: Grid, run_config: Mapping[str, Any] | None = None
) -> tuple[Result, list[dict[str, Any]]]:
    """Run ``num-server-rounds`` rounds of the configured algorithm on ``grid``.

    The initial model is ``build_model(cfg, seed=cfg["seed"])``; Python's ``random`` (used by
    Flower to sample nodes) is seeded with ``cfg["seed"]``; federated evaluation runs every
    ``evaluate-every`` rounds and in the last. When ``history-path`` is not empty,
    ``{"run-config": cfg, "history": [...]}`` is written there as JSON (one
    :class:`~flwr_analytic.strategies.records.RoundRecord` per round and kind: aggregated
    metrics, bytes sent/received, round time, per-client evaluation metrics). With
    ``checkpoint-path`` the run is :class:`~flwr_analytic.strategies.checkpointing.Checkpointed`.
    The log holds no per-client lists (they are in the history), whole-number work counters
    print as integers (:class:`WholeCounters`); the run ends with :func:`meta_outcome`.

    Returns
    -------
    (Result, history)
        Flower's :class:`~flwr.serverapp.strategy.Result` and the per-round history.
    """
    cfg = resolve_run_config(run_config)
    metered, train_config, evaluate_config = build_meta_strategy(cfg)
    rounds, every = int(cfg["num-server-rounds"]), max(1, int(cfg["evaluate-every"]))
    eval_rounds = {r for r in range(1, rounds + 1) if r % every == 0 or r == rounds}
    strategy: Strategy = EvaluateRounds(WholeCounters(metered), eval_rounds)
    if cfg.get("checkpoint-path"):  # a checkpoint after every round; a restart resumes from it
        strategy = Checkpointed(strategy, str(cfg["checkpoint-path"]))
    random.seed(int(cfg["seed"]))  # Flower samples nodes with the global `random`
    model = build_model(cfg, seed=int(cfg["seed"]))
    result = strategy.start(
        grid,
        ArrayRecord(model.state_dict()),
        num_rounds=rounds,
        train_config=train_config,
        evaluate_config=evaluate_config,
    )
    history = metered.history_records()
    for line in meta_outcome(cfg, history):
        log(INFO, "%s", line)
    if cfg.get("history-path"):
        path = metered.save_history(cfg["history-path"], **{"run-config": dict(cfg)})
        log(INFO, "Per-round history with per-client metrics: %s", path)
    return result, history


def meta_outcome(cfg: Mapping[str, Any], history: list[dict[str, Any]]) -> list[str]:
    """Closing lines of a meta run: accuracy of the global model and after fine-tuning.

    From the last evaluation record: ``acc-s0`` (the global model), ``acc`` (after
    ``finetune-steps`` SGD steps at rate ``alpha``; sample-weighted) and the clients' mean, min
    and p10 after fine-tuning. Empty when no round was evaluated.
    """
    evaluated = [h for h in history if h["kind"] == "evaluate" and "acc" in h.get("metrics", {})]
    if not evaluated:
        return []
    last, m = evaluated[-1], evaluated[-1]["metrics"]
    algo = str(cfg["algorithm"])
    if algo == "meta":
        algo = f"ν-step meta (ν={cfg['nu']}, {cfg['mode']})"
    steps = len(m.get("acc-curve", [0])) - 1
    head = f"{algo} after round {last['round']}, {m['num-clients']} clients: accuracy "
    clients = (
        f"client mean {m['acc-client-mean']:.2%}, min {m['acc-client-min']:.2%}, "
        f"p10 {m['acc-client-p10']:.2%}"
    )
    if steps == 0:  # no fine-tuning (fedavg)
        return [f"{head}{m['acc']:.2%} (global model)", clients]
    return [
        f"{head}{m['acc-s0']:.2%} (global model) → {m['acc']:.2%} after {steps} fine-tuning steps",
        f"after fine-tuning: {clients}",
    ]


def make_meta_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """Build a :class:`flwr.serverapp.ServerApp` running :func:`run_meta` with the run config.

    ``overrides`` replace keys, e.g. under ``run_simulation`` where the run config is empty.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_meta(grid, {**dict(context.run_config), **dict(overrides or {})})

    return app


def run_meta_in_process(
    run_config: Mapping[str, Any] | None = None,
    num_nodes: int = 20,
    client_app: ClientApp | None = None,
) -> tuple[Result, list[dict[str, Any]]]:
    """:func:`run_meta` on an :class:`InProcessGrid` with the package's client app."""
    from flwr_analytic.clients.meta_client import make_meta_client_app

    cfg = resolve_run_config(run_config)
    grid = InProcessGrid(client_app or make_meta_client_app(), num_nodes, cfg)
    return run_meta(grid, cfg)
