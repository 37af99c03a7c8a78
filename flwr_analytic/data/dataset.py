"""The one array convention every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ArrayDataset:
    """Images and labels as numpy arrays, with one shape convention.

    Attributes
    ----------
    x : numpy.ndarray
        ``float32`` images of shape ``(N, C, H, W)`` scaled to ``[0, 1]``.
    y : numpy.ndarray
        ``int64`` class labels of shape ``(N,)`` in ``0 .. num_classes - 1``.
    num_classes : int
        Number of classes ``c``.
    name : str
        Short name of the data set (``"digits"``, ``"mnist"``, ...).
    extras : dict[str, numpy.ndarray]
        Per-sample side information shipped with the data, e.g. a precomputed client split
        (``"client"``, ``"is_test"``, ``"official_test"`` in the MNIST ``.npz``).

    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise ValueError(f"{self.name}: x must have shape (N, C, H, W), got {self.x.shape}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(
                f"{self.name}: y must have shape ({self.x.shape[0]},), got {self.y.shape}"
            )
        for key, value in self.extras.items():
            if len(value) != len(self.y):
                raise ValueError(
                    f"{self.name}: extras[{key!r}] has {len(value)} rows, not {len(self.y)}"
                )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample."""
        return tuple(int(s) for s in self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, index: np.ndarray) -> ArrayDataset:
        """Rows ``index`` of every array (extras included), as a new data set."""
        index = np.asarray(index)
        return ArrayDataset(
            x=self.x[index],
            y=self.y[index],
            num_classes=self.num_classes,
            name=self.name,
            extras={k: v[index] for k, v in self.extras.items()},
        )


def to_float_images(images: np.ndarray, *, channels_last: bool = False) -> np.ndarray:
    """Convert integer images to ``float32`` ``(N, C, H, W)`` in ``[0, 1]``.

    Parameters
    ----------
    images : numpy.ndarray
        ``uint8`` images ``(N, H, W)``, ``(N, C, H, W)`` or, with ``channels_last``, ``(N, H, W, C)``.
    channels_last : bool
        Whether the channel axis is last (CIFAR-10 files are stored HWC).

    """
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[:, None, :, :]
    elif channels_last:
        arr = arr.transpose(0, 3, 1, 2)
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    return np.ascontiguousarray(arr, dtype=np.float32) / np.float32(scale)
