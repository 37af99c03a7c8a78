"""The meta app with `flwr run` on Flower's local simulation (Ray) (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flower_processes import flower_env, flwr_run, owned_processes, stop_owned_processes

APP = Path(__file__).resolve().parents[1] / "apps" / "meta"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_meta_app_runs_with_flwr_run_local_simulation(tmp_path):
    path = tmp_path / "history.json"
    overrides = {
        "algorithm": "meta",
        "nu": 2,
        "mode": "exact",
        "num-server-rounds": 2,
        "local-steps": 3,
        "finetune-steps": 2,
        "dataset": "digits",
        "model": "cnn",
        "min-nodes": 4,
        "history-path": str(path),
    }
    base = (tmp_path / "flwr").resolve()
    try:
        done = flwr_run(APP, flower_env(base), overrides, timeout=280, num_supernodes=4)
    finally:
        stop_owned_processes(base)
    assert owned_processes(base) == []
    assert done.returncode == 0 and path.is_file(), done.stdout[-3000:]
    assert "legacy usage" not in done.stdout and "Traceback" not in done.stdout
    saved = json.loads(path.read_text())
    history = saved["history"]  # one record per round and kind (train, evaluate)
    assert [(h["round"], h["kind"]) for h in history] == [
        (1, "train"),
        (1, "evaluate"),
        (2, "train"),
        (2, "evaluate"),
    ]
    for h in history:
        assert h["num-sent"] == h["num-replies"] == 4 and h["round-time"] > 0
        if h["kind"] == "train":
            assert h["metrics"]["hvp-evals"] == pytest.approx(3 * 2) and h["bytes-received"] > 0
        else:
            ev = h["metrics"]
            assert ev["num-clients"] == 4 and 0.0 <= ev["acc"] <= 1.0
            assert len(ev["acc-curve"]) == 3
