"""pFedACnnL with a per-client λ chosen by 5-fold validation vs one fixed λ (issue 15).

pFedACnnL (Gu et al., arXiv 2502.06915) personalizes client ``k``'s output layer as
``W_k = (G_k + λI)⁻¹(B_k + λW)`` with one λ for every client, ``λ = ρ·trace(G_k)/D``, ρ = 0.1 (the
package default). Our addition (:mod:`flwr_analytic.analytic.personal_lambda`): each client picks
ρ ∈ {1e-4, 1e-3, 1e-2, 0.1, 1, 10, ∞} by 5-fold cross-validation on its own training data (ρ = ∞
keeps the global model; ties go to the larger ρ); no extra communication.

In process, no Flower and no Ray: FedACnnL trains the package's default analytic network (the
``cnn`` with ``label-pca`` targets, float64, seed 0: the app's run-config defaults) on each setup
once (:func:`~flwr_analytic.analytic.fit_federated`); every client then scores on its own test split
the global model, the fixed ρ = 0.1 model and its auto-λ model
(:func:`~flwr_analytic.analytic.choose_output_lambda` on the statistics it sent). Setups: digits
IID over 10 and 20 clients; a seeded 12,000-image subset of MNIST's official training images IID
over 10 and 20 clients; MNIST's precomputed Dirichlet(0.1) 20-client split stored in
``../shared/data/mnist70k.npz`` (``client``, ``is_test``; all 70k images). Each client's own data
is split 75/25 train/test (IID setups; seeded) or as stored.

Reported per setup: sample-weighted test accuracy of the three models, per-client worst
``personal − global`` in test samples, clients better / worse than global, how many clients chose
each ρ, and the time the auto choice took (all clients, the forward pass over the training data
included). Test scores use the cached output-layer inputs (``personalization_lambda.HeadScorer``:
the same count as a full forward pass).

    python benchmarks/auto_lambda.py           # every setup (a few minutes on 2 cores)
    python benchmarks/auto_lambda.py --quick   # digits only
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, SHARED_DATA, environment, peak_rss_gib, write_json
from personalization_lambda import HeadScorer, head_inputs, load
from threadpoolctl import threadpool_limits

from flwr_analytic.analytic import (
    AnalyticNetwork,
    AutoLambda,
    Regularization,
    choose_output_lambda,
    fit_federated,
    personalize,
)
from flwr_analytic.analytic.personal_lambda import DEFAULT_GRID
from flwr_analytic.data import ArrayDataset, FederatedSplit, federated_split, load_mnist
from flwr_analytic.models import cnn

FIXED_RHO = 0.1
INF = "inf"
#: (name, data set, partitioner, clients); ``mnist-12k`` is the seeded subset.
SETUPS = (
    ("digits-iid-10", "digits", "iid", 10),
    ("digits-iid-20", "digits", "iid", 20),
    ("mnist12k-iid-10", "mnist-12k", "iid", 10),
    ("mnist12k-iid-20", "mnist-12k", "iid", 20),
    ("mnist-dirichlet0.1-20", "mnist-70k", "precomputed", 20),
)


def rho_key(rho: float) -> str:
    """JSON key of a ρ (``inf``: the global model kept)."""
    return INF if math.isinf(rho) else f"{rho:g}"


def dataset(name: str, data_dir: str, subset: int, seed: int) -> ArrayDataset:
    """``digits``; ``mnist-12k``: ``subset`` seeded official training images; ``mnist-70k``: all."""
    if name == "mnist-12k":
        train = load("mnist", data_dir)
        rows = np.sort(np.random.default_rng(seed).choice(len(train), subset, replace=False))
        return train.subset(rows)
    if name == "mnist-70k":
        return load_mnist(data_dir, "all")  # with the stored client split
    return load(name, data_dir)


def run_setup(data: ArrayDataset, split: FederatedSplit, args: argparse.Namespace) -> dict:
    """FedACnnL once, then per client: global, fixed ρ and auto-ρ test counts."""
    arch = cnn(data.input_shape, data.num_classes)
    net = AnalyticNetwork(arch, "label-pca", seed=args.seed, dtype=args.dtype)
    t0 = time.perf_counter()
    fit = fit_federated(net, [(data.x[i], data.y[i]) for i in split.train], args.batch_size)
    fit_seconds = time.perf_counter() - t0
    last = net.num_layers - 1
    scorer, policy = HeadScorer(net), AutoLambda(seed=args.seed)
    per_client, auto_seconds = [], 0.0
    for k, (train, test) in enumerate(zip(split.train, split.test, strict=True)):
        stats = fit.client_statistics[k]
        inputs, y_test = head_inputs(net, data.x[test], args.batch_size), data.y[test]
        fixed = personalize(net, stats, Regularization(FIXED_RHO))[last]
        t1 = time.perf_counter()
        choice = choose_output_lambda(
            net,
            data.x[train],
            data.y[train],
            policy=policy,
            statistics=stats[last],
            batch_size=args.batch_size,
        )
        auto_seconds += time.perf_counter() - t1
        per_client.append(
            {
                "client": k,
                "train": len(train),
                "test": len(test),
                "global": scorer.correct(inputs, y_test, net.weights[last]),
                "fixed": scorer.correct(inputs, y_test, fixed),
                "auto": scorer.correct(inputs, y_test, choice.weights),
                "rho": rho_key(choice.rho),
                "heldout_correct": {rho_key(r): c for r, c in choice.correct.items()},
            }
        )
    return summarize(per_client) | {
        "design_dim_output": int(net.design_dim(last)),
        "seconds": {"fit": fit_seconds, "auto_lambda": auto_seconds},
        "clients": per_client,
    }


def summarize(per_client: list[dict]) -> dict:
    """Weighted accuracies, per-client gains in test samples and the ρ histogram."""
    total = sum(c["test"] for c in per_client)
    out: dict = {"num_clients": len(per_client), "test_samples": total}
    for model in ("global", "fixed", "auto"):
        out[f"{model}_accuracy"] = sum(c[model] for c in per_client) / total
    for model in ("fixed", "auto"):
        gains = np.array([c[model] - c["global"] for c in per_client])
        out[f"{model}_worst_gain_samples"] = int(gains.min())
        out[f"{model}_clients_better"] = int(np.sum(gains > 0))
        out[f"{model}_clients_worse"] = int(np.sum(gains < 0))
    keys = [rho_key(r) for r in (*DEFAULT_GRID, math.inf)]
    out["rho_histogram"] = {k: sum(c["rho"] == k for c in per_client) for k in keys}
    return out


def print_table(rows: list[dict]) -> None:
    """Markdown table of the setups."""
    print(
        "| setup | clients | D | global | ρ=0.1 | auto | worst client Δ (samples) ρ=0.1 / auto "
        "| clients worse ρ=0.1 / auto | chosen ρ (clients) | auto time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hist = ", ".join(f"{k}: {v}" for k, v in r["rho_histogram"].items() if v)
        print(
            f"| {r['setup']} | {r['num_clients']} | {r['design_dim_output']} "
            f"| {100 * r['global_accuracy']:.2f}% | {100 * r['fixed_accuracy']:.2f}% "
            f"| {100 * r['auto_accuracy']:.2f}% "
            f"| {r['fixed_worst_gain_samples']:+d} / {r['auto_worst_gain_samples']:+d} "
            f"| {r['fixed_clients_worse']} / {r['auto_clients_worse']} | {hist} "
            f"| {r['seconds']['auto_lambda']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_DATA), help="folder of mnist70k.npz")
    parser.add_argument("--setups", nargs="+", default=[s[0] for s in SETUPS])
    parser.add_argument("--subset", type=int, default=12000, help="MNIST IID images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--blas-threads", type=int, default=1, help="BLAS threads (solves)")
    parser.add_argument("--quick", action="store_true", help="digits setups only")
    parser.add_argument("--out", default=None)
    parser.add_argument("--render", action="store_true", help="print the table of --out")
    args = parser.parse_args()
    if args.render:
        print_table(
            json.loads(Path(args.out or RESULTS / "auto_lambda.json").read_text())["setups"]
        )
        return
    if args.quick:
        args.setups = [s for s in args.setups if s.startswith("digits")]
    out = Path(args.out) if args.out else RESULTS / "auto_lambda.json"
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="The specified min_partition_size")
    result: dict = {
        "config": vars(args) | {"grid": [*DEFAULT_GRID, INF], "folds": 5, "fixed_rho": FIXED_RHO},
        "environment": environment(),
        "protocol": __doc__,
        "setups": [],
    }
    cache: dict[str, ArrayDataset] = {}
    start = time.perf_counter()
    with threadpool_limits(args.blas_threads, user_api="blas"):  # torch keeps its threads
        for name, data_name, partitioner, clients in SETUPS:
            if name not in args.setups:
                continue
            if data_name not in cache:
                cache[data_name] = dataset(data_name, args.data, args.subset, args.seed)
            data = cache[data_name]
            split = federated_split(data, clients, partitioner, seed=args.seed)
            row = {"setup": name, "dataset": data_name, "partitioner": partitioner}
            row |= run_setup(data, split, args)
            result["setups"].append(row)
            print(
                f"{name}: global {row['global_accuracy']:.4f}, ρ=0.1 {row['fixed_accuracy']:.4f}, "
                f"auto {row['auto_accuracy']:.4f} ({row['seconds']['auto_lambda']:.1f} s)",
                flush=True,
            )
    result["seconds_total"] = time.perf_counter() - start
    result["peak_rss_gib"] = peak_rss_gib()
    write_json(out, result)
    print()
    print_table(result["setups"])
    print(f"\nwrote {out} ({result['seconds_total']:.0f} s)")


if __name__ == "__main__":
    main()
