"""Scale: FedACnnL with 1000 simulated clients through Flower's Ray simulation; what Flower costs.

Gu et al., "Analytic Personalized Federated Meta-Learning" (arXiv 2502.06915). Every run is the real
``ServerApp`` / ``ClientApp`` of ``apps/fedacnnl`` (:func:`make_fedacnnl_server_app`,
:func:`make_fedacnnl_client_app`), started in a child process whose whole process tree (Ray's GCS,
raylet and workers included) is sampled with psutil every 0.5 s for the peak resident memory. Parts:

- ``naive``: the default path (``aggregation="sorted"``: the server holds every reply and sums them
  in partition-id order; clients keep their head statistics in ``context.state``) at a few client
  counts, to extrapolate to 1000 clients.
- ``scaled``: the scaled design (``aggregation="streaming"``: replies checked like the sorted path and
  added to one float64 accumulator as they arrive; ``keep-statistics=false``: clients recompute
  their head statistics in the evaluation round instead of parking 10 MB per node in the
  simulation's node state) at 1000 and 100 clients.
- ``fedavg``: FedAvg (``apps/meta``, same CNN, ``local-steps`` SGD steps per round) through Ray with
  100 clients, for contrast: wall time and peak memory per round.
- ``overhead``: the same FedACnnL rounds without Flower (sequential in-process loop over the same
  clients, the computation of :func:`flwr_analytic.analytic.fit_federated`), through Flower without
  Ray (:class:`LocalGrid`, every message and reply round-tripped through Flower's protobuf
  serialization) and through Ray: per-round Flower overhead in seconds and % of compute.
- ``serialization``: serializing one client's packed statistics record (``D(D+1)/2`` floats) to
  Flower's protobuf bytes and back, and with pickle (what the Ray backend does), for several ``D``.

Data: MNIST 60k training images (``../shared/data/mnist70k.npz``), split IID by flwr-datasets'
``IidPartitioner`` (seeded) into N clients, 75/25 per-client train/test. Model: the default ``cnn``
(conv 32 5x5 → pool → conv 64 5x5 → pool → linear head; layer design widths D = 26, 801, 1601),
``label-pca`` hidden targets, float32 client products with float64 sums (``dtype=float32``), one
torch thread per client, Ray ``client_resources = {num_cpus: 1}`` (2 workers on 2 cores).

    flock /tmp/flwr-analytic-cpu.lock python benchmarks/scale.py            # everything
    flock /tmp/flwr-analytic-cpu.lock python benchmarks/scale.py --parts scaled --clients 1000
    python benchmarks/scale.py --quick                                       # smoke test (digits)
    python benchmarks/scale.py --render                                      # tables from the JSON

Parts merge into ``benchmarks/results/scale.json`` (rerun one part without losing the others);
``benchmarks/results/scale.png`` plots the time split, memory and overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # flower_processes
from common import RESULTS, SHARED_DATA, environment, write_json  # noqa: E402

HERE = Path(__file__).resolve()
GIB = 2**30
DEFAULT_OUT = RESULTS / "scale.json"


# =============================================================================== configuration
def fedacnnl_config(quick: bool, data: str, seed: int) -> dict[str, Any]:
    """FedACnnL run config (``flwr_analytic.fedacnnl.config`` keys) of the benchmark."""
    if quick:
        base = {"dataset": "digits", "cnn-channels": "8,16"}
    else:
        base = {"dataset": "mnist", "data-path": data, "data-split": "train"}
    return {
        **base,
        "partitioner": "iid",
        "test-fraction": 0.25,
        "model": "cnn",
        "scheme": "label-pca",
        "dtype": "float32",
        "batch-size": 256,
        "seed": seed,
        "client-threads": 1,
        "centralized-eval": False,
        "round-timeout": 3600.0,
    }


def fedavg_config(quick: bool, seed: int, local_steps: int, rounds: int) -> dict[str, Any]:
    """FedAvg run config (``flwr_analytic.meta.config`` keys): same CNN, IID split."""
    return {
        "algorithm": "fedavg",
        "dataset": "digits" if quick else "mnist",
        "partitioner": "iid",
        "min-partition-size": 0,
        "test-fraction": 0.25,
        "model": "cnn",
        "seed": seed,
        "num-server-rounds": rounds,
        "local-steps": local_steps,
        "batch-size": 32,
        "alpha": 0.05,
        "finetune-steps": 0,
        "evaluate-every": rounds,
    }


# ================================================================================ child side
def _events_patch(strategy_cls: type, events: list[tuple[float, str, int]]) -> None:
    """Record wall-clock stamps of every strategy step (to cut the memory timeline per round)."""
    for name in ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate"):
        original = getattr(strategy_cls, name)

        def wrapped(self, server_round, *args, _f=original, _n=name, **kwargs):  # noqa: ANN001, ANN202
            events.append((time.time(), f"{_n}-start", int(server_round)))
            out = _f(self, server_round, *args, **kwargs)
            events.append((time.time(), f"{_n}-end", int(server_round)))
            return out

        setattr(strategy_cls, name, wrapped)


def _reply_compute_times(replies: list) -> list[float]:
    out = []
    for msg in replies:
        if msg.has_error() or not msg.content.metric_records:
            continue
        metrics = next(iter(msg.content.metric_records.values()))
        if "compute-time" in metrics:
            out.append(float(metrics["compute-time"]))
    return out


def _instrument_fedacnnl() -> None:
    """Add client compute, check and solve times to the history of both FedACnnL strategies.

    :class:`StreamingFedACnnL` records them itself; for :class:`FedACnnL` (the naive path) the
    replies' ``compute-time`` metrics are summed and ``solve_layer`` (merge + solve) is timed.
    """
    from flwr_analytic.strategies.fedacnnl import FedACnnL
    from flwr_analytic.strategies.fedacnnl_streaming import StreamingFedACnnL

    original_train, original_solve = FedACnnL.aggregate_train, FedACnnL.solve_layer
    original_eval = FedACnnL.aggregate_evaluate

    def aggregate_train(self, server_round, replies):  # noqa: ANN001, ANN202
        if isinstance(self, StreamingFedACnnL):
            return original_train(self, server_round, replies)
        replies = list(replies)
        compute = _reply_compute_times(replies)
        t0 = time.perf_counter()
        out = original_train(self, server_round, replies)
        entry = self.history[-1]
        entry["client-compute-time"] = float(sum(compute))
        entry["client-compute-time-max"] = float(max(compute, default=0.0))
        entry["aggregate-time"] = time.perf_counter() - t0 - entry.get("solve-time", 0.0)
        return out

    def solve_layer(self, valid, entry):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        out = original_solve(self, valid, entry)
        entry["solve-time"] = time.perf_counter() - t0
        return out

    def aggregate_evaluate(self, server_round, replies):  # noqa: ANN001, ANN202
        replies = list(replies)
        compute = _reply_compute_times(replies)
        out = original_eval(self, server_round, replies)
        self.history[-1]["client-compute-time"] = float(sum(compute))
        self.history[-1]["client-compute-time-max"] = float(max(compute, default=0.0))
        return out

    FedACnnL.aggregate_train = aggregate_train  # type: ignore[method-assign]
    FedACnnL.solve_layer = solve_layer  # type: ignore[method-assign]
    FedACnnL.aggregate_evaluate = aggregate_evaluate  # type: ignore[method-assign]


def _serde_local_grid(client_app: Any, num_nodes: int, cfg: dict[str, Any], seed: int):  # noqa: ANN202
    """A :class:`LocalGrid` that round-trips every message and reply through Flower's protobuf."""
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    from flwr_analytic.fedacnnl import LocalGrid

    class SerdeLocalGrid(LocalGrid):
        serde_time = 0.0
        serde_bytes = 0

        def _roundtrip(self, msg):  # noqa: ANN001, ANN202
            t0 = time.perf_counter()
            data = message_to_proto(msg).SerializeToString()
            out = message_from_proto(ProtoMessage.FromString(data))
            self.serde_time += time.perf_counter() - t0
            self.serde_bytes += len(data)
            return out

        def _call(self, msg):  # noqa: ANN001, ANN202
            if not msg.metadata.message_id:
                msg.metadata.__dict__["_message_id"] = f"{self._rng.getrandbits(64):x}"
            reply = super()._call(self._roundtrip(msg))
            return self._roundtrip(reply)

    return SerdeLocalGrid(client_app, num_nodes, cfg, seed=seed)


