"""Personalized accuracy of ν-step meta learning vs its peers at an equal local-gradient budget.

Data: the 20-client Dirichlet(0.1) MNIST split shipped with ``mnist70k.npz`` (PFLlib convention,
75/25 train/test per client; set ``FLWR_ANALYTIC_DATA``). Every method uses the same model,
batches of 32, the same seeded client sampling and the same evaluation: each of the 20 clients
fine-tunes the received global model with ``s = 0..S`` SGD steps at rate α on its training split
and is tested on its test split (optionally a fixed seeded subset, ``--test-cap``).

Methods (the rows): ν ∈ {0, 1, 2, 3, 5} in ``exact`` and ``first-order`` mode (ν = 0 is FedAvg,
ν = 1 first-order is Per-FedAvg FO; both are therefore run once), Per-FedAvg HF, FedAvg + FT,
FedProx and pFedMe. Each client spends ``--budget`` gradient-equivalents per round (an exact HVP
counts as 2 gradients, a finite-difference HVP as the 2 gradients it takes), i.e.
``tau = round(budget / cost of one local step)``.

The run uses the package's Flower strategies and ClientApp through an in-process grid (no Ray), so
it is the same code as ``apps/meta``.

    python benchmarks/meta_accuracy.py --rounds 30 --clients-per-round 5 --budget 30 --workers 2

Writes ``benchmarks/results/meta_accuracy.json`` (config, per-method round records of ``Metered``
and a summary) and prints a table with the final and best personalized accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from common import round_rows

RESULTS = Path(__file__).resolve().parent / "results"

#: label -> run-config overrides
METHODS: dict[str, dict[str, Any]] = {
    "fedavg+ft (= nu0)": {"algorithm": "fedavg-ft"},
    "nu1-exact": {"algorithm": "meta", "nu": 1, "mode": "exact"},
    "nu1-fo (= per-fedavg-fo)": {"algorithm": "per-fedavg-fo"},
    "nu2-exact": {"algorithm": "meta", "nu": 2, "mode": "exact"},
    "nu2-fo": {"algorithm": "meta", "nu": 2, "mode": "first-order"},
    "nu3-exact": {"algorithm": "meta", "nu": 3, "mode": "exact"},
    "nu3-fo": {"algorithm": "meta", "nu": 3, "mode": "first-order"},
    "nu5-exact": {"algorithm": "meta", "nu": 5, "mode": "exact"},
    "nu5-fo": {"algorithm": "meta", "nu": 5, "mode": "first-order"},
    "per-fedavg-hf": {"algorithm": "per-fedavg-hf"},
    "fedprox": {"algorithm": "fedprox"},
    "pfedme": {"algorithm": "pfedme"},
}


def run_method(label: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one method in-process and summarize its history."""
    import logging

    import torch
    from flwr.common.logger import FLOWER_LOGGER

    from flwr_analytic.meta.config import local_steps_for, resolve_run_config
    from flwr_analytic.strategies import run_meta_in_process

    FLOWER_LOGGER.setLevel(logging.WARNING)
    torch.set_num_threads(1)
    full = resolve_run_config({**cfg, **METHODS[label]})
    t0 = time.perf_counter()
    _, history = run_meta_in_process(full, num_nodes=20)
    wall = time.perf_counter() - t0
    rows = round_rows(history)  # one row per round from the Metered records
    evals = [(row["round"], row["evaluate"]) for row in rows if row["evaluate"]]
    best_round, best = max(evals, key=lambda e: e[1]["acc"])
    final_round, final = evals[-1]
    ge = [row["train"]["grad-equivalents"] for row in rows]
    return {
        "label": label,
        "overrides": METHODS[label],
        "local-steps": local_steps_for(full["algorithm"], full),
        "grad-equivalents-per-client-round": sum(ge) / len(ge),
        "wall-time-s": wall,
        "final": {"round": final_round, **{k: final[k] for k in _KEYS}},
        "best": {"round": best_round, "acc": best["acc"]},
        "acc-by-round": {r: e["acc"] for r, e in evals},
        "acc-s0-by-round": {r: e["acc-s0"] for r, e in evals},
        "history": history,
    }


