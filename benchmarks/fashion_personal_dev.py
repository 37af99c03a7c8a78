"""Where Fashion-MNIST's personalized accuracy stops: every λ rule on a development split and on test.

The app's split (official 60k training images, flwr-datasets Dirichlet(0.1), 20 clients,
``min-partition-size`` 20, per-client 25% test; ``natural_images.fashion_federated``) and the
``FASHION_RECIPE`` network, its hidden layer fitted on the pooled client training rows (the statistics
are sums: federated = centralized). The head rows are computed once; then, for two protocols,

- ``dev``: each client's training rows cut 80/20 (seeded, ``100 + k``); the global head and the
  personalized heads are fitted on the 80%, scored on the 20%; test data never used;
- ``test``: fitted on all training rows, scored on the clients' test rows (the README's protocol),

the global head (standardized γ) and pFedACnnL ``W_k = W + (G_k + Λ)⁻¹(B_k − G_kW)`` for fixed ρ under
the ``standardized`` and ``relative`` rules, ``personal-lambda = "auto"`` (exact leave-one-out,
:func:`~flwr_analytic.analytic.personal_lambda.select_lambda`), and the per-client oracle: every
client's best of all these rows (the global head, every fixed ρ and auto λ), counted on the very rows
it is scored on. The oracle is a bound for any per-client choice among these, not a method.

    python benchmarks/fashion_personal_dev.py
    python benchmarks/fashion_personal_dev.py --render
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from common import environment, out_or_render, peak_rss_gib, write_json
from natural_images import FASHION_RECIPE, fit_hidden

from flwr_analytic.analytic import AnalyticNetwork, Regularization
from flwr_analytic.analytic.personal_lambda import global_leverage, select_lambda
from flwr_analytic.analytic.solvers import personalized_solve, ridge_solve
from flwr_analytic.analytic.statistics import LayerStatistics
from flwr_analytic.analytic.targets import TargetScheme, one_hot
from flwr_analytic.fedacnnl import resolve_run_config
from flwr_analytic.fedacnnl.data import load_cached_dataset, split_from_config
from flwr_analytic.models import coates

#: The app's Fashion-MNIST split (``natural_images.fashion_federated``).
SPLIT = {
    "dataset": "fashion-mnist",
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.1,
    "min-partition-size": 20,
    "test-fraction": 0.25,
}
#: (rule, ρ) of the fixed-λ rows.
FIXED = tuple(("standardized", r) for r in (0.1, 0.3, 1.0, 3.0, 10.0)) + tuple(
    ("relative", r) for r in (0.1, 1.0)
)


def head_rows(net: AnalyticNetwork, x: np.ndarray) -> np.ndarray:
    """The head's design rows ``[h(x), 1]`` of ``x`` (float32, bias column last)."""
    last = net.num_layers - 1
    out = np.ones((len(x), net.design_dim(last)), dtype=np.float32)
    for i in range(0, len(x), 500):
        out[i : i + 500, :-1] = net.design_rows(last, x[i : i + 500])[:, 0, :].float().numpy()
    return out


def recipe_rows() -> tuple[np.ndarray, np.ndarray, Any, float]:
    """``(rows, y, split, seconds)``: the head rows of all 60k training images, the app's split.

    The ``FASHION_RECIPE`` network's hidden layer is fitted on the pooled client training rows
    (sums: federated = centralized); ``seconds`` covers that fit and the rows.
    """
    data = load_cached_dataset("fashion-mnist", "", "train")
    split = split_from_config(resolve_run_config(SPLIT), 20)
    pooled = np.concatenate(split.train)
    t0 = time.perf_counter()
    net = AnalyticNetwork(
        coates(
            data.x.shape[1:], 10, filters=FASHION_RECIPE["filters"], grid=FASHION_RECIPE["grid"]
        ),
        TargetScheme(
            "zca-kmeans", threshold=FASHION_RECIPE["threshold"], polarity=FASHION_RECIPE["polarity"]
        ),
        output_reg=Regularization(FASHION_RECIPE["gamma"], "standardized"),
        dtype="float32",
    )
    fit_hidden(net, data.x[pooled], data.y[pooled], 100)
    return head_rows(net, data.x), data.y, split, time.perf_counter() - t0


