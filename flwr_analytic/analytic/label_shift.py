"""Label-shift scoring: move a global head's tempered posteriors to a client's own class prior.

A global head trained on the pooled data estimates ``p(y | x)`` under the pooled prior ``π``; a client
whose labels follow ``π_k`` has, if ``p(x | y)`` is shared (label shift), the posterior
``p_k(y | x) ∝ p(y | x) π_k(y) / π(y)`` (Saerens, Latinne & Decaestecker, Neural Computation 2002).
A ridge head's scores ``f(x)`` are turned into log-posteriors by a temperature,
``log p(y | x) ≈ log softmax(T·f(x))``, so

    label_shift(f) = log softmax(T·f) + log(π_k / π),   π_k = (n_k + s) / (N_k + C·s)   (smoothed),

and a product of experts with the client's own (pFedACnnL) head ``s_k`` adds ``w · log softmax(T·s_k)``.
Both need only the client's label counts and the pooled ones (the bias row of the summed ``B``): no
extra communication. Measured (``benchmarks/fashion_second_stage.py``, T and w chosen on a development
split): on Fashion-MNIST Dirichlet(0.1), 20 clients, the product reaches 97.94% on test against 97.52%
for the pFedACnnL head alone.
"""

from __future__ import annotations

import numpy as np


def log_softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    """``log softmax(T·f)`` along the last (class) axis, computed stably."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    s = temperature * np.asarray(scores, dtype=np.float64)
    s = s - s.max(-1, keepdims=True)
    return s - np.log(np.exp(s).sum(-1, keepdims=True))


def _prior(counts: np.ndarray, smoothing: float, name: str) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or np.any(counts < 0) or not np.all(np.isfinite(counts)):
        raise ValueError(f"{name} must be a 1-D array of non-negative class counts, got {counts}")
    total = counts.sum() + smoothing * len(counts)
    if not total > 0:
        raise ValueError(f"{name} are all zero: no class prior (use smoothing > 0)")
    return (counts + smoothing) / total


def label_shift(
    scores: np.ndarray,
    local_counts: np.ndarray,
    pooled_counts: np.ndarray,
    temperature: float,
    smoothing: float = 0.5,
) -> np.ndarray:
    """``log softmax(T·f) + log(π_k / π)``: the client's log-posteriors (up to a per-row constant).

    Parameters
    ----------
    scores : numpy.ndarray
        ``f(x)``, the global head's scores (``N x C``).
    local_counts, pooled_counts : numpy.ndarray
        The client's and the pooled training label counts (``C``); both smoothed by ``smoothing``
        (``π_k = (n_k + s)/(N_k + C·s)``), so a class the client never saw keeps a small prior.
    temperature : float
        ``T > 0``: the scale that turns ridge scores into log-probabilities.
    """
    scores = np.asarray(scores, dtype=np.float64)
    local = _prior(local_counts, smoothing, "local_counts")
    pooled = _prior(pooled_counts, smoothing, "pooled_counts")
    if not (scores.ndim == 2 and scores.shape[1] == len(local) == len(pooled)):
        raise ValueError(
            f"scores ({scores.shape}), local_counts ({len(local)}) and pooled_counts "
            f"({len(pooled)}) must agree on the number of classes"
        )
    return log_softmax(scores, temperature) + np.log(local / pooled)


def product_of_experts(
    global_scores: np.ndarray,
    personal_scores: np.ndarray,
    local_counts: np.ndarray,
    pooled_counts: np.ndarray,
    temperature: float,
    weight: float,
    smoothing: float = 0.5,
) -> np.ndarray:
    """``label_shift(f) + w · log softmax(T·s_k)``: the label-shifted global head times the personal one.

    ``weight`` ``w ≥ 0`` (``0``: label shift alone). Argmax over the last axis gives the prediction.
    """
    if not weight >= 0:
        raise ValueError(f"weight must be non-negative, got {weight}")
    shifted = label_shift(global_scores, local_counts, pooled_counts, temperature, smoothing)
    personal = np.asarray(personal_scores, dtype=np.float64)
    if personal.shape != shifted.shape:
        raise ValueError(
            f"personal_scores {personal.shape} and global_scores {shifted.shape} differ in shape"
        )
    return shifted + weight * log_softmax(personal, temperature)


__all__ = ["label_shift", "log_softmax", "product_of_experts"]
