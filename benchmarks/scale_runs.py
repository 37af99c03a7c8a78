"""The scale benchmark's child side: one run inside the process whose tree ``scale.py`` samples.

``python benchmarks/scale_runs.py <spec.json>`` runs ``spec["kind"]`` (a key of :data:`RUNNERS`)
and writes ``result.json`` (and ``model.npz`` for FedACnnL) next to the spec; the parent
(:func:`scale_sampling.run_child`) gives it the Flower/Ray environment of its own directory.

What is measured comes from the package's own wrappers: every strategy runs under
:class:`~flwr_analytic.strategies.metering.Metered` (bytes, wall time per half round, per-client
metrics; FedACnnL's records add client compute, check/add and solve times), and under
:class:`Stamped`, a :class:`~flwr_analytic.strategies.wrapper.StrategyWrapper` of this benchmark that
stamps the wall clock around every step so the parent can cut its memory timeline into rounds.
Nothing of the library is patched.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flwr_analytic.strategies.wrapper import StrategyWrapper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # flower_processes

#: (wall-clock time, "<step>-start" | "<step>-end", server round)
Event = tuple[float, str, int]


class Stamped(StrategyWrapper):
    """Record the wall-clock start and end of every step of ``strategy`` in ``events``.

    Put it outermost: the loop calls it first, so its stamps enclose the inner wrappers' work too.
    (Not around ``Checkpointed``: ``StrategyWrapper.start`` runs the innermost strategy's loop, so
    ``Checkpointed.start``, which resumes, would be skipped; the benchmark sets no checkpoint.)

    Parameters
    ----------
    strategy : Strategy
        The wrapped strategy (here ``Metered(...)``).
    events : list
        Receives ``(time.time(), "<method>-start" | "<method>-end", server_round)`` tuples.

    """

    def __init__(self, strategy: Strategy, events: list[Event]) -> None:
        super().__init__(strategy)
        self.events = events

    def _stamped(self, name: str, server_round: int, step: Any) -> Any:
        self.events.append((time.time(), f"{name}-start", int(server_round)))
        try:
            return step()
        finally:
            self.events.append((time.time(), f"{name}-end", int(server_round)))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """The wrapped strategy's training messages, stamped."""
        inner = self.strategy.configure_train
        return self._stamped(
            "configure_train", server_round, lambda: list(inner(server_round, arrays, config, grid))
        )

    def aggregate_train(
        self, server_round: int, replies: Any
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's aggregation of training replies, stamped."""
        inner = self.strategy.aggregate_train
        return self._stamped("aggregate_train", server_round, lambda: inner(server_round, replies))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """The wrapped strategy's evaluation messages, stamped."""
        inner = self.strategy.configure_evaluate
        return self._stamped(
            "configure_evaluate",
            server_round,
            lambda: list(inner(server_round, arrays, config, grid)),
        )

    def aggregate_evaluate(self, server_round: int, replies: Any) -> MetricRecord | None:
        """The wrapped strategy's aggregation of evaluation replies, stamped."""
        inner = self.strategy.aggregate_evaluate
        return self._stamped(
            "aggregate_evaluate", server_round, lambda: inner(server_round, replies)
        )


class SerdeClientApp:
    """Call ``client_app`` with every message and reply round-tripped through Flower's protobuf.

    What a real transport does to a message, in process: the serialization time and bytes are
    counted in :attr:`seconds` and :attr:`nbytes`.
    """

    def __init__(self, client_app: Any) -> None:
        self.client_app = client_app
        self.seconds = 0.0
        self.nbytes = 0

    def _roundtrip(self, msg: Message) -> Message:
        from flwr.common.serde import message_from_proto, message_to_proto
        from flwr.proto.message_pb2 import Message as ProtoMessage

        t0 = time.perf_counter()
        data = message_to_proto(msg).SerializeToString()
        out = message_from_proto(ProtoMessage.FromString(data))
        self.seconds += time.perf_counter() - t0
        self.nbytes += len(data)
        return out

    def __call__(self, msg: Message, context: Any) -> Message:
        """The client app's reply to ``msg``, both through protobuf and back."""
        return self._roundtrip(self.client_app(self._roundtrip(msg), context))


def run_fedacnnl_stamped(
    grid: Grid, run_config: dict[str, Any], events: list[Event]
) -> tuple[ArrayRecord, dict[str, Any]]:
    """:func:`run_fedacnnl` under :class:`Stamped`: the final arrays and the benchmark's summary.

    The same strategy, wrappers, seeding and loop as the app (``run_fedacnnl`` offers no way to add
    a wrapper); the summary has the keys of the app's that the benchmark reads.
    """
    from flwr_analytic.fedacnnl import resolve_run_config
    from flwr_analytic.strategies.fedacnnl_server import (
        build_fedacnnl_strategy,
        wrap_fedacnnl_strategy,
    )
    from flwr_analytic.strategies.utils import arrays_digest, jsonable

    cfg = resolve_run_config(run_config)
    random.seed(int(cfg["seed"]))  # as the app: Flower samples nodes with the global `random`
    strategy = Stamped(wrap_fedacnnl_strategy(build_fedacnnl_strategy(cfg), cfg), events)
    t0 = time.perf_counter()
    result = strategy.start(
        grid,
        num_rounds=int(cfg["num-server-rounds"]) or None,
        timeout=float(cfg["round-timeout"]),
    )
    wall = time.perf_counter() - t0
    history = strategy.history_records()
    final = max(result.evaluate_metrics_clientapp, default=None)
    evaluation = dict(result.evaluate_metrics_clientapp[final]) if final else {}
    summary = {
        "num-nodes": len(list(grid.get_node_ids())),
        "rounds": history,
        "global-accuracy": evaluation.get("global-accuracy"),
        "personal-accuracy": evaluation.get("personal-accuracy"),
        "wall-time": wall,
        "bytes-sent": int(sum(r["bytes-sent"] for r in history)),
        "bytes-received": int(sum(r["bytes-received"] for r in history)),
        "model-sha256": arrays_digest(result.arrays),
    }
    return result.arrays, jsonable(summary)


def child_flower(spec: dict[str, Any]) -> dict[str, Any]:
    """One FedACnnL run through Flower (``ray`` or ``local``); returns timings and the summary."""
    import torch
    from flwr.serverapp import ServerApp

    from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
    from flwr_analytic.grid import LocalGrid

    base = Path(spec["base"])
    events: list[Event] = []
    n = int(spec["clients"])
    cfg = {
        **spec["config"],
        "min-nodes": n,
        "aggregation": spec["aggregation"],
        "keep-statistics": bool(spec["keep-statistics"]),
    }
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    if spec["runtime"] == "ray":
        from flower_processes import stop_owned_processes
        from flwr.simulation import run_simulation

        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Any) -> None:
            out["arrays"], out["summary"] = run_fedacnnl_stamped(grid, cfg, events)

        try:
            run_simulation(
                server_app=app,
                client_app=make_fedacnnl_client_app(run_config=cfg),
                num_supernodes=n,
                backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
            )
        finally:
            stop_owned_processes(base)
        if "summary" not in out:
            raise RuntimeError("the server app did not finish (see the log above)")
    else:
        torch.set_num_threads(1)
        client_app = SerdeClientApp(make_fedacnnl_client_app())
        grid = LocalGrid(client_app, n, cfg, seed=int(cfg["seed"]))
        out["arrays"], out["summary"] = run_fedacnnl_stamped(grid, cfg, events)
        out["serde-time"], out["serde-bytes"] = client_app.seconds, client_app.nbytes
    wall = time.perf_counter() - t0
    arrays = out.pop("arrays")
    np.savez(base / "model.npz", **{k: arrays[k].numpy() for k in arrays.keys()})
    return {"wall-time": wall, "events": events, **out}


