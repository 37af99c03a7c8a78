"""Analytic features for natural images (issue 15): CIFAR-10, centralized and federated.

Data: ``../shared/data/cifar10_20k.npz`` (2,000 images per class), split 16k train / 4k test by a
seeded permutation. Rows, each with wall time and peak memory:

- today's default analytic ``cnn`` (label-pca 32/64, 5×5);
- the ``coates`` layer (Coates, Lee, Ng, AISTATS 2011): 1,600 6×6 filters on contrast-normalized,
  ZCA-whitened patches (``zca-kmeans``: 10 federated Lloyd's iterations; ``zca-random``),
  soft-threshold ReLU, quadrant pooling, standardized ridge head. The head's ρ is chosen on a
  held-out 2k of the training images (statistics are sums, so the final head adds the held-out
  part back without another pass);
- backprop (Adam, lr 1e-3, batch 128) of the ``cnn`` architecture, its accuracy at the analytic
  time and at 5× the analytic time;
- federated: 20 clients Dirichlet(0.1) over all 20k images (flwr-datasets partitioner, per-client
  75/25 split), FedACnnL global and pFedACnnL personalized accuracy (weighted by test size).

    python benchmarks/natural_images.py                 # everything (~35 min on 2 cores)
    python benchmarks/natural_images.py --part central  # or federated
    python benchmarks/natural_images.py --quick         # 2k training images, a smoke run
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import RESULTS, SHARED_DATA, environment, peak_rss_gib, write_json
from torch import nn

from flwr_analytic.analytic import AnalyticNetwork, Regularization, fit_federated, personalize
from flwr_analytic.analytic.solvers import ridge_solve
from flwr_analytic.analytic.statistics import merge
from flwr_analytic.analytic.targets import TargetScheme
from flwr_analytic.data import partition_indices
from flwr_analytic.data.dataset import to_float_images
from flwr_analytic.models import build_module, cnn, coates

RHOS = (1e-3, 3e-3, 1e-2, 3e-2)
SHAPE = (3, 32, 32)


def load(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The seeded 16k/4k split of the 20k CIFAR-10 subset."""
    data = np.load(SHARED_DATA / "cifar10_20k.npz")
    x = to_float_images(data["x"], channels_last=True)
    y = data["y"].astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    return x[perm[:16000]], y[perm[:16000]], x[perm[16000:]], y[perm[16000:]]


def scheme(name: str) -> TargetScheme | str:
    return TargetScheme(name) if name.startswith("zca-") else name


def fit_hidden(net: AnalyticNetwork, x: np.ndarray, y: np.ndarray, batch: int) -> None:
    """Every hidden layer, all its rounds (k-means: 1 + iterations)."""
    for layer in range(net.num_layers - 1):
        while net.solved_layers == layer:
            stats = net.statistics(layer, x, y, batch) if net.needs_statistics(layer) else None
            net.solve(layer, stats)


def run_analytic(label: str, net: AnalyticNetwork, data: tuple, batch: int) -> dict:
    """Fit, choose the head's ρ on a held-out 2k of the training set, evaluate on the test set."""
    x, y, xt, yt = data
    held = min(2000, len(y) // 8)
    start = time.perf_counter()
    fit_hidden(net, x, y, batch)
    out = net.num_layers - 1
    fit_stats = net.statistics(out, x[held:], y[held:], batch)
    val_stats = net.statistics(out, x[:held], y[:held], batch)
    rule = net.output_reg.rule
    scores = {}
    for rho in RHOS:
        w = ridge_solve(fit_stats.gram, fit_stats.cross, Regularization(rho, rule))
        probe = net.with_weights(net.weights[:out] + [w])  # type: ignore[operator]
        scores[rho] = probe.evaluate(x[:held], y[:held])["accuracy"]
    rho = max(RHOS, key=lambda r: (scores[r], r))
    net.output_reg = Regularization(rho, rule)
    net.solve(out, merge([fit_stats, val_stats]))
    seconds = time.perf_counter() - start
    acc = net.evaluate(xt, yt)["accuracy"]
    row = {
        "label": label,
        "test_accuracy": acc,
        "seconds": seconds,
        "head_rho": rho,
        "validation": {str(k): v for k, v in scores.items()},
        "head_dim": net.design_dim(out),
        "peak_rss_gib": peak_rss_gib(),
    }
    print(
        f"  {label}: {acc:.4f} in {seconds:.1f} s (ρ={rho:g}, peak {row['peak_rss_gib']:.1f} GiB)"
    )
    return row


def run_backprop(data: tuple, budget: float) -> dict:
    """Adam on the analytic ``cnn`` architecture for ``budget`` seconds (training time only)."""
    x, y, xt, yt = (torch.from_numpy(a) for a in data)
    torch.manual_seed(0)
    model = build_module(cnn(SHAPE, 10, (32, 64)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    curve, elapsed = [], 0.0
    while elapsed < budget:
        t0 = time.perf_counter()
        model.train()
        for idx in torch.randperm(len(y), generator=gen).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        elapsed += time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(xt[i]).argmax(1) == yt[i]).sum()) for i in range(len(yt)))
        curve.append({"seconds": elapsed, "test_accuracy": correct / len(yt)})
        print(f"    backprop cnn: {curve[-1]['test_accuracy']:.4f} after {elapsed:.1f} s")
    return {"curve": curve}


