"""Auto λ on wide heads: CIFAR-10 Dirichlet(0.1), 20 clients, the natural-images recipe (issue 15).

Why the global layer's mean leverage ``h̄`` enters the per-client choice of λ
(:mod:`flwr_analytic.analytic.personal_lambda`), measured on a development split only. The clients
and their 75/25 train/test split are those of ``natural_images.py --part federated``. Each client's
*training* part is cut 80/20 (seed 123, as ``auto_lambda.py --split dev``), and FedACnnL (the recipe:
``coates`` 2,400 channels, ``zca-kmeans``, polarity, α 0.5) is refitted on the 80% parts. The
personalized heads are scored on the 20% parts; the test parts are never touched. Per λ rule
(relative, standardized):

* ``fixed ρ``: one ρ for every client, every value of the grid (the best is reported);
* ``oracle``: each client's best ρ by its *scored* part (an upper bound of any per-client choice);
* ``auto``: the package's choice with the ``h̄`` the server sends; ``auto, no h̄``: with ``h̄ = 0``;
* ``leave-client-out``: the same rule, validated against ``W_{−k}``, the global layer solved without
  client ``k``'s statistics (Woodbury on the server's Cholesky factor; what a server holding every
  client's statistics could send instead of ``h̄``), then applied to ``W``;
* ``auto, then recalibrated``: the auto layer refitted on the client's own scores ``[s, 1] ↦ V``
  (``personal-recalibration``, ρ = 0.01, :mod:`flwr_analytic.analytic.recalibration`); and, as
  an in-sample reference, ``W``'s scores recalibrated on the scored rows themselves.

Every personalized head's predictions on the scored part come from the client's eigendecomposition
(:class:`~flwr_analytic.analytic.leave_one_out.LeaveOneOut`, dual form: ``n < D``), not from 29
solves of a 6,401-wide system per client and rule.

With ``--mirror`` the recipe network is mirrored (:mod:`flwr_analytic.analytic.mirror`): every
image and its mirror enter the statistics (a client's rows are both views), and the scored rows
are the mean of the two views' features (the linear head's two-view score).

    python benchmarks/auto_lambda_cifar.py           # about 6 minutes on 2 cores, 17 GiB
    python benchmarks/auto_lambda_cifar.py --mirror  # about 13 minutes
    python benchmarks/auto_lambda_cifar.py --quick   # 3k images, 200 channels
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, SHARED_DATA, environment, peak_rss_gib, write_json
from natural_images import recipe_net
from scipy import linalg

from flwr_analytic.analytic import AutoLambda, Regularization, fit_federated
from flwr_analytic.analytic.leave_one_out import LeaveOneOut
from flwr_analytic.analytic.mirror import mirror_images
from flwr_analytic.analytic.personal_lambda import DEFAULT_GRID, choose_rho
from flwr_analytic.analytic.recalibration import DEFAULT_RHO, recalibrate
from flwr_analytic.analytic.solvers import standardized_penalty
from flwr_analytic.analytic.targets import one_hot
from flwr_analytic.analytic.training import output_design
from flwr_analytic.data import partition_indices
from flwr_analytic.data.dataset import to_float_images

RULES = ("relative", "standardized")
GAMMA = Regularization(3e-3, "standardized")  # the recipe's head ridge in the federated part
RECAL = "auto, then recalibrated"  # the auto layer refitted on its own scores (ρ = 0.01)
RECAL_IN_SAMPLE = "recalibration in-sample"  # W's scores recalibrated on the scored rows


def clients(quick: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list, list]:
    """Images, labels and each client's (fit, scored) indices: 75% train of Dir(0.1), cut 80/20."""
    data = np.load(SHARED_DATA / "cifar10_20k.npz")
    x, y = to_float_images(data["x"], channels_last=True), data["y"].astype(np.int64)
    if quick:
        x, y = x[:3000], y[:3000]
    parts = partition_indices(y, 20, "dirichlet", alpha=0.1, seed=seed)
    rng, dev = np.random.default_rng(seed), np.random.default_rng(123)
    fit, scored = [], []
    for idx in parts:
        train = rng.permutation(idx)[: int(round(0.75 * len(idx)))]  # as natural_images.federated
        perm = dev.permutation(train)
        cut = int(round(0.8 * len(perm)))
        fit.append(np.sort(perm[:cut]))
        scored.append(np.sort(perm[cut:]))
    return x, y, fit, scored