def protocol(split, kind: str) -> tuple[list, list]:
    """Every client's (fit, score) indices: ``dev`` cuts its training rows 80/20, ``test`` uses both."""
    if kind == "test":
        return list(split.train), list(split.test)
    fits, scores = [], []
    for k, idx in enumerate(split.train):
        perm = np.random.default_rng(100 + k).permutation(len(idx))
        cut = int(round(0.8 * len(idx)))
        fits.append(np.sort(idx[perm[:cut]]))
        scores.append(np.sort(idx[perm[cut:]]))
    return fits, scores


def evaluate(rows: np.ndarray, y: np.ndarray, fits: list, scores: list) -> dict:
    """Correct counts per client of the global head, every fixed ρ, auto λ; and their oracle."""
    design = [rows[i].astype(np.float64) for i in fits]
    grams = [a.T @ a for a in design]
    crosses = [a.T @ one_hot(y[i], 10) for a, i in zip(design, fits, strict=True)]
    gram, cross = sum(grams), sum(crosses)
    reg = Regularization(FASHION_RECIPE["gamma"], "standardized")
    w = ridge_solve(gram, cross, reg)
    leverage = global_leverage(LayerStatistics(gram, cross, int(gram[-1, -1])), reg)
    held = [(rows[i].astype(np.float64), y[i]) for i in scores]
    correct: dict[str, list[int]] = {
        "global": [int(((a @ w).argmax(1) == t).sum()) for a, t in held]
    }
    for rule, rho in FIXED:
        correct[f"{rule} {rho:g}"] = [
            int(((a @ personalized_solve(g, b, w, Regularization(rho, rule))).argmax(1) == t).sum())
            for (a, t), g, b in zip(held, grams, crosses, strict=True)
        ]
    auto, chosen = [], []
    for a, i, g, b, (s, t) in zip(design, fits, grams, crosses, held, strict=True):
        choice = select_lambda(a, y[i], w, rule="standardized", gram=g, cross=b, leverage=leverage)
        auto.append(int(((s @ choice.weights).argmax(1) == t).sum()))
        chosen.append(choice.rho)
    correct["auto (standardized)"] = auto
    n = [len(t) for _, t in held]
    best = np.max(np.array(list(correct.values())), axis=0)
    return {
        "num-examples": n,
        "accuracy": {key: sum(v) / sum(n) for key, v in correct.items()},
        "oracle": float(best.sum() / sum(n)),
        "per_client": correct,
        "auto_rho": chosen,
        "global_leverage": leverage,
    }


def render(result: dict) -> str:
    """The dev and test accuracy of every row, and the oracle, as a markdown table."""
    dev, test = result["dev"], result["test"]
    out = [
        "| head | development split (80/20 of each client's training rows) | test |",
        "|---|---|---|",
    ]
    for key in dev["accuracy"]:
        mark = " ← best fixed on dev" if key == result["dev_choice"] else ""
        out.append(
            f"| {key}{mark} | {100 * dev['accuracy'][key]:.2f}% | {100 * test['accuracy'][key]:.2f}% |"
        )
    out.append(
        f"| per-client oracle (best of the rows above, on the scored rows) | "
        f"{100 * dev['oracle']:.2f}% | {100 * test['oracle']:.2f}% |"
    )
    out += [
        "",
        f"{sum(dev['num-examples'])} development and {sum(test['num-examples'])} test rows; "
        f"features {result['feature_seconds']:.0f} s, peak {result['peak_rss_gib']:.1f} GiB.",
    ]
    return "\n".join(out)


def main() -> None:
    out = out_or_render(__doc__, "fashion_personal_dev.json", render)
    if out is None:
        return
    torch.set_num_threads(2)
    rows, y, split, seconds = recipe_rows()
    result = {"environment": environment(), "protocol": __doc__, "recipe": FASHION_RECIPE}
    result["feature_seconds"] = seconds
    for kind in ("dev", "test"):
        result[kind] = evaluate(rows, y, *protocol(split, kind))
        print(f"  {kind}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in result[kind]["accuracy"].items()
        ) + f", oracle {result[kind]['oracle']:.4f}", flush=True)  # fmt: skip
    fixed = [k for k in result["dev"]["accuracy"] if k not in ("global", "auto (standardized)")]
    result["dev_choice"] = max(fixed, key=lambda k: result["dev"]["accuracy"][k])
    result["peak_rss_gib"] = peak_rss_gib()
    result["command"] = "python benchmarks/fashion_personal_dev.py"
    write_json(out, result)
    print(render(result))


if __name__ == "__main__":
    main()
