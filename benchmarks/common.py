"""Helpers shared by the benchmarks: environment record, peak memory, JSON output, round histories."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def environment() -> dict[str, object]:
    """Versions and machine facts recorded with every result."""
    import flwr
    import scipy

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "unknown",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON (numpy scalars converted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def default(o: object) -> object:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    path.write_text(json.dumps(payload, indent=2, default=default) + "\n")


def round_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per server round of a run's history, in round order, from either schema.

    ``history`` is a ``Metered`` strategy's ``history_records()`` (the meta app's ``history-path``
    JSON): one record per round and kind (``train`` / ``evaluate``) with ``round-time``,
    ``bytes-sent``, ``bytes-received`` and the aggregated ``metrics``. Result files written before
    the records had one dict per round (``train`` / ``evaluate`` metrics, ``train-time``,
    ``round-time``, ``bytes-down``, ``bytes-up``); they are read too.

    Each row: ``round``; ``train-time`` (s, ``configure_train`` to the end of ``aggregate_train``);
    ``evaluate-time`` (s, 0 without evaluation); ``bytes-sent`` / ``bytes-received`` (the training
    half; old files: the whole round's ``bytes-down`` / ``bytes-up``); ``train`` (metrics) and
    ``evaluate`` (metrics, ``None`` in rounds without evaluation).
    """
    if not all("kind" in h for h in history):  # the old one-dict-per-round schema
        rows = []
        for h in sorted(history, key=lambda h: int(h["round"])):
            train_time = float(h["train-time"])
            evaluation = h.get("evaluate") or None
            rows.append(
                {
                    "round": int(h["round"]),
                    "train-time": train_time,
                    "evaluate-time": (
                        float(h.get("round-time", train_time)) - train_time if evaluation else 0.0
                    ),
                    "bytes-sent": int(h.get("bytes-down", 0)),
                    "bytes-received": int(h.get("bytes-up", 0)),
                    "train": dict(h.get("train") or {}),
                    "evaluate": evaluation,
                }
            )
        return rows
    by_round: dict[int, dict[str, Any]] = {}
    for record in history:
        if record["kind"] not in ("train", "evaluate"):
            continue
        rnd = int(record["round"])
        row = by_round.setdefault(
            rnd,
            {"round": rnd, "train-time": 0.0, "evaluate-time": 0.0, "bytes-sent": 0,
             "bytes-received": 0, "train": {}, "evaluate": None},
        )  # fmt: skip
        metrics = dict(record.get("metrics") or {})
        if record["kind"] == "train":
            row["train-time"] = float(record["round-time"])
            row["bytes-sent"] = int(record["bytes-sent"])
            row["bytes-received"] = int(record["bytes-received"])
            row["train"] = metrics
        else:
            row["evaluate-time"] = float(record["round-time"])
            row["evaluate"] = metrics or None
    return [by_round[r] for r in sorted(by_round)]


def out_or_render(doc: str, name: str, render: Callable[[dict], str]) -> Path | None:
    """The ``--out`` JSON of a benchmark without other options (default ``RESULTS / name``).

    With ``--render``, prints ``render`` of that JSON and returns ``None``: the caller stops.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--render", action="store_true", help="print the table of --out")
    args = parser.parse_args()
    out = Path(args.out) if args.out else RESULTS / name
    if args.render:
        print(render(json.loads(out.read_text())))
        return None
    return out
