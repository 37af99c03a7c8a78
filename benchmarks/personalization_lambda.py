"""pFedACnnL vs FedACnnL: per-client accuracy of the personalized output layer against λ.

Claim checked (Gu et al., *Analytic Personalized Federated Meta-Learning*, arXiv 2502.06915,
abstract): pFedACnnL beats FedACnnL by 4–8% test accuracy. For each data set (MNIST's official 60k
training images from ``../shared/data/mnist70k.npz``; Fashion-MNIST's 60k from the Debian package
path), Dirichlet(α) label skew over 20 clients (flwr-datasets, α ∈ {0.1, 0.5, 1.0}) with a 75/25
train/test split per client, and seed: FedACnnL trains the ``cnn`` (32/64 channels, ``label-pca``)
once; each client ``k`` then solves its personalized output layer

    W_k(λ) = (G_k + λI)⁻¹(B_k + λW),  λ = ρ·trace(G_k)/D  (relative rule),

from the output-layer statistics ``(G_k, B_k)`` it already sent (no extra communication); ρ = ∞ is
the global model. Reported per client: test accuracy of the global model and of ``W_k(λ)`` for every
ρ of the sweep, on the client's own test split, and the gain in points.

λ is chosen three ways, and only the first two are honest estimates:

* ``default``: the package default ρ = 0.1, fixed before any measurement (the headline);
* ``validation``: each client holds out 20% of its training rows; the output layer is re-solved
  without every client's held-out rows (the global and the personalized solves are linear in the
  statistics, so this is ``Σ_k(G_k − G_k^val)`` and ``G_k − G_k^val``, exact), each client picks the
  ρ with the best accuracy on its held-out rows (ties go to the larger ρ, i.e. towards the global
  model) and then uses that ρ with its full statistics. The conv layers below were fitted with the
  held-out rows included (their label channels saw those labels), so this selection is close to, not
  exactly, a clean held-out one;
* ``oracle``: the single ρ with the best mean *test* accuracy (reads the test set; an upper bound).

Evaluation of the sweep reuses each client's output-layer inputs (computed once by the trained conv
layers) and runs only the output block of a copy of the network; at the default ρ every client's
count of correct predictions is re-checked through the full ``net.with_weights(...).evaluate(...)``
path and must match exactly.

    python benchmarks/personalization_lambda.py            # MNIST + Fashion-MNIST, 10 runs (~45 min, 2 cores)
    python benchmarks/personalization_lambda.py --quick    # digits, 1 seed, 3 ρ: a smoke run
    python benchmarks/personalization_lambda.py --render   # markdown tables of the saved JSON
    python benchmarks/personalization_lambda.py --plot     # redraw the PNGs from the saved JSON
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

from flwr_analytic.analytic import (
    AnalyticNetwork,
    LayerStatistics,
    Regularization,
    fit_federated,
    personalize,
    personalized_solve,
    ridge_solve,
)
from flwr_analytic.data import (
    ArrayDataset,
    federated_split,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    train_test_indices,
)
from flwr_analytic.models import cnn

LAMBDAS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
QUICK_LAMBDAS = (0.01, 0.1, 1.0)
DEFAULT_LAMBDA = 0.1
INF = "inf"  # the key of ρ = ∞ (the global model) in the per-λ tables
PAPER_CLAIM = {
    "source": "Gu et al., arXiv 2502.06915 (abstract)",
    "claim": "pFedACnnL beats FedACnnL by 4-8% test accuracy",
    "gain_points_low": 4.0,
    "gain_points_high": 8.0,
}


def lam_key(lam: float) -> str:
    """JSON key of a ρ value (``inf`` for the global model)."""
    return INF if math.isinf(lam) else f"{lam:g}"


# --------------------------------------------------------------------------------------- data
def load(name: str, data_dir: str) -> ArrayDataset:
    """The training pool that is split among clients.

    ``mnist``: the 60k official training rows of ``mnist70k.npz`` (``~official_test``);
    ``fashion-mnist``: the 60k official training images (Debian package path or ``data_dir``);
    ``digits``: scikit-learn's 1,797 embedded 8x8 digits (smoke runs).
    """
    if name == "mnist":
        everything = load_mnist(data_dir, "all")
        return everything.subset(np.flatnonzero(~everything.extras["official_test"].astype(bool)))
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, "train")
    if name == "digits":
        return load_digits()
    raise ValueError(f"unknown dataset {name!r}; allowed: mnist, fashion-mnist, digits")


def validation_slices(
    train: list[np.ndarray], fraction: float, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each client's training rows split into ``(fit, validation)``; seeded per client."""
    out = []
    for k, rows in enumerate(train):
        sub_seed = int(np.random.SeedSequence([seed, k, 1]).generate_state(1)[0])
        out.append(train_test_indices(rows, fraction, sub_seed))
    return out