def child_flower(spec: dict[str, Any]) -> dict[str, Any]:
    """One FedACnnL run through Flower (``ray`` or ``local``); returns timings and the summary."""
    import torch
    from flower_processes import flower_env, stop_owned_processes

    base = Path(spec["base"])
    for key, value in flower_env(base).items():
        if key.startswith(("FLWR_", "RAY_")):
            os.environ[key] = value
    from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
    from flwr_analytic.fedacnnl import resolve_run_config
    from flwr_analytic.strategies.fedacnnl import FedACnnL
    from flwr_analytic.strategies.fedacnnl_server import make_fedacnnl_server_app, run_fedacnnl

    events: list[tuple[float, str, int]] = []
    from flwr_analytic.strategies.fedacnnl_streaming import StreamingFedACnnL

    _instrument_fedacnnl()
    _events_patch(FedACnnL, events)
    _events_patch(StreamingFedACnnL, events)  # its own aggregate_train (others: stamped twice)
    n = int(spec["clients"])
    cfg = {
        **spec["config"],
        "min-nodes": n,
        "aggregation": spec["aggregation"],
        "keep-statistics": bool(spec["keep-statistics"]),
        "results-path": str(base / "results.json"),
        "model-path": str(base / "model.pt"),
    }
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if spec["runtime"] == "ray":
        from flwr.simulation import run_simulation

        try:
            run_simulation(
                server_app=make_fedacnnl_server_app(cfg),
                client_app=make_fedacnnl_client_app(run_config=cfg),
                num_supernodes=n,
                backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
            )
        finally:
            stop_owned_processes(base)
        summary = json.loads((base / "results.json").read_text())
    else:
        torch.set_num_threads(1)
        cfg = resolve_run_config(cfg)
        grid = _serde_local_grid(make_fedacnnl_client_app(), n, cfg, int(cfg["seed"]))
        _, summary = run_fedacnnl(grid, cfg)
        extra = {"serde-time": grid.serde_time, "serde-bytes": grid.serde_bytes}
    wall = time.perf_counter() - t0
    state = torch.load(base / "model.pt")
    np.savez(base / "model.npz", **{k: v.numpy() for k, v in state.items()})
    return {"wall-time": wall, "summary": summary, "events": events, **extra}


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
    from flwr_analytic.fedacnnl.config import (
        load_cached_dataset,
        resolve_run_config,
        split_from_config,
    )
    from flwr_analytic.strategies.fedacnnl_server import build_fedacnnl_strategy

    torch.set_num_threads(1)
    n = int(spec["clients"])
    cfg = resolve_run_config({**spec["config"], "min-nodes": n, "results-path": ""})
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


