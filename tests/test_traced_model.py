"""Bring your own model and data: a user's ``nn.Module`` traced (torch.fx) and trained by FedACnnL.

Exactness is checked against an independent reference: every layer's whole design matrix built with
``torch.nn.functional.unfold`` (kernel, stride, padding, dilation) on the pooled data, solved by the
same rule. Two user-style models: an ``nn.Sequential`` and a ``forward``-written module with
functional calls; both have layers the package's own architectures lack (stride, dilation, no bias,
average and adaptive pooling, LeakyReLU/Tanh/GELU, dropout).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rounding import TOL, output_rounding_bound
from torch import nn
from torch.utils.data import DataLoader, Dataset

from flwr_analytic.analytic import AnalyticNetwork, LayerStatistics, fit_federated
from flwr_analytic.analytic.design import conv_rows
from flwr_analytic.data import federated_split
from flwr_analytic.data.batches import DataFormatError, LoaderData, iter_batches
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.models import ConvGeometry, UnsupportedModelError, trace_model


def sequential_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 12, 2, stride=2, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(48, 40),
        nn.GELU(),
        nn.Linear(40, 10),
    )


class FunctionalNet(nn.Module):
    """A ``forward``-written model: functional activations and pooling, ``view(x.size(0), -1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=2, dilation=2)
        self.conv2 = nn.Conv2d(6, 16, (3, 2), padding=(1, 0))
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.fc1 = nn.Linear(64, 30)
        self.fc2 = nn.Linear(30, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x / 1.0)), 2)
        x = self.pool(torch.relu(self.conv2(x)))
        x = x.view(x.size(0), -1)
        x = F.dropout(F.relu(self.fc1(x)), 0.5, self.training)
        return self.fc2(x)


