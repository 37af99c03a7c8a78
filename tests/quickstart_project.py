"""The Flower PyTorch quickstart project (``flwr new``, Message API) before and after FedACnnL.

The files of the quickstart as strings: ``pyproject.toml``, ``task.py`` (the classic ``Net`` and
``load_data`` with flwr-datasets' ``DirichletPartitioner``), and the client and server apps twice,
with FedAvg (:data:`FEDAVG`) and with FedACnnL (:data:`FEDACNNL`). The FedACnnL version is the
FedAvg version plus the change of ``docs/bring-your-own-model.md`` (:func:`project_diff`).

Offline differences from the real quickstart, both in ``task.py``: CIFAR-10 comes from the local
``cifar10_20k.npz`` (path in the environment variable :data:`DATA_ENV`) as a ``datasets.Dataset``
with the hub's columns (``img``: PIL image, ``label``), instead of
``FederatedDataset(dataset="uoft-cs/cifar10", ...)``; the partitioner is Dirichlet(0.1) over labels
(the quickstart's is IID). ``load_data(partition_id, num_partitions)`` has no run context, hence an
environment variable rather than a run-config key for the path.

:data:`SERVER_HARNESS` is appended to the FedACnnL ``server_app.py`` by the test only (it is not
part of the user's change): it writes the metrics, the ``state_dict`` and the server network's
scores of a probe batch into the folder named by :data:`OUT_ENV`.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

PACKAGE = "pytorchexample"
#: Environment variable holding the path of ``cifar10_20k.npz`` (read by ``task.load_data``).
DATA_ENV = "CIFAR10_NPZ"
#: Environment variable naming the folder where :data:`SERVER_HARNESS` writes its files.
OUT_ENV = "QUICKSTART_OUT_DIR"
#: Images of the probe batch whose scores the server network saves.
NUM_PROBE = 256

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "pytorchexample"
version = "1.0.0"
description = "Federated Learning with PyTorch and Flower (Quickstart Example)"
license = "Apache-2.0"
# flwr[simulation], flwr-datasets[vision], torch, torchvision (+ flwr-analytic for FedACnnL)
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "flwrlabs"

[tool.flwr.app.components]
serverapp = "pytorchexample.server_app:app"
clientapp = "pytorchexample.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 3
fraction-train = 0.5
local-epochs = 1
lr = 0.01
"""

INIT_PY = '''\
"""pytorchexample: A Flower / PyTorch app."""
'''

TASK_PY = '''\
"""pytorchexample: A Flower / PyTorch app."""

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, Features, Image
from flwr_datasets.partitioner import DirichletPartitioner
from torch.utils.data import DataLoader
from torchvision.transforms import Compose, Normalize, ToTensor

CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]


class Net(nn.Module):
    """Model (simple CNN adapted from 'PyTorch: A 60 Minute Blitz')"""

    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


partitioner = None  # Cache the partitioner (and its data set)

pytorch_transforms = Compose([ToTensor(), Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


def apply_transforms(batch):
    """Apply transforms to the partition from FederatedDataset."""
    batch["img"] = [pytorch_transforms(img) for img in batch["img"]]
    return batch


def load_cifar10() -> Dataset:
    """CIFAR-10 with the hub's columns ("img": PIL image, "label") from a local .npz (offline)."""
    data = np.load(os.environ["CIFAR10_NPZ"])
    features = Features({"img": Image(), "label": ClassLabel(names=CLASSES)})
    columns = {"img": list(data["x"]), "label": data["y"].astype(np.int64)}
    return Dataset.from_dict(columns, features=features)


def load_data(partition_id: int, num_partitions: int):
    """Load partition CIFAR10 data."""
    # Only initialize the partitioner (and load the data) once
    global partitioner
    if partitioner is None:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=0.1, seed=42
        )
        # Online: FederatedDataset(dataset="uoft-cs/cifar10", partitioners={"train": partitioner})
        partitioner.dataset = load_cifar10()
    partition = partitioner.load_partition(partition_id)
    # Divide data on each node: 80% train, 20% test
    partition_train_test = partition.train_test_split(test_size=0.2, seed=42)
    # Construct dataloaders
    partition_train_test = partition_train_test.with_transform(apply_transforms)
    trainloader = DataLoader(partition_train_test["train"], batch_size=32, shuffle=True)
    testloader = DataLoader(partition_train_test["test"], batch_size=32)
    return trainloader, testloader


def train(net, trainloader, epochs, lr, device):
    """Train the model on the training set."""
    net.to(device)  # move model to GPU if available
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for batch in trainloader:
            images = batch["img"].to(device)
            labels = batch["label"].to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    avg_trainloss = running_loss / (epochs * len(trainloader))
    return avg_trainloss


def test(net, testloader, device):
    """Validate the model on the test set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for batch in testloader:
            images = batch["img"].to(device)
            labels = batch["label"].to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (torch.max(outputs.data, 1)[1] == labels).sum().item()
    accuracy = correct / len(testloader.dataset)
    loss = loss / len(testloader)
    return loss, accuracy
'''

