"""Scale: FedACnnL with 1000 simulated clients through Flower's Ray simulation; what Flower costs.

Gu et al., "Analytic Personalized Federated Meta-Learning" (arXiv 2502.06915). Every run uses the
strategy and ``ClientApp`` of ``apps/fedacnnl`` (:func:`build_fedacnnl_strategy`, wrapped by
:func:`wrap_fedacnnl_strategy` in ``Metered`` as the app does, and :func:`make_fedacnnl_client_app`)
in a child process whose whole process tree (Ray's GCS, raylet and workers included) is sampled
with psutil every 0.5 s for the peak resident memory. Bytes, round times, client compute, check/add
and solve times come from the ``Metered`` round records; a ``Stamped`` wrapper of the benchmark
stamps every strategy step so the memory timeline can be cut per round. Parts:

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
  Ray (:class:`~flwr_analytic.grid.LocalGrid`, every message and reply round-tripped through
  Flower's protobuf serialization) and through Ray: per-round Flower overhead in seconds and % of
  compute.
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
``benchmarks/results/scale.png`` plots the time split, memory and overhead. The files: this one
(command line, parts), ``scale_runs.py`` (the child side: the runs), ``scale_sampling.py`` (the
child process and its memory samples), ``scale_report.py`` (rows, tables, plot).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED_DATA, environment, write_json  # noqa: E402
from scale_report import fedavg_rows, flower_row, model_diff, plot, rel, render, strip  # noqa: E402
from scale_sampling import run_child  # noqa: E402


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


# ======================================================================================= parts
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
            f"in-process {rel(row['vs-inprocess'])}",
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
    rounds = fedavg_rows(res)
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


# ======================================================================================== main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the selected parts and merge them into the JSON; returns the payload."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        write_json(out, strip(payload))
        plot(strip(payload), plot_path)

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
    payload = strip(payload)
    print(render(payload))
    print(f"saved {out} and {plot_path}")
    return payload


if __name__ == "__main__":
    main()
