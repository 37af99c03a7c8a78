"""Analytic networks on full MNIST: accuracy, wall time, Gram throughput, memory, personalization.

Trains on the official 60k training images and tests on the official 10k (``../shared/data/
mnist70k.npz``), then runs FedACnnL + pFedACnnL on that file's 20-client Dirichlet(0.1) split
(per-client 75/25). Writes ``benchmarks/results/analytic_accuracy.json`` and prints tables.

    python benchmarks/analytic_accuracy.py            # everything (~25 min on 2 cores)
    python benchmarks/analytic_accuracy.py --quick    # 3k training images, a smoke run
    python benchmarks/analytic_accuracy.py --render   # print the tables of the saved JSON
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, SHARED_DATA, environment, peak_rss_gib, write_json
from torch import nn

from flwr_analytic.analytic import (
    AnalyticNetwork,
    Regularization,
    StatisticsAccumulator,
    fit_federated,
    personalize,
    ridge_solve,
)
from flwr_analytic.analytic.design import conv_rows
from flwr_analytic.data import ArrayDataset, load_mnist, precomputed_split
from flwr_analytic.models import Architecture, ConvSpec, build_module, cnn, linear, mlp


@dataclass
class Config:
    """One analytic run: architecture, per-hidden-layer schemes, output ridge ρ."""

    label: str
    arch: Architecture
    schemes: tuple[str, ...] | str
    output_reg: float = 1e-6


def configs(shape: tuple[int, int, int], best_rf: int) -> list[Config]:
    mlp_arch, cnn_arch = mlp(shape, 10, 1024), cnn(shape, 10, (32, 64))
    out = [Config("linear (one layer)", linear(shape), (), 1e-2)]
    for scheme in ("label-encoding", "pca", "label-pca", "random"):
        out.append(Config(f"mlp-1024 {scheme}", mlp_arch, scheme, 1e-4))
    for scheme in ("label-encoding", "pca", "label-pca", "random"):
        out.append(Config(f"cnn-32-64 {scheme}", cnn_arch, scheme))
    rf = cnn(shape, 10, (32, 64), dense=(best_rf,))
    best = ("label-pca", "label-pca", "random-standardized")
    out.append(Config(f"cnn-32-64-rf{best_rf} label-pca", rf, best, 1e-4))
    out.append(Config(f"cnn-32-64-rf{best_rf} random", rf, ("random", "random", "random"), 1e-4))
    return out


def run_analytic(cfg: Config, train: ArrayDataset, test: ArrayDataset, dtype: str) -> dict:
    net = AnalyticNetwork(
        cfg.arch, cfg.schemes, output_reg=Regularization(cfg.output_reg), dtype=dtype
    )
    layer_seconds = []
    start = time.perf_counter()
    for layer in range(net.num_layers):
        t0 = time.perf_counter()
        stats = (
            net.statistics(layer, train.x, train.y, 500) if net.needs_statistics(layer) else None
        )
        net.solve(layer, stats)
        layer_seconds.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - start
    acc = net.evaluate(test.x, test.y)["accuracy"]
    return {
        "label": cfg.label,
        "test_accuracy": acc,
        "seconds": seconds,
        "layer_seconds": layer_seconds,
        "peak_rss_gib": peak_rss_gib(),
    }, net


def run_backprop(
    arch: Architecture, train: ArrayDataset, test: ArrayDataset, epochs: int, target: float
) -> dict:
    """Backprop reference: Adam (lr 1e-3, batch 128) on the same architecture.

    Trains until it reaches ``target`` test accuracy or ``epochs`` run out; the time counts training
    only, not the evaluations.
    """
    torch.manual_seed(0)
    model = build_module(arch)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    xt, yt = torch.from_numpy(test.x), torch.from_numpy(test.y)
    gen = torch.Generator().manual_seed(0)
    curve, reached, elapsed = [], None, 0.0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        for idx in torch.randperm(len(y), generator=gen).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        elapsed += time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            acc = float(
                sum(
                    (model(xt[i]).argmax(1) == yt[i]).sum()
                    for i in torch.arange(len(yt)).split(2000)
                )
            )
        acc /= len(yt)
        curve.append({"epoch": epoch, "seconds": elapsed, "test_accuracy": acc})
        print(
            f"    backprop {arch.name} epoch {epoch}: {acc:.4f} after {elapsed:.1f} s", flush=True
        )
        if reached is None and acc >= target:
            reached = elapsed
            break
    return {"curve": curve, "seconds_to_target": reached, "target": target}


def gram_throughput(net: AnalyticNetwork, layer: int, train: ArrayDataset, n: int) -> dict:
    """Gram build of ``layer`` on ``n`` images vs a plain ``AᵀA`` matmul of the same shape.

    The build (im2col for conv layers, the syrk update of ``G``, ``B`` and the sums) is timed on the
    layer's precomputed inputs; the full statistics pass (forward through the layers below too) is
    timed separately. Both are quoted in the GFLOP/s of a general ``AᵀA`` (``2·rows·D²``), so the
    ratio is matmul time / build time.
    """
    x, y = train.x[:n], train.y[:n]
    spec = net.arch.spec(layer)
    bs = 500
    inputs = [net.layer_input(layer, x[i : i + bs]) for i in range(0, n, bs)]
    targets = [net.layer_targets(layer, y[i : i + bs]) for i in range(0, n, bs)]
    d, m = net.design_dim(layer), net.num_targets(layer)

    def design(h: torch.Tensor) -> torch.Tensor:
        if isinstance(spec, ConvSpec):
            return conv_rows(h, spec.kernel_size, spec.padding)
        return torch.flatten(h, 1).reshape(len(h), 1, -1)

    rows_per_batch = design(inputs[0]).shape[1] * bs
    t0 = time.perf_counter()
    acc = StatisticsAccumulator(d, m, net.dtype)
    for h, t in zip(inputs, targets):
        acc.add_patches(design(h), t if m else None)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    net.statistics(layer, x, y, bs)
    pass_s = time.perf_counter() - t0
    a = torch.rand(
        rows_per_batch, d - 1, dtype=torch.float64 if net.dtype == "float64" else torch.float32
    )
    a.T @ a
    t0 = time.perf_counter()
    for _ in inputs:
        a.T @ a
    mm_s = time.perf_counter() - t0
    flops = 2.0 * rows_per_batch * len(inputs) * (d - 1) ** 2
    return {
        "layer": layer,
        "design_dim": d,
        "rows": rows_per_batch * len(inputs),
        "dtype": net.dtype,
        "build_seconds": build_s,
        "full_pass_seconds": pass_s,
        "matmul_seconds": mm_s,
        "build_gflops": flops / build_s / 1e9,
        "full_pass_gflops": flops / pass_s / 1e9,
        "matmul_gflops": flops / mm_s / 1e9,
        "ratio": mm_s / build_s,
    }


def personalization(cfg: Config, data: ArrayDataset, dtype: str, rhos: list[float]) -> dict:
    """FedACnnL on the 20-client split, then global / personalized / local accuracy per client."""
    split = precomputed_split(data)
    net = AnalyticNetwork(
        cfg.arch, cfg.schemes, output_reg=Regularization(cfg.output_reg), dtype=dtype
    )
    t0 = time.perf_counter()
    fit = fit_federated(net, [(data.x[i], data.y[i]) for i in split.train], 500)
    fed_seconds = time.perf_counter() - t0
    out: dict = {
        "label": cfg.label,
        "federated_seconds": fed_seconds,
        "upload_floats": sum(fit.upload_floats),
    }
    counts = np.array([len(t) for t in split.test])
    last = net.num_layers - 1

    def weighted(correct: list[int]) -> float:
        return float(np.sum(correct) / counts.sum())

    glob = [net.evaluate(data.x[t], data.y[t])["correct"] for t in split.test]
    out["global"] = weighted(glob)
    local = []
    for k, t in enumerate(split.test):
        stats = fit.client_statistics[k][last]
        w = [
            *net.weights[:-1],
            ridge_solve(stats.gram, stats.cross, Regularization(cfg.output_reg)),
        ]
        local.append(net.with_weights(w).evaluate(data.x[t], data.y[t])["correct"])
    out["local_ridge_last_layer"] = weighted(local)
    for mode in ("last", "all"):
        for rho in rhos:
            correct = []
            for k, t in enumerate(split.test):
                w = personalize(net, fit.client_statistics[k], Regularization(rho), layers=mode)
                correct.append(net.with_weights(w).evaluate(data.x[t], data.y[t])["correct"])
            out[f"personalized_{mode}_rho{rho:g}"] = weighted(correct)
            out[f"per_client_{mode}_rho{rho:g}"] = [c / n for c, n in zip(correct, counts)]
    out["per_client_global"] = [c / n for c, n in zip(glob, counts)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_DATA))
    parser.add_argument("--quick", action="store_true", help="3k/2k images, a smoke run")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--rf", type=int, default=8192, help="random-feature width of the best CNN")
    parser.add_argument("--epochs", type=int, default=6, help="most backprop epochs")
    parser.add_argument("--out", default=str(RESULTS / "analytic_accuracy.json"))
    parser.add_argument("--render", action="store_true", help="only print the tables of --out")
    args = parser.parse_args()
    if args.render:
        print_tables(json.loads(Path(args.out).read_text()))
        return
    torch.set_num_threads(2)

    everything = load_mnist(args.data, "all")
    official = everything.extras["official_test"].astype(bool)
    train, test = (
        everything.subset(np.flatnonzero(~official)),
        everything.subset(np.flatnonzero(official)),
    )
    if args.quick:
        train, test = train.subset(np.arange(3000)), test.subset(np.arange(2000))
    print(f"MNIST: {len(train)} train / {len(test)} test, statistics in {args.dtype}", flush=True)
    result: dict = {
        "config": vars(args),
        "environment": environment(),
        "analytic": [],
        "backprop": {},
    }

    nets = {}
    for cfg in configs(train.input_shape, args.rf if not args.quick else 2048):
        row, net = run_analytic(cfg, train, test, args.dtype)
        nets[cfg.label] = (cfg, net)
        result["analytic"].append(row)
        print(
            f"  {row['label']:<28} {row['test_accuracy']:.4f}  {row['seconds']:6.1f} s  "
            f"peak {row['peak_rss_gib']:.2f} GiB",
            flush=True,
        )
        write_json(args.out, result)

    best = max(result["analytic"], key=lambda r: r["test_accuracy"])
    result["best_analytic"] = best
    cnn_best = max(
        (r for r in result["analytic"] if r["label"].startswith("cnn")),
        key=lambda r: r["test_accuracy"],
    )
    mlp_best = max(
        (r for r in result["analytic"] if r["label"].startswith("mlp")),
        key=lambda r: r["test_accuracy"],
    )
    for best_row in (mlp_best, cnn_best):
        label = best_row["label"].split()[0]  # the architecture, e.g. cnn-32-64-rf8192
        arch, target = nets[best_row["label"]][0].arch, best_row["test_accuracy"]
        result["backprop"][label] = run_backprop(arch, train, test, args.epochs, target)
        write_json(args.out, result)

    n = 1000 if args.quick else 10000
    rf_label = f"cnn-32-64-rf{args.rf if not args.quick else 2048} label-pca"
    result["gram_throughput"] = [
        gram_throughput(nets["cnn-32-64 pca"][1], 1, train, n),
        gram_throughput(nets[rf_label][1], 3, train, n),
    ]
    write_json(args.out, result)

    rhos = [0.01, 0.1, 1.0]
    result["personalization"] = []
    for label in (
        f"cnn-32-64-rf{args.rf if not args.quick else 2048} label-pca",
        "mlp-1024 random",
        "linear (one layer)",
    ):
        cfg = nets[label][0]
        row = personalization(cfg, everything, args.dtype, rhos)
        result["personalization"].append(row)
        print(
            f"  personalization {label}: global {row['global']:.4f}, "
            + ", ".join(
                f"{k} {v:.4f}"
                for k, v in row.items()
                if k.startswith("personalized") or k.startswith("local")
            ),
            flush=True,
        )
        write_json(args.out, result)
    result["peak_rss_gib"] = peak_rss_gib()
    write_json(args.out, result)
    print_tables(result)


def print_tables(result: dict) -> None:
    """Markdown tables of a result JSON (what the README quotes)."""
    print("| model (MNIST 60k train / 10k test) | test acc | train time (s) | peak RSS (GiB) |")
    print("|---|---|---|---|")
    for r in result["analytic"]:
        print(
            f"| {r['label']} | {r['test_accuracy']:.2%} | {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} |"
        )
    for label, bp in result.get("backprop", {}).items():
        last = bp["curve"][-1]
        if bp["seconds_to_target"] is None:
            reach = f"did not reach {bp['target']:.2%} in {last['epoch']} epochs"
        else:
            reach = f"reached {bp['target']:.2%} after {bp['seconds_to_target']:.1f} s"
        print(
            f"| backprop {label}, Adam, {last['epoch']} epochs ({reach}) | "
            f"{last['test_accuracy']:.2%} | {last['seconds']:.1f} | - |"
        )
    if "gram_throughput" in result:
        print(
            "\n| layer | D | rows | Gram build GFLOP/s | full pass GFLOP/s | matmul GFLOP/s | build/matmul |"
        )
        print("|---|---|---|---|---|---|---|")
        for g in result["gram_throughput"]:
            print(
                f"| {g['layer']} | {g['design_dim']} | {g['rows']} | {g['build_gflops']:.1f} | "
                f"{g['full_pass_gflops']:.1f} | {g['matmul_gflops']:.1f} | {g['ratio']:.0%} |"
            )
    if "personalization" in result:
        print(
            "\n| model (20-client Dirichlet(0.1) split) | global | personalized last layer "
            "(ρ=0.01 / 0.1 / 1) | personalized all layers (ρ=0.1) | local ridge |"
        )
        print("|---|---|---|---|---|")
        for p in result["personalization"]:
            lasts = " / ".join(f"{p[f'personalized_last_rho{r:g}']:.2%}" for r in (0.01, 0.1, 1.0))
            print(
                f"| {p['label']} | {p['global']:.2%} | {lasts} | {p['personalized_all_rho0.1']:.2%} | "
                f"{p['local_ridge_last_layer']:.2%} |"
            )
    if "peak_rss_gib" in result:
        print(f"\npeak resident memory of the whole run: {result['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