# ----------------------------------------------------------------------------------- metrics
def distribution(correct: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """Sample-weighted mean and the spread over clients of per-client accuracy."""
    acc = correct / counts
    return {
        "weighted": float(correct.sum() / counts.sum()),
        "client_mean": float(acc.mean()),
        "client_std": float(acc.std()),
        "client_min": float(acc.min()),
        "client_p10": float(np.percentile(acc, 10)),
        "client_median": float(np.median(acc)),
    }


def gain(correct: np.ndarray, global_correct: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """Personalized − global, in accuracy points (weighted, and per client)."""
    per_client = 100.0 * (correct - global_correct) / counts
    return {
        "weighted_points": float(100.0 * (correct.sum() - global_correct.sum()) / counts.sum()),
        "client_mean_points": float(per_client.mean()),
        "client_min_points": float(per_client.min()),
        "client_max_points": float(per_client.max()),
        "clients_better": int(np.sum(correct > global_correct)),
        "clients_worse": int(np.sum(correct < global_correct)),
    }


def summarize(correct: np.ndarray, global_correct: np.ndarray, counts: np.ndarray) -> dict:
    """Per-client accuracies, their distribution and the gain over the global model."""
    return {
        "per_client_accuracy": (correct / counts).tolist(),
        "per_client_correct": correct.tolist(),
        **distribution(correct, counts),
        "gain": gain(correct, global_correct, counts),
    }


# ------------------------------------------------------------------------------------- one run
@torch.no_grad()
def head_inputs(net: AnalyticNetwork, x: np.ndarray, batch_size: int) -> torch.Tensor:
    """Input of the output layer for ``x`` (the trained conv stack), batch by batch."""
    last = net.num_layers - 1
    parts = [net.layer_input(last, x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(parts)


class HeadScorer:
    """Counts correct predictions of output-layer weights on cached output-layer inputs.

    Runs the output block of a copy of ``net`` (the same ``nn.Linear`` in the same dtype as the full
    forward pass), so the count equals ``net.with_weights(w).evaluate(x, y)["correct"]`` exactly.
    """

    def __init__(self, net: AnalyticNetwork) -> None:
        self.net = net.with_weights([np.asarray(w) for w in net.weights])  # type: ignore[misc]
        self.last = net.num_layers - 1

    @torch.no_grad()
    def correct(self, inputs: torch.Tensor, y: np.ndarray, w_last: np.ndarray) -> int:
        """Correct predictions of output weights ``w_last`` (D x c) on ``inputs``."""
        self.net.set_layer(self.last, w_last)
        scores = self.net.module.blocks[self.last](inputs)
        return int(np.sum(scores.argmax(1).numpy() == y))


def run_one(data: ArrayDataset, alpha: float, seed: int, args: argparse.Namespace) -> dict:
    """FedACnnL once on a Dirichlet(α) split, then the λ sweep, the λ choices and their accuracies."""
    lambdas = [*args.lambdas, math.inf]
    t_start = time.perf_counter()
    split = federated_split(
        data,
        args.clients,
        "dirichlet",
        alpha=alpha,
        seed=seed,
        min_partition_size=args.min_partition_size,
    )
    arch = cnn(data.input_shape, data.num_classes, tuple(args.channels) if args.channels else None)
    net = AnalyticNetwork(arch, "label-pca", seed=seed, dtype=args.dtype)
    t0 = time.perf_counter()
    fit = fit_federated(net, [(data.x[i], data.y[i]) for i in split.train], args.batch_size)
    fit_seconds = time.perf_counter() - t0
    last = net.num_layers - 1
    stats = [fit.client_statistics[k][last] for k in range(split.num_clients)]
    w_global = np.asarray(net.weights[last])
    scorer = HeadScorer(net)

    # -- test: every client, every λ (the global model is λ = ∞)
    t0 = time.perf_counter()
    counts = np.array([len(t) for t in split.test])
    test_in = [head_inputs(net, data.x[t], args.batch_size) for t in split.test]
    test_y = [data.y[t] for t in split.test]
    test_correct = {lam_key(lam): np.zeros(split.num_clients, dtype=np.int64) for lam in lambdas}
    checked = 0
    for k in range(split.num_clients):
        for lam in lambdas:
            if math.isinf(lam):
                w = w_global
            else:
                full = personalize(net, fit.client_statistics[k], Regularization(lam))
                w = full[last]
            test_correct[lam_key(lam)][k] = scorer.correct(test_in[k], test_y[k], w)
            if lam == DEFAULT_LAMBDA or math.isinf(lam):
                model = net if math.isinf(lam) else net.with_weights(full)
                direct = model.evaluate(data.x[split.test[k]], test_y[k])["correct"]
                if direct != test_correct[lam_key(lam)][k]:
                    raise RuntimeError(
                        f"client {k}, ρ={lam}: cached-input count {test_correct[lam_key(lam)][k]} "
                        f"!= full forward {direct}"
                    )
                checked += 1
    test_seconds = time.perf_counter() - t0

    # -- validation: held-out slice of each client's training rows, its statistics subtracted
    t0 = time.perf_counter()
    slices = validation_slices(split.train, args.val_fraction, seed)
    val_stats = [net.statistics(last, data.x[v], data.y[v], args.batch_size) for _, v in slices]
    fit_stats = [
        LayerStatistics(s.gram - v.gram, s.cross - v.cross, s.count - v.count)
        for s, v in zip(stats, val_stats, strict=True)
    ]
    w_heldout = ridge_solve(
        sum(s.gram for s in fit_stats), sum(s.cross for s in fit_stats), net.output_reg
    )
    val_counts = np.array([len(v) for _, v in slices])
    val_correct = {lam_key(lam): np.zeros(split.num_clients, dtype=np.int64) for lam in lambdas}
    for k, (_, v) in enumerate(slices):
        inputs = head_inputs(net, data.x[v], args.batch_size)
        for lam in lambdas:
            if math.isinf(lam):
                w = w_heldout
            else:
                s = fit_stats[k]
                w = personalized_solve(s.gram, s.cross, w_heldout, Regularization(lam))
            val_correct[lam_key(lam)][k] = scorer.correct(inputs, data.y[v], w)
    val_seconds = time.perf_counter() - t0

    # -- λ choices
    keys = [lam_key(lam) for lam in lambdas]  # ascending, ∞ last: ties go to the larger ρ
    per_client_choice = [
        max(reversed(keys), key=lambda key, k=k: val_correct[key][k])
        for k in range(split.num_clients)
    ]
    shared_choice = max(reversed(keys), key=lambda key: val_correct[key].sum())
    oracle_choice = max(reversed(keys), key=lambda key: test_correct[key].sum())
    chosen = np.array(
        [test_correct[key][k] for k, key in enumerate(per_client_choice)], dtype=np.int64
    )
    glob = test_correct[INF]

    sizes = np.array([len(tr) + len(te) for tr, te in zip(split.train, split.test, strict=True)])
    present = np.array(
        [
            np.count_nonzero(
                np.bincount(data.y[np.concatenate([tr, te])], minlength=data.num_classes)
            )
            for tr, te in zip(split.train, split.test, strict=True)
        ]
    )
    return {
        "dataset": data.name,
        "alpha": alpha,
        "seed": seed,
        "clients": split.num_clients,
        "client_sizes": sizes.tolist(),
        "client_test_counts": counts.tolist(),
        "client_classes_present": present.tolist(),
        "design_dim_output": int(net.design_dim(last)),
        "upload_floats": int(sum(fit.upload_floats)),
        "global": summarize(glob, glob, counts),
        "personalized": {
            key: summarize(test_correct[key], glob, counts) for key in keys if key != INF
        },
        "default": {"lambda": lam_key(DEFAULT_LAMBDA)},
        "validation_per_client": {
            "lambdas": per_client_choice,
            **summarize(chosen, glob, counts),
        },
        "validation_shared": {
            "lambda": shared_choice,
            "validation_accuracy": float(val_correct[shared_choice].sum() / val_counts.sum()),
            **summarize(test_correct[shared_choice], glob, counts),
        },
        "oracle_shared": {
            "lambda": oracle_choice,
            **summarize(test_correct[oracle_choice], glob, counts),
        },
        "validation_accuracy": {
            key: float(val_correct[key].sum() / val_counts.sum()) for key in keys
        },
        "full_forward_checks": checked,
        "seconds": {
            "fit": fit_seconds,
            "test_sweep": test_seconds,
            "validation": val_seconds,
            "total": time.perf_counter() - t_start,
        },
        "peak_rss_gib": peak_rss_gib(),
    }


# ------------------------------------------------------------------------------------ summary
def aggregate(runs: list[dict]) -> list[dict]:
    """Mean and spread over seeds of the headline numbers, per (dataset, α)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["alpha"]), []).append(r)

    def stat(values: list[float]) -> dict[str, float | None]:
        arr = np.asarray(values, dtype=np.float64)
        return {
            "mean": float(arr.mean()),
            "std": float(arr.std(ddof=1)) if len(arr) > 1 else None,
            "min": float(arr.min()),
            "max": float(arr.max()),
        }

    out = []
    for (dataset, alpha), rs in groups.items():
        d = lam_key(DEFAULT_LAMBDA)
        row = {
            "dataset": dataset,
            "alpha": alpha,
            "seeds": [r["seed"] for r in rs],
            "global": stat([r["global"]["weighted"] for r in rs]),
            "global_client_min": stat([r["global"]["client_min"] for r in rs]),
            "default_lambda": d,
            "personalized_default": stat([r["personalized"][d]["weighted"] for r in rs]),
            "personalized_default_client_min": stat(
                [r["personalized"][d]["client_min"] for r in rs]
            ),
            "gain_default_points": stat(
                [r["personalized"][d]["gain"]["weighted_points"] for r in rs]
            ),
            "gain_validation_points": stat(
                [r["validation_per_client"]["gain"]["weighted_points"] for r in rs]
            ),
            "gain_validation_shared_points": stat(
                [r["validation_shared"]["gain"]["weighted_points"] for r in rs]
            ),
            "gain_oracle_points": stat([r["oracle_shared"]["gain"]["weighted_points"] for r in rs]),
            "oracle_lambdas": [r["oracle_shared"]["lambda"] for r in rs],
            "error_removed_default": stat(
                [
                    (r["personalized"][d]["weighted"] - r["global"]["weighted"])
                    / (1.0 - r["global"]["weighted"])
                    for r in rs
                ]
            ),
            "clients_worse_default": sum(r["personalized"][d]["gain"]["clients_worse"] for r in rs),
            "clients_worse_validation": sum(
                r["validation_per_client"]["gain"]["clients_worse"] for r in rs
            ),
            "client_runs": sum(r["clients"] for r in rs),
            "validation_shared_lambdas": [r["validation_shared"]["lambda"] for r in rs],
            "curve": {
                key: stat([r["personalized"][key]["weighted"] for r in rs])
                for key in rs[0]["personalized"]
            },
        }
        out.append(row)
    return out


def fmt_stat(s: dict, scale: float = 100.0, digits: int = 2, sign: bool = False) -> str:
    """``mean ± std`` (std over seeds; omitted for one seed)."""
    mean = f"{s['mean'] * scale:+.{digits}f}" if sign else f"{s['mean'] * scale:.{digits}f}"
    return mean if s["std"] is None else f"{mean} ± {s['std'] * scale:.{digits}f}"


def print_tables(result: dict) -> None:
    """Markdown tables of a result JSON (what the README quotes)."""
    summary = aggregate(result["runs"])
    claim = result["paper_claim"]
    print(
        "| data set | α | seeds | global (FedACnnL) | pFedACnnL ρ=0.1 | gain ρ=0.1 (pts) | "
        "global error removed | gain, ρ by client validation (pts) | gain, oracle ρ (pts) | "
        "clients worse: ρ=0.1 / validation | client min global → ρ=0.1 | "
        f"paper ({claim['source'].split(',')[0]}) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        oracle = ", ".join(sorted(set(s["oracle_lambdas"]), key=float))
        print(
            f"| {s['dataset']} | {s['alpha']:g} | {len(s['seeds'])} | {fmt_stat(s['global'])}% | "
            f"{fmt_stat(s['personalized_default'])}% | "
            f"{fmt_stat(s['gain_default_points'], 1, sign=True)} | "
            f"{fmt_stat(s['error_removed_default'], 100, 0)}% | "
            f"{fmt_stat(s['gain_validation_points'], 1, sign=True)} | "
            f"{fmt_stat(s['gain_oracle_points'], 1, sign=True)} (ρ={oracle}) | "
            f"{s['clients_worse_default']} / {s['clients_worse_validation']} of {s['client_runs']} | "
            f"{s['global_client_min']['mean']:.1%} → "
            f"{s['personalized_default_client_min']['mean']:.1%} | "
            f"+{claim['gain_points_low']:g} to +{claim['gain_points_high']:g} |"
        )
    keys = list(summary[0]["curve"]) if summary else []
    print("\n| data set | α | global | " + " | ".join(f"ρ={k}" for k in keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for s in summary:
        cells = " | ".join(f"{s['curve'][k]['mean']:.2%}" for k in keys)
        print(f"| {s['dataset']} | {s['alpha']:g} | {s['global']['mean']:.2%} | {cells} |")
    print(
        f"\nweighted = sample-weighted mean of per-client test accuracy; ± = std over seeds; "
        f"{result['config']['clients']} clients, cnn {result['config']['channels'] or 'default'} "
        f"label-pca, statistics in {result['config']['dtype']}; total "
        f"{result.get('total_seconds', float('nan')) / 60:.1f} min, peak RSS "
        f"{result.get('peak_rss_gib', float('nan')):.2f} GiB"
    )


# -------------------------------------------------------------------------------------- plots
def plot(result: dict, out: Path) -> list[Path]:
    """(a) weighted accuracy vs ρ per data set and α, with the global line; (b) per-client boxes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = aggregate(result["runs"])
    datasets = list(dict.fromkeys(s["dataset"] for s in summary))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    alphas = sorted({s["alpha"] for s in summary})
    paths = []

    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for s in (s for s in summary if s["dataset"] == dataset):
            color = colors[alphas.index(s["alpha"]) % len(colors)]
            keys = list(s["curve"])
            x = [float(k) for k in keys]
            y = [100 * s["curve"][k]["mean"] for k in keys]
            err = [100 * (s["curve"][k]["std"] or 0.0) for k in keys]
            label = (
                f"α={s['alpha']:g} pFedACnnL ({len(s['seeds'])} seed{'s' * (len(s['seeds']) > 1)})"
            )
            ax.errorbar(x, y, yerr=err, marker="o", ms=3, color=color, label=label, capsize=2)
            ax.axhline(
                100 * s["global"]["mean"],
                color=color,
                ls="--",
                lw=1,
                label=f"α={s['alpha']:g} global",
            )
        ax.axvline(DEFAULT_LAMBDA, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("ρ   (λ = ρ·trace(G_k)/D; ρ → ∞ is the global model)")
        ax.set_ylabel("weighted per-client test accuracy (%)")
        ax.set_title(f"{dataset}: pFedACnnL vs FedACnnL")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out.with_name(f"{out.stem}_accuracy_vs_lambda.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    d = lam_key(DEFAULT_LAMBDA)
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        data, labels, positions = [], [], []
        for i, alpha in enumerate(alphas):
            rs = [r for r in result["runs"] if r["dataset"] == dataset and r["alpha"] == alpha]
            if not rs:
                continue
            for j, (name, values) in enumerate(
                (
                    ("global", [a for r in rs for a in r["global"]["per_client_accuracy"]]),
                    (
                        f"ρ={d}",
                        [a for r in rs for a in r["personalized"][d]["per_client_accuracy"]],
                    ),
                )
            ):
                data.append(100 * np.asarray(values))
                positions.append(3 * i + j)
                labels.append(f"α={alpha:g}\n{name}")
        ax.boxplot(data, positions=positions, widths=0.7, showfliers=False)
        rng = np.random.default_rng(0)
        for pos, values in zip(positions, data, strict=True):
            ax.scatter(
                pos + rng.uniform(-0.18, 0.18, len(values)),
                values,
                s=8,
                alpha=0.6,
                color=colors[0] if pos % 3 == 0 else colors[1],
            )
        ax.set_xticks(positions, labels, fontsize=7)
        ax.set_ylabel("per-client test accuracy (%)")
        ax.set_title(f"{dataset}: per client (all seeds), global vs ρ={d}")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = out.with_name(f"{out.stem}_per_client.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------- main
def jobs(args: argparse.Namespace) -> list[tuple[str, float, int]]:
    """(dataset, α, seed) in run order: every α at the first seed, then the headline's extra seeds."""
    order = []
    for alpha in args.alphas:
        seeds = args.seeds if alpha == args.headline_alpha else args.other_seeds
        for seed in seeds[:1]:
            order.extend((d, alpha, seed) for d in args.datasets)
    for alpha in args.alphas:
        seeds = args.seeds if alpha == args.headline_alpha else args.other_seeds
        for seed in seeds[1:]:
            order.extend((d, alpha, seed) for d in args.datasets)
    return order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_DATA), help="folder of mnist70k.npz")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    parser.add_argument("--headline-alpha", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="headline α")
    parser.add_argument("--other-seeds", type=int, nargs="+", default=[0], help="other α")
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS), help="ρ sweep")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--min-partition-size", type=int, default=50)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="cnn channels")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="digits, 1 seed, 3 ρ: a smoke run")
    parser.add_argument("--out", default=None, help="JSON path (PNGs are written next to it)")
    parser.add_argument("--render", action="store_true", help="only print the tables of --out")
    parser.add_argument("--plot", action="store_true", help="only redraw the PNGs of --out")
    if parser.parse_known_args()[0].quick:  # smoke-run defaults; explicit options still win
        parser.set_defaults(
            datasets=["digits"],
            alphas=[0.1, 1.0],
            seeds=[0],
            other_seeds=[0],
            min_partition_size=10,
            lambdas=list(QUICK_LAMBDAS),
        )
    args = parser.parse_args()
    name = "personalization_lambda_quick.json" if args.quick else "personalization_lambda.json"
    out = Path(args.out) if args.out else RESULTS / name
    if args.render or args.plot:
        result = json.loads(out.read_text())
        if args.render:
            print_tables(result)
        if args.plot:
            for p in plot(result, out):
                print(f"wrote {p}")
        return
    if DEFAULT_LAMBDA not in args.lambdas:
        raise ValueError(f"--lambdas must include the default ρ={DEFAULT_LAMBDA}")
    if any(not (lam > 0 and math.isfinite(lam)) for lam in args.lambdas):
        raise ValueError(
            f"--lambdas must be finite and > 0 (ρ = ∞ is always added), got {args.lambdas}"
        )
    args.lambdas = sorted(set(args.lambdas))
    torch.set_num_threads(args.threads)
    # flwr-datasets warns at every Dirichlet resample that misses --min-partition-size
    warnings.filterwarnings("ignore", message="The specified min_partition_size")

    result: dict = {
        "config": {k: v for k, v in vars(args).items() if k not in ("render", "plot")},
        "environment": environment(),
        "paper_claim": PAPER_CLAIM,
        "protocol": __doc__,
        "runs": [],
    }
    start = time.perf_counter()
    cache: dict[str, ArrayDataset] = {}
    for dataset, alpha, seed in jobs(args):
        if dataset not in cache:
            cache[dataset] = load(dataset, args.data)
        run = run_one(cache[dataset], alpha, seed, args)
        result["runs"].append(run)
        d = lam_key(DEFAULT_LAMBDA)
        print(
            f"{dataset} α={alpha:g} seed {seed}: global {run['global']['weighted']:.4f}, "
            f"ρ={d} {run['personalized'][d]['weighted']:.4f} "
            f"({run['personalized'][d]['gain']['weighted_points']:+.2f} pts), validation-chosen "
            f"{run['validation_per_client']['weighted']:.4f}, oracle ρ={run['oracle_shared']['lambda']} "
            f"{run['oracle_shared']['weighted']:.4f}; fit {run['seconds']['fit']:.0f} s, "
            f"total {run['seconds']['total']:.0f} s",
            flush=True,
        )
        result["total_seconds"] = time.perf_counter() - start
        result["peak_rss_gib"] = peak_rss_gib()
        result["summary"] = aggregate(result["runs"])
        write_json(out, result)
    for p in plot(result, out):
        print(f"wrote {p}")
    print_tables(result)


if __name__ == "__main__":
    main()