def child_fedavg(spec: dict[str, Any]) -> dict[str, Any]:
    """FedAvg (``apps/meta``) through Ray; returns the per-round history and step stamps."""
    from flower_processes import flower_env, stop_owned_processes

    base = Path(spec["base"])
    for key, value in flower_env(base).items():
        if key.startswith(("FLWR_", "RAY_")):
            os.environ[key] = value
    from flwr.simulation import run_simulation

    from flwr_analytic.clients.meta_client import make_meta_client_app
    from flwr_analytic.strategies.meta_baselines import MeteredFedAvg
    from flwr_analytic.strategies.meta_server import make_meta_server_app

    if spec.get("data-dir"):  # the meta clients find MNIST through this variable (Ray workers too)
        os.environ["FLWR_ANALYTIC_DATA"] = spec["data-dir"]
    events: list[tuple[float, str, int]] = []
    _events_patch(MeteredFedAvg, events)
    n = int(spec["clients"])
    cfg = {**spec["config"], "min-nodes": n, "history-path": str(base / "history.json")}
    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=make_meta_server_app(cfg),
            client_app=make_meta_client_app(cfg),
            num_supernodes=n,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    finally:
        stop_owned_processes(base)
    wall = time.perf_counter() - t0
    history = json.loads((base / "history.json").read_text())
    return {"wall-time": wall, "history": history, "events": events}


def child_serialization(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one statistics reply (packed ``D x D`` Gram, ``D x 10`` cross) through serializers."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.supercore.task_identity import TaskIdentity

    from flwr_analytic.analytic import LayerStatistics

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        if getattr(TaskIdentity, name) is None:
            setattr(TaskIdentity, name[1:], value)
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
            msg.metadata.__dict__["_message_id"] = "m"
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


CHILDREN = {
    "flower": child_flower,
    "inprocess": child_inprocess,
    "fedavg": child_fedavg,
    "serialization": child_serialization,
}


# =============================================================================== parent side
def _tree(pid: int, base: Path) -> list[Any]:
    """The child, its descendants, and any process owned by its Flower/Ray directory."""
    import psutil
    from flower_processes import owned_processes

    procs: dict[int, Any] = {}
    try:
        root = psutil.Process(pid)
        procs[pid] = root
        for p in root.children(recursive=True):
            procs[p.pid] = p
    except psutil.NoSuchProcess:
        pass
    for other in owned_processes(base):
        if other not in procs:
            try:
                procs[other] = psutil.Process(other)
            except psutil.NoSuchProcess:
                pass
    return list(procs.values())


def run_child(kind: str, spec: dict[str, Any], log_dir: Path, interval: float = 0.5) -> dict:
    """Run ``kind`` in a child process; sample its process tree's RSS every ``interval`` s."""
    import psutil
    from flower_processes import stop_owned_processes

    with tempfile.TemporaryDirectory(prefix="flwr-scale-") as tmp:
        base = Path(tmp)
        spec = {**spec, "base": str(base), "kind": kind}
        (base / "spec.json").write_text(json.dumps(spec))
        log_dir.mkdir(parents=True, exist_ok=True)
        tag = f"{kind}-{spec.get('runtime', '')}-{spec.get('aggregation', '')}-{spec.get('clients', '')}"
        log_path = log_dir / f"{tag}.log"
        env = {
            **os.environ,
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "OMP_NUM_THREADS": "1",
        }
        t0 = time.perf_counter()
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, str(HERE), "--child", str(base / "spec.json")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            # (time, Σ RSS, the child's own RSS, number of processes, Σ PSS): RSS counts pages
            # shared between processes (Ray's object store, libraries) once per process, PSS
            # splits them; Σ PSS is the tree's real footprint, Σ RSS an upper bound
            timeline: list[tuple[float, float, float, int, float]] = []
            try:
                while proc.poll() is None:
                    total = own = pss = 0.0
                    procs = _tree(proc.pid, base)
                    for p in procs:
                        try:
                            info = p.memory_full_info()
                        except (psutil.NoSuchProcess, psutil.AccessDenied):
                            continue
                        total += info.rss
                        pss += getattr(info, "pss", info.rss)
                        own += info.rss if p.pid == proc.pid else 0
                    timeline.append((time.time(), total / GIB, own / GIB, len(procs), pss / GIB))
                    time.sleep(interval)
            finally:
                if proc.poll() is None:
                    proc.kill()
                stop_owned_processes(base)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"child {tag} failed (exit {proc.returncode}); log tail:\n{tail}")
        result = json.loads((base / "result.json").read_text())
        if (base / "model.npz").exists():
            with np.load(base / "model.npz") as z:
                result["model"] = {k: z[k] for k in z.files}
    result["process-time"] = elapsed
    result["peak-rss-gib"] = max((t[1] for t in timeline), default=0.0)
    result["peak-rss-server-gib"] = max((t[2] for t in timeline), default=0.0)
    result["max-processes"] = max((t[3] for t in timeline), default=0)
    result["peak-pss-gib"] = max((t[4] for t in timeline), default=0.0)
    result["timeline"] = timeline
    result["log"] = str(log_path)
    return result


