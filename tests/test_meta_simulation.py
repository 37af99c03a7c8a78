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
    assert [h["round"] for h in saved["history"]] == [1, 2]
    for h in saved["history"]:
        assert h["train-clients"] == 4 and h["evaluate"]["num-clients"] == 4
        assert h["train"]["hvp-evals"] == pytest.approx(3 * 2)
        assert 0.0 <= h["evaluate"]["acc"] <= 1.0 and len(h["evaluate"]["acc-curve"]) == 3
        assert h["bytes-up"] > 0 and h["round-time"] > 0
