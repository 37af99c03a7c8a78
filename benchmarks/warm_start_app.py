"""The Flower apps of ``benchmarks/warm_start.py`` (issue 12): a quickstart project and its arms.

The user's side is the Flower PyTorch quickstart (``flwr new``, Message API): :class:`Net` (conv
3→6 5×5, pool, conv 6→16 5×5, pool, fc 120, fc 84, fc 10; on MNIST one input channel and 28×28
images), ``load_data(partition_id, num_partitions)`` returning DataLoaders of batch 32 with the
quickstart's normalization ``(x - 0.5) / 0.5``, local training with Adam (one epoch; the
benchmark sets lr 1e-3) and the evaluation. The data are in memory (``TensorDataset``) rather
than flwr-datasets' PIL transforms, so that the wall times measure training, not image decoding.

Our part is what a user adds to such a project: in the client app, ``add_fedacnnl_handlers`` and
``add_analytic_head_handlers`` (two lines); in the server app, ``warm_start(...)`` or
``AnalyticHead(FedAvg(...), head="fc3")``. Local fine-tuning (the personalization baseline) is a
third client handler, ``evaluate.finetune``, written here as a user would.

Two server arms, one Flower run each:

- ``fedavg``: ``Metered(AnalyticHead(Last(FedAvg)))`` for ``rounds`` rounds from a seeded random
  ``Net``, then the analytic head round; then, from FedAvg's last model (kept by :class:`Last`), one
  ``evaluate.finetune`` round per entry of ``finetune-epochs`` (every client fine-tunes that many
  local epochs and reports its test accuracy), and the head round again with each client's own λ
  (``AnalyticHead(..., personal_lambda="auto")``).
- ``warm-start``: :func:`~flwr_analytic.strategies.warm_start.warm_start`: ``FedACnnL(Net(), ...)``
  (one round per layer, float32 statistics, other options the package defaults), then FedAvg
  for ``warm-rounds`` rounds from its model.

Each writes its round records (``Metered``) and phase facts to ``cfg["out"]`` as JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flwr_analytic.clients import add_analytic_head_handlers, add_fedacnnl_handlers
from flwr_analytic.data import federated_split
from flwr_analytic.data.loaders import load_cifar10, load_mnist
from flwr_analytic.strategies import AnalyticHead, FedACnnL, Metered
from flwr_analytic.strategies.warm_start import warm_start
from flwr_analytic.strategies.wrapper import StrategyWrapper

#: input shape of each data set (channels, side)
SHAPES = {"cifar10": (3, 32), "mnist": (1, 28)}


class Net(nn.Module):
    """The quickstart's CNN ('PyTorch: A 60 Minute Blitz'), for ``channels`` × ``side``² images."""

    def __init__(self, channels: int = 3, side: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.flat = 16 * (((side - 4) // 2 - 4) // 2) ** 2
        self.fc1 = nn.Linear(self.flat, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images."""
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, self.flat)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


# ------------------------------------------------------------------------------------ the data
_CACHE: dict[str, Any] = {}


def load_federation(cfg: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, Any]:
    """Images (normalized to [-1, 1]), labels and the 20-client split of ``cfg["dataset"]``.

    CIFAR-10: ``cifar10_20k.npz``, Dirichlet(``alpha``) over labels, seeded, 75/25 per client.
    MNIST: ``mnist70k.npz`` with its stored 20-client split.
    """
    key = json.dumps([cfg["dataset"], cfg["data-dir"], cfg["seed"], cfg.get("limit", 0)])
    if key not in _CACHE:
        folder = Path(cfg["data-dir"])
        if cfg["dataset"] == "cifar10":
            ds = load_cifar10(folder / "cifar10_20k.npz", split="all")
            if cfg.get("limit"):
                ds = ds.subset(np.arange(int(cfg["limit"])))
            split = federated_split(
                ds, int(cfg["num-clients"]), "dirichlet", alpha=float(cfg["alpha"]),
                test_fraction=0.25, seed=int(cfg["seed"]),
                min_partition_size=int(cfg.get("min-partition-size", 20)),
            )  # fmt: skip
        elif cfg["dataset"] == "mnist":
            ds = load_mnist(folder / "mnist70k.npz", split="all")
            split = federated_split(ds, 20, "precomputed")
        else:
            raise ValueError(f"dataset {cfg['dataset']!r}: allowed cifar10, mnist")
        x = ((ds.x.astype(np.float32) - 0.5) / 0.5).astype(np.float32)
        _CACHE[key] = (x, ds.y.astype(np.int64), split)
    return _CACHE[key]


def make_load_data(cfg: dict[str, Any]):  # noqa: ANN201
    """The project's ``load_data(partition_id, num_partitions) -> (trainloader, testloader)``."""

    def load_data(partition_id: int, num_partitions: int) -> tuple[DataLoader, DataLoader]:
        x, y, split = load_federation(cfg)
        if num_partitions != split.num_clients:
            raise ValueError(f"{num_partitions} partitions, but the split has {split.num_clients}")

        def tensors(index: np.ndarray) -> TensorDataset:
            return TensorDataset(torch.from_numpy(x[index]), torch.from_numpy(y[index]))

        shuffle = torch.Generator().manual_seed(int(cfg["seed"]) * 1000 + partition_id)
        train = DataLoader(tensors(split.train[partition_id]), 32, shuffle=True, generator=shuffle)
        return train, DataLoader(tensors(split.test[partition_id]), 32)

    return load_data


def local_train(model: nn.Module, loader: DataLoader, epochs: int, lr: float) -> float:
    """The quickstart's ``train``: Adam, cross-entropy, ``epochs`` passes; the mean batch loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        for images, labels in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
    return total / max(batches, 1)


def test(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """The quickstart's ``test``: ``(mean batch loss, accuracy)``."""
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for images, labels in loader:
            out = model(images)
            loss += F.cross_entropy(out, labels).item()
            correct += int((out.argmax(1) == labels).sum())
    return loss / max(len(loader), 1), correct / max(len(loader.dataset), 1)


# ------------------------------------------------------------------------------ the client app
def make_client_app(cfg: dict[str, Any]) -> ClientApp:
    """The quickstart client (FedAvg train / evaluate), fine-tuning, and our two lines."""
    channels, side = SHAPES[cfg["dataset"]]
    load_data = make_load_data(cfg)

    def model() -> Net:
        return Net(channels, side)

    app = ClientApp()
    add_fedacnnl_handlers(app, load_data, model=model)
    add_analytic_head_handlers(app, load_data, model=model, head="fc3")

    def setup(msg: Message, context: Context) -> tuple[Net, DataLoader, DataLoader, int]:
        torch.set_num_threads(1)
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"].get("server-round", 0))
        torch.manual_seed(int(cfg["seed"]) * 100_000 + server_round * 100 + pid)
        net = model()
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        train, test_loader = load_data(pid, int(context.node_config["num-partitions"]))
        return net, train, test_loader, pid

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        net, trainloader, _, _ = setup(msg, context)
        config = msg.content["config"]
        loss = local_train(net, trainloader, int(config["local-epochs"]), float(config["lr"]))
        metrics = MetricRecord({"train_loss": loss, "num-examples": len(trainloader.dataset)})
        content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        net, _, testloader, _ = setup(msg, context)
        loss, acc = test(net, testloader)
        n = len(testloader.dataset)
        metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": n})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    @app.evaluate("finetune")
    def finetune(msg: Message, context: Context) -> Message:
        net, trainloader, testloader, pid = setup(msg, context)
        config = msg.content["config"]
        start = time.perf_counter()
        local_train(net, trainloader, int(config["epochs"]), float(config["lr"]))
        seconds = time.perf_counter() - start
        _, acc = test(net, testloader)
        metrics = {"finetune-acc": acc, "finetune-seconds": seconds, "partition-id": pid}
        metrics["num-examples"] = len(testloader.dataset)
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


# ------------------------------------------------------------------------------ the server app
def _plain(value: Any) -> Any:
    """A JSON value for NumPy scalars and arrays (``tolist``); text for anything else."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


class Last(StrategyWrapper):
    """Keep the model the wrapped strategy aggregated last (FedAvg's final model)."""

    arrays: ArrayRecord | None = None

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        """The wrapped strategy's aggregate; its arrays are kept."""
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.arrays = arrays
        return arrays, metrics


def finetune_round(grid: Grid, arrays: ArrayRecord, epochs: int, lr: float) -> dict[str, Any]:
    """Send ``arrays`` to every node for ``epochs`` epochs of local fine-tuning; the test accuracy."""
    nodes = sorted(grid.get_node_ids())
    config = ConfigRecord({"epochs": epochs, "lr": lr})
    start = time.perf_counter()
    messages = [
        Message(
            RecordDict({"arrays": arrays, "config": config}),
            dst_node_id=node,
            message_type="evaluate.finetune",
        )
        for node in nodes
    ]
    replies = [r for r in grid.send_and_receive(messages, timeout=3600) if r.has_content()]
    seconds = time.perf_counter() - start
    rows = sorted(
        (dict(next(iter(r.content.metric_records.values()))) for r in replies),
        key=lambda m: m["partition-id"],
    )
    n = np.array([m["num-examples"] for m in rows], dtype=float)
    acc = np.array([m["finetune-acc"] for m in rows])
    return {
        "epochs": epochs,
        "round-time": seconds,
        "bytes-sent": len(nodes) * sum(a.numpy().nbytes for a in arrays.values()),
        "personal-accuracy": float(acc @ n / n.sum()),
        "personal-accuracy-clients": acc.tolist(),
        "client-ids": [int(m["partition-id"]) for m in rows],
        "client-seconds": [float(m["finetune-seconds"]) for m in rows],
    }


def make_server_app(cfg: dict[str, Any]) -> ServerApp:
    """The arm ``cfg["arm"]`` (``fedavg`` or ``warm-start``) as a ServerApp writing ``cfg["out"]``."""
    channels, side = SHAPES[cfg["dataset"]]
    app = ServerApp()
    train_config = ConfigRecord({"lr": float(cfg["lr"]), "local-epochs": int(cfg["local-epochs"])})

    def fedavg() -> FedAvg:
        return FedAvg(
            fraction_train=float(cfg["fraction-train"]),
            fraction_evaluate=1.0,
            min_available_nodes=int(cfg["num-clients"]),
        )

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        out: dict[str, Any] = {"arm": cfg["arm"], "config": cfg}
        torch.manual_seed(int(cfg["seed"]))
        initial = ArrayRecord(Net(channels, side).state_dict())
        start = time.perf_counter()
        if cfg["arm"] == "fedavg":
            last = Last(fedavg())
            head = AnalyticHead(last, head="fc3")
            strategy = Metered(head)
            result = strategy.start(
                grid, initial_arrays=initial, num_rounds=int(cfg["rounds"]),
                train_config=train_config,
            )  # fmt: skip
            out["head-round"] = head.head_round
            out["history"] = strategy.history_records()
            out["head"] = dict(result.evaluate_metrics_clientapp[head.head_round])
            out["finetune"] = [
                finetune_round(grid, last.arrays, int(e), float(cfg["lr"]))
                for e in cfg["finetune-epochs"]
            ]
            # the same head round with each client's own λ (5-fold validation), from the same model
            auto = Metered(AnalyticHead(fedavg(), head="fc3", personal_lambda="auto"))
            auto.start(grid, initial_arrays=last.arrays, num_rounds=0)
            out["head-auto-history"] = auto.history_records()
        elif cfg["arm"] == "warm-start":
            shape = (channels, side, side)
            analytic = Metered(FedACnnL(Net(channels, side), input_shape=shape, dtype="float32"))
            then = Metered(fedavg())
            result = warm_start(
                grid, analytic, then, num_rounds=int(cfg["warm-rounds"]),
                train_config=train_config,
            )  # fmt: skip
            out["analytic-history"] = analytic.history_records()
            out["history"] = then.history_records()
            out["analytic-time"] = result.analytic_time
            out["gradient-time"] = result.gradient_time
            out["analytic"] = dict(result.phase_metrics())
        else:
            raise ValueError(f"arm {cfg['arm']!r}: allowed fedavg, warm-start")
        out["wall-time"] = time.perf_counter() - start
        Path(cfg["out"]).write_text(json.dumps(out, default=_plain))

    return app