def _window_peaks(timeline: list, events: list, interval: float = 0.5) -> dict:
    """Peak tree RSS (GiB) per server round, from the step stamps (window widened by a sample)."""
    starts: dict[int, float] = {}
    ends: dict[int, float] = {}
    for t, name, rnd in events:
        if name.endswith("-start"):
            starts[rnd] = min(starts.get(rnd, t), t)
        else:
            ends[rnd] = max(ends.get(rnd, t), t)
    out = {}
    for rnd in sorted(starts):
        lo, hi = starts[rnd] - interval, ends.get(rnd, starts[rnd]) + interval
        inside = [m for (t, m, *_rest) in timeline if lo <= t <= hi]
        out[rnd] = max(inside, default=None)
    return out


def model_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest absolute difference and the largest weight magnitude (the tests' 1e-9 x scale)."""
    if set(a) != set(b):
        raise ValueError(f"models have different tensors: {sorted(set(a) ^ set(b))}")
    diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    scale = max(float(np.max(np.abs(v))) for v in a.values())
    return {"max-abs-diff": diff, "scale": scale, "relative": diff / scale}


def flower_row(res: dict[str, Any], workers: int) -> dict[str, Any]:
    """Flatten one Flower run: totals, per-round split, evaluation."""
    summary = res["summary"]
    rounds = []
    peaks = _window_peaks(res["timeline"], res.get("events", []))
    for r in summary["rounds"]:
        compute = float(r.get("client-compute-time", 0.0))
        share = compute / workers
        solve = float(r.get("solve-time", 0.0))
        rounds.append(
            {
                "round": r["round"],
                "kind": r["kind"],
                "layer": r.get("layer"),
                "round-time": r["round-time"],
                "client-compute-sum": compute,
                "client-compute-max": float(r.get("client-compute-time-max", 0.0)),
                "client-compute-per-worker": share,
                "server-solve": solve,
                "server-check-add": float(r.get("aggregate-time", 0.0)),
                "overhead": r["round-time"] - share - solve,
                "bytes-sent": r.get("bytes-sent", 0),
                "bytes-received": r.get("bytes-received", 0),
                "num-replies": r.get("num-replies"),
                "peak-rss-gib": peaks.get(r["round"]),
            }
        )
    server_wall = float(summary["wall-time"])
    return {
        "wall-time": res["wall-time"],
        "process-time": res["process-time"],
        "server-wall-time": server_wall,
        "startup-and-teardown": res["wall-time"] - server_wall,
        "peak-rss-gib": res["peak-rss-gib"],
        "peak-rss-server-gib": res["peak-rss-server-gib"],
        "peak-pss-gib": res["peak-pss-gib"],
        "max-processes": res["max-processes"],
        "rounds": rounds,
        "train-time": sum(r["round-time"] for r in rounds if r["kind"] == "train"),
        "client-compute-sum": sum(r["client-compute-sum"] for r in rounds),
        "server-solve": sum(r["server-solve"] for r in rounds),
        "global-accuracy": summary.get("global-accuracy"),
        "personal-accuracy": summary.get("personal-accuracy"),
        "bytes-sent": summary.get("bytes-sent"),
        "bytes-received": summary.get("bytes-received"),
        "model-sha256": summary.get("model-sha256"),
        "num-nodes": summary.get("num-nodes"),
        **({"serde-time": res["serde-time"]} if "serde-time" in res else {}),
        **({"serde-bytes": res["serde-bytes"]} if "serde-bytes" in res else {}),
        "log": res["log"],
    }


def part_flower_runs(
    args: argparse.Namespace,
    cfg: dict,
    name: str,
    combos: list,
    out: dict[str, Any] | None = None,
    save: Any = None,
) -> dict:
    """Ray runs of (aggregation, keep-statistics, clients) combos; models vs in-process.

    Each run is added to ``out`` (and ``save()`` called) as soon as it is done.
    """
    out = {} if out is None else out
    for aggregation, keep, n in combos:
        window = args.max_in_flight if aggregation == "streaming" else 0
        key = f"ray-{aggregation}-{'keep' if keep else 'recompute'}-{n}"
        key += f"-window{window}" if window else ""
        print(f"[{name}] {key} ...", flush=True)
        spec = {
            "runtime": "ray",
            "clients": n,
            "aggregation": aggregation,
            "keep-statistics": keep,
            "config": {**cfg, "max-in-flight": window},
        }
        try:
            res = run_child("flower", spec, args.log_dir)
        except RuntimeError as exc:  # keep what the other runs measured
            print(f"  FAILED: {exc}", flush=True)
            out[key] = {"clients": n, "aggregation": aggregation, "error": str(exc)[-2000:]}
            if save is not None:
                save()
            continue
        row = flower_row(res, args.workers)
        row["vs-inprocess"] = None
        if n in (args.clients, args.overhead_clients) and not args.skip_reference:
            row["vs-inprocess"] = model_diff(reference_model(args, cfg, n), res["model"])
            row["vs-inprocess"]["order-spread"] = _REFERENCES[n].get("order-spread-max-abs-diff")
        print(
            f"  wall {row['wall-time']:.1f} s (server {row['server-wall-time']:.1f} s), peak "
            f"{row['peak-rss-gib']:.2f} GiB, client compute {row['client-compute-sum']:.1f} s, "
            f"solve {row['server-solve']:.1f} s, global {row['global-accuracy']:.4f}, model vs "
            f"in-process {_rel(row['vs-inprocess'])}",
            flush=True,
        )
        out[key] = {
            "clients": n,
            "aggregation": aggregation,
            "keep-statistics": keep,
            "max-in-flight": window,
            **row,
        }
        if save is not None:
            save()
    return out


_REFERENCES: dict[int, dict[str, Any]] = {}


def _rel(diff: dict[str, float] | None) -> str:
    return "-" if diff is None else f"{diff['relative']:.1e}"


def reference_model(args: argparse.Namespace, cfg: dict, n: int) -> dict[str, np.ndarray]:
    """The in-process (no Flower) model for ``n`` clients, computed once per ``n``."""
    if n not in _REFERENCES:
        spec = {"clients": n, "config": cfg, "check_fit_federated": n <= args.fit_federated_max}
        _REFERENCES[n] = run_child("inprocess", spec, args.log_dir)
    return _REFERENCES[n]["model"]


def part_overhead(args: argparse.Namespace, cfg: dict, n: int, ray_row: dict | None) -> dict:
    """Per-round cost of Flower: in-process vs LocalGrid (+protobuf) vs Ray, same clients."""
    reference_model(args, cfg, n)
    inproc = _REFERENCES[n]
    print(f"[overhead] LocalGrid {n} clients ...", flush=True)
    local_spec = {
        "runtime": "local",
        "clients": n,
        "aggregation": "sorted",
        "keep-statistics": True,
        "config": cfg,
    }
    local = run_child("flower", local_spec, args.log_dir)
    local_row = flower_row(local, 1)
    local_row["vs-inprocess"] = model_diff(inproc["model"], local["model"])
    if ray_row is None:
        print(f"[overhead] Ray {n} clients ...", flush=True)
        ray_row = part_flower_runs(args, cfg, "overhead", [("sorted", True, n)])
        ray_row = next(iter(ray_row.values()))
    rounds = []
    train_local = [r for r in local_row["rounds"] if r["kind"] == "train"]
    train_ray = [r for r in ray_row["rounds"] if r["kind"] == "train"]
    for i, (base, lr, rr) in enumerate(zip(inproc["rounds"], train_local, train_ray, strict=True)):
        # Flower's clients load and partition their data in their first round: count it as compute
        base = {
            **base,
            "compute-time": base["compute-time"] + (inproc["load-time"] if i == 0 else 0),
        }
        compute = base["compute-time"] + base["solve-time"]
        lo = lr["round-time"] - compute
        # Ray runs the clients on `workers` cores: its ideal round is compute/workers + solve
        ideal = base["compute-time"] / args.workers + base["solve-time"]
        ro = rr["round-time"] - ideal
        rounds.append(
            {
                "layer": base["layer"],
                "inprocess-compute": base["compute-time"],
                "inprocess-solve": base["solve-time"],
                "localgrid-round": lr["round-time"],
                "localgrid-overhead-s": lo,
                "localgrid-overhead-pct": 100 * lo / compute,
                "ray-round": rr["round-time"],
                "ray-ideal-round": ideal,
                "ray-overhead-s": ro,
                "ray-overhead-pct": 100 * ro / ideal,
            }
        )
    for r in rounds:
        print(
            f"  layer {r['layer']}: in-process {r['inprocess-compute'] + r['inprocess-solve']:.2f} s"
            f" | LocalGrid {r['localgrid-round']:.2f} s (+{r['localgrid-overhead-s']:.2f} s,"
            f" {r['localgrid-overhead-pct']:.0f}%) | Ray {r['ray-round']:.2f} s vs ideal"
            f" {r['ray-ideal-round']:.2f} s (+{r['ray-overhead-s']:.2f} s,"
            f" {r['ray-overhead-pct']:.0f}%)",
            flush=True,
        )
    return {
        "clients": n,
        "inprocess": {k: v for k, v in inproc.items() if k not in ("model", "timeline")},
        "localgrid": local_row,
        "ray": {k: v for k, v in ray_row.items() if k != "rounds"} | {"rounds": ray_row["rounds"]},
        "rounds": rounds,
        "localgrid-serde-time": local_row.get("serde-time"),
        "localgrid-serde-bytes": local_row.get("serde-bytes"),
    }


def part_fedavg(args: argparse.Namespace, n: int) -> dict:
    """FedAvg through Ray with ``n`` clients: wall time and peak memory per round."""
    cfg = fedavg_config(args.quick, args.seed, args.local_steps, args.fedavg_rounds)
    print(f"[fedavg] {n} clients, {args.fedavg_rounds} rounds ...", flush=True)
    spec = {"clients": n, "config": cfg, "data-dir": str(Path(args.data).parent)}
    res = run_child("fedavg", spec, args.log_dir)
    peaks = _window_peaks(res["timeline"], res["events"])
    rounds = []
    for entry in res["history"].get("history", []):
        rnd = int(entry["round"])
        rounds.append(
            {
                "round": rnd,
                # train: configure_train → aggregate_train; round: to aggregate_evaluate (if any)
                "train-time": entry.get("train-time"),
                "round-time": entry.get("round-time", entry.get("train-time")),
                "bytes-down": entry.get("bytes-down"),
                "bytes-up": entry.get("bytes-up"),
                "peak-rss-gib": peaks.get(rnd),
                "accuracy": (entry.get("evaluate") or {}).get("acc"),
            }
        )
    row = {
        "clients": n,
        "config": cfg,
        "wall-time": res["wall-time"],
        "peak-rss-gib": res["peak-rss-gib"],
        "peak-pss-gib": res["peak-pss-gib"],
        "rounds": rounds,
        "log": res["log"],
    }
    print(f"  wall {row['wall-time']:.1f} s, peak {row['peak-rss-gib']:.2f} GiB", flush=True)
    for r in rounds:
        print(
            f"  round {r['round']}: train {r['train-time']:.1f} s, with evaluation "
            f"{r['round-time']:.1f} s, peak {r['peak-rss-gib']} GiB"
        )
    return row


# ================================================================================= render/plot
def render(payload: dict[str, Any]) -> str:
    """Markdown tables of the JSON."""
    lines = []
    runs = {**payload.get("naive", {}), **payload.get("scaled", {})}
    runs = {k: v for k, v in runs.items() if "error" not in v}
    if runs:
        lines += [
            "| run | clients | wall (s) | server (s) | train rounds (s) | client compute Σ (s) "
            "| server solve (s) | peak Σ RSS / Σ PSS (GiB) | global acc | model vs in-process |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for _key, r in sorted(runs.items(), key=lambda kv: (kv[1]["clients"], kv[0])):
            lines.append(
                f"| {r['aggregation']}{'' if r['keep-statistics'] else ' + recompute'}"
                f"{' + window ' + str(r['max-in-flight']) if r.get('max-in-flight') else ''}"
                f"{' (earlier design: ' + r['note'] + ')' if r.get('note') else ''} | "
                f"{r['clients']} | {r['wall-time']:.1f} | {r['server-wall-time']:.1f} | "
                f"{r['train-time']:.1f} | {r['client-compute-sum']:.1f} | {r['server-solve']:.2f} | "
                f"{r['peak-rss-gib']:.2f} / {r.get('peak-pss-gib', 0):.2f} | "
                f"{r['global-accuracy']:.4f} | "
                f"{_rel(r['vs-inprocess'])} |"
            )
    ov = payload.get("overhead")
    if ov:
        lines += [
            "",
            f"Per round, {ov['clients']} clients (seconds; % of the compute):",
            "",
            "| layer | in-process | LocalGrid + protobuf | Flower overhead | Ray (2 workers) "
            "| ideal | Ray overhead |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in ov["rounds"]:
            lines.append(
                f"| {r['layer']} | {r['inprocess-compute'] + r['inprocess-solve']:.2f} | "
                f"{r['localgrid-round']:.2f} | {r['localgrid-overhead-s']:+.2f} "
                f"({r['localgrid-overhead-pct']:+.0f}%) | {r['ray-round']:.2f} | "
                f"{r['ray-ideal-round']:.2f} | {r['ray-overhead-s']:+.2f} "
                f"({r['ray-overhead-pct']:+.0f}%) |"
            )
    fa = payload.get("fedavg")
    if fa and "error" in fa:
        lines += ["", f"FedAvg: {fa['error']}"]
    elif fa:
        lines += [
            "",
            f"FedAvg, {fa['clients']} clients, {fa['config']['local-steps']} local steps: wall "
            f"{fa['wall-time']:.1f} s, peak {fa['peak-rss-gib']:.2f} GiB; per round (s): "
            + ", ".join(f"{r['round-time']:.1f}" for r in fa["rounds"]),
        ]
    ser = payload.get("serialization")
    if ser:
        lines += [
            "",
            "| D | packed floats | protobuf MB | pack (ms) | Flower record+proto round trip (ms) "
            "| MB/s | pickle round trip (ms) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in ser["rows"]:
            lines.append(
                f"| {r['D']} | {r['floats']} | {r['proto-bytes'] / 1e6:.2f} | "
                f"{1e3 * r['pack-s']:.1f} | {1e3 * r['flower-roundtrip-s']:.1f} | "
                f"{r['flower-roundtrip-MBps']:.0f} | "
                f"{1e3 * (r['pickle-s'] + r['unpickle-s']):.1f} |"
            )
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: Path) -> None:
    """Time split bars per run, peak memory vs clients, and per-round Flower overhead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {**payload.get("naive", {}), **payload.get("scaled", {})}
    runs = {k: v for k, v in runs.items() if "error" not in v}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    labels, parts = (
        [],
        {
            "client compute / worker": [],
            "server solve": [],
            "Flower + transport + checks": [],
            "evaluation round": [],
            "Ray start/stop": [],
        },
    )
    for _key, r in sorted(runs.items(), key=lambda kv: (kv[1]["clients"], kv[0])):
        train = [x for x in r["rounds"] if x["kind"] == "train"]
        ev = sum(x["round-time"] for x in r["rounds"] if x["kind"] != "train")
        window = f" w{r['max-in-flight']}" if r.get("max-in-flight") else ""
        labels.append(f"{r['aggregation'][:6]}{window}\n{r['clients']}")
        parts["client compute / worker"].append(sum(x["client-compute-per-worker"] for x in train))
        parts["server solve"].append(sum(x["server-solve"] for x in train))
        parts["Flower + transport + checks"].append(sum(x["overhead"] for x in train))
        parts["evaluation round"].append(ev)
        parts["Ray start/stop"].append(r["startup-and-teardown"])
    bottom = np.zeros(len(labels))
    for name, values in parts.items():
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom += np.asarray(values)
    ax.axhline(600, color="k", ls="--", lw=1, label="10 min goal")
    ax.set_ylabel("seconds")
    ax.set_title("FedACnnL through Ray: where the time goes")
    ax.legend(fontsize=7)
    ax = axes[1]
    for agg, marker in (("sorted", "o"), ("streaming", "s")):
        pts = sorted(
            (r["clients"], r["peak-rss-gib"]) for r in runs.values() if r["aggregation"] == agg
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, label=agg)
    ex = payload.get("naive-extrapolation")
    if ex:
        ax.plot(
            [ex["fit-clients"][0], 1000],
            [ex["fit-peak"][0], ex["peak-rss-gib-1000"]],
            "o:",
            color="C0",
            alpha=0.6,
            label="sorted, extrapolated",
        )
    ax.axhline(8, color="k", ls="--", lw=1, label="8 GiB goal")
    ax.set_xlabel("clients")
    ax.set_ylabel("peak RSS of the process tree (GiB)")
    ax.set_title("Memory")
    ax.legend(fontsize=7)
    ax = axes[2]
    ov = payload.get("overhead")
    if ov:
        x = np.arange(len(ov["rounds"]))
        w = 0.25
        ax.bar(
            x - w,
            [r["inprocess-compute"] + r["inprocess-solve"] for r in ov["rounds"]],
            w,
            label="in-process (1 core)",
        )
        ax.bar(x, [r["localgrid-round"] for r in ov["rounds"]], w, label="LocalGrid + protobuf")
        ax.bar(x + w, [r["ray-round"] for r in ov["rounds"]], w, label="Ray (2 workers)")
        ax.set_xticks(x, [f"layer {r['layer']}" for r in ov["rounds"]])
        ax.set_ylabel("round time (s)")
        ax.set_title(f"Per-round cost, {ov['clients']} clients")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _strip(obj: Any) -> Any:
    """Drop bulky fields (timelines, models, events) before writing JSON."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in ("timeline", "model", "events")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


# ======================================================================================== main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the selected parts and merge them into the JSON; returns the payload."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="digits, few clients: a smoke test")
    parser.add_argument(
        "--parts",
        default="naive,scaled,overhead,fedavg,serialization",
        help="comma-separated: naive, scaled, overhead, fedavg, serialization",
    )
    parser.add_argument("--clients", type=int, default=1000, help="the scaled run's clients")
    parser.add_argument(
        "--naive-clients",
        default="100,200",
        help="client counts of the naive runs",
    )
    parser.add_argument(
        "--scaled-clients", default="100", help="more client counts of the scaled design"
    )
    parser.add_argument("--overhead-clients", type=int, default=100)
    parser.add_argument("--fedavg-clients", type=int, default=100)
    parser.add_argument("--fedavg-rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=15, help="≈ 1 epoch of 450 images")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=64,
        help="scaled runs: messages in flight (the app default; 0 = all at once)",
    )
    parser.add_argument(
        "--skip-reference", action="store_true", help="no in-process model to compare with"
    )
    parser.add_argument(
        "--fit-federated-max",
        type=int,
        default=0,
        help="check the in-process loop against fit_federated and measure the summation-order "
        "spread up to this many clients (5 extra fits; --quick: 100)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(SHARED_DATA / "mnist70k.npz"))
    parser.add_argument("--out", default="")
    parser.add_argument("--plot", default="")
    parser.add_argument("--render", action="store_true", help="print the tables of --out")
    args = parser.parse_args(argv)

    if args.child:
        spec = json.loads(Path(args.child).read_text())
        result = CHILDREN[spec["kind"]](spec)
        (Path(spec["base"]) / "result.json").write_text(json.dumps(result))
        return result

    default_name = "scale_quick" if args.quick else "scale"
    out = Path(args.out) if args.out else RESULTS / f"{default_name}.json"
    plot_path = Path(args.plot) if args.plot else out.with_suffix(".png")
    if args.render:
        print(render(json.loads(out.read_text())))
        return {}
    if args.quick:
        args.clients = min(args.clients, 12)
        args.naive_clients = "6"
        args.scaled_clients = "6"
        args.overhead_clients = min(args.overhead_clients, 6)
        args.fedavg_clients = min(args.fedavg_clients, 4)
        args.fedavg_rounds = min(args.fedavg_rounds, 2)
        args.local_steps = min(args.local_steps, 2)
        args.fit_federated_max = max(args.fit_federated_max, 100)
    args.workers = max(1, (os.cpu_count() or 1) // 1)  # client_resources num_cpus = 1
    # child logs (Flower/Ray output) stay out of the results folder
    args.log_dir = Path(tempfile.gettempdir()) / "flwr-analytic-scale-logs" / default_name
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"naive", "scaled", "overhead", "fedavg", "serialization"}
    if unknown:
        raise SystemExit(
            f"unknown --parts {sorted(unknown)}; allowed: naive, scaled, overhead, fedavg, "
            "serialization"
        )
    cfg = fedacnnl_config(args.quick, args.data, args.seed)
    payload: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    payload["environment"] = environment()
    payload["environment"]["ray-workers"] = args.workers
    command = "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    previous = payload.get("config", {})
    payload["config"] = {
        "fedacnnl-run-config": cfg,
        "backend-config": {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        "partitioner": "iid (flwr-datasets IidPartitioner, seeded), 75/25 per-client split",
        "seed": args.seed,
        "quick": args.quick,
        # every invocation that wrote into this file (parts merge), oldest first
        "commands": [*previous.get("commands", [previous.get("command")]), command],
    }
    payload["config"]["commands"] = [c for c in payload["config"]["commands"] if c]
    small = [int(x) for x in args.naive_clients.split(",") if x]

    def save() -> None:
        write_json(out, _strip(payload))
        plot(_strip(payload), plot_path)

    if "scaled" in parts:
        # the headline run first: its result is saved even if a later run is stopped
        scaled = [int(x) for x in args.scaled_clients.split(",") if x]
        combos = [("streaming", False, n) for n in [args.clients, *scaled]]
        part_flower_runs(args, cfg, "scaled", combos, payload.setdefault("scaled", {}), save)
    if "naive" in parts:
        combos = [("sorted", True, n) for n in small]
        part_flower_runs(args, cfg, "naive", combos, payload.setdefault("naive", {}), save)
        naive = sorted(
            (r["clients"], r["peak-rss-gib"], r["wall-time"])
            for r in payload["naive"].values()
            if "error" not in r
        )
        if len(naive) >= 2:
            (n0, m0, w0), (n1, m1, w1) = naive[0], naive[-1]
            slope = (m1 - m0) / (n1 - n0)
            payload["naive-extrapolation"] = {
                "fit-clients": [n0, n1],
                "fit-peak": [m0, m1],
                "gib-per-client": slope,
                "peak-rss-gib-1000": m1 + slope * (1000 - n1),
                "wall-time-1000": w1 + (w1 - w0) / (n1 - n0) * (1000 - n1),
            }
        save()
    if "overhead" in parts:
        n = args.overhead_clients
        ray_row = (payload.get("naive") or {}).get(f"ray-sorted-keep-{n}")
        ray_row = None if ray_row is None or "error" in ray_row else ray_row
        payload["overhead"] = part_overhead(args, cfg, n, ray_row)
        save()
    if "fedavg" in parts:
        payload["fedavg"] = part_fedavg(args, args.fedavg_clients)
        save()
    if "serialization" in parts:
        dims = [26, 801, 1601] if args.quick else [26, 801, 1601, 3201, 8193]
        res = run_child("serialization", {"dims": dims, "seed": args.seed}, args.log_dir)
        payload["serialization"] = {"rows": res["rows"]}
        save()
    payload = _strip(payload)
    print(render(payload))
    print(f"saved {out} and {plot_path}")
    return payload


if __name__ == "__main__":
    main()
