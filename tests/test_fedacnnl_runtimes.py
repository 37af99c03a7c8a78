"""FedACnnL under Flower's runtimes (slow): `flwr run` (local simulation), a real deployment, Ray via
Flower's deprecated ``run_simulation`` entry point and the legacy API.

Each run is compared with the same configuration run in-process on a :class:`LocalGrid`: the
final model must be the same (the statistics are summed in partition-id order everywhere).
Every process started here is stopped by id at the end (see ``tests/flower_processes.py``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_processes import (
    BIN,
    LocalDeployment,
    flower_env,
    flwr_run,
    format_run_config,
    owned_processes,
    stop_owned_processes,
)
from rounding import TOL, output_rounding_bound

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "fedacnnl"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
MIGRATION_NOTICE = ("legacy usage", "MIGRATION NOTICE", "will migrate")

# a small, quick configuration: digits, a two-conv CNN, float64
BASE = {
    "dataset": "digits",
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.3,
    "model": "cnn",
    "cnn-channels": "8,16",
    "seed": 1,
}


def _offline(monkeypatch, tmp_path):
    for key, value in flower_env(tmp_path).items():
        if key.startswith(("FLWR_", "RAY_")):
            monkeypatch.setenv(key, value)


def _reference(cfg, num_nodes, tmp_path):
    """The same run in-process (LocalGrid) -> (summary, state_dict)."""
    from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
    from flwr_analytic.fedacnnl import LocalGrid, resolve_run_config
    from flwr_analytic.strategies.fedacnnl_server import run_fedacnnl

    cfg = resolve_run_config({**cfg, "results-path": "", "model-path": ""})
    result, summary = run_fedacnnl(LocalGrid(make_fedacnnl_client_app(), num_nodes, cfg), cfg)
    return summary, result.arrays.to_torch_state_dict()


def _same_model(path, reference_state, summary, reference_summary):
    state = torch.load(path)
    assert state.keys() == reference_state.keys()
    diff = max(float((state[k] - reference_state[k]).abs().max()) for k in state)
    scale = max(float(v.abs().max()) for v in reference_state.values())
    assert diff <= 1e-9 * scale, diff
    for key in ("global-accuracy", "personal-accuracy"):
        assert summary[key] == pytest.approx(reference_summary[key], abs=1e-12)
    return diff, summary["model-sha256"] == reference_summary["model-sha256"]


def _check_summary(summary, num_nodes, layers=3):
    train = [r for r in summary["rounds"] if r["kind"] == "train"]
    assert [r["layer"] for r in train] == list(range(layers))
    assert all(r["num-valid"] == num_nodes and "rejected" not in r for r in train)
    ev = summary["evaluate"]
    assert ev["num-clients"] == len(ev["client-ids"]) and ev["num-clients"] >= num_nodes - 1
    # personalization used the statistics kept in context.state between rounds
    assert ev["num-stats-reused"] == ev["num-clients"]
    assert 0.5 < ev["global-accuracy"] <= 1 and 0.5 < ev["personal-accuracy"] <= 1
    assert summary["bytes-sent"] > 0 and summary["bytes-received"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_simulation_ray_20_clients(tmp_path, monkeypatch):
    """Flower's deprecated Python entry point still runs the app's factories (1.41, 1.42)."""
    _offline(monkeypatch, tmp_path)
    from flwr.simulation import run_simulation

    from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
    from flwr_analytic.strategies.fedacnnl_server import make_fedacnnl_server_app

    cfg = {
        **BASE,
        "min-nodes": 20,
        "results-path": str(tmp_path / "ray.json"),
        "model-path": str(tmp_path / "ray.pt"),
    }
    try:
        run_simulation(
            server_app=make_fedacnnl_server_app(cfg),
            client_app=make_fedacnnl_client_app(run_config=cfg),
            num_supernodes=20,
            backend_config={"client_resources": {"num_cpus": 2, "num_gpus": 0.0}},
        )
    finally:
        stop_owned_processes(str(tmp_path.resolve()))
    summary = json.loads((tmp_path / "ray.json").read_text())
    assert summary["num-nodes"] == 20
    _check_summary(summary, 20)
    ref_summary, ref_state = _reference(cfg, 20, tmp_path)
    _same_model(tmp_path / "ray.pt", ref_state, summary, ref_summary)


def _assert_clean(output: str) -> None:
    """No migration notice, no deprecation, no traceback in ``flwr run``'s output."""
    for text in MIGRATION_NOTICE:
        assert text not in output, output[-3000:]
    assert "deprecated" not in output.lower(), output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_apps_hold_no_legacy_federation_tables():
    """Connections live in Flower's config file: a `[tool.flwr.federations]` table is the legacy
    form that makes `flwr run` migrate it and print a notice (Flower 1.41 and 1.42)."""
    for app in ("fedacnnl", "meta"):
        with open(ROOT / "apps" / app / "pyproject.toml", "rb") as f:
            flwr = tomllib.load(f)["tool"]["flwr"]
        assert set(flwr) == {"app"}, (app, sorted(flwr))
        assert "federations" not in (ROOT / "apps" / app / "pyproject.toml").read_text()