_KEYS = (
    "acc",
    "acc-s0",
    "acc-client-mean",
    "acc-client-std",
    "acc-client-min",
    "acc-client-p10",
    "acc-curve",
    "loss",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients-per-round", type=int, default=5)
    parser.add_argument("--budget", type=float, default=30, help="gradient-equivalents/round")
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--finetune-steps", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--test-cap", type=int, default=200, help="test rows per client (0: all)")
    parser.add_argument("--hessian-batches", default="independent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="all", help="comma-separated labels or 'all'")
    parser.add_argument("--workers", type=int, default=2, help="methods run in parallel")
    parser.add_argument("--out", default=str(RESULTS / "meta_accuracy.json"))
    args = parser.parse_args()
    os.environ.setdefault("FLWR_ANALYTIC_DATA", "/work/shared/data")
    labels = list(METHODS) if args.methods == "all" else args.methods.split(",")
    cfg = {
        "dataset": "mnist",
        "partitioner": "precomputed",
        "model": args.model,
        "seed": args.seed,
        "num-server-rounds": args.rounds,
        "fraction-train": args.clients_per_round / 20,
        "fraction-evaluate": 1.0,
        "min-nodes": 2,
        "alpha": args.alpha,
        "beta": args.beta,
        "batch-size": 32,
        "grad-budget": args.budget,
        "hessian-batches": args.hessian_batches,
        "finetune-steps": args.finetune_steps,
        "finetune-batch-size": 32,
        "evaluate-every": args.eval_every,
        "eval-test-cap": args.test_cap,
        "history-path": "",
    }
    t0 = time.perf_counter()
    if args.workers > 1:
        with get_context("spawn").Pool(args.workers) as pool:
            runs = pool.starmap(run_method, [(label, cfg) for label in labels])
    else:
        runs = [run_method(label, cfg) for label in labels]
    total = time.perf_counter() - t0

    by = {r["label"]: r for r in runs}
    verdict = {}
    nu1 = {"exact": by.get("nu1-exact"), "first-order": by.get("nu1-fo (= per-fedavg-fo)")}
    for mode, tag in (("exact", "exact"), ("first-order", "fo")):
        if nu1[mode] is None:
            continue
        base = nu1[mode]
        for nu in (2, 3, 5):
            r = by.get(f"nu{nu}-{tag}")
            if r is not None:
                verdict[f"nu{nu}-{tag} vs nu1-{tag}"] = {
                    "final": r["final"]["acc"] - base["final"]["acc"],
                    "best": r["best"]["acc"] - base["best"]["acc"],
                    "beats_final": r["final"]["acc"] > base["final"]["acc"],
                }
    result = {
        "config": {**cfg, "methods": labels, "total-wall-time-s": total, "workers": args.workers},
        "runs": runs,
        "nu_gt_1_vs_nu_1": verdict,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    s = args.finetune_steps
    print(
        f"MNIST 20 clients Dirichlet(0.1), {args.model}, {args.rounds} rounds, "
        f"{args.clients_per_round} clients/round, budget {args.budget:g} grad-eq/client/round, "
        f"alpha={args.alpha} beta={args.beta}, S={s}, test cap {args.test_cap}"
    )
    print(
        f"{'method':<26}{'tau':>4}{'ge':>6}{'acc s=0':>9}{f'acc s={s}':>9}{'best':>8}"
        f"{'cl-mean':>9}{'cl-std':>8}{'cl-min':>8}{'cl-p10':>8}{'time s':>8}"
    )
    for r in runs:
        f = r["final"]
        print(
            f"{r['label']:<26}{r['local-steps']:>4}{r['grad-equivalents-per-client-round']:>6.0f}"
            f"{f['acc-s0']:>9.4f}{f['acc']:>9.4f}{r['best']['acc']:>8.4f}"
            f"{f['acc-client-mean']:>9.4f}{f['acc-client-std']:>8.4f}{f['acc-client-min']:>8.4f}"
            f"{f['acc-client-p10']:>8.4f}{r['wall-time-s']:>8.1f}"
        )
    for key, v in verdict.items():
        print(
            f"{key}: final {v['final']:+.4f}, best {v['best']:+.4f} -> "
            f"{'beats' if v['beats_final'] else 'does not beat'} nu=1 (final round)"
        )
    print(f"total {total:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
