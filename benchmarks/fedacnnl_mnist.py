"""FedACnnL + pFedACnnL on MNIST through the Flower strategy and client app, in one command.

Runs the package's :class:`~flwr_analytic.strategies.fedacnnl.FedACnnL` strategy and the FedACnnL
``ClientApp`` on the 20-client Dirichlet(0.1) split stored in ``../shared/data/mnist70k.npz``
(``load_mnist(path, 'all')`` + ``federated_split(ds, 20, 'precomputed')``, per-client 75/25), and
reports global and personalized (pFedACnnL) accuracy, per-round and total wall time and bytes.
Writes ``benchmarks/results/fedacnnl_mnist.json``.

    python benchmarks/fedacnnl_mnist.py                      # in-process grid (no Ray)
    python benchmarks/fedacnnl_mnist.py --runtime ray        # Flower's Ray simulation
    python benchmarks/fedacnnl_mnist.py --dtype float64      # exact arithmetic, slower

Run it under ``flock /tmp/flwr-analytic-cpu.lock`` on shared machines.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, SHARED_DATA, environment, peak_rss_gib, write_json

from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
from flwr_analytic.fedacnnl import resolve_run_config
from flwr_analytic.grid import LocalGrid
from flwr_analytic.strategies.fedacnnl_server import make_fedacnnl_server_app, run_fedacnnl


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", choices=("local", "ray"), default="local")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--cnn-channels", default="32,64")
    parser.add_argument("--scheme", default="label-pca")
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument(
        "--num-groups", type=int, default=4, help="group-wise output layers (0: off)"
    )
    parser.add_argument("--data", default=str(SHARED_DATA / "mnist70k.npz"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads per client call")
    parser.add_argument("--out", default=str(RESULTS / "fedacnnl_mnist.json"))
    args = parser.parse_args(argv)

    cfg = resolve_run_config(  # checked and read-only
        {
            "dataset": "mnist",
            "data-path": args.data,
            "partitioner": "precomputed",
            "model": args.model,
            "cnn-channels": args.cnn_channels,
            "scheme": args.scheme,
            "lam": args.lam,
            "num-groups": args.num_groups,
            "dtype": args.dtype,
            "min-nodes": 20,
            "client-threads": args.threads if args.runtime == "local" else 1,
            "centralized-eval": True,
            "results-path": "",
        }
    )
    start = time.perf_counter()
    if args.runtime == "local":
        grid = LocalGrid(make_fedacnnl_client_app(), 20, cfg)
        _, summary = run_fedacnnl(grid, cfg)
    else:
        from flwr.simulation import run_simulation

        with tempfile.TemporaryDirectory() as tmp:
            run_cfg = {**cfg, "results-path": str(Path(tmp) / "r.json")}
            run_simulation(
                server_app=make_fedacnnl_server_app(run_cfg),
                client_app=make_fedacnnl_client_app(run_config=run_cfg),
                num_supernodes=20,
                backend_config={"client_resources": {"num_cpus": 2, "num_gpus": 0.0}},
            )
            summary = json.loads(Path(run_cfg["results-path"]).read_text())
    total = time.perf_counter() - start

    ev = summary["evaluate"]
    train_rounds = [r for r in summary["rounds"] if r["kind"] == "train"]
    print(f"FedACnnL on MNIST (precomputed 20-client Dirichlet(0.1)), {args.model} {args.dtype}")
    print(f"{'round':>5} {'layer':>5} {'clients':>7} {'sent MB':>8} {'recv MB':>8} {'time s':>7}")
    for r in summary["rounds"]:
        print(
            f"{r['round']:>5} {str(r.get('layer', 'eval')):>5} {r.get('num-valid', r.get('num-replies')):>7}"
            f" {r['bytes-sent'] / 1e6:>8.2f} {r['bytes-received'] / 1e6:>8.2f} {r['round-time']:>7.1f}"
        )
    prefixes = ["global", "personal"]
    prefixes += ["group", "group-personal"] if "group-accuracy" in ev else []
    for prefix in prefixes:
        key = f"{prefix}-accuracy"
        print(
            f"{prefix:>14} accuracy: weighted {ev[key]:.4f}, client mean {ev[key + '-client-mean']:.4f}"
            f" ± {ev[key + '-client-std']:.4f}, min {ev[key + '-client-min']:.4f},"
            f" p10 {ev[key + '-client-p10']:.4f}"
        )
    print(
        f"training {sum(r['round-time'] for r in train_rounds):.1f} s, total {total:.1f} s; "
        f"sent {summary['bytes-sent'] / 1e6:.2f} MB, received {summary['bytes-received'] / 1e6:.2f} MB"
    )
    payload = {
        "command": "python benchmarks/fedacnnl_mnist.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "runtime": args.runtime,
        "global-accuracy": ev["global-accuracy"],
        "personal-accuracy": ev["personal-accuracy"],
        "group-accuracy": ev.get("group-accuracy"),
        "group-personal-accuracy": ev.get("group-personal-accuracy"),
        "centralized-global-accuracy": (summary.get("centralized-evaluate") or {}).get("accuracy"),
        "total-wall-time": total,
        "training-time": sum(r["round-time"] for r in train_rounds),
        "bytes-sent": summary["bytes-sent"],
        "bytes-received": summary["bytes-received"],
        "peak-rss-gib": peak_rss_gib(),
        "summary": summary,
        "environment": environment(),
    }
    write_json(Path(args.out), payload)
    print(f"saved {args.out}")
    return payload


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
