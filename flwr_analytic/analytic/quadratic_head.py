"""The quadratic second stage on an :class:`AnalyticNetwork`: its statistics and its scores.

The network's output layer reads the head features ``h`` (its dense input). The second stage
(:class:`~flwr_analytic.analytic.second_stage.QuadraticStage`, built from the pooled output-layer
Gram) maps them to ``[h, q, 1]``; its head is one more ridge solve from summed statistics,

    W₂ = (Σ_k A₂ₖᵀA₂ₖ + γI)⁻¹ Σ_k A₂ₖᵀT_k,    A₂ = [h, q, 1],

so it equals the centralized head on the pooled data for any partition (float64 sums). A client
computes its ``(A₂ᵀA₂, A₂ᵀT, n)`` with :func:`stage_statistics` and scores its test data with
:func:`head_scores`: the second-stage head and any linear heads on ``[h, 1]`` (the global output
layer, its pFedACnnL layer ``W_k``), which :func:`~flwr_analytic.analytic.label_shift.product_of_experts`
combines. A mirrored network (:mod:`.mirror`) trains on every image and its mirror and scores the
mean of the two, as :meth:`AnalyticNetwork.statistics` and :meth:`AnalyticNetwork.predict` do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from flwr_analytic.analytic.design import StatisticsAccumulator
from flwr_analytic.analytic.mirror import mirror_images, with_mirrors
from flwr_analytic.analytic.network import AnalyticNetwork
from flwr_analytic.analytic.second_stage import QuadraticStage
from flwr_analytic.analytic.statistics import LayerStatistics
from flwr_analytic.analytic.targets import one_hot
from flwr_analytic.data.batches import iter_batches


def stage_dim(net: AnalyticNetwork, stage: QuadraticStage) -> int:
    """``D₂`` of the second stage's design rows ``[h, q, 1]``: ``D + k(k+1)/2``."""
    return net.design_dim(net.num_layers - 1) + stage.width


def check_stage(net: AnalyticNetwork, stage: QuadraticStage) -> None:
    """Refuse a stage that does not fit ``net``'s head features (``ValueError`` naming both)."""
    last = net.num_layers - 1
    if net.arch.conv_geometry(last) is not None:
        raise ValueError("a second stage needs a dense output layer; this one is a convolution")
    width = net.design_dim(last) - 1
    if stage.mean.shape != (width,) or stage.projection.shape[0] != width:
        raise ValueError(
            f"the second stage is for {stage.mean.shape[0]} head features, the network has {width}"
        )


def head_features(net: AnalyticNetwork, xb: Any) -> np.ndarray:
    """``h``: a batch's output-layer input, flattened (float64, ``N x (D − 1)``)."""
    h = torch.flatten(net.layer_input(net.num_layers - 1, xb), 1)
    return h.to(torch.float64).numpy()


def stage_statistics(
    net: AnalyticNetwork,
    stage: QuadraticStage,
    x: Any,
    y: np.ndarray | None = None,
    batch_size: int = 256,
) -> LayerStatistics:
    """``(A₂ᵀA₂, A₂ᵀT, n)`` of the rows ``A₂ = [h, q, 1]`` of ``(x, y)`` (or a data source).

    Streamed in batches (memory ``D₂²`` and one batch); products and sums in float64, so the sum
    over clients equals the pooled statistics to rounding. Every layer of ``net`` below the output
    must be solved.
    """
    check_stage(net, stage)
    classes = net.arch.num_classes
    acc = StatisticsAccumulator(stage_dim(net, stage), classes, "float64")
    source = iter_batches((x, y) if y is not None else x, batch_size)
    for xb, yb in with_mirrors(source) if net.mirror else source:
        h = head_features(net, xb)
        rows = np.hstack([h, stage.features(h)])[:, None, :]  # [h, q]: the bias entry is implicit
        acc.add_patches(torch.from_numpy(rows), one_hot(np.asarray(yb), classes))
    return acc.result()


def head_scores(
    net: AnalyticNetwork,
    stage: QuadraticStage,
    w_stage: np.ndarray,
    heads: Mapping[str, np.ndarray],
    x: Any,
    y: np.ndarray | None = None,
    batch_size: int = 256,
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Scores of the second-stage head and of linear heads on ``[h, 1]``, and the labels.

    Parameters
    ----------
    net : AnalyticNetwork
        Every layer below the output solved (the head features).
    stage, w_stage : QuadraticStage, numpy.ndarray
        The stage and its head ``W₂`` (``D₂ x C``).
    heads : mapping of str to numpy.ndarray
        Output-layer weights ``W`` (``D x C``) to score with, e.g. ``{"personal": W_k}``.
    x, y : array-like, or a data source and ``None``
        Samples and labels.
    batch_size : int
        Samples per forward pass (array sources).

    Returns
    -------
    (numpy.ndarray, dict, numpy.ndarray)
        ``[h, q, 1]W₂`` (``N x C``), each head's ``[h, 1]W``, and the labels (a mirrored network:
        the mean of an image's and its mirror's scores).

    """
    check_stage(net, stage)
    if w_stage.shape != (stage_dim(net, stage), net.arch.num_classes):
        raise ValueError(
            f"the second-stage head has shape {w_stage.shape}, expected "
            f"({stage_dim(net, stage)}, {net.arch.num_classes})"
        )

    def score(xb: Any) -> list[np.ndarray]:
        h = head_features(net, xb)
        ones = np.ones((len(h), 1))
        return [stage.rows(h) @ w_stage] + [np.hstack([h, ones]) @ w for w in heads.values()]

    out: list[list[np.ndarray]] = []
    labels: list[np.ndarray] = []
    for xb, yb in iter_batches((x, y) if y is not None else x, batch_size):
        scores = score(xb)
        if net.mirror:
            scores = [0.5 * (a + b) for a, b in zip(scores, score(mirror_images(xb)), strict=True)]
        out.append(scores)
        labels.append(np.asarray(yb, dtype=np.int64))
    classes = net.arch.num_classes
    columns = [
        np.concatenate([batch[i] for batch in out]) if out else np.zeros((0, classes))
        for i in range(1 + len(heads))
    ]
    y_all = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    return columns[0], dict(zip(heads, columns[1:], strict=True)), y_all


__all__ = ["check_stage", "head_features", "head_scores", "stage_dim", "stage_statistics"]
