"""Wire format of the quadratic second stage (issue 15), shared by its strategy wrapper and clients.

After the output layer is solved, :class:`~flwr_analytic.strategies.second_stage.SecondStage` runs one
more training round: its ``ConfigRecord`` holds :data:`SECOND_STAGE` (``k``, the number of
components) besides the usual network entries and ``layer`` (the output layer), and its
``ArrayRecord`` holds the solved layers plus the stage (:data:`MEAN`, :data:`PROJECTION`); the client
replies with the packed statistics of ``[h, q, 1]``
(:func:`~flwr_analytic.analytic.quadratic_head.stage_statistics`) and echoes ``second-stage`` in its
metrics. Evaluation messages carry the stage, its head (:data:`WEIGHTS`) and the pooled class counts
(:data:`POOLED_COUNTS`, the bias row of the output layer's summed ``B``) in the ``ArrayRecord``
:data:`STAGE_ARRAYS_KEY`, and the scoring's ``T`` and ``w`` in the config. Arrays are float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from flwr_analytic.analytic.second_stage import QuadraticStage

#: Config key of the second stage's round and evaluation: ``k`` (components).
SECOND_STAGE = "second-stage"
#: Config keys of the clients' product-of-experts scoring (``label_shift.product_of_experts``).
TEMPERATURE = "scoring-temperature"
WEIGHT = "scoring-weight"
#: Array keys.
MEAN = "second-stage.mean"
PROJECTION = "second-stage.projection"
WEIGHTS = "second-stage.weights"
POOLED_COUNTS = "second-stage.pooled-counts"
#: The evaluation message's record of the stage, its head and the pooled class counts.
STAGE_ARRAYS_KEY = "second-stage"


def _tensor(value: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64))


def stage_arrays(
    stage: QuadraticStage, weights: np.ndarray | None = None, pooled: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """The stage (and, for evaluation, its head ``W₂`` and the pooled class counts) as arrays."""
    out = {MEAN: _tensor(stage.mean), PROJECTION: _tensor(stage.projection)}
    if weights is not None:
        out[WEIGHTS] = _tensor(weights)
    if pooled is not None:
        out[POOLED_COUNTS] = _tensor(pooled)
    return out


def stage_from_arrays(arrays: Mapping[str, Any]) -> QuadraticStage:
    """The :class:`QuadraticStage` of :func:`stage_arrays` (``KeyError`` / ``ValueError`` named)."""
    missing = [k for k in (MEAN, PROJECTION) if k not in arrays]
    if missing:
        raise KeyError(f"a second-stage message needs the arrays {missing}")
    mean = np.asarray(arrays[MEAN], dtype=np.float64)
    projection = np.asarray(arrays[PROJECTION], dtype=np.float64)
    if mean.ndim != 1 or projection.ndim != 2 or projection.shape[0] != len(mean):
        raise ValueError(
            f"{MEAN} {mean.shape} and {PROJECTION} {projection.shape} do not fit (D and D x k)"
        )
    return QuadraticStage(mean, projection)


def scoring_settings(temperature: float, weight: float) -> dict[str, float]:
    """The evaluate config's scoring entries, checked: ``T > 0`` and ``w ≥ 0``, finite."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{TEMPERATURE} must be finite and > 0, got {temperature!r}")
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"{WEIGHT} must be finite and >= 0, got {weight!r}")
    return {TEMPERATURE: float(temperature), WEIGHT: float(weight)}


__all__ = [
    "MEAN",
    "POOLED_COUNTS",
    "PROJECTION",
    "SECOND_STAGE",
    "STAGE_ARRAYS_KEY",
    "TEMPERATURE",
    "WEIGHT",
    "WEIGHTS",
    "scoring_settings",
    "stage_arrays",
    "stage_from_arrays",
]
