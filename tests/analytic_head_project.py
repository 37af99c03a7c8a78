"""The user's side of ``tests/test_analytic_head.py`` (issue 12): models, FedAvg handlers, a project.

In process (digits): ``ResNetish`` (BatchNorm and a residual addition: FedACnnL refuses it), ``Net``
(a chain FedACnnL trains), ``load_data`` over a federated split and the FedAvg handlers a user writes.

Through ``flwr run``: a quickstart project with a model FedACnnL refuses, FedAvg, then
``AnalyticHead``.
Built from :mod:`quickstart_project`: the same ``pyproject.toml``, ``load_data`` (CIFAR-10 from the
local npz, Dirichlet(0.1)) and FedAvg client handlers; ``Net`` is a small ResNet-ish CNN with
``BatchNorm2d`` and a residual addition; the client app gains one line,
:data:`HEAD_CLIENT_LINE`; the server app wraps FedAvg in ``AnalyticHead(..., head="fc3")`` and
ends with a harness writing ``results.json`` and the ``state_dict`` into ``$QUICKSTART_OUT_DIR``.
"""

from __future__ import annotations

from pathlib import Path

import quickstart_project as qp
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import DataLoader


class ResNetish(nn.Module):
    """conv-BN-ReLU, a residual block with BatchNorm, global pooling, ``fc``: FedACnnL refuses it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(h + self.bn2(self.conv2(h)))  # residual addition
        return self.fc(torch.flatten(self.pool(h), 1))


class Net(nn.Module):
    """A small chain FedACnnL trains (conv, pool, conv, pool, fc, fc)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc2(F.relu(self.fc1(x.view(-1, 16))))


def make_load_data(dataset, split):
    """``load_data(partition_id, num_partitions)`` (the quickstart's): DataLoaders of dict batches."""

    def load_data(partition_id: int, num_partitions: int):
        assert num_partitions == split.num_clients
        train, test = split.client(dataset, partition_id)

        def loader(data, shuffle):
            rows = [{"image": torch.tensor(x), "label": int(y)} for x, y in zip(data.x, data.y)]
            return DataLoader(rows, batch_size=32, shuffle=shuffle)

        return loader(train, True), loader(test, False)

    return load_data


def add_fedavg_handlers(app: ClientApp, model_fn, load) -> ClientApp:
    """The user's own FedAvg handlers (cross-entropy), as in the quickstart.

    Config ``lr`` and ``optimizer``: ``sgd`` (momentum 0.9, one epoch of the loader's batches) or
    ``adam`` (``steps`` full-batch steps on the client's training data).
    """

    @app.train()
    def train(msg: Message, context) -> Message:
        config = msg.content["config"]
        pid = int(context.node_config["partition-id"])
        torch.manual_seed(1000 * int(config.get("round", 0)) + pid)
        model = model_fn()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        trainloader, _ = load(pid, int(context.node_config["num-partitions"]))
        model.train()
        if config.get("optimizer", "sgd") == "adam":
            batches = list(trainloader)
            x = torch.cat([b["image"] for b in batches])
            y = torch.cat([b["label"] for b in batches])
            opt = torch.optim.Adam(model.parameters(), lr=float(config["lr"]))
            batches = [{"image": x, "label": y}] * int(config["steps"])
        else:
            opt = torch.optim.SGD(model.parameters(), lr=float(config["lr"]), momentum=0.9)
            batches = trainloader
        for batch in batches:
            opt.zero_grad()
            F.cross_entropy(model(batch["image"]), batch["label"]).backward()
            opt.step()
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": len(trainloader.dataset)}),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        model = model_fn()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        model.eval()
        node = context.node_config
        _, testloader = load(int(node["partition-id"]), int(node["num-partitions"]))
        correct = 0
        with torch.no_grad():
            for batch in testloader:
                correct += int((model(batch["image"]).argmax(1) == batch["label"]).sum())
        n = len(testloader.dataset)
        metrics = MetricRecord({"eval_acc": correct / n, "num-examples": n})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return app


# ----------------------------------------------------------- the project run with `flwr run`

RESNET_NET = '''class Net(nn.Module):
    """A small ResNet-ish CNN: BatchNorm and a residual block (FedACnnL refuses it)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.avg = nn.AdaptiveAvgPool2d(2)
        self.fc3 = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(x + self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc3(torch.flatten(self.avg(x), 1))


'''

HEAD_CLIENT_LINE = 'add_analytic_head_handlers(app, load_data, model=Net, head="fc3")'

HEAD_SERVER_APP = '''"""pytorchexample: A Flower / PyTorch app."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr_analytic.strategies import AnalyticHead

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

    # FedAvg, then one round solving the head fc3 in closed form
    strategy = AnalyticHead(FedAvg(fraction_train=fraction_train), head="fc3", gamma=1e-4)

    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
    )
    metrics = result.evaluate_metrics_clientapp[strategy.head_round]
    print(f"head: global {metrics['global-accuracy']:.4f}, personalized {metrics['personal-accuracy']:.4f}")

    # Save final model to disk
    print("\\nSaving final model to disk...")
    state_dict = result.arrays.to_torch_state_dict()
    torch.save(state_dict, "final_model.pt")

    # --- test harness (tests/test_analytic_head.py) ---
    import json
    import os
    from pathlib import Path

    out = Path(os.environ["QUICKSTART_OUT_DIR"])
    torch.save(state_dict, out / "state_dict.pt")
    summary = {
        "head-round": strategy.head_round,
        "train": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate": {str(r): dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
'''


def write_head_project(dest: Path) -> Path:
    """The quickstart project with a ResNet-ish ``Net``, FedAvg handlers + the head's, AnalyticHead."""
    project = qp.write_project(dest, "fedavg", harness=False)
    package = project / qp.PACKAGE
    task = qp.TASK_PY
    start, end = task.index("class Net(nn.Module):"), task.index("partitioner = None")
    (package / "task.py").write_text(task[:start] + RESNET_NET + task[end:])
    client = qp.CLIENT_APP_FEDAVG.replace(
        "from flwr.clientapp import ClientApp\n",
        "from flwr.clientapp import ClientApp\n"
        "from flwr_analytic.clients import add_analytic_head_handlers\n",
    ).replace("app = ClientApp()\n", f"app = ClientApp()\n{HEAD_CLIENT_LINE}\n")
    assert HEAD_CLIENT_LINE in client
    (package / "client_app.py").write_text(client)
    (package / "server_app.py").write_text(HEAD_SERVER_APP)
    return project
