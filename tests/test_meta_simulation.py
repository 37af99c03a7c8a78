"""The meta app under Flower's Ray simulation (slow)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_meta_app_runs_under_ray_simulation(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home"))
    from flwr.simulation import run_simulation

    from flwr_analytic.clients import make_meta_client_app
    from flwr_analytic.strategies import make_meta_server_app

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
        "history-path": str(path),
    }
    run_simulation(
        server_app=make_meta_server_app(overrides),
        client_app=make_meta_client_app(overrides),
        num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 2, "num_gpus": 0.0}},
    )
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
