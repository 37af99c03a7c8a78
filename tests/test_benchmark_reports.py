"""The benchmark reports: time-to-accuracy bookkeeping and the generated results section.

``benchmarks/time_to_accuracy.py`` turns a gradient method's round history (the ``Metered`` round
records, or the one-dict-per-round history of older result files) into an accuracy-vs-time curve,
and curves into times to reach a level and time-reduction ratios (a lower bound when a method never
reached the level within its budget); ``benchmarks/render_results.py --check`` fails when the
README's claims table or ``docs/results.md`` no longer match the committed JSON.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import time_to_accuracy as tta  # noqa: E402


def _curve(points):
    return [
        {"train-time": t, "bytes": 0, "global-accuracy": g, "personal-accuracy": p}
        for t, g, p in points
    ]


def test_time_to_level_and_reduction():
    curve = _curve([(10.0, 0.5, 0.8), (20.0, 0.9, 0.95), (30.0, 0.97, 0.99)])
    assert tta.time_to(curve, "personal-accuracy", 0.95) == 20.0
    assert tta.time_to(curve, "global-accuracy", 0.97) == 30.0
    assert tta.time_to(curve, "global-accuracy", 0.98) is None
    assert tta.reduction(3.0, 30.0, 30.0) == {"reached": True, "reduction": 0.9, "bound": "exact"}
    # never reached within a 60 s budget: the analytic method's 3 s is > 95% less (a lower bound)
    red = tta.reduction(3.0, None, 60.0)
    assert red["reached"] is False and red["bound"] == "lower"
    assert red["reduction"] == pytest.approx(0.95)


def test_summary_uses_the_first_seed_as_the_gradient_methods_reference():
    ana = [
        {"dataset": "d", "method": "fedacnnl", "seed": s, "global-accuracy": 0.9,
         "personal-accuracy": 0.96, "train-time": t, "wall-time": t + 5, "bytes-down": 1,
         "bytes-up": 2}
        for s, t in ((1, 12.0), (0, 10.0))
    ]  # fmt: skip
    grad = {
        "dataset": "d", "method": "fedavg", "seed": 0, "train-time": 100.0, "wall-time": 120.0,
        "rounds": 3, "bytes-down": 5, "bytes-up": 5,
        "curve": _curve([(20.0, 0.5, 0.9), (50.0, 0.92, 0.95), (100.0, 0.93, 0.955)]),
    }  # fmt: skip
    s = tta.summarize([*ana, grad])["d"]
    assert s["analytic-reference-seed"] == 0
    # older result files name the bytes bytes-down / bytes-up: read as bytes-sent / -received
    assert s["analytic-reference"]["bytes-sent"] == 1
    assert s["analytic-reference"]["bytes-received"] == 2
    assert s["analytic"]["train-time"]["mean"] == pytest.approx(11.0)
    row = s["gradient"]["fedavg"]
    assert row["time-to-analytic-global"] == 50.0
    assert row["reduction-global"]["reduction"] == pytest.approx(1 - 10.0 / 50.0)
    assert row["time-to-analytic-personal"] is None  # 0.955 < 0.96
    assert row["reduction-personal"] == {"reached": False, "reduction": 0.9, "bound": "lower"}
    assert s["fastest-gradient-to-analytic-personal"] is None
    assert "not reached in 100 s (> 90.0%)" in tta.render({"summary": {"d": s}})


def _records(rnd, train_time, evaluate=None):
    """The ``Metered`` records of one round: training, and evaluation when ``evaluate`` is given."""
    train = {"round": rnd, "kind": "train", "num-sent": 2, "num-replies": 2, "bytes-sent": 10,
             "bytes-received": 20, "round-time": train_time, "metrics": {"train-loss": 1.0}}  # fmt: skip
    if evaluate is None:
        return [train]
    return [train, {"round": rnd, "kind": "evaluate", "num-sent": 2, "num-replies": 2,
                    "bytes-sent": 10, "bytes-received": 0, "round-time": 0.5,
                    "metrics": evaluate, "client-metrics": {"acc": [0.5, 0.7]}}]  # fmt: skip


def test_gradient_curve_reads_round_records_and_old_histories():
    new = [*_records(1, 2.0), *_records(2, 3.0, {"acc": 0.9, "acc-s0": 0.6}),
           *_records(3, 1.0), *_records(4, 4.0, {"acc": 0.95, "acc-s0": 0.7})]  # fmt: skip
    out = tta.gradient_curve(new)
    assert out["rounds"] == 4 and out["train-time"] == pytest.approx(10.0)
    assert out["eval-time"] == pytest.approx(1.0)
    assert (out["bytes-sent"], out["bytes-received"]) == (40, 80)  # training rounds only
    assert out["curve"] == [
        {"round": 2, "train-time": 5.0, "bytes": 60, "global-accuracy": 0.6,
         "personal-accuracy": 0.9},
        {"round": 4, "train-time": 10.0, "bytes": 120, "global-accuracy": 0.7,
         "personal-accuracy": 0.95},
    ]  # fmt: skip
    old = [  # the one-dict-per-round history of result files written before the round records
        {"round": 1, "train": {"train-loss": 1.0}, "bytes-down": 10, "bytes-up": 20,
         "train-time": 2.0},
        {"round": 2, "train": {"train-loss": 1.0}, "evaluate": {"acc": 0.9, "acc-s0": 0.6},
         "bytes-down": 20, "bytes-up": 20, "train-time": 3.0, "round-time": 3.5},
    ]  # fmt: skip
    out = tta.gradient_curve(old)
    assert out["rounds"] == 2 and out["train-time"] == 5.0 and out["eval-time"] == 0.5
    assert out["curve"] == [{"round": 2, "train-time": 5.0, "bytes": 70, "global-accuracy": 0.6,
                             "personal-accuracy": 0.9}]  # fmt: skip


def test_results_section_matches_the_committed_json():
    run = subprocess.run(
        [sys.executable, str(BENCH / "render_results.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=BENCH,
    )
    assert run.returncode == 0, run.stdout + run.stderr
