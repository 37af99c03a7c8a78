"""Batches ``(x, y)`` from whatever holds a client's data: arrays or the user's own ``DataLoader``.

Statistics and evaluation stream over these batches, so memory is bounded by one batch whatever the
data size, and a ``DataLoader``'s transforms (e.g. ``Normalize``) apply as the user wrote them.
Supported sources:

* :class:`~flwr_analytic.data.ArrayDataset` or a pair ``(x, y)`` of arrays, cut into ``batch_size``
  rows;
* a ``torch.utils.data.DataLoader`` (or any iterable of batches) yielding dicts, as flwr-datasets
  with ``with_transform`` does (``{"img": ..., "label": ...}``), or ``(x, y)`` tuples; its own
  batch size is used. :class:`LoaderData` names the keys; by default the first present of
  :data:`IMAGE_KEYS` / :data:`LABEL_KEYS` (the names of flwr-datasets' vision sets).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flwr_analytic.data.dataset import ArrayDataset

#: Image keys of flwr-datasets' vision sets (CIFAR-10 ``img``, MNIST ``image``, ...), in order.
IMAGE_KEYS = ("img", "image", "pixel_values", "x")
#: Label keys likewise.
LABEL_KEYS = ("label", "labels", "fine_label", "y")

Batch = tuple[torch.Tensor | np.ndarray, np.ndarray]


class DataFormatError(ValueError):
    """A batch is not ``(x, y)`` nor a dict with the image and label keys."""


@dataclass(frozen=True)
class LoaderData:
    """A user's ``DataLoader`` (or iterable of batches) with the keys of its dict batches.

    Parameters
    ----------
    loader : iterable
        Yields dict batches or ``(x, y)`` tuples; iterated once per pass.
    image_key, label_key : str, optional
        Keys of dict batches; default: the first of :data:`IMAGE_KEYS` / :data:`LABEL_KEYS` found.

    """

    loader: Iterable[Any]
    image_key: str | None = None
    label_key: str | None = None

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            yield split_batch(batch, self.image_key, self.label_key)

    def __len__(self) -> int:
        """Samples in the loader's data set (``len(loader.dataset)``), when it has one."""
        dataset = getattr(self.loader, "dataset", None)
        if dataset is None:
            raise TypeError("this loader has no dataset: its size is known only after a pass")
        return len(dataset)


def _pick(batch: Mapping[str, Any], given: str | None, options: tuple[str, ...], what: str) -> str:
    if given is not None:
        if given not in batch:
            raise DataFormatError(f"batch has no {what} key {given!r}; keys: {sorted(batch)}")
        return given
    for key in options:
        if key in batch:
            return key
    raise DataFormatError(
        f"batch has none of the {what} keys {options}; keys: {sorted(batch)} "
        f"(name yours with LoaderData(loader, image_key=..., label_key=...))"
    )


def split_batch(batch: Any, image_key: str | None = None, label_key: str | None = None) -> Batch:
    """``(x, y)`` of one loader batch: a dict (keys as named or found) or an ``(x, y)`` sequence."""
    if isinstance(batch, Mapping):
        x = batch[_pick(batch, image_key, IMAGE_KEYS, "image")]
        y = batch[_pick(batch, label_key, LABEL_KEYS, "label")]
    elif isinstance(batch, list | tuple) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    else:
        raise DataFormatError(
            f"a batch must be a dict or an (x, y) tuple, got {type(batch).__name__}"
        )
    y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if len(y) != len(x):
        raise DataFormatError(f"a batch has {len(x)} samples but {len(y)} labels")
    return x, y.astype(np.int64, copy=False)


def iter_batches(data: Any, batch_size: int = 256) -> Iterator[Batch]:
    """Batches ``(x, y)`` of ``data`` (see the module docstring for the sources).

    Parameters
    ----------
    data : ArrayDataset, (x, y), LoaderData, DataLoader or iterable of batches
        The client's data.
    batch_size : int
        Rows per batch for array sources (loaders keep their own).

    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(data, ArrayDataset):
        data = (data.x, data.y)
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], Mapping):
        x, y = data
        y = np.asarray(y)
        if len(y) != len(x):
            raise DataFormatError(f"{len(x)} samples but {len(y)} labels")
        for start in range(0, len(y), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    if not isinstance(data, LoaderData):
        data = LoaderData(data)
    yield from data


__all__ = [
    "IMAGE_KEYS",
    "LABEL_KEYS",
    "DataFormatError",
    "LoaderData",
    "iter_batches",
    "split_batch",
]
