"""pFedACnnL with a per-client λ chosen by exact leave-one-out vs one fixed λ (issue 15).

pFedACnnL (Gu et al., arXiv 2502.06915) personalizes client ``k``'s output layer as
``W_k = (G_k + λI)⁻¹(B_k + λW)`` with one λ for every client, ``λ = ρ·trace(G_k)/D``, ρ = 0.1 (the
package default). Our addition (:mod:`flwr_analytic.analytic.personal_lambda`): each client picks
ρ from quarter decades 1e-4 … 1e3 or ∞ (keep the global model) by exact leave-one-out on its own
training data (residuals also divided by ``1 − h̄``, the global layer's mean leverage the server
sends), keeps the global model unless the left-out gain exceeds one standard error (``z = 1``),
and otherwise takes the middle of the best plateau.

In process, no Flower and no Ray: FedACnnL trains the package's default analytic network (the
``cnn`` with ``label-pca`` targets, float64, seed 0: the app's run-config defaults) on each setup
once (:func:`~flwr_analytic.analytic.fit_federated`); every client then scores the global model,
the fixed ρ = 0.1 model and each auto-λ policy's model
(:func:`~flwr_analytic.analytic.choose_output_lambda` on the statistics it sent); the ``auto``
model is also scored recalibrated (``personal-recalibration`` ρ = 0.01,
:mod:`flwr_analytic.analytic.recalibration`). Setups: digits
IID over 10 and 20 clients; a seeded 12,000-image subset of MNIST's official training images IID
over 10 and 20 clients; MNIST's precomputed Dirichlet(0.1) 20-client split stored in
``../shared/data/mnist70k.npz`` (``client``, ``is_test``; all 70k images). Each client's own data
is split 75/25 train/test (IID setups; seeded) or as stored.

Two splits (``--split``):

* ``dev`` — how the rule was chosen, without test data: each client's *training* part is cut
  80/20 (seed 123), FedACnnL is refitted on the 80% parts and the policies are scored on the 20%.
  Policies: ``auto`` (the package default), ``z=0`` (no significance test), ``no h̄`` (the global
  layer's own samples not discounted), ``decades`` (the grid 1e-4 … 10 only).
* ``test`` — the reported figures: the package default against fixed ρ on each client's test part.

Reported per setup and policy: sample-weighted accuracy, per-client worst ``personal − global``
in samples, clients worse than global, how many clients chose each ρ and the time the choice took
(all clients, the forward pass over the training data included). Scores use the cached
output-layer inputs (``personalization_lambda.HeadScorer``: the same count as a forward pass).

    python benchmarks/auto_lambda.py                 # test split, every setup (a few minutes)
    python benchmarks/auto_lambda.py --split dev     # the rule's development split
    python benchmarks/auto_lambda.py --quick         # digits only
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
from flwr_analytic.analytic.recalibration import DEFAULT_RHO, recalibrate
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


#: Auto-λ policies scored on the development split (the first is the package default).
DECADES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: the auto layer, then ``personal-recalibration`` (ρ 0.01, :mod:`flwr_analytic.analytic.recalibration`)
RECAL = "auto + recalibration"
#: name -> (policy, whether the global layer's mean leverage h̄ corrects the left-out scores)
DEV_POLICIES = {
    "auto": (AutoLambda(), True),
    "z=0": (AutoLambda(z=0.0), True),
    "no h̄": (AutoLambda(), False),
    "decades": (AutoLambda(grid=DECADES), True),
}


def dev_split(split: FederatedSplit, seed: int = 123) -> tuple[list, list]:
    """Each client's training part cut 80/20 (seeded): (fit parts, scored parts)."""
    rng = np.random.default_rng(seed)
    fit, scored = [], []
    for rows in split.train:
        perm = rng.permutation(rows)
        cut = int(round(0.8 * len(perm)))
        fit.append(np.sort(perm[:cut]))
        scored.append(np.sort(perm[cut:]))
    return fit, scored


