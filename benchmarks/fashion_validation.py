"""How the Fashion-MNIST ``coates`` recipe was chosen: a validation split, test data never used.

The official 60k training images are cut 50k fit / 10k validation by a seeded permutation; the
``coates`` network (``zca-kmeans``, polarity split) is fitted centrally on the 50k and its head solved
for three standardized ρ; validation accuracy per (channels, pooling grid, kernel, α, mirror). With
``mirror`` the fit holds every image and its mirror (:mod:`flwr_analytic.analytic.mirror`), and the
validation images are scored both ways: one view and the mean of both views.

    python benchmarks/fashion_validation.py            # the rows of natural_images.FASHION_RECIPE
    python benchmarks/fashion_validation.py --render
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import environment, out_or_render, peak_rss_gib, write_json

from flwr_analytic.analytic import AnalyticNetwork, Regularization
from flwr_analytic.analytic.mirror import mirror_images
from flwr_analytic.analytic.solvers import ridge_solve
from flwr_analytic.analytic.targets import TargetScheme
from flwr_analytic.data.loaders import load_fashion_mnist
from flwr_analytic.models import coates

#: (channels, grid, kernel, α, mirror)
CONFIGS = (
    (1600, 2, 6, 0.5, False),
    (800, 3, 6, 0.5, False),
    (400, 4, 6, 0.5, False),
    (400, 4, 6, 0.5, True),
)
RHOS = (3e-4, 1e-3, 3e-3)


def rows(net: AnalyticNetwork, x: np.ndarray) -> np.ndarray:
    """The head's design rows of ``x`` (float64, bias column implicit)."""
    last = net.num_layers - 1
    parts = [net.design_rows(last, x[i : i + 500])[:, 0, :] for i in range(0, len(x), 500)]
    return torch.cat(parts).double().numpy()


def run_config(data: tuple, channels: int, grid: int, kernel: int, alpha: float, mirror: bool):
    x, y, xv, yv = data
    t0 = time.perf_counter()
    net = AnalyticNetwork(
        coates(x.shape[1:], 10, filters=channels, grid=grid, kernel=kernel),
        TargetScheme("zca-kmeans", threshold=alpha, polarity=True),
        output_reg=Regularization(RHOS[0], "standardized"),
        dtype="float32",
        mirror=mirror,
    )
    for layer in range(net.num_layers - 1):
        while net.solved_layers == layer:
            stats = net.statistics(layer, x, y, 100) if net.needs_statistics(layer) else None
            net.solve(layer, stats)
    stats = net.statistics(net.num_layers - 1, x, y, 100)
    a, am = rows(net, xv), rows(net, mirror_images(xv))
    row = {"channels": channels, "grid": grid, "kernel": kernel, "alpha": alpha, "mirror": mirror}
    row |= {"head_dim": net.design_dim(net.num_layers - 1), "one_view": {}, "two_views": {}}
    for rho in RHOS:
        w = ridge_solve(stats.gram, stats.cross, Regularization(rho, "standardized"))
        row["one_view"][str(rho)] = float(np.mean((a @ w[:-1] + w[-1]).argmax(1) == yv))
        row["two_views"][str(rho)] = float(
            np.mean((0.5 * (a + am) @ w[:-1] + w[-1]).argmax(1) == yv)
        )
    row["seconds"] = time.perf_counter() - t0
    print(f"  {row}", flush=True)
    return row


def render(result: dict) -> str:
    out = [
        "| channels | grid | kernel | α | mirror | head D | validation, one view (ρ 3e-4 / 1e-3 / "
        "3e-3) | mean of both views |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        one = " / ".join(f"{100 * v:.2f}%" for v in r["one_view"].values())
        two = " / ".join(f"{100 * v:.2f}%" for v in r["two_views"].values())
        out.append(
            f"| {r['channels']} | {r['grid']}×{r['grid']} | {r['kernel']} | {r['alpha']} "
            f"| {r['mirror']} | {r['head_dim']} | {one} | {two if r['mirror'] else '-'} |"
        )
    return "\n".join(out)


def main() -> None:
    out = out_or_render(__doc__, "fashion_validation.json", render)
    if out is None:
        return
    torch.set_num_threads(2)
    train = load_fashion_mnist(split="train")
    perm = np.random.default_rng(0).permutation(len(train.y))
    fit, val = perm[:50000], perm[50000:]
    data = (train.x[fit], train.y[fit], train.x[val], train.y[val])
    result = {"environment": environment(), "protocol": __doc__}
    result["rows"] = [run_config(data, *c) for c in CONFIGS]
    result["peak_rss_gib"] = peak_rss_gib()
    result["command"] = "python benchmarks/fashion_validation.py"
    write_json(out, result)
    print(render(result))


if __name__ == "__main__":
    main()