def _doc_connection_and_command() -> tuple[str, list[str]]:
    """docs/deployment.md §1: the ``config.toml`` block and the ``flwr run`` command."""
    text = DEPLOYMENT_DOC.read_text()
    (toml,) = [b for b in re.findall(r"```toml\n(.*?)```", text, re.S) if "local-simulation" in b]
    commands = [
        line
        for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        for line in block.replace("\\\n", " ").splitlines()
        if line.startswith("flwr run apps/fedacnnl local-simulation")
    ]
    (command,) = commands
    return toml, shlex.split(command)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_deployment_doc_flwr_run_on_apps_fedacnnl(tmp_path):
    """The doc's connection and command on the clone's app (4 SuperNodes, an MLP, as overrides)."""
    toml, command = _doc_connection_and_command()
    assert tomllib.loads(toml)["superlink"]["local-simulation"] == {"address": ":local:"}
    env = flower_env(tmp_path / "flwr")
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(toml)
    pyproject = (APP / "pyproject.toml").read_bytes()
    results = tmp_path / "small.json"
    overrides = {"model": "mlp", "min-nodes": 4, "results-path": str(results)}
    assert command[:5] == ["flwr", "run", "apps/fedacnnl", "local-simulation", "--stream"]
    command[0] = str(BIN / "flwr")
    command += ["--federation-config", "num-supernodes=4"]
    command += ["--run-config", format_run_config(overrides)]
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=240,
            check=False,
        )
    finally:
        stop_owned_processes(str((tmp_path / "flwr").resolve()))
    assert owned_processes(str((tmp_path / "flwr").resolve())) == []
    assert done.returncode == 0, done.stdout[-3000:]
    _assert_clean(done.stdout)
    assert (APP / "pyproject.toml").read_bytes() == pyproject  # nothing migrated in place
    summary = json.loads(results.read_text())  # the run completed
    assert summary["num-nodes"] == 4 and summary["architecture"].startswith("mlp")
    assert [r["layer"] for r in summary["rounds"] if r["kind"] == "train"] == [0, 1]
    assert 0.5 < summary["personal-accuracy"] <= 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_flwr_run_local_simulation_20_supernodes(tmp_path):
    env = flower_env(tmp_path / "flwr")
    cfg = {
        **BASE,
        "min-nodes": 20,
        "results-path": str(tmp_path / "run.json"),
        "model-path": str(tmp_path / "run.pt"),
    }
    try:
        done = flwr_run(APP, env, cfg, timeout=240, num_supernodes=20)
        assert done.returncode == 0, done.stdout[-3000:]
        assert (tmp_path / "run.json").is_file(), done.stdout[-3000:]
    finally:
        stop_owned_processes(str((tmp_path / "flwr").resolve()))
    assert owned_processes(str((tmp_path / "flwr").resolve())) == []
    _assert_clean(done.stdout)
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["num-nodes"] == 20  # --federation-config num-supernodes=20
    _check_summary(summary, 20)
    ref_summary, ref_state = _reference(cfg, 20, tmp_path)
    _same_model(tmp_path / "run.pt", ref_state, summary, ref_summary)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_deployment_superlink_and_3_supernodes(tmp_path):
    cfg = {
        **BASE,
        "min-nodes": 3,
        "results-path": str(tmp_path / "deploy.json"),
        "model-path": str(tmp_path / "deploy.pt"),
    }
    deployment = LocalDeployment(tmp_path / "deploy", num_nodes=3)
    with deployment:
        done = deployment.run(APP, cfg, timeout=200)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert (tmp_path / "deploy.json").is_file(), done.stdout[-2000:]
    assert owned_processes(str(deployment.base)) == []
    assert all(p.poll() is not None for p in deployment.processes)
    summary = json.loads((tmp_path / "deploy.json").read_text())
    assert summary["num-nodes"] == 3
    _check_summary(summary, 3)
    # equals the simulation of the same three partitions
    ref_summary, ref_state = _reference(cfg, 3, tmp_path)
    _same_model(tmp_path / "deploy.pt", ref_state, summary, ref_summary)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_deployment_with_the_second_stage(tmp_path):
    """``second-stage = k`` over gRPC: one more round, the same scores as in process (issue 15)."""
    cfg = {
        **BASE,
        "min-nodes": 3,
        "second-stage": 10,
        "lam": 3.0,
        "lam-rule": "standardized",
        "gamma-rule": "standardized",
        "gamma": 1e-3,
        "results-path": str(tmp_path / "stage.json"),
        "model-path": str(tmp_path / "stage.pt"),
    }
    deployment = LocalDeployment(tmp_path / "deploy", num_nodes=3)
    with deployment:
        done = deployment.run(APP, cfg, timeout=200)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert owned_processes(str(deployment.base)) == []
    summary = json.loads((tmp_path / "stage.json").read_text())
    train = [r for r in summary["rounds"] if r["kind"] == "train"]
    assert [bool(r.get("second-stage")) for r in train] == [False] * 3 + [True]
    assert train[-1]["num-valid"] == 3 and "rejected" not in train[-1]
    ref_summary, ref_state = _reference(cfg, 3, tmp_path)
    _same_model(tmp_path / "stage.pt", ref_state, summary, ref_summary)
    for key in ("second-stage-accuracy", "product-accuracy"):
        assert 0.5 < summary[key] <= 1
        assert summary[key] == pytest.approx(ref_summary[key], abs=1e-12)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_legacy_numpyclient_and_strategy_under_ray(tmp_path, monkeypatch, digits):
    _offline(monkeypatch, tmp_path)
    from flwr.client import ClientApp
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.simulation import run_simulation

    from flwr_analytic.analytic import AnalyticNetwork, fit_federated
    from flwr_analytic.clients.fedacnnl_legacy import FedACnnLNumPyClient
    from flwr_analytic.data import federated_split
    from flwr_analytic.models import cnn
    from flwr_analytic.strategies.fedacnnl_legacy import FedACnnLLegacy

    split = federated_split(digits, 5, "dirichlet", alpha=0.5, seed=0)
    arch = cnn(digits.input_shape, 10, channels=(8, 16))
    strategies = []

    def server_fn(context):
        strategy = FedACnnLLegacy(arch, seed=2, min_train_nodes=5, min_available_nodes=5)
        strategies.append(strategy)
        return ServerAppComponents(strategy=strategy, config=ServerConfig(strategy.num_rounds))

    def client_fn(context):
        torch.set_num_threads(1)
        k = int(context.node_config["partition-id"])
        train, test = split.client(digits, k)
        return FedACnnLNumPyClient(train, test, k, context).to_client()

    try:
        run_simulation(
            server_app=ServerApp(server_fn=server_fn),
            client_app=ClientApp(client_fn=client_fn),
            num_supernodes=5,
            backend_config={"client_resources": {"num_cpus": 2, "num_gpus": 0.0}},
        )
    finally:
        stop_owned_processes(str(tmp_path.resolve()))
    (strategy,) = strategies
    ref = AnalyticNetwork(arch, seed=2)
    fit_federated(ref, [(digits.x[i], digits.y[i]) for i in split.train])
    # hidden layers to 1e-9; the ill-conditioned ridge head to rounding times its condition number
    # (the Ray clients' BLAS runs one thread, the reference two: another summation order)
    last = strategy.core.server.layer_statistics[arch.num_layers - 1]
    bounds = [TOL] * (arch.num_layers - 1) + [output_rounding_bound(strategy.net, last)]
    for w, r, bound in zip(strategy.net.weights, ref.weights, bounds, strict=True):
        assert np.abs(w - r).max() <= bound * np.abs(r).max()
    assert strategy.evaluation["num-clients"] == 5
    assert strategy.evaluation["num-stats-reused"] == 5
    assert strategy.evaluation["personal-accuracy"] > 0.5
    assert os.environ["FLWR_TELEMETRY_ENABLED"] == "0"
