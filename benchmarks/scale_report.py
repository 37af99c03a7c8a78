"""The scale benchmark's report: per-round rows from a run's records, tables and plots.

:func:`flower_row` flattens one FedACnnL run (the ``Metered`` round records of its summary, the
step stamps of ``Stamped`` and the sampled memory timeline) into the time split per round;
:func:`fedavg_rows` does the same for FedAvg; :func:`render` and :func:`plot` turn the merged JSON
(``benchmarks/results/scale.json``, older files included) into Markdown tables and a figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from common import round_rows


def window_peaks(timeline: list, events: list, interval: float = 0.5) -> dict:
    """Peak tree RSS (GiB) per server round, from the step stamps (window widened by a sample)."""
    starts: dict[int, float] = {}
    ends: dict[int, float] = {}
    for t, name, rnd in events:
        if name.endswith("-start"):
            starts[rnd] = min(starts.get(rnd, t), t)
        else:
            ends[rnd] = max(ends.get(rnd, t), t)
    out = {}
    for rnd in sorted(starts):
        lo, hi = starts[rnd] - interval, ends.get(rnd, starts[rnd]) + interval
        inside = [m for (t, m, *_rest) in timeline if lo <= t <= hi]
        out[rnd] = max(inside, default=None)
    return out


def model_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest absolute difference and the largest weight magnitude (the tests' 1e-9 x scale)."""
    if set(a) != set(b):
        raise ValueError(f"models have different tensors: {sorted(set(a) ^ set(b))}")
    diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    scale = max(float(np.max(np.abs(v))) for v in a.values())
    return {"max-abs-diff": diff, "scale": scale, "relative": diff / scale}


def rel(diff: dict[str, float] | None) -> str:
    """A model difference as a relative number for the tables (``-``: not compared)."""
    return "-" if diff is None else f"{diff['relative']:.1e}"


def client_compute(record: dict[str, Any]) -> tuple[float, float]:
    """Sum and maximum of the clients' ``compute-time`` in one round record.

    FedACnnL's training records hold them (``client-compute-time``, ``-max``); an evaluation
    record has ``Metered``'s per-client metrics (``client-metrics["compute-time"]``).
    """
    if "client-compute-time" in record:
        return float(record["client-compute-time"]), float(record["client-compute-time-max"])
    times = [float(t) for t in (record.get("client-metrics") or {}).get("compute-time", [])]
    return float(sum(times)), float(max(times, default=0.0))


def flower_row(res: dict[str, Any], workers: int) -> dict[str, Any]:
    """Flatten one Flower run: totals, per-round split, evaluation."""
    summary = res["summary"]
    rounds = []
    peaks = window_peaks(res["timeline"], res.get("events", []))
    for r in summary["rounds"]:
        compute, compute_max = client_compute(r)
        share = compute / workers
        solve = float(r.get("solve-time", 0.0))
        rounds.append(
            {
                "round": r["round"],
                "kind": r["kind"],
                "layer": r.get("layer"),
                "round-time": r["round-time"],
                "client-compute-sum": compute,
                "client-compute-max": compute_max,
                "client-compute-per-worker": share,
                "server-solve": solve,
                "server-check-add": float(r.get("aggregate-time", 0.0)),
                "overhead": r["round-time"] - share - solve,
                "bytes-sent": r.get("bytes-sent", 0),
                "bytes-received": r.get("bytes-received", 0),
                "num-replies": r.get("num-replies"),
                "peak-rss-gib": peaks.get(r["round"]),
            }
        )
    server_wall = float(summary["wall-time"])
    return {
        "wall-time": res["wall-time"],
        "process-time": res["process-time"],
        "server-wall-time": server_wall,
        "startup-and-teardown": res["wall-time"] - server_wall,
        "peak-rss-gib": res["peak-rss-gib"],
        "peak-rss-server-gib": res["peak-rss-server-gib"],
        "peak-pss-gib": res["peak-pss-gib"],
        "max-processes": res["max-processes"],
        "rounds": rounds,
        "train-time": sum(r["round-time"] for r in rounds if r["kind"] == "train"),
        "client-compute-sum": sum(r["client-compute-sum"] for r in rounds),
        "server-solve": sum(r["server-solve"] for r in rounds),
        "global-accuracy": summary.get("global-accuracy"),
        "personal-accuracy": summary.get("personal-accuracy"),
        "bytes-sent": summary.get("bytes-sent"),
        "bytes-received": summary.get("bytes-received"),
        "model-sha256": summary.get("model-sha256"),
        "num-nodes": summary.get("num-nodes"),
        **({"serde-time": res["serde-time"]} if "serde-time" in res else {}),
        **({"serde-bytes": res["serde-bytes"]} if "serde-bytes" in res else {}),
        "log": res["log"],
    }