def child_inprocess(spec: dict[str, Any]) -> dict[str, Any]:
    """FedACnnL's rounds without Flower: per layer, each client's statistics in turn, summed, solved.

    The computation of :func:`fit_federated` (same network, same clients, partition order), but the
    statistics are added as they are computed instead of kept per client (``fit_federated`` keeps
    all of them: ``N · D²`` floats). With ``check_fit_federated`` the model is also checked against
    :func:`fit_federated` itself (small runs only).
    """
    import torch

    from flwr_analytic.analytic import fit_federated
    from flwr_analytic.fedacnnl import protocol as P
    from flwr_analytic.fedacnnl.config import resolve_run_config
    from flwr_analytic.fedacnnl.data import load_cached_dataset, split_from_config
    from flwr_analytic.strategies.fedacnnl_server import build_fedacnnl_strategy

    torch.set_num_threads(1)
    n = int(spec["clients"])
    cfg = resolve_run_config({**spec["config"], "min-nodes": n})
    t0 = time.perf_counter()
    split = split_from_config(cfg, n)
    data = load_cached_dataset(str(cfg["dataset"]), str(cfg["data-path"]), str(cfg["data-split"]))
    clients = [split.client(data, k)[0] for k in range(n)]
    load_time = time.perf_counter() - t0
    net = build_fedacnnl_strategy(cfg).net
    rounds = []
    for layer in range(net.solved_layers, net.num_layers):
        if not net.needs_statistics(layer):
            net.solve(layer, None)
            continue
        t1 = time.perf_counter()
        total = None
        for c in clients:
            stats = net.statistics(layer, c.x, c.y, int(cfg["batch-size"]))
            if stats.count:
                total = stats if total is None else total + stats
        t2 = time.perf_counter()
        net.solve(layer, total)
        t3 = time.perf_counter()
        rounds.append({"layer": layer, "compute-time": t2 - t1, "solve-time": t3 - t2})
    state = {k: v.numpy() for k, v in P.weights_state_dict(net).items()}
    np.savez(Path(spec["base"]) / "model.npz", **state)
    out: dict[str, Any] = {"wall-time": time.perf_counter() - t0, "load-time": load_time}
    out["rounds"] = rounds
    if spec.get("check_fit_federated"):
        ref = build_fedacnnl_strategy(cfg).net
        fit_federated(ref, [(c.x, c.y) for c in clients], int(cfg["batch-size"]))
        ref_state = {k: v.numpy() for k, v in P.weights_state_dict(ref).items()}
        out["fit-federated-max-abs-diff"] = max(
            float(np.max(np.abs(ref_state[k] - state[k]))) for k in state
        )
        # summation-order spread: the same fit with the clients summed in other (seeded) orders;
        # a server adding replies in arrival order lands within this spread of the sorted sum
        rng = np.random.default_rng(int(cfg["seed"]))
        spread = 0.0
        for _ in range(int(spec.get("order_permutations", 3))):
            order = rng.permutation(n)
            other = build_fedacnnl_strategy(cfg).net
            fit_federated(
                other, [(clients[k].x, clients[k].y) for k in order], int(cfg["batch-size"])
            )
            perm = {k: v.numpy() for k, v in P.weights_state_dict(other).items()}
            spread = max(spread, max(float(np.max(np.abs(perm[k] - state[k]))) for k in state))
        out["order-spread-max-abs-diff"] = spread
    return out