class QuickstartNet(nn.Module):
    """The Flower PyTorch quickstart ``Net`` (CIFAR-10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


MODELS = {"sequential": sequential_net, "functional": FunctionalNet}


def reference_fit(net: AnalyticNetwork, x: np.ndarray, y: np.ndarray) -> list[LayerStatistics]:
    """Centralized training from explicit design matrices (``F.unfold``) of all pooled rows."""
    totals = []
    for layer in range(net.num_layers):
        h = net.layer_input(layer, x)
        geo = net.arch.conv_geometry(layer)
        if geo is not None:
            cols = F.unfold(h, geo.kernel, geo.dilation, geo.padding, geo.stride).transpose(1, 2)
            per_sample, p = cols.shape[1], cols.reshape(-1, cols.shape[2]).numpy()
        else:
            per_sample, p = 1, torch.flatten(h, 1).numpy()
        a = np.hstack([p, np.ones((len(p), 1))])
        t = net.layer_targets(layer, y)
        t = np.zeros((len(y), 0)) if t is None else t
        stats = LayerStatistics(a.T @ a, a.T @ np.repeat(t, per_sample, axis=0), len(y))
        net.solve(layer, stats)
        totals.append(stats)
    return totals


def _rel(w: np.ndarray, r: np.ndarray) -> float:
    return float(np.abs(w - r).max() / max(np.abs(r).max(), 1e-300))


def test_conv_rows_equal_unfold_for_any_geometry():
    x = torch.randn(3, 4, 11, 9, dtype=torch.float64)
    for geo in (
        ConvGeometry.of(4, 3),
        ConvGeometry.of(4, (3, 2), stride=2, padding=(1, 2), dilation=2),
        ConvGeometry.of(4, 1, stride=3),
    ):
        ref = F.unfold(x, geo.kernel, geo.dilation, geo.padding, geo.stride).transpose(1, 2)
        np.testing.assert_array_equal(conv_rows(x, geo).numpy(), ref.numpy())
    # the historical (kernel, padding) call is the stride-1 square case
    ref = F.unfold(x, 3, padding=1).transpose(1, 2)
    np.testing.assert_array_equal(conv_rows(x, 3, 1).numpy(), ref.numpy())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_traced_model_federated_equals_centralized(digits, name):
    """Every layer of a traced user model: federated (5 Dirichlet clients) = pooled reference."""
    arch = trace_model(MODELS[name](), digits.input_shape)
    split = federated_split(digits, 5, "dirichlet", alpha=0.3, test_fraction=0.0, seed=4)
    pooled = np.concatenate(split.train)
    ref = AnalyticNetwork(arch, seed=2)
    totals = reference_fit(ref, digits.x[pooled], digits.y[pooled])
    net = AnalyticNetwork(arch, seed=2)
    fit_federated(net, [(digits.x[i], digits.y[i]) for i in split.train], [17, 64, 256, 5, 1000])
    last = net.num_layers - 1
    for layer in range(last):
        assert _rel(net.weights[layer], ref.weights[layer]) <= TOL, layer
    assert _rel(net.weights[last], ref.weights[last]) <= output_rounding_bound(ref, totals[last])
    # a layer without bias keeps a zero bias row (sequential: the second conv)
    for layer in range(net.num_layers):
        if not arch.has_bias(layer):
            assert np.all(net.weights[layer][-1] == 0.0)
    assert any(not arch.has_bias(layer) for layer in range(arch.num_layers)) == (
        name == "sequential"
    )
    probe = digits.x[pooled[:100]]
    np.testing.assert_allclose(net.predict(probe), ref.predict(probe), rtol=1e-6, atol=1e-8)
    assert np.mean(net.predict(digits.x).argmax(1) == digits.y) > 0.8


@pytest.mark.parametrize("name", sorted(MODELS))
def test_solved_weights_load_into_the_users_module(digits, name):
    arch = trace_model(MODELS[name](), digits.input_shape)
    net = AnalyticNetwork(arch, seed=1)
    fit_federated(net, [(digits.x, digits.y)])
    user = MODELS[name]().eval()
    user.load_state_dict(net.state_dict())  # strict: the user's parameter names, float32
    user64 = MODELS[name]().double().eval()
    user64.load_state_dict(net.state_dict())
    x = torch.from_numpy(digits.x[:256])
    expected = net.predict(digits.x[:256])
    with torch.no_grad():
        np.testing.assert_allclose(user64(x.double()).numpy(), expected, rtol=1e-12, atol=1e-12)
        scores32 = user(x).numpy()
    scale = np.abs(expected).max()
    assert np.abs(scores32 - expected).max() <= 1e-5 * scale  # float32 rounding
    # and back: a module's weights installed into a fresh network give the same model
    again = AnalyticNetwork(arch, seed=1)
    again.load_module(user64)
    for w, r in zip(again.weights, net.weights, strict=True):
        np.testing.assert_array_equal(w, r)


def test_quickstart_net_is_traced_as_five_layers():
    arch = trace_model(QuickstartNet(), (3, 32, 32))
    assert [(layer.name, layer.kind, layer.design_dim) for layer in arch.layers] == [
        ("conv1", "conv", 3 * 25 + 1),
        ("conv2", "conv", 6 * 25 + 1),
        ("fc1", "dense", 401),
        ("fc2", "dense", 121),
        ("fc3", "dense", 85),
    ]
    assert [layer.activation for layer in arch.layers] == ["relu"] * 4 + ["identity"]
    assert arch.num_classes == 10 and arch.input_shape_of(1) == (6, 14, 14)
    net = AnalyticNetwork(arch)
    assert [net.rows_per_sample(k) for k in range(5)] == [28 * 28, 10 * 10, 1, 1, 1]
    expected = {k for k in QuickstartNet().state_dict()}
    assert {k for layer in range(5) for k in P.layer_keys(net, layer)} == expected


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.relu(self.bn1(self.conv(x))), 1))


class WithResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.relu(self.conv(x)) + x, 1))


class SharedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.out(F.relu(self.fc(F.relu(self.fc(x)))))


REFUSED = {
    "batchnorm": (WithBatchNorm, r"module 'bn1' \(BatchNorm2d\)"),
    "residual": (WithResidual, r"operation 'add' .*combines two tensors"),
    "shared": (SharedWeights, r"module 'fc' \(Linear\).*called twice"),
    "grouped": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3, groups=1),
            nn.Conv2d(2, 2, 3, groups=2),
            nn.Flatten(),
            nn.Linear(32, 10),
        ),  # fmt: skip
        r"module '1' \(Conv2d\): groups=2",
    ),  # fmt: skip
    "softmax-after-output": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softmax(dim=1)),
        r"module '2' \(Softmax\)",
    ),
    "conv-output": (lambda: nn.Sequential(nn.Conv2d(1, 10, 8)), r"output layer must be a Linear"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_unsupported_models_are_refused_before_any_round(kind):
    from flwr_analytic.strategies import FedACnnL

    build, pattern = REFUSED[kind]
    with pytest.raises(UnsupportedModelError, match=pattern) as info:
        trace_model(build(), (1, 8, 8))
    if kind != "conv-output":
        assert "FedACnnL supports Conv2d" in str(info.value)  # says what is supported
    with pytest.raises(UnsupportedModelError, match=pattern):  # the strategy refuses it at once
        FedACnnL(build(), input_shape=(1, 8, 8))


def test_wrong_input_shape_and_missing_shape_are_named():
    from flwr_analytic.strategies import FedACnnL

    with pytest.raises(UnsupportedModelError, match=r"QuickstartNet does not run on a sample"):
        trace_model(QuickstartNet(), (1, 8, 8))
    with pytest.raises(ValueError, match="input_shape: give the shape of one sample"):
        FedACnnL(QuickstartNet())


class DigitImages(Dataset):
    """A torch ``Dataset`` of dict samples with a user transform (normalization)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, key: str = "img") -> None:
        self.x, self.y, self.key = x, y, key

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {self.key: (torch.from_numpy(self.x[i]) - 0.5) / 0.25, "label": int(self.y[i])}


