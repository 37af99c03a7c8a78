"""Group-wise output layers: clients clustered by their label distribution (no extra data).

The bias row of a client's output-layer ``B_k`` is its label histogram (one-hot targets), so the
server can cluster the clients of the output round without asking for anything else: seeded
k-means++ (``scipy.cluster.vq.kmeans2``) on the normalized histograms, over the clients in key order
so the groups do not depend on arrival order. Each group's output layer is then solved from the
sum of its members' statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flwr_analytic.analytic.statistics import LayerStatistics


def cluster_by_labels(
    members: list[tuple[Any, LayerStatistics]], num_groups: int, seed: int
) -> dict[int, list[tuple[Any, LayerStatistics]]]:
    """Cluster label -> members (``(key, output-layer statistics)``, keys sorted); no empty group."""
    from scipy.cluster.vq import kmeans2

    members = sorted(members, key=lambda kv: kv[0])  # arrival order must not matter
    hist = np.array([stats.cross[-1] / max(stats.rows, 1.0) for _, stats in members])
    k = min(num_groups, len(members))
    _, labels = kmeans2(hist, k, minit="++", seed=np.random.default_rng(seed))
    groups = {g: [m for m, lab in zip(members, labels, strict=True) if lab == g] for g in range(k)}
    return {g: group for g, group in groups.items() if group}