CLIENT_APP_FEDAVG = '''\
"""pytorchexample: A Flower / PyTorch app."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pytorchexample.task import Net, load_data
from pytorchexample.task import test as test_fn
from pytorchexample.task import train as train_fn

# Flower ClientApp
app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    """Train the model on local data."""

    # Load the model and initialize it with the received weights
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model.to(device)

    # Load the data
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    trainloader, _ = load_data(partition_id, num_partitions)

    # Call the training function
    train_loss = train_fn(
        model,
        trainloader,
        context.run_config["local-epochs"],
        msg.content["config"]["lr"],
        device,
    )

    # Construct and return reply Message
    model_record = ArrayRecord(model.state_dict())
    metrics = {
        "train_loss": train_loss,
        "num-examples": len(trainloader.dataset),
    }
    metric_record = MetricRecord(metrics)
    content = RecordDict({"arrays": model_record, "metrics": metric_record})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    """Evaluate the model on local data."""

    # Load the model and initialize it with the received weights
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model.to(device)

    # Load the data
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    _, valloader = load_data(partition_id, num_partitions)

    # Call the evaluation function
    eval_loss, eval_acc = test_fn(
        model,
        valloader,
        device,
    )

    # Construct and return reply Message
    metrics = {
        "eval_loss": eval_loss,
        "eval_acc": eval_acc,
        "num-examples": len(valloader.dataset),
    }
    metric_record = MetricRecord(metrics)
    content = RecordDict({"metrics": metric_record})
    return Message(content=content, reply_to=msg)
'''

SERVER_APP_FEDAVG = '''\
"""pytorchexample: A Flower / PyTorch app."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from pytorchexample.task import Net

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""

    # Read run config
    fraction_train: float = context.run_config["fraction-train"]
    num_rounds: int = context.run_config["num-server-rounds"]
    lr: float = context.run_config["lr"]

    # Load global model
    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    # Initialize FedAvg strategy
    strategy = FedAvg(fraction_train=fraction_train)

    # Start strategy, run FedAvg for `num_rounds`
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
    )

    # Save final model to disk
    print("\\nSaving final model to disk...")
    state_dict = result.arrays.to_torch_state_dict()
    torch.save(state_dict, "final_model.pt")
'''

# ------------------------------------------------------------------ the same project with FedACnnL
CLIENT_APP_FEDACNNL = '''\
"""pytorchexample: A Flower / PyTorch app."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr_analytic.clients import add_fedacnnl_handlers

from pytorchexample.task import Net, load_data
from pytorchexample.task import test as test_fn
from pytorchexample.task import train as train_fn

# Flower ClientApp
app = ClientApp()
add_fedacnnl_handlers(app, load_data, model=Net)


@app.train()
def train(msg: Message, context: Context):
    """Train the model on local data."""

    # Load the model and initialize it with the received weights
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model.to(device)

    # Load the data
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    trainloader, _ = load_data(partition_id, num_partitions)

    # Call the training function
    train_loss = train_fn(
        model,
        trainloader,
        context.run_config["local-epochs"],
        msg.content["config"]["lr"],
        device,
    )

    # Construct and return reply Message
    model_record = ArrayRecord(model.state_dict())
    metrics = {
        "train_loss": train_loss,
        "num-examples": len(trainloader.dataset),
    }
    metric_record = MetricRecord(metrics)
    content = RecordDict({"arrays": model_record, "metrics": metric_record})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    """Evaluate the model on local data."""

    # Load the model and initialize it with the received weights
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model.to(device)

    # Load the data
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    _, valloader = load_data(partition_id, num_partitions)

    # Call the evaluation function
    eval_loss, eval_acc = test_fn(
        model,
        valloader,
        device,
    )

    # Construct and return reply Message
    metrics = {
        "eval_loss": eval_loss,
        "eval_acc": eval_acc,
        "num-examples": len(valloader.dataset),
    }
    metric_record = MetricRecord(metrics)
    content = RecordDict({"metrics": metric_record})
    return Message(content=content, reply_to=msg)
'''