def run_setup(
    data: ArrayDataset, parts: tuple[list, list], policies: dict, args: argparse.Namespace
) -> dict:
    """FedACnnL once on the fit parts, then per client: global, fixed ρ and each policy's count."""
    train_parts, test_parts = parts
    arch = cnn(data.input_shape, data.num_classes)
    net = AnalyticNetwork(arch, "label-pca", seed=args.seed, dtype=args.dtype)
    t0 = time.perf_counter()
    fit = fit_federated(net, [(data.x[i], data.y[i]) for i in train_parts], args.batch_size)
    fit_seconds = time.perf_counter() - t0
    last = net.num_layers - 1
    leverage = fit.global_leverage(net)  # what the server sends with personal-lambda = "auto"
    scorer = HeadScorer(net)
    per_client, seconds = [], dict.fromkeys(policies, 0.0)
    for k, (train, test) in enumerate(zip(train_parts, test_parts, strict=True)):
        stats = fit.client_statistics[k]
        inputs, y_test = head_inputs(net, data.x[test], args.batch_size), data.y[test]
        fixed = personalize(net, stats, Regularization(FIXED_RHO))[last]
        row = {
            "client": k,
            "train": len(train),
            "test": len(test),
            "global": scorer.correct(inputs, y_test, net.weights[last]),
            "fixed": scorer.correct(inputs, y_test, fixed),
        }
        for name, (policy, corrected) in policies.items():
            t1 = time.perf_counter()
            choice = choose_output_lambda(
                net,
                data.x[train],
                data.y[train],
                policy=policy,
                statistics=stats[last],
                batch_size=args.batch_size,
                leverage=leverage if corrected else 0.0,
            )
            seconds[name] += time.perf_counter() - t1
            row[name] = scorer.correct(inputs, y_test, choice.weights)
            row[f"{name} rho"] = rho_key(choice.rho)
            row[f"{name} gain"] = list(choice.gain)
            if name == "auto":  # personal-recalibration: that layer refitted on its own scores
                own = recalibrate(stats[last].gram, stats[last].cross, choice.weights, DEFAULT_RHO)
                row[RECAL] = scorer.correct(inputs, y_test, own)
        row["heldout_correct"] = {rho_key(r): c for r, c in choice.correct.items()}
        per_client.append(row)
    return summarize(per_client, list(policies)) | {
        "design_dim_output": int(net.design_dim(last)),
        "global_leverage": leverage,
        "seconds": {"fit": fit_seconds, "auto_lambda": seconds},
        "clients": per_client,
    }


def summarize(per_client: list[dict], policies: list[str]) -> dict:
    """Weighted accuracies, per-client gains in samples and each policy's ρ histogram."""
    total = sum(c["test"] for c in per_client)
    out: dict = {"num_clients": len(per_client), "test_samples": total, "policies": policies}
    out["extra"] = [RECAL] if RECAL in per_client[0] else []
    for model in ("global", "fixed", *policies, *out["extra"]):
        out[f"{model}_accuracy"] = sum(c[model] for c in per_client) / total
    for model in ("fixed", *policies, *out["extra"]):
        gains = np.array([c[model] - c["global"] for c in per_client])
        out[f"{model}_worst_gain_samples"] = int(gains.min())
        out[f"{model}_clients_better"] = int(np.sum(gains > 0))
        out[f"{model}_clients_worse"] = int(np.sum(gains < 0))
    for name in policies:
        chosen = [c[f"{name} rho"] for c in per_client]
        keys = sorted({k for k in chosen if k != INF}, key=float) + [INF]
        out[f"{name}_rho_histogram"] = {k: chosen.count(k) for k in keys if chosen.count(k)}
    return out


def print_table(rows: list[dict]) -> None:
    """Markdown table of the setups: fixed ρ and every policy."""
    print(
        "| setup | clients | D | global | ρ=0.1 | auto-λ policy | auto | worst client Δ (samples) "
        "ρ=0.1 / auto | clients worse ρ=0.1 / auto | chosen ρ (clients) | auto time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for name in [*r["policies"], *r.get("extra", [])]:
            policy = name if name in r["policies"] else "auto"  # recalibration: of the auto layer
            hist = ", ".join(f"{k}: {v}" for k, v in r[f"{policy}_rho_histogram"].items())
            print(
                f"| {r['setup']} | {r['num_clients']} | {r['design_dim_output']} "
                f"| {100 * r['global_accuracy']:.2f}% | {100 * r['fixed_accuracy']:.2f}% "
                f"| {name} | {100 * r[f'{name}_accuracy']:.2f}% "
                f"| {r['fixed_worst_gain_samples']:+d} / {r[f'{name}_worst_gain_samples']:+d} "
                f"| {r['fixed_clients_worse']} / {r[f'{name}_clients_worse']} | {hist} "
                f"| {r['seconds']['auto_lambda'][policy]:.1f} |"
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
    parser.add_argument("--split", default="test", choices=["test", "dev"])
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
    default_out = "auto_lambda.json" if args.split == "test" else "auto_lambda_dev.json"
    out = Path(args.out) if args.out else RESULTS / default_out
    policies = {"auto": (AutoLambda(), True)} if args.split == "test" else DEV_POLICIES
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="The specified min_partition_size")
    result: dict = {
        "config": vars(args)
        | {"grid": [*DEFAULT_GRID, INF], "fixed_rho": FIXED_RHO, "z": AutoLambda().z},
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
            parts = (split.train, split.test) if args.split == "test" else dev_split(split)
            row = {"setup": name, "dataset": data_name, "partitioner": partitioner}
            row |= run_setup(data, parts, policies, args)
            result["setups"].append(row)
            print(
                f"{name}: global {row['global_accuracy']:.4f}, ρ=0.1 {row['fixed_accuracy']:.4f}, "
                f"auto {row['auto_accuracy']:.4f} ({row['seconds']['auto_lambda']['auto']:.1f} s)",
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
