"""Accuracy vs ε of FedACnnL with differentially private client statistics on MNIST.

The 20-client Dirichlet(0.1) split stored in ``../shared/data/mnist70k.npz`` (per-client 75/25), an
MLP whose hidden layer is ``random`` (seeded random ReLU features: no statistics, no privacy cost),
so each client releases one layer: the output layer's ``(G_k, B_k)``, clipped (rows ``[a, 1]`` to
norm ``C``, one-hot targets have norm 1) and noised with ``σ = zΔ``, ``Δ = 2C√(C² + 1)``; ``z`` is
set so the release is exactly ``(ε, δ)``-DP (analytic Gaussian mechanism, Balle & Wang 2018; see
:mod:`flwr_analytic.analytic.privacy`). The server solves with the public ridge ``γ_DP = 2σ√(KD)``
(:func:`~flwr_analytic.analytic.privacy.solve_noisy_layer`: the solve of ``DPRelease``, the release
policy of ``FedACnnL(..., release=DPRelease(dp))``).
Each client's clean and clipped statistics are computed once per seed; only the noise changes with ε.

Reported per (width, ε): global accuracy (pooled client test sets) and pFedACnnL personalized
accuracy (each client's ``(G_k + λI)⁻¹(B_k + λW)`` from its own clean statistics, which never leave
it; sample-weighted), mean ± std over seeds (the seed sets the random features and the noise).
``ε = inf`` is the non-private run (no clipping, no noise); ``clip-only`` is clipping without noise.

    flock /tmp/flwr-analytic-cpu.lock python benchmarks/dp_accuracy.py
    python benchmarks/dp_accuracy.py --render        # tables from the JSON

Writes ``benchmarks/results/dp_accuracy.json`` and ``benchmarks/results/dp_accuracy.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, SHARED_DATA, environment, peak_rss_gib, write_json

from flwr_analytic.analytic import AnalyticNetwork, Regularization, merge, personalized_solve
from flwr_analytic.analytic.privacy import (
    DPConfig,
    add_gaussian_noise,
    clipped_statistics,
    noise_multiplier_for,
    noise_rng,
    privacy_report,
    solve_noisy_layer,
)
from flwr_analytic.data import federated_split, load_mnist
from flwr_analytic.models import mlp


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t]


def _accuracies(net: AnalyticNetwork, clients, clean, lam: Regularization) -> tuple[float, float]:
    """(global accuracy on the pooled client test sets, sample-weighted personalized accuracy)."""
    correct_g = correct_p = total = 0
    last = net.num_layers - 1
    w = net.weights[last]
    for (_, test), stats in zip(clients, clean, strict=True):
        if len(test) == 0:
            continue
        correct_g += int(net.evaluate(test.x, test.y)["correct"])
        w_k = personalized_solve(stats.gram, stats.cross, w, lam)
        correct_p += int(
            net.with_weights([*net.weights[:last], w_k]).evaluate(test.x, test.y)["correct"]
        )
        total += len(test)
    return correct_g / total, correct_p / total


def run(args: argparse.Namespace) -> dict:
    data = load_mnist(Path(args.data), split="all")
    split = federated_split(data, 20, "precomputed")
    clients = [split.client(data, k) for k in range(split.num_clients)]
    output_reg = Regularization(args.gamma, "relative")
    lam = Regularization(args.lam, "relative")
    epsilons = _floats(args.epsilons)
    rows: list[dict] = []
    for hidden in [int(h) for h in args.hidden.split(",")]:
        arch = mlp(data.input_shape, 10, hidden=hidden)
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            net = AnalyticNetwork(arch, "random", output_reg=output_reg, seed=seed, dtype="float64")
            net.solve(0, None)  # random features: drawn from the seed, no statistics
            layer = 1
            hidden_w = net.weights[0]
            clean = [net.statistics(layer, tr.x, tr.y, 1024) for tr, _ in clients]
            norms = torch.sqrt(
                torch.linalg.vector_norm(
                    net.layer_input(layer, clients[0][0].x[:2000]).flatten(1), dim=1
                )
                ** 2
                + 1
            )
            # ("inf", None): no DP at all; per clip norm C: clipping only, then each ε
            settings: list[tuple[str, float | None]] = [("inf", None)]
            for c in _floats(args.clip_norm):
                settings += [("clip-only", c)] + [
                    (f"{e:g}", c) for e in epsilons if math.isfinite(e)
                ]
            clipped: dict[float, list] = {}
            for label, c in settings:
                t1 = time.perf_counter()
                net = AnalyticNetwork(arch, "random", output_reg=output_reg, seed=seed)
                net.set_layer(0, hidden_w)
                z = sigma = 0.0
                if c is not None and c not in clipped:
                    dp0 = DPConfig(1.0, c)
                    clipped[c] = [
                        clipped_statistics(net, layer, tr.x, tr.y, dp0, 1024) for tr, _ in clients
                    ]
                if label == "inf":
                    net.solve(layer, merge(clean))
                elif label == "clip-only":
                    net.solve(layer, merge(clipped[c]))
                else:
                    z = noise_multiplier_for(float(label), args.delta, num_layers=1)
                    sigma = DPConfig(z, c).sigma(1, 10)
                    released = [
                        add_gaussian_noise(st, sigma, noise_rng(1000 + seed, k, layer))
                        for k, st in enumerate(clipped[c])
                    ]
                    solve_noisy_layer(net, layer, released, sigma, args.ridge_factor)
                acc_g, acc_p = _accuracies(net, clients, clean, lam)
                report = privacy_report([z], args.delta) if z > 0 else None
                rows.append(
                    {
                        "hidden": hidden,
                        "seed": seed,
                        "clip-norm": c,
                        "epsilon": label,
                        "noise-multiplier": z,
                        "sigma": sigma,
                        "epsilon-check": report["epsilon"] if report else None,
                        "epsilon-zcdp": report["epsilon-zcdp"] if report else None,
                        "fraction-clipped-client0": (
                            float((norms > c).double().mean()) if c is not None else 0.0
                        ),
                        "median-row-norm-client0": float(norms.median()),
                        "global-accuracy": acc_g,
                        "personal-accuracy": acc_p,
                        "time": time.perf_counter() - t1,
                    }
                )
                print(
                    f"hidden {hidden:>5} seed {seed} C={c} ε={label:>9}: z={z:7.3f} σ={sigma:9.2f} "
                    f"global {acc_g:.4f} personal {acc_p:.4f}",
                    flush=True,
                )
            print(f"seed done in {time.perf_counter() - t0:.1f} s", flush=True)
    return {"rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (hidden, clip norm, ε)."""
    out = []
    keys = sorted(
        {(r["hidden"], r["clip-norm"], r["epsilon"]) for r in rows},
        key=lambda k: (k[0], k[1] or 0.0, _order(k[2])),
    )
    for hidden, clip, eps in keys:
        sel = [
            r for r in rows if (r["hidden"], r["clip-norm"], r["epsilon"]) == (hidden, clip, eps)
        ]
        entry = {"hidden": hidden, "clip-norm": clip, "epsilon": eps, "seeds": len(sel)}
        for key in ("global-accuracy", "personal-accuracy"):
            vals = np.array([r[key] for r in sel])
            entry[key] = float(vals.mean())
            entry[key + "-std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        entry["noise-multiplier"] = sel[0]["noise-multiplier"]
        entry["fraction-clipped-client0"] = float(
            np.mean([r["fraction-clipped-client0"] for r in sel])
        )
        entry["median-row-norm-client0"] = float(
            np.mean([r["median-row-norm-client0"] for r in sel])
        )
        out.append(entry)
    return out


def _order(label: str) -> float:
    fixed = {"inf": 1e9, "clip-only": 1e8}
    return fixed[label] if label in fixed else float(label)


def render(payload: dict) -> str:
    cfg = payload["config"]
    lines = [
        f"MNIST 20-client Dirichlet(0.1), mlp random features, δ={cfg['delta']:g}, one released layer,"
        f" {cfg['seeds']} seeds (mean ± std)",
        "",
        "| hidden | C | ε | z = σ/Δ | global | personalized (pFedACnnL) |",
        "|---|---|---|---|---|---|",
    ]
    for e in payload["summary"]:
        clip = "-" if e["clip-norm"] is None else f"{e['clip-norm']:g}"
        lines.append(
            f"| {e['hidden']} | {clip} | {e['epsilon']} | {e['noise-multiplier']:.3g} | "
            f"{100 * e['global-accuracy']:.2f} ± {100 * e['global-accuracy-std']:.2f}% | "
            f"{100 * e['personal-accuracy']:.2f} ± {100 * e['personal-accuracy-std']:.2f}% |"
        )
    norms = {e["hidden"]: e["median-row-norm-client0"] for e in payload["summary"]}
    lines.append("")
    lines.append(
        "median ‖[a, 1]‖ (client 0): "
        + ", ".join(f"hidden {h}: {v:.2f}" for h, v in sorted(norms.items()))
    )
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = payload["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key in zip(axes, ("global-accuracy", "personal-accuracy"), strict=True):
        for hidden in sorted({e["hidden"] for e in summary}):
            ref = next(e for e in summary if e["hidden"] == hidden and e["epsilon"] == "inf")
            clips = sorted({e["clip-norm"] for e in summary if e["clip-norm"] is not None})
            for clip in clips:
                sel = [
                    e
                    for e in summary
                    if e["hidden"] == hidden
                    and e["clip-norm"] == clip
                    and e["epsilon"] not in ("inf", "clip-only")
                ]
                ax.errorbar(
                    [float(e["epsilon"]) for e in sel],
                    [100 * e[key] for e in sel],
                    yerr=[100 * e[key + "-std"] for e in sel],
                    fmt="-o",
                    ms=3,
                    capsize=2,
                    label=f"hidden {hidden}, C={clip:g}",
                )
            ax.axhline(100 * ref[key], lw=0.8, ls=":", color="k")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"ε (δ = {payload['config']['delta']:g}, per client)")
        ax.set_title(key.replace("-", " ") + " (dotted: no DP)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(fontsize=7)
    fig.suptitle("FedACnnL + Gaussian DP, MNIST 20 clients, random-feature MLP")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_DATA / "mnist70k.npz"))
    parser.add_argument("--hidden", default="256,1024", help="random-feature widths")
    parser.add_argument("--epsilons", default="0.5,1,2,4,8")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip-norm", default="2,4,8", help="values of C for rows [a, 1]")
    parser.add_argument("--ridge-factor", type=float, default=2.0)
    parser.add_argument("--gamma", type=float, default=1e-4, help="relative ridge ρ (output)")
    parser.add_argument("--lam", type=float, default=0.1, help="pFedACnnL relative λ")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "dp_accuracy.json"))
    parser.add_argument("--render", action="store_true", help="print the tables of --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.render:
        payload = json.loads(out.read_text())
        print(render(payload))
        return payload
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = run(args)
    payload = {
        "command": "python benchmarks/dp_accuracy.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: v for k, v in vars(args).items() if k not in ("render", "out")},
        **result,
        "total-time": time.perf_counter() - start,
        "peak-rss-gib": peak_rss_gib(),
        "environment": environment(),
    }
    write_json(out, payload)
    plot(payload, out.with_suffix(".png"))
    print(render(payload))
    print(f"saved {out} and {out.with_suffix('.png')}")
    return payload


if __name__ == "__main__":
    main()