def test_statistics_stream_from_a_users_dataloader(digits):
    """Dict and tuple batches, the user's transform applied: same statistics as the arrays."""
    arch = trace_model(FunctionalNet(), digits.input_shape)
    net = AnalyticNetwork(arch, seed=0)
    x, y = digits.x[:300], digits.y[:300]
    fit_federated(net, [(x, y)])  # every layer solved, so later layers see real inputs
    normalized = (x - 0.5) / 0.25
    dict_loader = DataLoader(DigitImages(x, y), batch_size=32, shuffle=True)
    tuple_loader = DataLoader(list(zip(torch.from_numpy(normalized), torch.from_numpy(y))), 50)
    for layer in range(net.num_layers):
        ref = net.statistics(layer, normalized, y, batch_size=300)
        for source in (LoaderData(dict_loader), tuple_loader):
            got = net.statistics(layer, source)
            assert got.count == 300
            np.testing.assert_allclose(got.gram, ref.gram, rtol=1e-12, atol=1e-9)
            np.testing.assert_allclose(got.cross, ref.cross, rtol=1e-12, atol=1e-9)
    res = net.evaluate(LoaderData(dict_loader))
    assert res["num-examples"] == 300
    assert res["accuracy"] == pytest.approx(net.evaluate(normalized, y)["accuracy"])
    # other keys: named, or refused with the keys present
    other = DataLoader(DigitImages(x, y, key="pixels"), batch_size=64)
    assert net.statistics(0, LoaderData(other, image_key="pixels")).count == 300
    with pytest.raises(DataFormatError, match=r"none of the image keys .*'pixels'"):
        list(iter_batches(other))


def test_a_client_with_another_model_is_told(digits):
    arch = trace_model(FunctionalNet(), digits.input_shape)
    config = P.network_config(AnalyticNetwork(arch), batch_size=64)
    assert P.network_from_config(config, FunctionalNet).arch.describe() == arch.describe()
    with pytest.raises(UnsupportedModelError, match=r"differs from the server's"):
        P.network_from_config(config, sequential_net)
    with pytest.raises(UnsupportedModelError, match=r"give the client app the same model"):
        P.network_from_config(config)


