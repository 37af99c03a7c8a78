"""Cost of one ν-step meta-step per mode, next to one plain gradient step.

For ν = 0..5 and each mode (exact, hessian-free, first-order; plus autograd through the unrolled
steps as a reference) this measures the best-of-``repeats`` wall time (robust to other load on a
shared machine; the median is stored too) of one meta-gradient evaluation and its
peak extra resident memory (VmHWM minus the RSS after setup, each configuration in a fresh
process), on an MNIST-shaped CNN (LeNet-5 as in the accuracy benchmark by default) with batches
of 32 and one thread.

    python benchmarks/meta_cost.py [--nu-max 5] [--repeats 7] [--model lenet5] [--batch 32]

Writes ``benchmarks/results/meta_cost.json`` and prints a table. The exact mode should grow
linearly in ν (ν HVPs, each a fixed multiple of a gradient) with nearly flat memory (it keeps only
the ν + 1 parameter vectors of the trajectory), whereas the unrolled autograd graph's memory grows
with ν.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("exact", "hessian-free", "first-order", "unrolled")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(mode: str, nu: int, repeats: int, model_name: str, batch: int) -> dict:
    """Run in a child process: time and peak memory of one step of ``mode`` at ``nu``."""
    import torch

    from flwr_analytic.meta import gradient, make_loss_fn, meta_gradient, model_params
    from flwr_analytic.meta.meta_gradient import unrolled_meta_gradient
    from flwr_analytic.models import build_module, get_architecture

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_module(get_architecture(model_name, (1, 28, 28), 10))
    loss_fn = make_loss_fn(model)
    params = model_params(model)
    g = torch.Generator().manual_seed(1)

    def batch_():
        x = torch.rand(batch, 1, 28, 28, generator=g)
        return x, torch.randint(0, 10, (batch,), generator=g)

    inner = [batch_() for _ in range(nu)]
    outer = batch_()
    hess = [batch_() for _ in range(nu)]
    base = _rss_kb("VmRSS")

    def step():
        if mode == "plain":
            return gradient(loss_fn, params, outer)
        if mode == "unrolled":
            return unrolled_meta_gradient(loss_fn, params, inner, outer, 0.01)
        return meta_gradient(loss_fn, params, inner, outer, 0.01, mode, hess).direction

    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "mode": mode,
        "nu": nu,
        "time_ms": 1e3 * float(np.median(times[1:])),
        "time_ms_min": 1e3 * float(np.min(times[1:])),
        "peak_extra_mb": (_rss_kb("VmHWM") - base) / 1024.0,
    }


def _child(args: argparse.Namespace, mode: str, nu: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        str(nu),
        "--repeats",
        str(args.repeats),
        "--model",
        args.model,
        "--batch",
        str(args.batch),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nu-max", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "NU"))
    parser.add_argument("--out", default=str(RESULTS / "meta_cost.json"))
    args = parser.parse_args()
    if args.child:
        print(
            json.dumps(
                measure(args.child[0], int(args.child[1]), args.repeats, args.model, args.batch)
            )
        )
        return

    plain = _child(args, "plain", 0)
    rows = [plain]
    for mode in MODES:
        for nu in range(args.nu_max + 1):
            rows.append(_child(args, mode, nu))
    exact = [r for r in rows if r["mode"] == "exact"]
    nus = np.array([r["nu"] for r in exact], dtype=float)
    ts = np.array([r["time_ms_min"] for r in exact])
    slope, intercept = np.polyfit(nus, ts, 1)
    r2 = 1 - ((ts - (slope * nus + intercept)) ** 2).sum() / ((ts - ts.mean()) ** 2).sum()
    summary = {
        "plain_grad_ms": plain["time_ms_min"],
        "exact_linear_fit": {
            "slope_ms_per_nu": slope,
            "intercept_ms": intercept,
            "r2": r2,
            "slope_in_plain_grads": slope / plain["time_ms_min"],
        },
    }
    result = {
        "config": {
            "model": args.model,
            "input": [1, 28, 28],
            "batch": args.batch,
            "repeats": args.repeats,
            "threads": 1,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "rows": rows,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    print(
        f"model {args.model}, batch {args.batch}, 1 thread; plain gradient step: "
        f"{plain['time_ms_min']:.1f} ms, peak +{plain['peak_extra_mb']:.1f} MB"
    )
    print(f"best of {args.repeats} times per meta-step in ms (x plain gradient) | peak extra MB")
    print(f"{'nu':>3} " + " ".join(f"{m:>26}" for m in MODES))
    for nu in range(args.nu_max + 1):
        cells = []
        for mode in MODES:
            r = next(r for r in rows if r["mode"] == mode and r["nu"] == nu)
            ratio = r["time_ms_min"] / plain["time_ms_min"]
            cells.append(f"{r['time_ms_min']:8.1f} ({ratio:4.1f}x) | {r['peak_extra_mb']:6.1f}")
        print(f"{nu:>3} " + " ".join(f"{c:>26}" for c in cells))
    fit = summary["exact_linear_fit"]
    print(
        f"exact: time = {fit['intercept_ms']:.1f} + {fit['slope_ms_per_nu']:.1f} * nu ms "
        f"(R^2 = {fit['r2']:.4f}; {fit['slope_in_plain_grads']:.2f} plain gradients per extra "
        f"step)"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
