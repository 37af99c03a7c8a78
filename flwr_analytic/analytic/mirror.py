"""Mirror symmetry: train on every image and its left-right mirror, predict by their mean.

With ``mirror=True`` an :class:`~flwr_analytic.analytic.network.AnalyticNetwork` treats each
training sample ``(x, y)`` as two, ``(x, y)`` and ``(x̄, y)`` with ``x̄`` the image reversed along
its last (width) axis, in the statistics of every layer:

    G = Σ_i a(x_i)a(x_i)ᵀ + a(x̄_i)a(x̄_i)ᵀ,   B = Σ_i (a(x_i) + a(x̄_i)) t_iᵀ,   n = 2·N,

and scores a sample by the mean of its two views, ``s(x) = ½ (f(x) + f(x̄))`` (for the linear
output layer, the layer applied to the mean of the two feature vectors). The pair is a
deterministic function of the sample, so the statistics remain sums over samples: federated
training equals centralized training on the mirrored pooled data, whatever the partition, and
every closed-form guarantee holds for that data set. Horizontal flips are the standard
augmentation of natural images (CIFAR-10: Krizhevsky, 2009; with single-layer k-means features:
Coates & Ng, "Learning Feature Representations with K-means", 2012); they are wrong for data whose
classes change under a mirror (digits, text) and can cost accuracy where a pose is consistent
(Fashion-MNIST's shoes all face one way: ``benchmarks/fashion_validation.py``).

Per-client leave-one-out (``personal-lambda = "auto"``) leaves out one view at a time, while the
other view stays in the fit: its estimates are optimistic for mirrored data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch


def mirror_images(x: Any) -> Any:
    """``x̄``: the batch ``x`` (``N x C x H x W`` or any ``N x ... x W``) reversed along its last axis."""
    if isinstance(x, torch.Tensor):
        return torch.flip(x, dims=(-1,))
    return np.ascontiguousarray(np.asarray(x)[..., ::-1])


def with_mirrors(batches: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
    """Each batch ``(x, y)`` as ``([x; x̄], [y; y])``: the training samples of a mirrored network."""
    for x, y in batches:
        if isinstance(x, torch.Tensor):
            both = torch.cat([x, mirror_images(x)])
        else:
            both = np.concatenate([np.asarray(x), mirror_images(x)])
        yield both, np.concatenate([np.asarray(y), np.asarray(y)])


def mirror_mean(score: Any, x: Any) -> np.ndarray:
    """``½ (f(x) + f(x̄))`` for a scoring function ``f`` of a batch."""
    return 0.5 * (np.asarray(score(x)) + np.asarray(score(mirror_images(x))))


__all__ = ["mirror_images", "mirror_mean", "with_mirrors"]