def test_legacy_numpyclient_project_trains_a_users_model(digits):
    """A NumPyClient project (``client_fn`` + ``flwr.server.strategy``): same model and data support.

    Driven by hand, as Flower's legacy server loop would (the Ray run of the legacy adapters is
    in the slow tests); the clients hold DataLoaders of dict batches, the model has a bias-free conv.
    """
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from legacy_driver import client_manager

    from flwr_analytic.clients import FedACnnLNumPyClient
    from flwr_analytic.strategies.fedacnnl_legacy import FedACnnLLegacy

    split = federated_split(digits, 4, "dirichlet", alpha=0.5, seed=2)

    def loader(index):
        return DataLoader(DigitImages(digits.x[index], digits.y[index]), batch_size=40)

    clients = {
        700 + k: FedACnnLNumPyClient(
            loader(split.train[k]), loader(split.test[k]), partition_id=k, model=sequential_net
        )
        for k in range(4)
    }
    manager = client_manager(clients)
    strategy = FedACnnLLegacy(
        sequential_net(), input_shape=(1, 8, 8), seed=3, min_train_nodes=4, min_available_nodes=4
    )
    params = strategy.initialize_parameters(manager)
    for rnd in range(1, strategy.num_rounds + 1):
        results = []
        for proxy, ins in strategy.configure_fit(rnd, params, manager):
            arrays, n, metrics = clients[proxy.node_id].fit(
                parameters_to_ndarrays(ins.parameters), ins.config
            )
            results.append(
                (proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, metrics))
            )
        params, metrics = strategy.aggregate_fit(rnd, results[::-1], [])
        assert metrics["num-clients"] == 4
    # the same as in-memory FedACnnL on the normalized pooled data
    ref = AnalyticNetwork(trace_model(sequential_net(), (1, 8, 8)), seed=3)
    fit_federated(ref, [((digits.x[i] - 0.5) / 0.25, digits.y[i]) for i in split.train])
    for layer, (w, r) in enumerate(zip(strategy.net.weights, ref.weights, strict=True)):
        bound = TOL if layer < ref.num_layers - 1 else 1e-6
        assert _rel(w, r) <= bound, layer
    evals = []
    for proxy, ins in strategy.configure_evaluate(strategy.num_rounds, params, manager):
        loss, n, m = clients[proxy.node_id].evaluate(
            parameters_to_ndarrays(ins.parameters), ins.config
        )
        evals.append((proxy, type("R", (), {"loss": loss, "num_examples": n, "metrics": m})()))
    _, agg = strategy.aggregate_evaluate(strategy.num_rounds, evals, [])
    assert agg["num-clients"] == 4
    assert agg["num-examples"] == sum(len(i) for i in split.test)
    assert agg["personal-accuracy"] > agg["global-accuracy"] > 0.8
    # the final parameters load into the user's module
    user = sequential_net()
    user.load_state_dict(strategy.net.state_dict())


def test_a_flwr_datasets_partition_is_client_data(digits):
    """``FederatedDataset(...).load_partition(k)``-style data: a partition of a HF ``Dataset``."""
    from datasets import Dataset, Features, Image, Value
    from flwr_datasets.partitioner import DirichletPartitioner
    from PIL import Image as PILImage

    from flwr_analytic.clients.fedacnnl_local import as_client_data

    images = np.round(digits.x[:, 0] * 255).astype(np.uint8)
    partitioner = DirichletPartitioner(3, partition_by="label", alpha=0.5, seed=42)
    features = Features({"image": Image(), "label": Value("int64")})
    pil = [PILImage.fromarray(im) for im in images]  # hub vision sets hold PIL images
    partitioner.dataset = Dataset.from_dict({"image": pil, "label": digits.y.tolist()}, features)
    partition = partitioner.load_partition(1)
    data = as_client_data(partition)
    assert data.input_shape == (1, 8, 8) and len(data) == partition.num_rows
    np.testing.assert_array_equal(data.y, np.asarray(partition["label"]))
    net = AnalyticNetwork(trace_model(sequential_net(), (1, 8, 8)))
    stats = net.statistics(0, data)
    pixels = np.stack([np.asarray(im) for im in partition["image"]])[:, None]
    ref = net.statistics(0, pixels.astype(np.float32) / np.float32(255), data.y)
    np.testing.assert_allclose(stats.gram, ref.gram, rtol=1e-12)


def test_handlers_in_a_users_app_ignore_the_projects_own_run_config(digits):
    """The project's keys, even ones named like FedACnnL's (``dataset``, ``seed``), are not ours."""
    from flwr.clientapp import ClientApp

    from flwr_analytic.clients import add_fedacnnl_handlers
    from flwr_analytic.fedacnnl import LocalGrid
    from flwr_analytic.strategies import FedACnnL

    split = federated_split(digits, 3, "iid", seed=1)

    def load_data(partition_id, num_partitions):
        assert num_partitions == 3
        train, test = split.client(digits, partition_id)
        return (DataLoader(DigitImages(d.x, d.y), batch_size=64) for d in (train, test))

    app = ClientApp()
    add_fedacnnl_handlers(app, load_data, model=sequential_net)
    theirs = {"dataset": "uoft-cs/cifar10", "seed": -1, "batch-size": 0, "model": "resnet18",
              "lr": 0.1, "local-epochs": 1}  # fmt: skip
    strategy = FedACnnL(sequential_net(), input_shape=(1, 8, 8), accept_failures=False,
                        min_train_nodes=3, min_available_nodes=3, min_evaluate_nodes=3)  # fmt: skip
    result = strategy.start(grid=LocalGrid(app, 3, theirs, seed=2))
    assert result.evaluate_metrics_clientapp[strategy.num_rounds]["num-clients"] == 3