def best_within(curve: list[dict], seconds: float) -> float | None:
    """Best test accuracy among epochs finished within ``seconds``."""
    inside = [c["test_accuracy"] for c in curve if c["seconds"] <= seconds]
    return max(inside) if inside else None


def central(data: tuple, quick: bool) -> dict:
    k = 200 if quick else 1600
    rows = [
        run_analytic(
            "cnn-32-64 label-pca (previous default)",
            AnalyticNetwork(cnn(SHAPE, 10, (32, 64)), "label-pca", dtype="float32"),
            data,
            250,
        )
    ]
    for name in ("zca-kmeans", "zca-random"):
        net = AnalyticNetwork(
            coates(SHAPE, 10, filters=k),
            scheme(name),
            output_reg=Regularization(RHOS[0], "standardized"),
            dtype="float32",
        )
        rows.append(run_analytic(f"coates-{k} {name}", net, data, 50))
    analytic_seconds = rows[1]["seconds"]
    backprop = run_backprop(data, 5 * analytic_seconds)
    backprop["at_analytic_time"] = best_within(backprop["curve"], analytic_seconds)
    backprop["at_5x_analytic_time"] = best_within(backprop["curve"], 5 * analytic_seconds)
    return {"rows": rows, "backprop_cnn": backprop, "analytic_seconds": analytic_seconds}


def federated(quick: bool, num_clients: int = 20, alpha: float = 0.1, seed: int = 0) -> dict:
    """FedACnnL (coates, zca-kmeans) over Dirichlet clients in process; pFedACnnL per client."""
    data = np.load(SHARED_DATA / "cifar10_20k.npz")
    x = to_float_images(data["x"], channels_last=True)
    y = data["y"].astype(np.int64)
    if quick:
        x, y = x[:3000], y[:3000]
    parts = partition_indices(y, num_clients, "dirichlet", alpha=alpha, seed=seed)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for idx in parts:
        idx = rng.permutation(idx)
        cut = int(round(0.75 * len(idx)))
        train.append((x[idx[:cut]], y[idx[:cut]]))
        test.append((x[idx[cut:]], y[idx[cut:]]))
    k = 200 if quick else 1600
    net = AnalyticNetwork(
        coates(SHAPE, 10, filters=k),
        TargetScheme("zca-kmeans"),
        output_reg=Regularization(3e-3, "standardized"),
        dtype="float32",
    )
    start = time.perf_counter()
    fit = fit_federated(net, train, batch_size=50)
    seconds = time.perf_counter() - start
    rows = []
    for (xt, yt), stats in zip(test, fit.client_statistics, strict=True):
        g = net.evaluate(xt, yt)
        row = {"num-examples": len(yt), "global": g.get("correct", 0)}
        for rho in (0.1, 1.0):
            own = personalize(net, stats, Regularization(rho, "standardized"))
            row[f"personal-{rho:g}"] = net.with_weights(own).evaluate(xt, yt).get("correct", 0)
        rows.append(row)
    total = sum(r["num-examples"] for r in rows)
    result = {
        "clients": num_clients,
        "alpha": alpha,
        "seconds": seconds,
        "peak_rss_gib": peak_rss_gib(),
        "upload_floats_per_layer": fit.upload_floats,
        "upload_mb_per_client": [4 * f / num_clients / 1e6 for f in fit.upload_floats],
        "per_client": rows,
        "global_accuracy": sum(r["global"] for r in rows) / total,
    }
    for rho in (0.1, 1.0):
        result[f"personal_accuracy_{rho:g}"] = sum(r[f"personal-{rho:g}"] for r in rows) / total
    print(
        f"  federated {num_clients} clients Dir({alpha}): global {result['global_accuracy']:.4f}, "
        f"personalized ρ=0.1 {result['personal_accuracy_0.1']:.4f}, ρ=1 "
        f"{result['personal_accuracy_1']:.4f}; {seconds:.0f} s, peak {result['peak_rss_gib']:.1f} GiB"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "central", "federated"), default="all")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    result: dict = {"environment": environment(), "quick": args.quick}
    if args.part in ("all", "central"):
        x, y, xt, yt = load()
        if args.quick:
            x, y, xt, yt = x[:2000], y[:2000], xt[:1000], yt[:1000]
        result["central"] = central((x, y, xt, yt), args.quick)
    if args.part in ("all", "federated"):
        result["federated"] = federated(args.quick)
    name = (
        "natural_images"
        + ("_quick" if args.quick else "")
        + ("" if args.part == "all" else f"_{args.part}")
    )
    write_json(RESULTS / f"{name}.json", result)


if __name__ == "__main__":
    main()
