"""Time to accuracy: FedACnnL / pFedACnnL against gradient-based federated learning, through Flower.

Claim under test (Gu et al., arXiv 2502.06915): analytic federated learning cuts training time by
83-99% against conventional federated learning. Every method runs through Flower's simulation engine
(``flwr.simulation.run_simulation``, Ray, 20 SuperNodes, one CPU per client) on the same 20-client
split and trains the same CNN (``cnn``: conv 32 → conv 64 → linear, 5x5 kernels, 2x2 max-pool):

- ``fedacnnl``: the package's FedACnnL strategy and ClientApp (one round per layer, label-pca hidden
  targets, statistics in float32 with float64 sums); it reports the global model's and the clients'
  pFedACnnL models' accuracy (``W_k = (G_k + λI)⁻¹(B_k + λW)``, λ = 0.1 relative).
- ``fedavg`` (global = FedAvg, personalized = FedAvg + fine-tuning), ``fedprox``, ``per-fedavg-fo``,
  ``nu2-exact`` (ν-step meta FL, ν = 2, exact meta-gradient; Jamali et al., arXiv 2504.21327) and
  ``pfedme``: the package's meta app (one ClientApp for all), each client spending the same budget of
  gradient-equivalents per round, a quarter of the clients sampled per round. Their global accuracy is
  the received model's; their personalized accuracy is after ``finetune-steps`` SGD steps on the
  client's training split (the protocol of Per-FedAvg).

Data: MNIST with the 20-client Dirichlet(0.1) split stored in ``../shared/data/mnist70k.npz``, and
Fashion-MNIST (the Debian package's official IDX files) split by flwr-datasets' Dirichlet(0.1)
partitioner, and CIFAR-10 (``../shared/data/cifar10_20k.npz``, all 20k images, the same
Dirichlet(0.1) partitioner; ``--datasets cifar10``); 75/25 train/test per client. Time is
*training* time: the sum of the training rounds'
server-side wall time (configure → replies → aggregate; Ray start-up and evaluation rounds are
excluded and reported separately). The time-reduction ratio is ``1 - t_analytic / t_gradient`` where
``t_gradient`` is the training time a gradient method needed to reach the analytic method's accuracy
(a lower bound ``> 1 - t_analytic / t_budget`` when it never did within its budget).

    python benchmarks/time_to_accuracy.py            # headline: both data sets, FedAvg + FedProx, 300 rounds
    python benchmarks/time_to_accuracy.py --methods fedavg fedprox per-fedavg-fo nu2-exact pfedme \
        --rounds 30 --evaluate-every 5 --eval-test-cap 100 --out benchmarks/results/time_to_accuracy_r30.json
                                                     # screening run of all five gradient methods
    python benchmarks/time_to_accuracy.py --datasets mnist --seeds 0 --methods fedprox --rounds 900 \
        --evaluate-every 50 --out benchmarks/results/time_to_accuracy_long.json  # longer FedProx
    python benchmarks/time_to_accuracy.py --datasets cifar10 --seeds 0 \
        --out benchmarks/results/time_to_accuracy_cifar10.json       # the CIFAR-10 row
    python benchmarks/time_to_accuracy.py --quick    # digits smoke test (~2 min)
    python benchmarks/time_to_accuracy.py --render   # tables from the JSON

Writes ``benchmarks/results/time_to_accuracy.json`` and ``time_to_accuracy_<dataset>.png``. Run it
under ``flock /tmp/flwr-analytic-cpu.lock`` on shared machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, SHARED_DATA, environment, round_rows, write_json

#: gradient methods: label -> meta-app run-config overrides
GRADIENT_METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {"algorithm": "fedavg-ft"},
    "fedprox": {"algorithm": "fedprox"},
    "per-fedavg-fo": {"algorithm": "per-fedavg-fo"},
    "nu2-exact": {"algorithm": "meta", "nu": 2, "mode": "exact"},
    "pfedme": {"algorithm": "pfedme"},
}
#: local files of the data sets that are not searched for (``""``: the loaders' search)
DATA_FILES = {
    "mnist": str(SHARED_DATA / "mnist70k.npz"),
    "cifar10": str(SHARED_DATA / "cifar10_20k.npz"),
}
#: accuracy levels whose time to reach is tabulated (plus the analytic method's own accuracies)
LEVELS = (0.80, 0.90, 0.95, 0.97, 0.98, 0.99)


def dataset_config(dataset: str, seed: int, quick: bool) -> dict[str, Any]:
    """Run-config keys shared by the FedACnnL and meta apps for ``dataset``."""
    if quick or dataset == "digits":
        return {
            "dataset": "digits",
            "partitioner": "dirichlet",
            "dirichlet-alpha": 0.5,
            "min-partition-size": 10,
            "test-fraction": 0.25,
            "seed": seed,
        }
    if dataset == "mnist":
        return {
            "dataset": "mnist",
            "partitioner": "precomputed",
            "test-fraction": 0.25,
            "seed": seed,
        }
    if dataset == "fashion-mnist":
        return {
            "dataset": "fashion-mnist",
            "partitioner": "dirichlet",
            "dirichlet-alpha": 0.1,
            "min-partition-size": 20,
            "test-fraction": 0.25,
            "seed": seed,
        }
    if dataset == "cifar10":  # cifar10_20k.npz has no official split: partition all 20k images
        return {
            "dataset": "cifar10",
            "data-split": "all",
            "partitioner": "dirichlet",
            "dirichlet-alpha": 0.1,
            "min-partition-size": 20,
            "test-fraction": 0.25,
            "seed": seed,
        }
    raise ValueError(f"unknown dataset {dataset!r}; allowed: mnist, fashion-mnist, cifar10, digits")


# ------------------------------------------------------------------------- one run (subprocess)
def _flower_env(home: str) -> None:
    os.environ.update(
        FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_HOME=home
    )


def run_fedacnnl(spec: dict[str, Any], tmp: str) -> dict[str, Any]:
    """FedACnnL + pFedACnnL through ``run_simulation``; the strategy's per-round records."""
    from flwr.simulation import run_simulation

    from flwr_analytic.clients import make_fedacnnl_client_app
    from flwr_analytic.strategies import make_fedacnnl_server_app

    path = Path(tmp) / "fedacnnl.json"
    cfg = {
        **spec["data"],
        "model": "cnn",
        "scheme": "label-pca",
        "dtype": "float32",
        "lam": spec["lam"],
        "min-nodes": spec["num-clients"],
        "client-threads": 1,
        "data-path": spec.get("data-path", ""),
        "results-path": str(path),
    }
    t0 = time.perf_counter()
    run_simulation(
        server_app=make_fedacnnl_server_app(cfg),
        client_app=make_fedacnnl_client_app(run_config=cfg),
        num_supernodes=spec["num-clients"],
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    wall = time.perf_counter() - t0
    summary = json.loads(path.read_text())
    train = [r for r in summary["rounds"] if r["kind"] == "train"]
    evals = [r for r in summary["rounds"] if r["kind"] == "evaluate"]
    ev = summary["evaluate"]
    return {
        "method": "fedacnnl",
        "run-config": cfg,
        "wall-time": wall,
        "train-time": float(sum(r["round-time"] for r in train)),
        "eval-time": float(sum(r["round-time"] for r in evals)),
        "bytes-sent": int(sum(r["bytes-sent"] for r in train)),
        "bytes-received": int(sum(r["bytes-received"] for r in train)),
        "rounds": len(train),
        "global-accuracy": ev["global-accuracy"],
        "personal-accuracy": ev["personal-accuracy"],
        "global-accuracy-clients": ev["global-accuracy-clients"],
        "personal-accuracy-clients": ev["personal-accuracy-clients"],
        "client-ids": ev["client-ids"],
        "history": summary["rounds"],
    }


def run_gradient(spec: dict[str, Any], tmp: str) -> dict[str, Any]:
    """One gradient method through ``run_simulation``; accuracy after every evaluated round."""
    from flwr.simulation import run_simulation

    from flwr_analytic.clients import make_meta_client_app
    from flwr_analytic.strategies import make_meta_server_app

    path = Path(tmp) / "meta.json"
    cfg = {
        **spec["data"],
        **GRADIENT_METHODS[spec["method"]],
        "model": "cnn",
        "num-server-rounds": spec["rounds"],
        "fraction-train": spec["fraction-train"],
        "fraction-evaluate": 1.0,
        "min-nodes": 2,
        "grad-budget": spec["grad-budget"],
        "alpha": spec["alpha"],
        "beta": spec["beta"],
        "batch-size": 32,
        "finetune-steps": spec["finetune-steps"],
        "evaluate-every": spec["evaluate-every"],
        "eval-test-cap": spec["eval-test-cap"],
        "history-path": str(path),
    }
    t0 = time.perf_counter()
    run_simulation(
        server_app=make_meta_server_app(cfg),
        client_app=make_meta_client_app(cfg),
        num_supernodes=spec["num-clients"],
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    wall = time.perf_counter() - t0
    history = json.loads(path.read_text())["history"]
    return {
        "method": spec["method"],
        "run-config": cfg,
        "wall-time": wall,
        **gradient_curve(history),
        "history": history,
    }


def gradient_curve(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Training time, bytes and accuracy after every evaluated round of a gradient method's run.

    ``history`` is the meta app's (``history-path``): ``Metered`` round records, or the
    one-dict-per-round history of older result files (:func:`common.round_rows` reads both).
    ``train-time`` sums the training halves of the rounds; ``bytes-sent`` / ``bytes-received``
    are the training rounds' (as for FedACnnL); each curve point holds the training time and bytes
    so far and the evaluated global (``acc-s0``) and personalized (``acc``) accuracy.
    """
    t_train, sent, received, eval_time, curve = 0.0, 0, 0, 0.0, []
    rows = round_rows(history)
    for row in rows:
        t_train += row["train-time"]
        sent += row["bytes-sent"]
        received += row["bytes-received"]
        if row["evaluate"]:
            eval_time += row["evaluate-time"]
            curve.append(
                {
                    "round": row["round"],
                    "train-time": t_train,
                    "bytes": sent + received,
                    "global-accuracy": row["evaluate"]["acc-s0"],
                    "personal-accuracy": row["evaluate"]["acc"],
                }
            )
    return {
        "train-time": t_train,
        "eval-time": eval_time,
        "bytes-sent": sent,
        "bytes-received": received,
        "rounds": len(rows),
        "curve": curve,
    }


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec`` in this process (called in a fresh subprocess per run)."""
    import resource

    with tempfile.TemporaryDirectory() as tmp:
        _flower_env(str(Path(tmp) / "flwr_home"))
        os.environ["FLWR_ANALYTIC_DATA"] = str(SHARED_DATA)
        if spec["method"] == "fedacnnl":
            out = run_fedacnnl(spec, tmp)
        else:
            out = run_gradient(spec, tmp)
    out["dataset"] = spec["data"]["dataset"]
    out["seed"] = spec["data"]["seed"]
    out["peak-rss-gib-driver"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["peak-rss-gib-children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return out


def launch(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec`` in a fresh Python process (a clean Ray and memory record per run)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, __file__, "--run", json.dumps(spec), "--run-out", out.name]
        print(
            f"--- {spec['data']['dataset']} seed {spec['data']['seed']}: {spec['method']}",
            flush=True,
        )
        subprocess.run(cmd, check=True, cwd=Path(__file__).parent)
        return json.loads(Path(out.name).read_text())


# ------------------------------------------------------------------------------------ analysis
def run_bytes(run: dict[str, Any]) -> int:
    """Training bytes sent + received of a run (``bytes-down`` / ``bytes-up`` in older files)."""
    sent = run.get("bytes-sent", run.get("bytes-down", 0))
    return int(sent) + int(run.get("bytes-received", run.get("bytes-up", 0)))


def time_to(curve: list[dict[str, Any]], key: str, level: float) -> float | None:
    """Training time of the first evaluated round whose ``key`` accuracy is >= ``level``."""
    for point in curve:
        if point[key] >= level:
            return float(point["train-time"])
    return None


def reduction(t_analytic: float, t_gradient: float | None, budget: float) -> dict[str, Any]:
    """``1 - t_analytic / t_gradient``; a lower bound from the budget when the level was not reached."""
    if t_gradient is None:
        return {"reached": False, "reduction": 1.0 - t_analytic / budget, "bound": "lower"}
    return {"reached": True, "reduction": 1.0 - t_analytic / t_gradient, "bound": "exact"}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per data set: analytic headline (mean ± std over seeds), gradient best/final/time-to-level."""
    out: dict[str, Any] = {}
    for dataset in sorted({r["dataset"] for r in runs}):
        ana = [r for r in runs if r["dataset"] == dataset and r["method"] == "fedacnnl"]
        ref = min(ana, key=lambda r: r["seed"])  # the seed the gradient methods share
        headline = {}
        for key in ("global-accuracy", "personal-accuracy", "train-time", "wall-time"):
            values = np.array([r[key] for r in ana], dtype=float)
            headline[key] = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                "values": values.tolist(),
                "seeds": [r["seed"] for r in ana],
            }
        methods = {}
        for r in runs:
            if r["dataset"] != dataset or r["method"] == "fedacnnl":
                continue
            curve = r["curve"]
            row: dict[str, Any] = {
                "seed": r["seed"],
                "train-time": r["train-time"],
                "wall-time": r["wall-time"],
                "rounds": r["rounds"],
                "bytes": run_bytes(r),
                "best-personal": max(p["personal-accuracy"] for p in curve),
                "best-global": max(p["global-accuracy"] for p in curve),
                "final-personal": curve[-1]["personal-accuracy"],
                "final-global": curve[-1]["global-accuracy"],
                "time-to-personal": {
                    f"{lv:.2f}": time_to(curve, "personal-accuracy", lv) for lv in LEVELS
                },
                "time-to-global": {
                    f"{lv:.2f}": time_to(curve, "global-accuracy", lv) for lv in LEVELS
                },
            }
            t_p = time_to(curve, "personal-accuracy", ref["personal-accuracy"])
            t_g = time_to(curve, "global-accuracy", ref["global-accuracy"])
            row["time-to-analytic-personal"] = t_p
            row["time-to-analytic-global"] = t_g
            row["reduction-personal"] = reduction(ref["train-time"], t_p, r["train-time"])
            row["reduction-global"] = reduction(ref["train-time"], t_g, r["train-time"])
            methods[r["method"]] = row
        best = None
        reached = {m: v for m, v in methods.items() if v["time-to-analytic-personal"] is not None}
        if reached:
            best = min(reached, key=lambda m: reached[m]["time-to-analytic-personal"])
        out[dataset] = {
            "analytic": headline,
            "analytic-reference-seed": ref["seed"],
            "analytic-reference": {
                **{k: ref[k] for k in ("global-accuracy", "personal-accuracy", "train-time")},
                "bytes-sent": int(ref.get("bytes-sent", ref.get("bytes-down", 0))),
                "bytes-received": int(ref.get("bytes-received", ref.get("bytes-up", 0))),
            },
            "gradient": methods,
            "fastest-gradient-to-analytic-personal": best,
        }
    return out


# ---------------------------------------------------------------------------------- reporting
def plot(payload: dict[str, Any], out: Path) -> list[str]:
    """One PNG per data set (``<out stem>_<dataset>.png``): accuracy vs training time and vs bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    runs = payload["runs"]
    for dataset in sorted({r["dataset"] for r in runs}):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for r in runs:
            if r["dataset"] != dataset:
                continue
            if r["method"] == "fedacnnl":
                mb = run_bytes(r) / 1e6
                for ax, x in zip(axes, (r["train-time"], mb)):
                    ax.scatter(
                        [x],
                        [r["personal-accuracy"]],
                        marker="*",
                        s=160,
                        color="k",
                        label="pFedACnnL" if r["seed"] == 0 else None,
                        zorder=5,
                    )
                    ax.scatter(
                        [x],
                        [r["global-accuracy"]],
                        marker="D",
                        s=60,
                        color="gray",
                        label="FedACnnL (global)" if r["seed"] == 0 else None,
                        zorder=5,
                    )
                continue
            t = [p["train-time"] for p in r["curve"]]
            b = [p["bytes"] / 1e6 for p in r["curve"]]
            pa = [p["personal-accuracy"] for p in r["curve"]]
            ga = [p["global-accuracy"] for p in r["curve"]]
            for ax, x in zip(axes, (t, b)):
                (line,) = ax.plot(x, pa, marker="o", ms=3, label=f"{r['method']} (personalized)")
                ax.plot(x, ga, ls="--", color=line.get_color(), alpha=0.6)
        for ax, xlabel in zip(axes, ("training time (s)", "bytes sent + received (MB)")):
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy (solid: personalized, dashed: global)")
            ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, loc="lower right")
        fig.suptitle(
            f"Time to accuracy on {dataset} (20 clients, Dirichlet 0.1, Flower simulation)"
        )
        fig.tight_layout()
        path = out.parent / f"{out.stem}_{dataset}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _reach(t: float | None, red: dict[str, Any], budget: float) -> str:
    """Table cell: time to reach a level and the time reduction (a lower bound when not reached)."""
    if red["reached"]:
        return f"{t:.1f} s ({100 * red['reduction']:.1f}%)"
    if red["reduction"] > 0:
        return f"not reached in {budget:.0f} s (> {100 * red['reduction']:.1f}%)"
    return f"not reached in {budget:.0f} s (unsettled)"


def render(payload: dict[str, Any]) -> str:
    """Markdown tables of the summary (used by the README generator)."""
    lines = []
    for dataset, s in payload["summary"].items():
        a = s["analytic"]
        ref = s["analytic-reference"]
        lines.append(
            f"**{dataset}** — FedACnnL over {len(a['train-time']['values'])} seeds: global "
            f"{_pct(a['global-accuracy']['mean'])} ± {_pct(a['global-accuracy']['std'])}%, "
            f"pFedACnnL {_pct(a['personal-accuracy']['mean'])} ± "
            f"{_pct(a['personal-accuracy']['std'])}%, training "
            f"{a['train-time']['mean']:.1f} ± {a['train-time']['std']:.1f} s "
            f"({run_bytes(ref) / 1e6:.1f} MB)."
        )
        lines.append("")
        lines.append(
            "| method | best global % | best personalized % | final personalized % | "
            "training s | MB | to FedACnnL's global accuracy: time (reduction) | "
            "to pFedACnnL's personalized accuracy: time (reduction) |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        lines.append(
            f"| FedACnnL / pFedACnnL (seed {s['analytic-reference-seed']}) | "
            f"{_pct(ref['global-accuracy'])} | {_pct(ref['personal-accuracy'])} | "
            f"{_pct(ref['personal-accuracy'])} | {ref['train-time']:.1f} | "
            f"{run_bytes(ref) / 1e6:.1f} | — | — |"
        )
        for m, row in s["gradient"].items():
            cells = [
                _reach(row[f"time-to-analytic-{kind}"], row[f"reduction-{kind}"], row["train-time"])
                for kind in ("global", "personal")
            ]
            lines.append(
                f"| {m} ({row['rounds']} rounds) | {_pct(row['best-global'])} | "
                f"{_pct(row['best-personal'])} | {_pct(row['final-personal'])} | "
                f"{row['train-time']:.1f} | {row['bytes'] / 1e6:.1f} | {cells[0]} | {cells[1]} |"
            )
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0, 1, 2],
        help="FedACnnL seeds (the gradient methods run the first seed)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["fedavg", "fedprox"],
        choices=list(GRADIENT_METHODS),
        help="gradient methods (default: the two leaders of the 30-round screening run)",
    )
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--fraction-train", type=float, default=0.25)
    parser.add_argument("--grad-budget", type=float, default=10)
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.02,
        help="inner / fine-tuning rate (the better of the meta benchmark's settings)",
    )
    parser.add_argument("--beta", type=float, default=0.1, help="outer / local SGD rate")
    parser.add_argument("--finetune-steps", type=int, default=5)
    parser.add_argument("--evaluate-every", type=int, default=20)
    parser.add_argument(
        "--eval-test-cap",
        type=int,
        default=0,
        help="score at most this many test rows per client (0: all, like the analytic method)",
    )
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument(
        "--quick", action="store_true", help="digits (10 clients, Dirichlet 0.5), 1 seed, 3 methods"
    )
    parser.add_argument("--render", action="store_true", help="print the tables from --out")
    parser.add_argument("--out", default=str(RESULTS / "time_to_accuracy.json"))
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--run-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.run:  # child process: one run
        Path(args.run_out).write_text(json.dumps(run_one(json.loads(args.run))))
        return None
    if args.render:
        print(render(json.loads(Path(args.out).read_text())))
        return None
    if args.quick:
        args.datasets, args.seeds = ["digits"], [0]
        args.methods = ["fedavg", "per-fedavg-fo", "nu2-exact"]
        args.rounds, args.evaluate_every, args.eval_test_cap = 6, 2, 0
    config = {k: v for k, v in vars(args).items() if k not in ("run", "run_out", "render")}
    num_clients = 10 if args.quick else 20
    config["num-clients"] = num_clients
    config["command"] = "python benchmarks/time_to_accuracy.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    t0 = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for dataset in args.datasets:
        for seed in args.seeds:
            spec = {
                "method": "fedacnnl",
                "data": dataset_config(dataset, seed, args.quick),
                "num-clients": num_clients,
                "lam": args.lam,
                "data-path": DATA_FILES.get(dataset, ""),
            }
            runs.append(launch(spec))
            save(runs, config, out, t0, complete=False)
            print(
                f"    global {runs[-1]['global-accuracy']:.4f} personal "
                f"{runs[-1]['personal-accuracy']:.4f} train {runs[-1]['train-time']:.1f} s",
                flush=True,
            )
        for method in args.methods:
            spec = {
                "method": method,
                "data": dataset_config(dataset, args.seeds[0], args.quick),
                "num-clients": num_clients,
                "rounds": args.rounds,
                "fraction-train": args.fraction_train,
                "grad-budget": args.grad_budget,
                "alpha": args.alpha,
                "beta": args.beta,
                "finetune-steps": args.finetune_steps,
                "evaluate-every": args.evaluate_every,
                "eval-test-cap": args.eval_test_cap,
            }
            runs.append(launch(spec))
            save(runs, config, out, t0, complete=False)
            last = runs[-1]["curve"][-1]
            print(
                f"    final global {last['global-accuracy']:.4f} personal "
                f"{last['personal-accuracy']:.4f} train {runs[-1]['train-time']:.1f} s",
                flush=True,
            )
    payload = save(runs, config, out, t0, complete=True)
    payload["plots"] = plot(payload, out)
    write_json(out, payload)
    print(render(payload))
    print(f"saved {out}")
    return payload


def save(
    runs: list[dict[str, Any]], config: dict[str, Any], out: Path, t0: float, complete: bool
) -> dict[str, Any]:
    """Write what has been measured so far (after every run, so an interrupted run keeps it)."""
    payload = {
        "config": config,
        "environment": environment(),
        "runs": runs,
        "summary": summarize(runs),
        "total-time": time.perf_counter() - t0,
        "complete": complete,
    }
    write_json(out, payload)
    return payload


if __name__ == "__main__":
    main()