def scored_predictions(
    loo: LeaveOneOut, a: np.ndarray, t: np.ndarray, w: np.ndarray, av: np.ndarray
) -> list[np.ndarray]:
    """Scores of ``W_k(ρ)`` on the rows ``av`` for every grid ρ, from the dual eigenbasis.

    Relative: ``av W + (av Aᵀ) U diag(1/(s+λ)) UᵀR``; standardized (free bias): ``av W + mean(R) +
    (x̃v Xᵀ) U diag(1/(s+ρ)) UᵀR_c`` with the client's centring and scaling.
    """
    if loo.rule == "relative":
        kernel, offset = av @ a.T, av @ w
    else:
        unit = standardized_penalty(np.einsum("ij,ij->j", a, a), a.T @ a[:, -1], 1.0)[:-1]
        mean, scale = a[:, :-1].mean(axis=0), np.sqrt(unit)
        kernel = ((av[:, :-1] - mean) / scale) @ ((a[:, :-1] - mean) / scale).T
        offset = av @ w + (t - a @ w).mean(axis=0)
    projected = kernel @ loo.basis
    return [
        offset + projected @ (loo.projected / (loo.s + loo.penalty(r))[:, None])
        for r in DEFAULT_GRID
    ]


def recalibrated_correct(own: np.ndarray, t: np.ndarray, scored: np.ndarray, yv: np.ndarray) -> int:
    """Right answers on the scored rows of the layer recalibrated on the client's own scores.

    ``recalibrate`` on the statistics of the rows ``X = [s, 1]`` with the identity map ``[I; 0]``
    as the layer returns ``V`` itself (``W̃ = I``): the scored rows' answers are ``[s_v, 1]V``.
    """
    x = np.hstack([own, np.ones((len(own), 1))])
    v = recalibrate(x.T @ x, x.T @ t, np.eye(x.shape[1], t.shape[1]), DEFAULT_RHO)
    return int(np.sum((np.hstack([scored, np.ones((len(scored), 1))]) @ v).argmax(1) == yv))


def leave_client_out(total, factor, a: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, float]:
    """``W_{−k} = (M − AᵀA)⁻¹(B − AᵀT)``, ``M = G + Γ = LLᵀ``, by Woodbury on ``L`` (n x n solve).

    Also the client's exact mean leverage in the global fit, ``mean_i A_i M⁻¹ A_iᵀ`` (what ``h̄``
    stands in for).
    """
    z = linalg.solve_triangular(factor, a.T, lower=True)  # L⁻¹Aᵀ
    hat = z.T @ z  # the client's block of the global hat matrix
    rhs = linalg.cho_solve((factor, True), total.cross - a.T @ t)
    m_inv_at = linalg.solve_triangular(factor.T, z, lower=False)  # M⁻¹Aᵀ
    w_out = rhs + m_inv_at @ np.linalg.solve(np.eye(len(a)) - hat, a @ rhs)
    return w_out, float(np.mean(np.diag(hat)))


