import pickle

import numpy as np
import pytest

from flwr_analytic.data import (
    DatasetNotFoundError,
    federated_split,
    from_hf_dataset,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_mnist,
    partition_indices,
    precomputed_split,
    train_test_indices,
)
from flwr_analytic.data.idx import read_idx, write_idx


@pytest.fixture
def idx_folder(tmp_path):
    """A tiny MNIST-layout folder of official-format IDX files (train gzip, test plain)."""
    rng = np.random.default_rng(0)
    for stem, n, gz in (("train", 12, True), ("t10k", 5, False)):
        suffix = ".gz" if gz else ""
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n))
    return tmp_path


def test_idx_roundtrip_and_bad_magic(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")


def test_mnist_from_idx_folder(idx_folder):
    train = load_mnist(idx_folder, "train")
    test = load_mnist(idx_folder, "test")
    every = load_mnist(idx_folder, "all")
    assert train.x.shape == (12, 1, 28, 28) and test.x.shape == (5, 1, 28, 28)
    assert train.x.dtype == np.float32 and 0.0 <= train.x.min() and train.x.max() <= 1.0
    assert train.y.dtype == np.int64
    assert len(every) == 17 and every.extras["official_test"].sum() == 5


def test_fashion_mnist_from_idx_folder_in_subdir(idx_folder, tmp_path_factory):
    parent = tmp_path_factory.mktemp("data")
    (parent / "fashion-mnist").symlink_to(idx_folder, target_is_directory=True)
    assert len(load_fashion_mnist(parent, "train")) == 12


def test_fashion_mnist_debian_package_when_installed():
    from flwr_analytic.data.loaders import DEBIAN_FASHION_MNIST

    if not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    test = load_fashion_mnist(split="test")
    assert test.x.shape == (10000, 1, 28, 28)
    assert np.bincount(test.y).tolist() == [1000] * 10


def test_missing_dataset_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_ANALYTIC_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="nowhere") as info:
        load_mnist(tmp_path / "empty")
    assert "IDX" in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-python"):
        load_cifar10(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path, "validation")


def test_cifar10_python_batches_and_npz(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b"labels": list(range(4)),
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    train = load_cifar10(tmp_path, "train")
    assert train.x.shape == (20, 3, 32, 32) and len(load_cifar10(tmp_path, "test")) == 4
    npz = tmp_path / "npz"
    npz.mkdir()
    x = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(npz / "cifar10_small.npz", x=x, y=np.arange(6) % 10)
    loaded = load_cifar10(npz, "all")
    assert loaded.x.shape == (6, 3, 32, 32)
    np.testing.assert_allclose(loaded.x[2, 1], x[2, :, :, 1] / 255.0, rtol=1e-6)
    with pytest.raises(ValueError, match="no official train/test split"):
        load_cifar10(npz, "train")


def test_hub_conversion_on_an_in_memory_dataset():
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(2)
    images = [PILImage.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(3)]
    ds = Dataset.from_dict(
        {"image": images, "label": [0, 3, 9]},
        features=Features({"image": Image(), "label": ClassLabel(num_classes=10)}),
    )
    out = from_hf_dataset(ds, name="mnist")
    assert out.x.shape == (3, 1, 28, 28) and out.num_classes == 10
    np.testing.assert_array_equal(out.y, [0, 3, 9])


def test_shared_mnist_npz(mnist_all):
    assert mnist_all.x.shape == (70000, 1, 28, 28)
    assert int(mnist_all.extras["official_test"].sum()) == 10000
    split = precomputed_split(mnist_all)
    assert split.num_clients == 20
    assert sum(len(a) + len(b) for a, b in zip(split.train, split.test)) == 70000
    train, test = split.client(mnist_all, 0)
    assert len(train) == len(split.train[0]) and len(test) == len(split.test[0])


@pytest.mark.parametrize("method", ["iid", "dirichlet", "pathological"])
def test_partitions_cover_every_row_once_and_are_seeded(digits, method):
    parts = partition_indices(digits.y, 20, method, alpha=0.1, classes_per_partition=2, seed=4)
    joined = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(joined, np.arange(len(digits)))
    again = partition_indices(digits.y, 20, method, alpha=0.1, classes_per_partition=2, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(digits.y, 20, method, alpha=0.1, classes_per_partition=2, seed=5)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    if method == "pathological":
        assert max(len(np.unique(digits.y[p])) for p in parts) <= 2
    if method == "iid":
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_dirichlet_is_heterogeneous(digits):
    parts = partition_indices(digits.y, 20, "dirichlet", alpha=0.1, seed=0)
    dominant = [np.bincount(digits.y[p], minlength=10).max() / len(p) for p in parts if len(p)]
    assert np.median(dominant) > 0.5


def test_train_test_split_is_75_25_and_disjoint():
    train, test = train_test_indices(np.arange(100, 200), 0.25, seed=1)
    assert len(test) == 25 and len(train) == 75
    assert not set(train) & set(test)
    split = federated_split(load_dataset("digits"), 5, "iid", seed=0)
    for a, b in zip(split.train, split.test):
        assert abs(len(b) - 0.25 * (len(a) + len(b))) < 1


def test_bad_partition_arguments(digits):
    with pytest.raises(ValueError, match="unknown partitioner"):
        partition_indices(digits.y, 3, "weird")
    with pytest.raises(ValueError, match="exceeds"):
        partition_indices(digits.y[:5], 10, "iid")
    with pytest.raises(ValueError, match="alpha"):
        partition_indices(digits.y, 3, "dirichlet", alpha=0)
    with pytest.raises(ValueError, match="no precomputed split"):
        precomputed_split(digits)
