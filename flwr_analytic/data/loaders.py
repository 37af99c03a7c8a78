"""Data loaders: every one returns an :class:`ArrayDataset` (float32 NCHW in [0, 1], int64 labels).

Nothing here downloads unless asked to: local folders and files are tried first, and a missing data set
is an error that says where it looked and how to get it. Search order for a data set's files:

1. the ``path`` argument (a file or a folder);
2. every folder in the environment variable ``FLWR_ANALYTIC_DATA`` (``os.pathsep``-separated);
3. ``~/.cache/flwr-analytic/data``;
4. for Fashion-MNIST, the Debian package path ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from flwr_analytic.data.dataset import ArrayDataset, to_float_images
from flwr_analytic.data.idx import read_idx

DATA_ENV = "FLWR_ANALYTIC_DATA"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SPLITS = ("train", "test", "all")
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")

_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not in any of the places searched."""


def search_dirs(path: str | Path | None = None) -> list[Path]:
    """Folders searched for data files, in order (see the module docstring)."""
    dirs: list[Path] = []
    if path is not None:
        dirs.append(Path(path).expanduser())
    for entry in os.environ.get(DATA_ENV, "").split(os.pathsep):
        if entry:
            dirs.append(Path(entry).expanduser())
    dirs.append(Path("~/.cache/flwr-analytic/data").expanduser())
    return dirs


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")


def load_digits() -> ArrayDataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes): the embedded default.

    Pixel values 0..16 are scaled to ``[0, 1]``; no file or network is needed.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = (bunch.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    return ArrayDataset(x=x, y=bunch.target.astype(np.int64), num_classes=10, name="digits")


def _find_idx_folder(candidates: Iterable[Path], subdirs: tuple[str, ...]) -> Path | None:
    for base in candidates:
        for folder in [base, *(base / s for s in subdirs)]:
            if _idx_file(folder, _IDX_NAMES["train"][0]) is not None:
                return folder
    return None


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_idx_pair(folder: Path, split: str, name: str) -> ArrayDataset:
    parts = ("train", "test") if split == "all" else (split,)
    xs, ys, official = [], [], []
    for part in parts:
        img_stem, lab_stem = _IDX_NAMES[part]
        img_path, lab_path = _idx_file(folder, img_stem), _idx_file(folder, lab_stem)
        if img_path is None or lab_path is None:
            raise DatasetNotFoundError(f"{name}: {folder} has no {img_stem}[.gz] / {lab_stem}[.gz]")
        images, labels = read_idx(img_path), read_idx(lab_path)
        if len(images) != len(labels):
            raise ValueError(
                f"{name}: {img_path} has {len(images)} images, {lab_path} {len(labels)}"
            )
        xs.append(images)
        ys.append(labels)
        official.append(np.full(len(labels), part == "test"))
    return ArrayDataset(
        x=to_float_images(np.concatenate(xs)),
        y=np.concatenate(ys).astype(np.int64),
        num_classes=10,
        name=name,
        extras={"official_test": np.concatenate(official)},
    )


def _load_mnist_npz(file: Path, split: str, name: str) -> ArrayDataset:
    with np.load(file) as data:
        missing = {"x", "y"} - set(data.files)
        if missing:
            raise ValueError(f"{file}: missing arrays {sorted(missing)} (has {data.files})")
        arrays = {k: data[k] for k in data.files}
    extras = {k: v for k, v in arrays.items() if k not in ("x", "y")}
    ds = ArrayDataset(
        x=to_float_images(arrays["x"]),
        y=arrays["y"].astype(np.int64),
        num_classes=10,
        name=name,
        extras=extras,
    )
    if split == "all":
        return ds
    if "official_test" not in extras:
        raise ValueError(f"{file}: split={split!r} needs an 'official_test' array; use split='all'")
    mask = extras["official_test"].astype(bool)
    return ds.subset(np.flatnonzero(mask if split == "test" else ~mask))


def _not_found(name: str, looked: list[Path], how: str) -> DatasetNotFoundError:
    places = "\n  ".join(str(p) for p in looked)
    return DatasetNotFoundError(f"{name} not found. Looked in:\n  {places}\n{how}")


def load_mnist(path: str | Path | None = None, split: str = "train") -> ArrayDataset:
    """MNIST (LeCun et al. 1998) from local files.

    Parameters
    ----------
    path : str or Path, optional
        An ``.npz`` with ``x`` (uint8 N x 28 x 28) and ``y`` (and optionally ``client``, ``is_test``,
        ``official_test``), or a folder holding either such a file (``mnist70k.npz``, ``mnist.npz``) or
        the four official IDX files (``train-images-idx3-ubyte[.gz]`` ...), directly or in ``mnist/``.
    split : {"train", "test", "all"}
        The official 60k training set, the official 10k test set, or all 70k (train first); ``all``
        keeps the ``.npz`` extras such as the precomputed client split.

    """
    _check_split(split)
    looked = search_dirs(path)
    for base in looked:
        if base.is_file() and base.suffix == ".npz":
            return _load_mnist_npz(base, split, "mnist")
        for fname in ("mnist70k.npz", "mnist.npz"):
            if (base / fname).is_file():
                return _load_mnist_npz(base / fname, split, "mnist")
    folder = _find_idx_folder(looked, ("mnist", "MNIST/raw"))
    if folder is not None:
        return _load_idx_pair(folder, split, "mnist")
    raise _not_found(
        "MNIST",
        looked,
        f"Put the official IDX files (train-images-idx3-ubyte.gz, ...) or an .npz in one of these "
        f"folders, pass path=..., set {DATA_ENV}, or load it online with load_hub('ylecun/mnist').",
    )


def load_fashion_mnist(path: str | Path | None = None, split: str = "train") -> ArrayDataset:
    """Fashion-MNIST (Xiao et al. 2017) from the official IDX files.

    Searches the folders of :func:`search_dirs` (directly or in ``fashion-mnist/``) and then the
    Debian package path ``/usr/share/datasets/fashion-mnist`` (``apt-get install
    dataset-fashion-mnist``). ``split`` as in :func:`load_mnist`.
    """
    _check_split(split)
    looked = [*search_dirs(path), DEBIAN_FASHION_MNIST]
    folder = _find_idx_folder(looked, ("fashion-mnist", "FashionMNIST/raw"))
    if folder is None:
        raise _not_found(
            "Fashion-MNIST",
            looked,
            "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), put the "
            f"official IDX files in one of these folders, set {DATA_ENV}, or use "
            "load_hub('zalando-datasets/fashion_mnist').",
        )
    return _load_idx_pair(folder, split, "fashion-mnist")


def _load_cifar_batches(folder: Path, split: str) -> ArrayDataset:
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    parts = ("train", "test") if split == "all" else (split,)
    xs, ys = [], []
    for part in parts:
        for fname in names[part]:
            with open(folder / fname, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return ArrayDataset(
        x=to_float_images(np.concatenate(xs)), y=np.concatenate(ys), num_classes=10, name="cifar10"
    )


def load_cifar10(path: str | Path | None = None, split: str = "train") -> ArrayDataset:
    """CIFAR-10 (Krizhevsky 2009) from a local folder.

    Accepts the official python version (a folder ``cifar-10-batches-py`` with ``data_batch_1..5`` and
    ``test_batch``) or an ``.npz`` with ``x`` (uint8 N x 32 x 32 x 3, HWC) and ``y``; an ``.npz`` has
    no official split, so it needs ``split="all"`` (split it yourself with
    :func:`flwr_analytic.data.partition.train_test_indices`).
    """
    _check_split(split)
    looked = search_dirs(path)
    for base in looked:
        for folder in (base, base / "cifar-10-batches-py"):
            if (folder / "data_batch_1").is_file():
                return _load_cifar_batches(folder, split)
        files = [base] if base.is_file() else sorted(base.glob("cifar10*.npz"))
        for file in files:
            if file.suffix != ".npz":
                continue
            if split != "all":
                raise ValueError(f"{file} has no official train/test split; use split='all'")
            with np.load(file) as data:
                x, y = data["x"], data["y"]
            return ArrayDataset(
                x=to_float_images(x, channels_last=x.shape[-1] == 3),
                y=y.astype(np.int64),
                num_classes=10,
                name="cifar10",
            )
    raise _not_found(
        "CIFAR-10",
        looked,
        "Unpack cifar-10-python.tar.gz into one of these folders, pass path=..., set "
        f"{DATA_ENV}, or use load_hub('uoft-cs/cifar10').",
    )


def from_hf_dataset(
    dataset: object, image_key: str | None = None, label_key: str | None = None, name: str = "hub"
) -> ArrayDataset:
    """Convert a Hugging Face ``datasets.Dataset`` of PIL images (or arrays) and labels.

    ``image_key`` / ``label_key`` default to the first of ``image``, ``img`` and of ``label``,
    ``labels``, ``fine_label`` present in the columns.
    """
    columns = list(dataset.column_names)  # type: ignore[attr-defined]

    def pick(given: str | None, options: tuple[str, ...], what: str) -> str:
        if given is not None:
            if given not in columns:
                raise KeyError(f"{what} column {given!r} not in {columns}")
            return given
        for option in options:
            if option in columns:
                return option
        raise KeyError(f"no {what} column among {columns}; pass {what}_key=...")

    ikey = pick(image_key, ("image", "img"), "image")
    lkey = pick(label_key, ("label", "labels", "fine_label"), "label")
    images = np.stack([np.asarray(im) for im in dataset[ikey]])  # type: ignore[index]
    labels = np.asarray(dataset[lkey], dtype=np.int64)  # type: ignore[index]
    features = getattr(dataset, "features", {})
    names = getattr(features.get(lkey), "names", None) if hasattr(features, "get") else None
    num_classes = len(names) if names else int(labels.max()) + 1
    return ArrayDataset(
        x=to_float_images(images, channels_last=images.ndim == 4),
        y=labels,
        num_classes=num_classes,
        name=name,
    )


def load_hub(repo: str, split: str = "train") -> ArrayDataset:
    """Load a Hugging Face hub image data set through flwr-datasets (needs the network).

    ``repo`` is a hub id such as ``"ylecun/mnist"``, ``"zalando-datasets/fashion_mnist"`` or
    ``"uoft-cs/cifar10"``; partition it afterwards with :mod:`flwr_analytic.data.partition`.
    """
    from flwr_datasets import FederatedDataset

    fds = FederatedDataset(dataset=repo, partitioners={split: 1})
    return from_hf_dataset(fds.load_split(split), name=repo.split("/")[-1])


def load_dataset(name: str, path: str | Path | None = None, split: str = "train") -> ArrayDataset:
    """Load a data set by name: one of :data:`DATASETS`, or ``"hub:<repo id>"``.

    ``digits`` is embedded (scikit-learn) and a hub data set is downloaded: a ``path`` for them is
    refused rather than ignored.
    """
    if path and (name == "digits" or name.startswith("hub:")):
        raise ValueError(f"data-path: {str(path)!r} is not used by {name!r}; leave it empty")
    if name == "digits":
        return load_digits()
    if name == "mnist":
        return load_mnist(path, split)
    if name == "fashion-mnist":
        return load_fashion_mnist(path, split)
    if name == "cifar10":
        return load_cifar10(path, split)
    if name.startswith("hub:"):
        return load_hub(name[4:], split)
    raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)} or 'hub:<repo id>'")