SERVER_APP_FEDACNNL = '''\
"""pytorchexample: A Flower / PyTorch app."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr_analytic.strategies import FedACnnL

from pytorchexample.task import Net

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""

    # Read run config
    fraction_train: float = context.run_config["fraction-train"]
    num_rounds: int = context.run_config["num-server-rounds"]
    lr: float = context.run_config["lr"]

    # Load global model
    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    # Initialize FedACnnL strategy (every node, every layer)
    strategy = FedACnnL(Net(), input_shape=(3, 32, 32))

    # Start strategy, run FedACnnL: one round per layer of Net, then evaluation
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": lr}),
    )
    metrics = result.evaluate_metrics_clientapp[strategy.num_rounds]
    print(f"global {metrics['global-accuracy']:.4f}, personalized {metrics['personal-accuracy']:.4f}")

    # Save final model to disk
    print("\\nSaving final model to disk...")
    state_dict = result.arrays.to_torch_state_dict()
    torch.save(state_dict, "final_model.pt")
'''

#: Appended to the body of ``main`` in the FedACnnL ``server_app.py`` by the test (not the user's).
SERVER_HARNESS = f'''
    # --- test harness (tests/test_quickstart_project.py); not part of the FedACnnL change ---
    import json
    import os
    from pathlib import Path

    import numpy as np

    from pytorchexample.task import pytorch_transforms

    out = Path(os.environ["{OUT_ENV}"])
    torch.save(state_dict, out / "state_dict.pt")
    images = np.load(os.environ["{DATA_ENV}"])["x"][:{NUM_PROBE}]
    probe = torch.stack([pytorch_transforms(img) for img in images]).numpy()
    np.savez(out / "probe.npz", x=probe, scores=strategy.net.predict(probe))
    last_round = max(result.evaluate_metrics_clientapp)
    summary = {{
        "last-round": last_round,
        "num-rounds": strategy.num_rounds,
        "evaluate": dict(result.evaluate_metrics_clientapp[last_round]),
        "train-rounds": sorted(result.train_metrics_clientapp),
    }}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
'''

FEDAVG = {"client_app.py": CLIENT_APP_FEDAVG, "server_app.py": SERVER_APP_FEDAVG}
FEDACNNL = {"client_app.py": CLIENT_APP_FEDACNNL, "server_app.py": SERVER_APP_FEDACNNL}


def project_diff() -> str:
    """The unified diff FedAvg -> FedACnnL of the client and server apps (``git diff`` style)."""
    parts = []
    for name in ("server_app.py", "client_app.py"):
        path = f"{PACKAGE}/{name}"
        parts += difflib.unified_diff(
            FEDAVG[name].splitlines(keepends=True),
            FEDACNNL[name].splitlines(keepends=True),
            fromfile=f"a/{path}",
            tofile=f"b/{path}",
            n=1,
        )
    return "".join(parts)


def changed_lines() -> tuple[list[str], list[str]]:
    """``(removed, added)`` lines of :func:`project_diff` (no headers)."""
    lines = project_diff().splitlines()
    body = [ln for ln in lines if not ln.startswith(("---", "+++"))]
    return [ln[1:] for ln in body if ln.startswith("-")], [ln[1:] for ln in body if ln[:1] == "+"]


def write_project(dest: Path | str, version: str = "fedacnnl", harness: bool = True) -> Path:
    """Write the quickstart project into ``dest`` (``version``: ``fedavg`` or ``fedacnnl``).

    With ``harness`` (FedACnnL only), :data:`SERVER_HARNESS` ends the server app's ``main``.
    """
    apps = {"fedavg": FEDAVG, "fedacnnl": FEDACNNL}[version]
    dest = Path(dest)
    package = dest / PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(PYPROJECT)
    (package / "__init__.py").write_text(INIT_PY)
    (package / "task.py").write_text(TASK_PY)
    (package / "client_app.py").write_text(apps["client_app.py"])
    server = apps["server_app.py"]
    if harness and version == "fedacnnl":
        server += SERVER_HARNESS
    (package / "server_app.py").write_text(server)
    return dest


def project_env(env: dict[str, str], data: Path | str, out: Path | str) -> dict[str, str]:
    """``env`` plus the data path (:data:`DATA_ENV`) and the harness's folder (:data:`OUT_ENV`)."""
    return {**env, DATA_ENV: str(Path(data).resolve()), OUT_ENV: str(Path(out).resolve())}


def whole_cpu() -> int:
    """CPUs per simulated client so that Ray runs one client at a time (all CPUs)."""
    return max(1, os.cpu_count() or 1)