def fedavg_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per FedAvg round: training and whole-round time, bytes, peak memory, accuracy.

    ``train-time`` is the training half (``configure_train`` to the end of ``aggregate_train``),
    ``round-time`` adds the evaluation half (if any); bytes are the training half's.
    """
    peaks = window_peaks(res["timeline"], res.get("events", []))
    return [
        {
            "round": row["round"],
            "train-time": row["train-time"],
            "evaluate-time": row["evaluate-time"],
            "round-time": row["train-time"] + row["evaluate-time"],
            "bytes-sent": row["bytes-sent"],
            "bytes-received": row["bytes-received"],
            "peak-rss-gib": peaks.get(row["round"]),
            "accuracy": (row["evaluate"] or {}).get("acc"),
        }
        for row in round_rows(res["history"])
    ]


def render(payload: dict[str, Any]) -> str:
    """Markdown tables of the JSON."""
    lines = []
    runs = {**payload.get("naive", {}), **payload.get("scaled", {})}
    runs = {k: v for k, v in runs.items() if "error" not in v}
    if runs:
        lines += [
            "| run | clients | wall (s) | server (s) | train rounds (s) | client compute Σ (s) "
            "| server solve (s) | peak Σ RSS / Σ PSS (GiB) | global acc | model vs in-process |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for _key, r in sorted(runs.items(), key=lambda kv: (kv[1]["clients"], kv[0])):
            lines.append(
                f"| {r['aggregation']}{'' if r['keep-statistics'] else ' + recompute'}"
                f"{' + window ' + str(r['max-in-flight']) if r.get('max-in-flight') else ''}"
                f"{' (earlier design: ' + r['note'] + ')' if r.get('note') else ''} | "
                f"{r['clients']} | {r['wall-time']:.1f} | {r['server-wall-time']:.1f} | "
                f"{r['train-time']:.1f} | {r['client-compute-sum']:.1f} | {r['server-solve']:.2f} | "
                f"{r['peak-rss-gib']:.2f} / {r.get('peak-pss-gib', 0):.2f} | "
                f"{r['global-accuracy']:.4f} | "
                f"{rel(r['vs-inprocess'])} |"
            )
    ov = payload.get("overhead")
    if ov:
        lines += [
            "",
            f"Per round, {ov['clients']} clients (seconds; % of the compute):",
            "",
            "| layer | in-process | LocalGrid + protobuf | Flower overhead | Ray (2 workers) "
            "| ideal | Ray overhead |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in ov["rounds"]:
            lines.append(
                f"| {r['layer']} | {r['inprocess-compute'] + r['inprocess-solve']:.2f} | "
                f"{r['localgrid-round']:.2f} | {r['localgrid-overhead-s']:+.2f} "
                f"({r['localgrid-overhead-pct']:+.0f}%) | {r['ray-round']:.2f} | "
                f"{r['ray-ideal-round']:.2f} | {r['ray-overhead-s']:+.2f} "
                f"({r['ray-overhead-pct']:+.0f}%) |"
            )
    fa = payload.get("fedavg")
    if fa and "error" in fa:
        lines += ["", f"FedAvg: {fa['error']}"]
    elif fa:
        lines += [
            "",
            f"FedAvg, {fa['clients']} clients, {fa['config']['local-steps']} local steps: wall "
            f"{fa['wall-time']:.1f} s, peak {fa['peak-rss-gib']:.2f} GiB; per round (s): "
            + ", ".join(f"{r['round-time']:.1f}" for r in fa["rounds"]),
        ]
    ser = payload.get("serialization")
    if ser:
        lines += [
            "",
            "| D | packed floats | protobuf MB | pack (ms) | Flower record+proto round trip (ms) "
            "| MB/s | pickle round trip (ms) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in ser["rows"]:
            lines.append(
                f"| {r['D']} | {r['floats']} | {r['proto-bytes'] / 1e6:.2f} | "
                f"{1e3 * r['pack-s']:.1f} | {1e3 * r['flower-roundtrip-s']:.1f} | "
                f"{r['flower-roundtrip-MBps']:.0f} | "
                f"{1e3 * (r['pickle-s'] + r['unpickle-s']):.1f} |"
            )
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: Path) -> None:
    """Time split bars per run, peak memory vs clients, and per-round Flower overhead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {**payload.get("naive", {}), **payload.get("scaled", {})}
    runs = {k: v for k, v in runs.items() if "error" not in v}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    labels, parts = (
        [],
        {
            "client compute / worker": [],
            "server solve": [],
            "Flower + transport + checks": [],
            "evaluation round": [],
            "Ray start/stop": [],
        },
    )
    for _key, r in sorted(runs.items(), key=lambda kv: (kv[1]["clients"], kv[0])):
        train = [x for x in r["rounds"] if x["kind"] == "train"]
        ev = sum(x["round-time"] for x in r["rounds"] if x["kind"] != "train")
        window = f" w{r['max-in-flight']}" if r.get("max-in-flight") else ""
        labels.append(f"{r['aggregation'][:6]}{window}\n{r['clients']}")
        parts["client compute / worker"].append(sum(x["client-compute-per-worker"] for x in train))
        parts["server solve"].append(sum(x["server-solve"] for x in train))
        parts["Flower + transport + checks"].append(sum(x["overhead"] for x in train))
        parts["evaluation round"].append(ev)
        parts["Ray start/stop"].append(r["startup-and-teardown"])
    bottom = np.zeros(len(labels))
    for name, values in parts.items():
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom += np.asarray(values)
    ax.axhline(600, color="k", ls="--", lw=1, label="10 min goal")
    ax.set_ylabel("seconds")
    ax.set_title("FedACnnL through Ray: where the time goes")
    ax.legend(fontsize=7)
    ax = axes[1]
    for agg, marker in (("sorted", "o"), ("streaming", "s")):
        pts = sorted(
            (r["clients"], r["peak-rss-gib"]) for r in runs.values() if r["aggregation"] == agg
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, label=agg)
    ex = payload.get("naive-extrapolation")
    if ex:
        ax.plot(
            [ex["fit-clients"][0], 1000],
            [ex["fit-peak"][0], ex["peak-rss-gib-1000"]],
            "o:",
            color="C0",
            alpha=0.6,
            label="sorted, extrapolated",
        )
    ax.axhline(8, color="k", ls="--", lw=1, label="8 GiB goal")
    ax.set_xlabel("clients")
    ax.set_ylabel("peak RSS of the process tree (GiB)")
    ax.set_title("Memory")
    ax.legend(fontsize=7)
    ax = axes[2]
    ov = payload.get("overhead")
    if ov:
        x = np.arange(len(ov["rounds"]))
        w = 0.25
        ax.bar(
            x - w,
            [r["inprocess-compute"] + r["inprocess-solve"] for r in ov["rounds"]],
            w,
            label="in-process (1 core)",
        )
        ax.bar(x, [r["localgrid-round"] for r in ov["rounds"]], w, label="LocalGrid + protobuf")
        ax.bar(x + w, [r["ray-round"] for r in ov["rounds"]], w, label="Ray (2 workers)")
        ax.set_xticks(x, [f"layer {r['layer']}" for r in ov["rounds"]])
        ax.set_ylabel("round time (s)")
        ax.set_title(f"Per-round cost, {ov['clients']} clients")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def strip(obj: Any) -> Any:
    """Drop bulky fields (timelines, models, events) before writing JSON."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in ("timeline", "model", "events")}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj
