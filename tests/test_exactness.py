"""FedACnnL equals centralized training: summed client statistics give the pooled solution.

The reference builds every layer's whole design matrix explicitly (``torch.nn.functional.unfold`` for
conv layers, plain numpy products for ``AᵀA`` and ``AᵀT``): a code path independent of the streaming
accumulator the clients use.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flwr_analytic.analytic import AnalyticNetwork, LayerStatistics, fit_federated, layer_seed
from flwr_analytic.data import federated_split
from flwr_analytic.models import ConvSpec, cnn, mlp

TOL = 1e-9


def reference_fit(net: AnalyticNetwork, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Centralized training from explicit design matrices of all pooled rows."""
    for layer in range(net.num_layers):
        h = net.layer_input(layer, x)
        spec = net.arch.spec(layer)
        if isinstance(spec, ConvSpec):
            patches = F.unfold(h, spec.kernel_size, padding=spec.padding).transpose(1, 2)
            per_sample = patches.shape[1]
            p = patches.reshape(-1, patches.shape[2]).numpy()
        else:
            per_sample, p = 1, torch.flatten(h, 1).numpy()
        a = np.hstack([p, np.ones((len(p), 1))])
        stats = None
        if net.needs_statistics(layer):
            t = net.layer_targets(layer, y)
            t = np.zeros((len(y), 0)) if t is None else t
            stats = LayerStatistics(a.T @ a, a.T @ np.repeat(t, per_sample, axis=0), len(y))
        net.solve(layer, stats)
    return [w.copy() for w in net.weights]


def max_relative_difference(ws, refs):
    return [float(np.abs(w - r).max() / np.abs(r).max()) for w, r in zip(ws, refs, strict=True)]


def _check(dataset, arch, scheme, split, batch_sizes, seed=3):
    pooled = np.concatenate(split)
    ref_net = AnalyticNetwork(arch, scheme, seed=seed)
    refs = reference_fit(ref_net, dataset.x[pooled], dataset.y[pooled])
    net = AnalyticNetwork(arch, scheme, seed=seed)
    fit_federated(net, [(dataset.x[i], dataset.y[i]) for i in split], batch_sizes)
    diffs = max_relative_difference(net.weights, refs)
    assert max(diffs) <= TOL, diffs
    # the federated network also predicts like the reference
    probe = dataset.x[pooled[:64]]
    np.testing.assert_allclose(net.predict(probe), ref_net.predict(probe), rtol=1e-7, atol=1e-9)
    return diffs


PARTITIONS = [
    ("one", 1, "iid"),
    ("iid20", 20, "iid"),
    ("dir20", 20, "dirichlet"),
    ("dir100", 100, "dirichlet"),
]


def _partition(dataset, num, method):
    split = federated_split(dataset, num, method, alpha=0.1, test_fraction=0.0, seed=11)
    return split.train


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize(("label", "num", "method"), PARTITIONS)
def test_federated_equals_centralized_on_digits(digits, model, label, num, method):
    arch = mlp(digits.input_shape, 10, hidden=128) if model == "mlp" else cnn(digits.input_shape)
    split = _partition(digits, num, method)
    assert sum(len(s) for s in split) == len(digits)
    batch_sizes = [3 + 17 * (k % 5) for k in range(num)]  # different on every client
    _check(digits, arch, "label-pca", split, batch_sizes)


@pytest.mark.parametrize("scheme", ["label-encoding", "pca", "random", "random-standardized"])
def test_every_scheme_is_partition_invariant(digits, scheme):
    arch = cnn(digits.input_shape, 10, channels=(16, 32), dense=(64,))
    _check(digits, arch, scheme, _partition(digits, 20, "dirichlet"), [50] * 20)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize(("label", "num", "method"), [PARTITIONS[0], PARTITIONS[2], PARTITIONS[3]])
def test_federated_equals_centralized_on_mnist_slice(mnist_slice, model, label, num, method):
    shape = mnist_slice.input_shape
    arch = mlp(shape, 10, hidden=256) if model == "mlp" else cnn(shape, 10, channels=(8, 16))
    split = _partition(mnist_slice, num, method)
    _check(mnist_slice, arch, "label-pca", split, [64 + 7 * (k % 3) for k in range(num)])


def test_label_encoding_is_seeded_and_shared(digits):
    arch = mlp(digits.input_shape, 10, hidden=32)
    a = AnalyticNetwork(arch, "label-encoding", seed=5)
    b = AnalyticNetwork(arch, "label-encoding", seed=5)
    c = AnalyticNetwork(arch, "label-encoding", seed=6)
    y = digits.y[:20]
    np.testing.assert_array_equal(a.layer_targets(0, y), b.layer_targets(0, y))
    assert not np.allclose(a.layer_targets(0, y), c.layer_targets(0, y))
    assert layer_seed(5, 0) != layer_seed(5, 1)
