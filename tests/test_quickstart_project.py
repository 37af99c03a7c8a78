"""A user's own Flower PyTorch quickstart project switched from FedAvg to FedACnnL.

``quickstart_project`` holds the project (``flwr new``'s PyTorch template, Message API): the
classic ``Net``, ``load_data`` with flwr-datasets' Dirichlet(0.1) partitioner over CIFAR-10 (the
offline ``cifar10_20k.npz``), the FedAvg client and server apps, and the same apps after the change
of ``docs/bring-your-own-model.md``. Fast: the change is a small patch that leaves ``Net`` and
``load_data`` alone, and the doc shows it. Slow: the FedACnnL project runs with ``flwr run`` on a
20-SuperNode local simulation, and its result loads into the user's ``Net``; the patched client app
still serves FedAvg.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import quickstart_project as qp
import torch
from flower_processes import (
    BIN,
    LOCAL_CONNECTION,
    flower_env,
    format_run_config,
    owned_processes,
    simulation_config,
    stop_owned_processes,
)

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bring-your-own-model.md"
DATA = REPO.parent / "shared" / "data" / "cifar10_20k.npz"
NUM_NODES = 20
needs_data = pytest.mark.skipif(not DATA.is_file(), reason=f"{DATA} not present")


def load_module(path: Path, name: str):
    """Import the file ``path`` as module ``name`` (not left in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ the change itself
def test_fedacnnl_is_a_small_patch_of_the_quickstart():
    removed, added = qp.changed_lines()
    assert 0 < len(removed) <= 10 and 0 < len(added) <= 10, qp.project_diff()
    # the model and the data loading are the user's, untouched: task.py is not in the diff
    touched = "".join(removed + added)
    for name in ("class Net", "def load_data", "DataLoader", "def forward", "Partitioner"):
        assert name not in touched
    assert "task.py" not in qp.project_diff()
    # the client app only gains lines: the FedAvg handlers stay as they were
    client = [ln for ln in qp.project_diff().split("+++ b/")[2].splitlines() if ln[:1] == "-"]
    assert client == [], client
    assert "add_fedacnnl_handlers(app, load_data, model=Net)" in added
    assert any("FedACnnL(Net(), input_shape=(3, 32, 32))" in ln for ln in added)
    assert any("FedAvg(" in ln for ln in removed)
    assert any("num_rounds=num_rounds" in ln for ln in removed)  # 3 < 5 layers would raise
    for version in (qp.FEDAVG, qp.FEDACNNL):
        for name, code in version.items():
            compile(code, name, "exec")
    compile(qp.TASK_PY, "task.py", "exec")
    compile(qp.SERVER_APP_FEDACNNL + qp.SERVER_HARNESS, "server_app.py", "exec")


def test_the_quickstart_net_is_the_classic_one():
    task = qp.TASK_PY
    for line in (
        "nn.Conv2d(3, 6, 5)",
        "nn.MaxPool2d(2, 2)",
        "nn.Conv2d(6, 16, 5)",
        "nn.Linear(16 * 5 * 5, 120)",
        "nn.Linear(120, 84)",
        "nn.Linear(84, 10)",
        "x = x.view(-1, 16 * 5 * 5)",
        'partition_by="label", alpha=0.1, seed=42',
        "train_test_split(test_size=0.2, seed=42)",
        "Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))",
        "batch_size=32",
    ):
        assert line in task, line


def test_doc_shows_the_patch():
    text = DOC.read_text()
    blocks = re.findall(r"```diff\n(.*?)```", text, flags=re.S)
    assert qp.project_diff() in blocks, "docs/bring-your-own-model.md: regenerate the diff block"


def test_federations_are_not_in_pyproject(tmp_path):
    from flwr.cli.config_utils import load_and_validate

    project = qp.write_project(tmp_path / "project")
    config, warnings = load_and_validate(project / "pyproject.toml", check_module=False)
    assert not warnings
    assert "federations" not in config["tool"]["flwr"]  # Flower 1.42: $FLWR_HOME/config.toml
    assert config["tool"]["flwr"]["app"]["config"]["num-server-rounds"] == 3


# --------------------------------------------------------------------- the run, with flwr run
@pytest.mark.slow
@needs_data
@pytest.mark.timeout(900)
def test_quickstart_with_fedacnnl_runs_with_flwr_run(tmp_path):
    project = qp.write_project(tmp_path / "project", "fedacnnl", harness=True)
    out, cwd, base = tmp_path / "out", tmp_path / "cwd", (tmp_path / "flwr").resolve()
    out.mkdir()
    cwd.mkdir()
    env = qp.project_env(flower_env(base), DATA, out)
    federation = simulation_config(NUM_NODES, num_cpus=qp.whole_cpu())
    command = [str(BIN / "flwr"), "run", str(project), LOCAL_CONNECTION, "--stream"]
    command += ["--federation-config", format_run_config(federation)]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=850,
            check=False,
        )
    finally:
        stop_owned_processes(base)
    wall = time.perf_counter() - start
    assert owned_processes(base) == []
    log = done.stdout
    (tmp_path / "flwr_run.log").write_text(log)
    server_time = float(re.findall(r"Strategy execution finished in ([\d.]+)s", log)[-1])
    assert done.returncode == 0, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    assert (out / "results.json").is_file(), log[-4000:]

    summary = json.loads((out / "results.json").read_text())
    metrics = summary["evaluate"]
    assert summary["num-rounds"] == 5  # conv1, conv2, fc1, fc2, fc3: one round per layer
    assert summary["train-rounds"] == [1, 2, 3, 4, 5]
    assert metrics["num-clients"] == NUM_NODES
    assert sorted(metrics["client-ids"]) == list(range(NUM_NODES))
    assert len(metrics["personal-accuracy-clients"]) == NUM_NODES
    global_acc, personal_acc = metrics["global-accuracy"], metrics["personal-accuracy"]
    # the user's own print line, in the streamed log
    assert f"global {global_acc:.4f}, personalized {personal_acc:.4f}" in log, log[-4000:]
    # 10 classes: chance is 0.1; Dirichlet(0.1) clients hold few labels, so personalizing helps
    assert 0.2 < global_acc < 0.9
    assert personal_acc > global_acc
    # the quickstart's own `torch.save(state_dict, "final_model.pt")`, where `flwr run` ran
    assert (cwd / "final_model.pt").is_file()

    # the result loads into the user's Net (same parameter names, strict) ...
    task = load_module(project / qp.PACKAGE / "task.py", "quickstart_task")
    state = torch.load(out / "state_dict.pt")
    assert set(state) == set(task.Net().state_dict())
    model = task.Net()
    model.load_state_dict(state, strict=True)
    model.eval()
    # ... and computes the server's analytic network: float32 to rounding, float64 exactly
    probe = np.load(out / "probe.npz")
    x, scores = probe["x"], probe["scores"]
    assert x.shape == (qp.NUM_PROBE, 3, 32, 32) and scores.shape == (qp.NUM_PROBE, 10)
    with torch.no_grad():
        out32 = model(torch.from_numpy(x)).numpy()
        model64 = task.Net().double()
        model64.load_state_dict(state, strict=True)
        out64 = model64(torch.from_numpy(x).double()).numpy()
    scale = np.abs(scores).max()
    np.testing.assert_allclose(out32, scores, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(out64, scores, rtol=0, atol=1e-10 * scale)
    assert np.mean(out32.argmax(1) == scores.argmax(1)) >= 0.99
    probe_acc = float(np.mean(out32.argmax(1) == np.load(DATA)["y"][: qp.NUM_PROBE]))

    print(
        f"\nquickstart Net, FedACnnL via flwr run, {NUM_NODES} SuperNodes, Dirichlet(0.1), "
        f"CIFAR-10 20k: global accuracy {global_acc:.4f}, pFedACnnL personalized "
        f"{personal_acc:.4f} (client mean {metrics['global-accuracy-client-mean']:.4f} / "
        f"{metrics['personal-accuracy-client-mean']:.4f}); Net on the probe batch "
        f"{probe_acc:.4f}; wall time {wall:.1f} s (strategy {server_time:.1f} s)"
    )


@pytest.mark.slow
@needs_data
@pytest.mark.timeout(300)
def test_patched_client_app_still_serves_fedavg(tmp_path, monkeypatch):
    """The user's FedAvg handlers answer FedAvg's plain ``train``/``evaluate`` messages."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from flwr_analytic.grid import InProcessGrid

    project = qp.write_project(tmp_path / "project", "fedacnnl", harness=False)
    monkeypatch.setenv(qp.DATA_ENV, str(DATA))
    monkeypatch.syspath_prepend(str(project))
    try:
        from pytorchexample.client_app import app
        from pytorchexample.task import Net

        grid = InProcessGrid(app, NUM_NODES, {"local-epochs": 1, "lr": 0.01})
        strategy = FedAvg(fraction_train=0.1, fraction_evaluate=0.1)
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(Net().state_dict()),
            train_config=ConfigRecord({"lr": 0.01}),
            num_rounds=1,
        )
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == qp.PACKAGE]:
            del sys.modules[name]
    assert set(result.arrays.to_torch_state_dict()) == set(Net().state_dict())
    assert "train_loss" in result.train_metrics_clientapp[1]
    assert 0.0 <= result.evaluate_metrics_clientapp[1]["eval_acc"] <= 1.0
