"""Analytic warm start and analytic head against FedAvg, on the Flower quickstart project.

Four ways to train the quickstart ``Net`` (conv 3→6 5×5, pool, conv 6→16 5×5, pool, fc 120, fc 84,
fc 10) over 20 clients, through Flower's simulation engine (``run_simulation``, Ray, one CPU per
client), side by side in one invocation (the apps: ``benchmarks/warm_start_app.py``):

- **FedAvg** from a seeded random init: the quickstart's local training (Adam, one epoch, batch 32)
  at lr 1e-3, half the clients per round, every client evaluated every round. The quickstart's
  lr 0.01 does not learn on these Dirichlet(0.1) clients: a first run of this benchmark stayed at
  9.4–10.3% for 94 rounds; in process, 30 rounds reached 29.5% at lr 1e-3;
- **warm start + FedAvg**: FedACnnL (Gu et al., arXiv 2502.06915) trains the same ``Net`` in
  closed form, one round per layer (statistics in float32, summed in float64), then FedAvg
  continues from its model in the same run (:func:`flwr_analytic.strategies.warm_start.warm_start`);
- **FedAvg + AnalyticHead**: after the FedAvg rounds, one round in which the clients send the
  statistics of ``fc3``'s input features; the server solves ``W = (ΣG + γI)⁻¹ΣB`` and every
  client its pFedACnnL head ``W_k = (G_k + λI)⁻¹(B_k + λW)`` (package defaults γ = 1e-6, λ = 0.1,
  relative);
- **FedAvg + local fine-tuning**: from the same final FedAvg model, each client trains ``e``
  local epochs (the quickstart's Adam) and is tested, one round per ``e``.

Data: CIFAR-10 (``../shared/data/cifar10_20k.npz``, 20 clients Dirichlet(0.1), seeded, 75/25 per
client) and MNIST (``../shared/data/mnist70k.npz`` with its stored 20-client Dirichlet(0.1) split).
Accuracy is over all clients' test rows (weighted by test-set size). Time is *training* time: the
sum of the training rounds' server wall time (configure → replies → aggregate); FedAvg's
evaluation rounds are excluded, the head round counts both halves (the personalized heads are
solved in its evaluation half), a fine-tuning round counts whole. Bytes: model/statistics arrays
sent plus received.

    python benchmarks/warm_start.py                   # CIFAR-10 and MNIST (~35 min)
    python benchmarks/warm_start.py --quick           # 2k CIFAR images, few rounds (~2 min)
    python benchmarks/warm_start.py --render          # tables from the JSON

Writes ``benchmarks/results/warm_start.json`` (after every run) and ``warm_start_<dataset>.png``.
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

from common import RESULTS, SHARED_DATA, environment, round_rows, write_json

#: per data set: FedAvg rounds, FedAvg rounds after the warm start, fine-tuning epochs per round
PLANS: dict[str, dict[str, Any]] = {
    "cifar10": {"rounds": 200, "warm-rounds": 30, "finetune-epochs": [1, 2, 5]},
    "mnist": {"rounds": 40, "warm-rounds": 15, "finetune-epochs": [1, 2]},
}
QUICK = {
    "rounds": 3,
    "warm-rounds": 2,
    "finetune-epochs": [1],
    "limit": 2000,
    "min-partition-size": 5,
}
ARMS = ("fedavg", "warm-start")
#: data sets run to show where the warm start does not matter (not held to the goals)
CONTROLS = ("mnist",)


def spec_for(dataset: str, arm: str, quick: bool, seed: int = 0) -> dict[str, Any]:
    """The run config of one arm."""
    return {
        "dataset": dataset,
        "arm": arm,
        "seed": seed,
        "num-clients": 20,
        "alpha": 0.1,
        "fraction-train": 0.5,
        "local-epochs": 1,
        "lr": 1e-3,
        "data-dir": str(SHARED_DATA),
        **PLANS[dataset],
        **(QUICK if quick else {}),
    }


# ------------------------------------------------------------------------- one run (subprocess)
def run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one arm through ``run_simulation`` in this process; its JSON record."""
    import resource

    from flwr.simulation import run_simulation
    from warm_start_app import make_client_app, make_server_app

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_HOME=str(Path(tmp) / "flwr_home"),
        )
        cfg = {**cfg, "out": str(Path(tmp) / "arm.json")}
        t0 = time.perf_counter()
        run_simulation(
            server_app=make_server_app(cfg),
            client_app=make_client_app(cfg),
            num_supernodes=int(cfg["num-clients"]),
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
        out = json.loads(Path(cfg["out"]).read_text())
    out["simulation-wall-time"] = time.perf_counter() - t0
    out["peak-rss-gib-children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return out


def launch(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run ``cfg`` in a fresh Python process (a clean Ray per run)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        print(f"--- {cfg['dataset']}: {cfg['arm']}", flush=True)
        cmd = [sys.executable, "-u", __file__, "--run", json.dumps(cfg), "--run-out", out.name]
        subprocess.run(cmd, check=True, cwd=Path(__file__).parent)
        return json.loads(Path(out.name).read_text())


# ------------------------------------------------------------------------------------ analysis
def _bytes(row: dict[str, Any]) -> int:
    return int(row["bytes-sent"] + row["bytes-received"])


def fedavg_curve(rows: list[dict[str, Any]], t0: float = 0.0, b0: int = 0) -> list[dict]:
    """Cumulative training time, bytes and global accuracy after every evaluated FedAvg round."""
    curve, t, b = [], t0, b0
    for row in rows:
        t, b = t + row["train-time"], b + _bytes(row)
        if row["evaluate"] and "eval_acc" in row["evaluate"]:
            curve.append(
                {
                    "round": row["round"],
                    "time": t,
                    "bytes": b,
                    "global": row["evaluate"]["eval_acc"],
                }
            )
    return curve


def first_reach(curve: list[dict[str, Any]], level: float) -> dict[str, Any] | None:
    """The first curve point at or above ``level``."""
    return next((p for p in curve if p["global"] >= level - 1e-12), None)


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The comparison of one data set's two runs (goals of issue 12 included)."""
    fed, warm = runs["fedavg"], runs["warm-start"]
    head_round = fed["head-round"]
    rows = round_rows(fed["history"])
    inner = [r for r in rows if r["round"] < head_round]
    (head_row,) = [r for r in rows if r["round"] == head_round]
    curve = fedavg_curve(inner)
    best = max(curve, key=lambda p: p["global"])
    final = curve[-1]
    head_time = head_row["train-time"] + head_row["evaluate-time"]
    head = head_row["evaluate"]
    head_out = {
        "round-time": head_time,
        "bytes": _bytes(head_row),
        "global": head["global-accuracy"],
        "personal": head["personal-accuracy"],
        "gain": head["personal-accuracy"] - final["global"],
        "personal-clients": head["personal-accuracy-clients"],
    }
    tuned = [
        {
            "epochs": f["epochs"],
            "round-time": f["round-time"],
            "bytes": f["bytes-sent"],
            "personal": f["personal-accuracy"],
        }
        for f in fed["finetune"]
    ]
    # fine-tuning at equal time: the longest round that fits in the head round's time; when none
    # fits, the shortest one (it had more time than the head)
    if "head-auto-history" in fed:  # the head round again, each client with its own λ
        (auto,) = round_rows(fed["head-auto-history"])
        ev = auto["evaluate"]
        head_out["auto"] = {
            "round-time": auto["train-time"] + auto["evaluate-time"],
            "personal": ev["personal-accuracy"],
            "personal-clients": ev["personal-accuracy-clients"],
            "lambda-clients": ev["personal-lambda-clients"],
        }
    within = [f for f in tuned if f["round-time"] <= head_time]
    if within:
        equal = {**max(within, key=lambda f: f["round-time"]), "fits": True}
    else:
        equal = {**min(tuned, key=lambda f: f["round-time"]), "fits": False}
    arows = round_rows(warm["analytic-history"])
    a_time = sum(r["train-time"] for r in arows)
    a_bytes = sum(_bytes(r) for r in arows)
    a_eval = next(r["evaluate"] for r in reversed(arows) if r["evaluate"])
    start = {"round": 0, "time": a_time, "bytes": a_bytes, "global": a_eval["global-accuracy"]}
    wcurve = [start] + fedavg_curve(round_rows(warm["history"]), a_time, a_bytes)
    reach = first_reach(wcurve, best["global"])
    out = {
        "fedavg": {
            "curve": curve,
            "best": best,
            "final": final,
            "train-time": final["time"],
            "wall-time": fed["wall-time"],
        },
        "warm": {
            "analytic-time": a_time,
            "analytic-bytes": a_bytes,
            "analytic-global": a_eval["global-accuracy"],
            "analytic-personal": a_eval["personal-accuracy"],
            "curve": wcurve,
            "best": max(wcurve, key=lambda p: p["global"]),
            "reach-fedavg-best": reach,
            "wall-time": warm["wall-time"],
        },
        "head": head_out,
        "finetune": tuned,
        "finetune-equal-time": equal,
    }
    ratio = reach["time"] / best["time"] if reach else None
    out["goals"] = {  # FedAvg's time: the training time it took to reach its best accuracy
        "warm-start-time-ratio": ratio,
        "warm-start-time-ratio-to-budget": reach["time"] / final["time"] if reach else None,
        "warm-start-within-20pct": ratio is not None and ratio <= 0.2,
        "head-gain-5-points": head_out["gain"] >= 0.05,
        "head-beats-finetune-equal-time": head_out["personal"] > equal["personal"],
    }
    return out


# --------------------------------------------------------------------------------- plot, text
def plot(dataset: str, summary: dict[str, Any], out: Path) -> str:
    """Global accuracy vs training time (left) and personalized accuracy vs extra time (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    fed, warm = summary["fedavg"], summary["warm"]
    left.plot([p["time"] for p in fed["curve"]], [p["global"] for p in fed["curve"]],
              label="FedAvg (random init)")  # fmt: skip
    left.plot([p["time"] for p in warm["curve"]], [p["global"] for p in warm["curve"]],
              label="FedACnnL warm start + FedAvg")  # fmt: skip
    left.scatter([warm["analytic-time"]], [warm["analytic-global"]], marker="*", s=120, zorder=3,
                 label="end of the analytic phase")  # fmt: skip
    left.axhline(fed["best"]["global"], ls=":", c="grey", label="FedAvg's best")
    left.set(xlabel="training time (s)", ylabel="global accuracy", title=f"{dataset}: global")
    left.legend(fontsize=8)
    base = fed["final"]["global"]
    tuned = summary["finetune"]
    right.plot([0] + [f["round-time"] for f in tuned], [base] + [f["personal"] for f in tuned],
               "o-", label="FedAvg + local fine-tuning (1 round per epoch count)")  # fmt: skip
    head = summary["head"]
    right.scatter([head["round-time"]], [head["personal"]], marker="*", s=160, c="C3", zorder=3,
                  label="FedAvg + AnalyticHead (one round)")  # fmt: skip
    if "auto" in head:
        right.scatter([head["auto"]["round-time"]], [head["auto"]["personal"]], marker="*", s=160,
                      c="C2", zorder=3, label="AnalyticHead, each client's own λ")  # fmt: skip
    right.set(xlabel="time after FedAvg (s)", ylabel="personalized accuracy",
              title=f"{dataset}: personalized")  # fmt: skip
    right.legend(fontsize=8)
    fig.tight_layout()
    name = f"warm_start_{dataset}.png"
    fig.savefig(out.parent / name, dpi=110)
    plt.close(fig)
    return name


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _mb(b: float) -> str:
    return f"{b / 1e6:.1f} MB"


def table(dataset: str, s: dict[str, Any]) -> list[str]:
    """One data set's table: every arm's global and personalized accuracy, time and bytes."""
    fed, warm, head = s["fedavg"], s["warm"], s["head"]
    wbest, reach = warm["best"], warm["reach-fedavg-best"]
    control = (
        " (the control: where the warm start should not matter)" if dataset in CONTROLS else ""
    )
    rows = [
        f"**{dataset}**, 20 clients, Dirichlet(0.1), quickstart `Net`{control}:",
        "",
        "| arm | global | personalized | training time | bytes |",
        "|---|---|---|---|---|",
        f"| FedAvg, best (round {fed['best']['round']}) | {_pct(fed['best']['global'])} | = global "
        f"| {fed['best']['time']:.0f} s | {_mb(fed['best']['bytes'])} |",
        f"| FedAvg, final (round {fed['final']['round']}) | {_pct(fed['final']['global'])} "
        f"| = global | {fed['final']['time']:.0f} s | {_mb(fed['final']['bytes'])} |",
        f"| FedACnnL alone (warm start's analytic phase) | {_pct(warm['analytic-global'])} "
        f"| {_pct(warm['analytic-personal'])} | {warm['analytic-time']:.0f} s "
        f"| {_mb(warm['analytic-bytes'])} |",
        f"| warm start + FedAvg, best (round {wbest['round']}) | {_pct(wbest['global'])} "
        f"| = global | {wbest['time']:.0f} s | {_mb(wbest['bytes'])} |",
        f"| FedAvg final + AnalyticHead (+1 round) | {_pct(head['global'])} "
        f"| {_pct(head['personal'])} | +{head['round-time']:.1f} s | +{_mb(head['bytes'])} |",
    ]
    if "auto" in head:
        auto = head["auto"]
        rows.append(
            f"| FedAvg final + AnalyticHead, each client's own λ (+1 round) | {_pct(head['global'])} "
            f"| {_pct(auto['personal'])} | +{auto['round-time']:.1f} s | +{_mb(head['bytes'])} |"
        )
    for f in s["finetune"]:
        rows.append(
            f"| FedAvg final + local fine-tuning, {f['epochs']} epoch(s) | = FedAvg "
            f"| {_pct(f['personal'])} | +{f['round-time']:.1f} s | +{_mb(f['bytes'])} |"
        )
    g, eq = s["goals"], s["finetune-equal-time"]
    when = (
        f"at {reach['time']:.0f} s (round {reach['round']} after the analytic phase), "
        f"{100 * g['warm-start-time-ratio']:.0f}% of the {fed['best']['time']:.0f} s FedAvg took "
        f"to reach it ({100 * g['warm-start-time-ratio-to-budget']:.0f}% of its "
        f"{fed['final']['time']:.0f} s budget)"
        if reach
        else "never within its rounds"
    )
    versus = (
        f"the longest fine-tuning round that fits in the head round's time ({eq['epochs']} "
        f"epoch(s), {eq['round-time']:.1f} s, {_pct(eq['personal'])})"
        if eq["fits"]
        else f"the shortest fine-tuning round, which took longer than the head round "
        f"({eq['epochs']} epoch(s), {eq['round-time']:.1f} s, {_pct(eq['personal'])})"
    )
    rows += [
        "",
        f"- Warm start reaches FedAvg's best global accuracy {when}: goal ≤ 20% "
        f"{'met' if g['warm-start-within-20pct'] else 'not met'}.",
        f"- AnalyticHead adds {100 * head['gain']:+.2f} points of personalized accuracy to FedAvg's "
        f"final model in one round (goal ≥ +5: {'met' if g['head-gain-5-points'] else 'not met'}); "
        f"against {versus}: "
        f"{'beats it' if g['head-beats-finetune-equal-time'] else 'does not beat it'}.",
    ]
    return rows


def claim_rows(ws: dict[str, Any]) -> list[str]:
    """Rows of the README's claims table: the issue's two goals per data set, with the verdicts."""
    rows = []
    for dataset, entry in ws.get("datasets", {}).items():
        if "summary" not in entry:
            continue
        s, where = entry["summary"], f"{dataset}, 20 clients, quickstart `Net`, Ray simulation"
        fed, warm, head, goals = s["fedavg"], s["warm"], s["head"], s["goals"]
        reach = warm["reach-fedavg-best"]
        when = (
            f"at {reach['time']:.0f} s = {100 * goals['warm-start-time-ratio']:.0f}% of the "
            f"{fed['best']['time']:.0f} s FedAvg took"
            if reach
            else "never"
        )
        verdict = "met" if goals["warm-start-within-20pct"] else "not met"
        if dataset in CONTROLS:  # the control: where the warm start does not matter
            verdict = f"{verdict} (control data set: the issue expects no gain here)"
        rows.append(
            f"| Goal: the analytic warm start reaches FedAvg's best global accuracy in ≤ 20% of "
            f"FedAvg's time ({where}) | FedAvg best {_pct(fed['best']['global'])} (round "
            f"{fed['best']['round']} of {fed['final']['round']}); FedACnnL phase "
            f"{_pct(warm['analytic-global'])} in {warm['analytic-time']:.0f} s; reached {when}; "
            f"best after the warm start {_pct(warm['best']['global'])} | {verdict} |"
        )
        eq = s["finetune-equal-time"]
        versus = (
            f"fine-tuning {eq['epochs']} epoch(s) in {eq['round-time']:.1f} s "
            f"{_pct(eq['personal'])}"
            + ("" if eq["fits"] else " (longer than the head round; none fits in its time)")
        )
        ok = goals["head-gain-5-points"] and goals["head-beats-finetune-equal-time"]
        rows.append(
            f"| Goal: `AnalyticHead` adds ≥ 5 points of personalized accuracy to FedAvg in one "
            f"round and beats local fine-tuning at equal time ({where}) | FedAvg "
            f"{_pct(fed['final']['global'])} → head personalized {_pct(head['personal'])} "
            f"({100 * head['gain']:+.2f} points, +{head['round-time']:.1f} s); {versus} | "
            f"{'met' if ok else 'not met'} |"
        )
    return rows


def render(payload: dict[str, Any]) -> str:
    """Markdown tables of every data set in ``payload``."""
    parts = []
    for dataset, entry in payload["datasets"].items():
        if "summary" in entry:
            parts += table(dataset, entry["summary"]) + [""]
    return "\n".join(parts).rstrip()


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["cifar10", "mnist"])
    parser.add_argument("--quick", action="store_true", help="2k CIFAR images, a few rounds")
    parser.add_argument("--render", action="store_true", help="print the tables from --out")
    parser.add_argument("--out", type=Path, default=RESULTS / "warm_start.json")
    parser.add_argument(
        "--arms", nargs="+", choices=ARMS, default=list(ARMS),
        help="run these arms; the others are kept from --out",
    )  # fmt: skip
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--run-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        Path(args.run_out).write_text(json.dumps(run_one(json.loads(args.run))))
        return
    if args.render:
        print(render(json.loads(args.out.read_text())))
        return
    command = "python benchmarks/warm_start.py" + (" --quick" if args.quick else "")
    old = json.loads(args.out.read_text()) if args.out.is_file() else {"datasets": {}}
    payload: dict[str, Any] = {"command": command, "environment": environment(), "datasets": {}}
    payload["plots"] = []
    for dataset in args.datasets:
        kept = old["datasets"].get(dataset, {}).get("runs", {})
        entry: dict[str, Any] = {"runs": {a: kept[a] for a in ARMS if a not in args.arms}}
        if len(entry["runs"]) + len(args.arms) < len(ARMS):
            raise SystemExit(f"{args.out} has no {dataset} runs to keep: run every arm")
        payload["datasets"][dataset] = entry
        for arm in args.arms:
            entry["runs"][arm] = launch(spec_for(dataset, arm, args.quick))
            write_json(args.out, payload)  # keep what is done
        entry["summary"] = summarize(entry["runs"])
        payload["plots"].append(plot(dataset, entry["summary"], args.out))
        write_json(args.out, payload)
        print("\n".join(table(dataset, entry["summary"])), flush=True)


if __name__ == "__main__":
    main()
