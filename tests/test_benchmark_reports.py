"""The benchmark reports: time-to-accuracy bookkeeping and the generated results section.

``benchmarks/time_to_accuracy.py`` turns accuracy-vs-time curves into times to reach a level and
time-reduction ratios (a lower bound when a method never reached the level within its budget);
``benchmarks/render_results.py --check`` fails when the README's claims table or
``docs/results.md`` no longer match the committed JSON.
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
    assert s["analytic"]["train-time"]["mean"] == pytest.approx(11.0)
    row = s["gradient"]["fedavg"]
    assert row["time-to-analytic-global"] == 50.0
    assert row["reduction-global"]["reduction"] == pytest.approx(1 - 10.0 / 50.0)
    assert row["time-to-analytic-personal"] is None  # 0.955 < 0.96
    assert row["reduction-personal"] == {"reached": False, "reduction": 0.9, "bound": "lower"}
    assert s["fastest-gradient-to-analytic-personal"] is None
    assert "not reached in 100 s (> 90.0%)" in tta.render({"summary": {"d": s}})


def test_results_section_matches_the_committed_json():
    run = subprocess.run(
        [sys.executable, str(BENCH / "render_results.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=BENCH,
    )
    assert run.returncode == 0, run.stdout + run.stderr
