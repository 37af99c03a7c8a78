"""Server side of the ν-step meta app, and an in-process grid to run it without Ray."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Error
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result
from flwr.supercore.task_identity import TaskIdentity

from flwr_analytic.meta.config import resolve_run_config
from flwr_analytic.meta.task import build_model
from flwr_analytic.strategies.meta_baselines import build_meta_strategy


def run_meta(
    grid: Grid, run_config: Mapping[str, Any] | None = None
) -> tuple[Result, list[dict[str, Any]]]:
    """Run ``num-server-rounds`` rounds of the configured algorithm on ``grid``.

    The initial model is ``build_model(cfg, seed=cfg["seed"])``; Python's ``random`` (used by
    Flower to sample nodes) is seeded with ``cfg["seed"]``; federated evaluation runs every
    ``evaluate-every`` rounds and in the last. When ``history-path`` is not empty,
    ``{"run-config": cfg, "history": [...]}`` is written there as JSON (one entry per round:
    aggregated train/evaluate metrics, bytes down/up, round time).

    Returns
    -------
    (Result, history)
        Flower's :class:`~flwr.serverapp.strategy.Result` and the per-round history.
    """
    cfg = resolve_run_config(run_config)
    strategy, train_config, evaluate_config = build_meta_strategy(cfg)
    rounds, every = int(cfg["num-server-rounds"]), max(1, int(cfg["evaluate-every"]))
    eval_rounds = {r for r in range(1, rounds + 1) if r % every == 0 or r == rounds}
    strategy.evaluate_rounds = eval_rounds  # type: ignore[attr-defined]
    random.seed(int(cfg["seed"]))  # Flower samples nodes with the global `random`
    model = build_model(cfg, seed=int(cfg["seed"]))
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=rounds,
        train_config=train_config,
        evaluate_config=evaluate_config,
    )
    history = strategy.history_records()  # type: ignore[attr-defined]
    if cfg.get("history-path"):
        strategy.save_history(cfg["history-path"], **{"run-config": cfg})  # type: ignore[attr-defined]
    return result, history


def make_meta_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """Build a :class:`flwr.serverapp.ServerApp` running :func:`run_meta` with the run config.

    ``overrides`` replace keys, e.g. under ``run_simulation`` where the run config is empty.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_meta(grid, {**dict(context.run_config), **dict(overrides or {})})

    return app


class InProcessGrid(Grid):
    """A :class:`~flwr.serverapp.Grid` that calls a ``ClientApp`` directly, node by node.

    Runs the exact strategy and client code of a Flower run in one process without Ray or a
    SuperLink (for benchmarks and tests). Node ``k`` (id ``k + 1``) gets the node config
    ``{"partition-id": k, "num-partitions": num_nodes}``. A client exception becomes an error reply.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: Mapping[str, Any] | None = None,
        run_id: int = 1,
    ) -> None:
        self.client_app = client_app
        self.num_nodes = num_nodes
        self.run_config = dict(run_config or {})
        self.run_id = run_id
        self._replies: dict[str, Message] = {}
        self._contexts = {
            k + 1: Context(
                run_id=run_id,
                node_id=k + 1,
                node_config={"partition-id": k, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(self.run_config),
            )
            for k in range(num_nodes)
        }
        # Instruction messages read the identity of the running task.
        if TaskIdentity._run_id is None:  # noqa: SLF001
            TaskIdentity.run_id = run_id
        if TaskIdentity._node_id is None:  # noqa: SLF001
            TaskIdentity.node_id = 0
        if TaskIdentity._task_id is None:  # noqa: SLF001
            TaskIdentity.task_id = 0

    def set_run(self, run) -> None:  # noqa: ANN001, D102
        self._run = run

    @property
    def run(self):  # noqa: ANN201, D102
        return getattr(self, "_run", None)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201, D102
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        """Node ids ``1 .. num_nodes``."""
        return list(self._contexts)

    def _call(self, msg: Message) -> Message:
        try:
            return self.client_app(msg, self._contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # noqa: BLE001
            return Message(Error(code=0, reason=repr(exc)), reply_to=msg)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run every message now and keep the replies."""
        ids = []
        for i, msg in enumerate(messages):
            key = f"{len(self._replies)}-{i}"
            self._replies[key] = self._call(msg)
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Return the replies of ``message_ids``."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Run the messages sequentially and return the replies."""
        return [self._call(msg) for msg in messages]


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