def run_fedavg_stamped(
    grid: Grid, run_config: dict[str, Any], events: list[Event]
) -> list[dict[str, Any]]:
    """:func:`run_meta` under :class:`Stamped`: the ``Metered`` history of the run.

    The same strategy, wrappers, seeding and evaluation rounds as the meta app's server.
    """
    from flwr_analytic.meta.config import resolve_run_config
    from flwr_analytic.meta.task import build_model
    from flwr_analytic.strategies.meta_baselines import build_meta_strategy
    from flwr_analytic.strategies.wrapper import EvaluateRounds

    cfg = resolve_run_config(run_config)
    metered, train_config, evaluate_config = build_meta_strategy(cfg)
    rounds, every = int(cfg["num-server-rounds"]), max(1, int(cfg["evaluate-every"]))
    evaluated = {r for r in range(1, rounds + 1) if r % every == 0 or r == rounds}
    strategy = Stamped(EvaluateRounds(metered, evaluated), events)
    random.seed(int(cfg["seed"]))
    model = build_model(cfg, seed=int(cfg["seed"]))
    strategy.start(
        grid,
        ArrayRecord(model.state_dict()),
        num_rounds=rounds,
        train_config=train_config,
        evaluate_config=evaluate_config,
    )
    return metered.history_records()


