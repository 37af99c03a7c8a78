"""Message-API client of the ν-step meta app and of its peers (one code path for all methods).

``train``: loads the received ``ArrayRecord`` and runs the local update named by the config key
``"local-algorithm"``:

- ``"meta"``: :func:`flwr_analytic.meta.meta_train` (keys of
  :class:`flwr_analytic.strategies.NuStepMetaFedAvg`);
- ``"sgd"``: :func:`flwr_analytic.meta.sgd_train` with ``"lr"``, ``"local-steps"``,
  ``"batch-size"`` and, when present (Flower's ``FedProx``), ``"proximal-mu"``;
- ``"pfedme"``: :func:`flwr_analytic.meta.pfedme_train` (keys of
  :class:`flwr_analytic.strategies.PFedMe`).

``evaluate``: :func:`flwr_analytic.meta.personalization_curve` with ``"finetune-steps"``,
``"finetune-lr"``, ``"finetune-batch-size"``; replies ``correct-curve`` and ``loss-curve``
(``s = 0..S``), ``acc``/``loss`` at ``S``, ``partition-id`` and the test size as ``num-examples``.

Data, model and seed come from the run config (keys, defaults and allowed values:
:data:`flwr_analytic.meta.config.RUN_CONFIG`), resolved once per message by the handlers, and the
node config (``partition-id``, ``num-partitions``). Every batch is drawn from a generator seeded by
seed, partition id and round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr_analytic.config_checks import RunConfig
from flwr_analytic.meta import (
    MetaConfig,
    meta_train,
    personalization_curve,
    pfedme_train,
    sgd_train,
)
from flwr_analytic.meta.config import RUN_CONFIG, resolve_run_config
from flwr_analytic.meta.protocol import LOCAL_ALGORITHM, decode_settings
from flwr_analytic.meta.task import build_model, client_tensors, round_rng


def client_run_config(context: Context, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The node's run config overridden by ``overrides``, resolved (the app boundary).

    Raises :class:`~flwr_analytic.config_checks.ConfigError` for an unknown key (naming the
    closest known one) or a value that is not allowed.
    """
    given = context.run_config
    if overrides:
        given = {**dict(given), **dict(overrides)}
    return resolve_run_config(given)


def _partition(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


def local_train(
    arrays: ArrayRecord,
    config: Mapping[str, Any],
    run_config: RunConfig,
    partition_id: int,
    num_partitions: int,
) -> tuple[ArrayRecord, MetricRecord]:
    """One client's local update (Flower records in and out; the logic is Flower-free).

    Parameters
    ----------
    arrays : ArrayRecord
        The received global model.
    config : mapping
        The training ``ConfigRecord`` (``"local-algorithm"``, its hyper-parameters and
        ``"server-round"``).
    run_config : RunConfig
        The resolved run config (:func:`client_run_config`: data set, model, partitioner, seed).
    partition_id, num_partitions : int
        This client's partition.

    Returns
    -------
    (ArrayRecord, MetricRecord)
        The local model and metrics with ``num-examples`` (training size) and work counters.

    """
    cfg = run_config
    x, y, _, _ = client_tensors(cfg, partition_id, num_partitions)
    model = build_model(cfg)
    model.load_state_dict(arrays.to_torch_state_dict())
    rng = round_rng(int(cfg["seed"]), partition_id, int(config.get("server-round", 0)), 0)
    algo = str(config.get(LOCAL_ALGORITHM, "sgd"))
    settings = decode_settings(algo, config)
    if algo == "meta":
        result = meta_train(model, x, y, MetaConfig(**settings), rng)
    elif algo == "sgd":  # Flower's FedProx adds its proximal-mu
        mu = float(config.get("proximal-mu", 0.0))
        result = sgd_train(model, x, y, **settings, rng=rng, proximal_mu=mu)
    else:
        result = pfedme_train(model, x, y, **settings, rng=rng)
    metrics = MetricRecord({"num-examples": len(y), **result.metrics})
    return ArrayRecord(model.state_dict()), metrics


def local_evaluate(
    arrays: ArrayRecord,
    config: Mapping[str, Any],
    run_config: RunConfig,
    partition_id: int,
    num_partitions: int,
) -> MetricRecord:
    """Personalized evaluation: test accuracy after ``s = 0..finetune-steps`` SGD steps.

    Fine-tuning uses the client's training split only; the test split is only evaluated (a fixed
    seeded subset of ``eval-test-cap`` rows when that run-config key is positive). ``run_config``
    is the resolved run config (:func:`client_run_config`).
    """
    cfg = run_config
    x, y, xt, yt = client_tensors(cfg, partition_id, num_partitions)
    cap = int(cfg["eval-test-cap"])
    if 0 < cap < len(yt):  # a fixed seeded subset of the test split, the same in every round
        keep = torch.from_numpy(
            np.sort(round_rng(int(cfg["seed"]), partition_id, 0, 2).choice(len(yt), cap, False))
        )
        xt, yt = xt[keep], yt[keep]
    model = build_model(cfg)
    model.load_state_dict(arrays.to_torch_state_dict())
    steps = int(config.get("finetune-steps", cfg["finetune-steps"]))
    rng = round_rng(int(cfg["seed"]), partition_id, int(config.get("server-round", 0)), 1)
    curve = personalization_curve(
        model,
        x,
        y,
        xt,
        yt,
        alpha=float(config.get("finetune-lr", cfg["alpha"])),
        steps=steps,
        batch_size=int(config.get("finetune-batch-size", cfg["finetune-batch-size"])),
        rng=rng,
    )
    return MetricRecord(
        {
            "num-examples": curve.num_test,
            "partition-id": int(partition_id),
            "acc": curve.accuracy[-1],
            "loss": curve.loss[-1],
            "correct-curve": curve.correct,
            "loss-curve": curve.loss,
        }
    )


def handle_train(
    msg: Message, context: Context, overrides: Mapping[str, Any] | None = None
) -> Message:
    """``@app.train()`` handler: local update of the received model (run config resolved here)."""
    torch.set_num_threads(1)
    pid, num = _partition(context)
    arrays, metrics = local_train(
        msg.content.array_records["arrays"],
        dict(msg.content.config_records["config"]),
        client_run_config(context, overrides),
        pid,
        num,
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def handle_evaluate(
    msg: Message, context: Context, overrides: Mapping[str, Any] | None = None
) -> Message:
    """``@app.evaluate()`` handler: personalized test metrics (run config resolved here)."""
    torch.set_num_threads(1)
    pid, num = _partition(context)
    metrics = local_evaluate(
        msg.content.array_records["arrays"],
        dict(msg.content.config_records["config"]),
        client_run_config(context, overrides),
        pid,
        num,
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def make_meta_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """Build a :class:`flwr.clientapp.ClientApp` running ``handle_train`` / ``handle_evaluate``.

    ``overrides`` replace run-config keys (used when no Flower run config is available, e.g. in
    ``flwr.simulation.run_simulation``); each is checked here against
    :data:`~flwr_analytic.meta.config.RUN_CONFIG`.
    """
    overrides = RUN_CONFIG.check_overrides(overrides)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, overrides)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, overrides)

    return app