def scored_design(net, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows that score ``x``: ``output_design``, for a mirrored network the mean of both views."""
    mirror, net.mirror = net.mirror, False
    try:
        av, yv = output_design(net, x, y, 100)
        if mirror:
            av = 0.5 * (av + output_design(net, mirror_images(x), y, 100)[0])
    finally:
        net.mirror = mirror
    return av, yv


def run(quick: bool, mirror: bool = False) -> dict:
    x, y, fit_parts, scored_parts = clients(quick)
    net = recipe_net(quick, mirror)
    net.output_reg = GAMMA
    t0 = time.perf_counter()
    fit = fit_federated(net, [(x[i], y[i]) for i in fit_parts], batch_size=50)
    fit_seconds = time.perf_counter() - t0
    leverage, total = fit.global_leverage(net), fit.output_statistics
    del fit
    w = np.asarray(net.weights[-1], dtype=np.float64)
    system = total.gram.copy()
    system[np.diag_indices_from(system)] += GAMMA.penalty(total.gram)
    factor = linalg.cholesky(system, lower=True)
    del system
    rows = []
    for k, (fit_rows, scored_rows) in enumerate(zip(fit_parts, scored_parts, strict=True)):
        a, labels = output_design(net, x[fit_rows], y[fit_rows], 100)
        av, yv = scored_design(net, x[scored_rows], y[scored_rows])
        t = one_hot(labels, 10)
        w_out, own_leverage = leave_client_out(total, factor, a, t)
        row = {
            "fit": len(labels),
            "scored": len(yv),
            "global": int(np.sum((av @ w).argmax(1) == yv)),
            "mean_leverage": own_leverage,
        }
        row["global_fit_correct"] = int(np.sum((a @ w).argmax(1) == labels))
        for rule in RULES:
            loo = LeaveOneOut(a, t, w, rule)
            scored = scored_predictions(loo, a, t, w, av)
            fixed = [int(np.sum(p.argmax(1) == yv)) for p in scored]
            picks = {}
            for name, anchor, lev in (
                ("auto", w, leverage),
                ("auto, no h̄", w, 0.0),
                ("leave-client-out", w_out, 0.0),
            ):
                check = loo if anchor is w else LeaveOneOut(a, t, anchor, rule)
                right = np.stack([p.argmax(1) == labels for p in check.path(DEFAULT_GRID, lev)])
                base = (t - (t - a @ anchor) / (1.0 - lev)).argmax(1) == labels
                rho, _ = choose_rho(DEFAULT_GRID, right, base, AutoLambda().z)
                picks[name] = row["global"] if np.isinf(rho) else fixed[DEFAULT_GRID.index(rho)]
                if name == "auto":  # then recalibrated (personal-recalibration = 0.01)
                    i = None if np.isinf(rho) else DEFAULT_GRID.index(rho)
                    own = a @ w if i is None else scored_predictions(loo, a, t, w, a)[i]
                    picks[RECAL] = recalibrated_correct(
                        own, t, av @ w if i is None else scored[i], yv
                    )
            # a reference, not a bound: V fitted (ridge) and scored on the scored rows themselves
            picks[RECAL_IN_SAMPLE] = recalibrated_correct(av @ w, one_hot(yv, 10), av @ w, yv)
            row[rule] = {"fixed": fixed, "oracle": max(max(fixed), row["global"]), **picks}
        rows.append(row)
        print(
            f"  client {k}: n {len(labels)}, scored {len(yv)}, global {row['global']}", flush=True
        )
    n = sum(r["scored"] for r in rows)
    summary = {"global": sum(r["global"] for r in rows) / n}
    summary["global_on_own_fit_samples"] = sum(r["global_fit_correct"] for r in rows) / sum(
        r["fit"] for r in rows
    )
    for rule in RULES:
        curve = [sum(r[rule]["fixed"][i] for r in rows) / n for i in range(len(DEFAULT_GRID))]
        best = int(np.argmax(curve))
        summary[rule] = {
            "best_fixed": curve[best],
            "best_fixed_rho": DEFAULT_GRID[best],
            **{
                p: sum(r[rule][p] for r in rows) / n
                for p in (
                    "oracle",
                    "auto",
                    "auto, no h̄",
                    "leave-client-out",
                    RECAL,
                    RECAL_IN_SAMPLE,
                )
            },
        }
    return {
        "mirror": mirror,
        "global_leverage": leverage,
        "fit_seconds": fit_seconds,
        "summary": summary,
        "clients": rows,
        "peak_rss_gib": peak_rss_gib(),
    }


def render(result: dict) -> str:
    s = result["summary"]
    lev = [r["mean_leverage"] for r in result["clients"] if r["fit"] >= 10]
    out = [
        "Mirrored network (every image and its mirror; two-view scores). "
        * result.get("mirror", 0)
        + f"Global layer: {100 * s['global']:.2f}% on the scored parts, "
        f"{100 * s['global_on_own_fit_samples']:.2f}% on the samples it was fitted on; "
        f"h̄ = {result['global_leverage']:.3f}; the clients' exact mean leverages "
        f"{min(lev):.3f}–{max(lev):.3f} (clients with ≥ 10 samples).",
        "",
        "| λ rule | best fixed ρ | oracle per client | auto (h̄) | auto, no h̄ | leave-client-out "
        "| auto, then recalibrated | recalibration fitted on the scored rows (in-sample) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rule in RULES:
        r = s[rule]
        out.append(
            f"| {rule} | {100 * r['best_fixed']:.2f}% (ρ = {r['best_fixed_rho']:.3g}) "
            f"| {100 * r['oracle']:.2f}% | {100 * r['auto']:.2f}% | {100 * r['auto, no h̄']:.2f}% "
            f"| {100 * r['leave-client-out']:.2f}% | {100 * r.get(RECAL, float('nan')):.2f}% "
            f"| {100 * r.get(RECAL_IN_SAMPLE, float('nan')):.2f}% |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mirror", action="store_true", help="the mirrored recipe network")
    parser.add_argument("--out", default=None)
    parser.add_argument("--render", action="store_true", help="print the table of --out")
    args = parser.parse_args()
    name = f"auto_lambda_cifar{'_mirror' * args.mirror}{'_quick' * args.quick}.json"
    out = Path(args.out) if args.out else RESULTS / name
    if args.render:
        print(render(json.loads(out.read_text())))
        return
    torch.set_num_threads(2)
    result = {"environment": environment(), "protocol": __doc__, "quick": args.quick}
    result |= run(args.quick, args.mirror)
    flags = " --mirror" * args.mirror + " --quick" * args.quick
    result["command"] = "python benchmarks/auto_lambda_cifar.py" + flags
    write_json(out, result)
    print(render(result))


if __name__ == "__main__":
    main()
