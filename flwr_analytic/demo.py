"""The main job on the embedded default: FedACnnL + pFedACnnL on scikit-learn digits, 20 clients.

Trains the analytic CNN layer by layer from 20 simulated clients' statistics (Dirichlet(0.1) label
skew, 75/25 per-client train/test split), then personalizes every client in closed form, and prints
global vs personalized accuracy per client, a table of both (weighted mean, client mean, min, p10)
and the time taken. Run ``flwr-analytic-demo --help``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from flwr_analytic.analytic import AnalyticNetwork, Regularization, fit_federated, personalize
from flwr_analytic.data import federated_split, load_dataset
from flwr_analytic.models import get_architecture
from flwr_analytic.report import accuracy_table, client_summary


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the demo; returns the headline numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--num-clients", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--scheme", default="label-pca")
    parser.add_argument(
        "--lam", type=float, default=0.1, help="personalization ρ: λ = ρ·trace(G_k)/D"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    data = load_dataset(args.dataset)
    split = federated_split(data, args.num_clients, "dirichlet", alpha=args.alpha, seed=args.seed)
    arch = get_architecture(args.model, data.input_shape, data.num_classes)
    net = AnalyticNetwork(arch, args.scheme, seed=args.seed)
    clients = [(data.x[i], data.y[i]) for i in split.train]
    fit = fit_federated(net, clients)
    train_time = time.perf_counter() - start

    print(
        f"FedACnnL on {args.dataset}: {args.num_clients} clients, Dirichlet({args.alpha}), "
        f"{args.model} ({arch.num_layers} layers, scheme {args.scheme})"
    )
    print(f"{'client':>6} {'train':>6} {'test':>5} {'global':>8} {'personal':>9}")
    reg = Regularization(args.lam)
    totals, rows = np.zeros(3), []
    for k, test in enumerate(split.test):
        if len(test) == 0:
            continue
        glob = net.evaluate(data.x[test], data.y[test])
        own = net.with_weights(personalize(net, fit.client_statistics[k], reg))
        pers = own.evaluate(data.x[test], data.y[test])
        totals += (glob["correct"], pers["correct"], len(test))
        rows.append((glob["accuracy"], pers["accuracy"], len(test)))
        row = f"{k:>6} {len(split.train[k]):>6} {len(test):>5}"
        print(f"{row} {glob['accuracy']:>8.2%} {pers['accuracy']:>9.2%}")
    per_client = np.array(rows, dtype=float)
    evaluation = {
        "num-clients": len(rows),
        **client_summary(per_client[:, 0], per_client[:, 2], "global-accuracy"),
        **client_summary(per_client[:, 1], per_client[:, 2], "personal-accuracy"),
    }
    print()
    print("\n".join(accuracy_table(evaluation)))
    result = {
        "global_accuracy": totals[0] / totals[2],
        "personalized_accuracy": totals[1] / totals[2],
        "train_seconds": train_time,
        "total_seconds": time.perf_counter() - start,
        "upload_floats": float(sum(fit.upload_floats)),
    }
    print_headline(
        result["global_accuracy"],
        result["personalized_accuracy"],
        f"training {train_time:.1f} s ({arch.num_layers} layer rounds, "
        f"{result['upload_floats'] * 8 / 1e6:.1f} MB uploaded in float64); "
        f"total {result['total_seconds']:.1f} s",
    )
    return result


def print_headline(
    global_accuracy: float,
    personalized_accuracy: float,
    cost: str,
    *,
    measure: str = "accuracy",
    personalized: str = "personalized",
) -> None:
    """Print the closing lines of a run: sample-weighted global vs personalized accuracy, then cost.

    Parameters
    ----------
    global_accuracy, personalized_accuracy : float
        Sample-weighted test accuracy of the global and of the personalized models.
    cost : str
        The line printed after the accuracies (time, bytes).
    measure, personalized : str
        How the accuracy and the personalized models are named.

    """
    print(
        f"sample-weighted {measure}: global {global_accuracy:.2%}, "
        f"{personalized} {personalized_accuracy:.2%}"
    )
    print(cost)


def cli() -> None:
    """Console entry point ``flwr-analytic-demo`` (exit status 0 on success)."""
    main()


if __name__ == "__main__":
    cli()