def child_fedavg(spec: dict[str, Any]) -> dict[str, Any]:
    """FedAvg (``apps/meta``) through Ray; returns the per-round records and step stamps."""
    from flower_processes import stop_owned_processes
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from flwr_analytic.clients.meta_client import make_meta_client_app

    if spec.get("data-dir"):  # the meta clients find MNIST through this variable (Ray workers too)
        os.environ["FLWR_ANALYTIC_DATA"] = spec["data-dir"]
    base = Path(spec["base"])
    events: list[Event] = []
    out: dict[str, Any] = {}
    n = int(spec["clients"])
    cfg = {**spec["config"], "min-nodes": n}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Any) -> None:
        out["history"] = run_fedavg_stamped(grid, cfg, events)

    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=app,
            client_app=make_meta_client_app(cfg),
            num_supernodes=n,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    finally:
        stop_owned_processes(base)
    if "history" not in out:
        raise RuntimeError("the server app did not finish (see the log above)")
    return {"wall-time": time.perf_counter() - t0, "history": out["history"], "events": events}


def _task_identity() -> None:
    """Give Flower's ``TaskIdentity`` ids where no runtime set them (its getters raise then)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("run_id", 1), ("node_id", 0), ("task_id", 0)):
        try:
            getattr(TaskIdentity, name)
        except RuntimeError:
            setattr(TaskIdentity, name, value)


def child_serialization(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one statistics reply (packed ``D x D`` Gram, ``D x 10`` cross) through serializers."""
    from flwr.app import Array, RecordDict
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    from flwr_analytic.analytic import LayerStatistics

    _task_identity()
    rng = np.random.default_rng(int(spec["seed"]))
    rows = []
    for dim in spec["dims"]:
        a = rng.standard_normal((64, dim))
        a[:, -1] = 1.0
        stats = LayerStatistics(a.T @ a, a.T @ rng.standard_normal((64, 10)), 64)
        reps = 3 if dim > 2000 else 10
        times: dict[str, list[float]] = {k: [] for k in ("pack", "record", "proto", "unproto")}
        times.update({"unrecord": [], "pickle": [], "unpickle": []})
        nbytes = 0
        for _ in range(reps):
            t = time.perf_counter()
            packed = stats.pack()
            times["pack"].append(time.perf_counter() - t)
            t = time.perf_counter()
            record = ArrayRecord({k: Array(v) for k, v in packed.items()})
            content = RecordDict({"statistics": record, "metrics": MetricRecord({"n": 64})})
            msg = Message(content, dst_node_id=1, message_type="train")
            times["record"].append(time.perf_counter() - t)
            t = time.perf_counter()
            data = message_to_proto(msg).SerializeToString()
            times["proto"].append(time.perf_counter() - t)
            t = time.perf_counter()
            back = message_from_proto(ProtoMessage.FromString(data))
            times["unproto"].append(time.perf_counter() - t)
            t = time.perf_counter()
            arrays = {k: v.numpy() for k, v in back.content["statistics"].items()}
            times["unrecord"].append(time.perf_counter() - t)
            t = time.perf_counter()
            pickled = pickle.dumps(msg, protocol=5)
            times["pickle"].append(time.perf_counter() - t)
            t = time.perf_counter()
            pickle.loads(pickled)
            times["unpickle"].append(time.perf_counter() - t)
            nbytes = len(data)
            assert np.array_equal(arrays["gram-triu"], packed["gram-triu"])
        row: dict[str, Any] = {"D": dim, "floats": int(dim * (dim + 1) // 2 + dim * 10 + 1)}
        row["proto-bytes"] = nbytes
        row.update({f"{k}-s": float(np.median(v)) for k, v in times.items()})
        flower = row["record-s"] + row["proto-s"] + row["unproto-s"] + row["unrecord-s"]
        row["flower-roundtrip-s"] = flower
        row["flower-roundtrip-MBps"] = nbytes / flower / 1e6
        rows.append(row)
    return {"rows": rows}


RUNNERS = {
    "flower": child_flower,
    "inprocess": child_inprocess,
    "fedavg": child_fedavg,
    "serialization": child_serialization,
}


def main(spec_path: str) -> None:
    """Run the spec at ``spec_path``; write ``result.json`` next to it."""
    spec = json.loads(Path(spec_path).read_text())
    result = RUNNERS[spec["kind"]](spec)
    (Path(spec["base"]) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
