"""Client-side differential privacy of FedACnnL statistics (the hook of the client apps).

The client's configuration decides the noise — its node config's ``dp-*`` keys override the run
config's, so a SuperNode can enforce noise the server cannot switch off
(:func:`~flwr_analytic.analytic.privacy.dp_from_config`):
``dp-noise-multiplier`` ``z`` (0 = off), ``dp-clip-norm`` ``C`` (rows ``[a, 1]`` clipped to norm C),
``dp-target-bound`` ``τ`` and ``dp-seed`` (−1 = OS entropy; a fixed seed makes runs reproducible and
must be kept from the server). The released statistics are the clipped ones plus Gaussian noise
``σ = zΔ`` (:mod:`flwr_analytic.analytic.privacy`); the client keeps its *clean* statistics for its
own pFedACnnL personalization (they never leave it). The reply's metrics carry
``dp-noise-multiplier`` and ``dp-clip-norm`` so the server can check them and set its ridge.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr_analytic.analytic import AnalyticNetwork, LayerStatistics
from flwr_analytic.analytic.privacy import (
    DP_CLIP_NORM,
    DP_NOISE_MULTIPLIER,
    DP_SEED,
    DPConfig,
    private_statistics,
)
from flwr_analytic.data import ArrayDataset
from flwr_analytic.fedacnnl import protocol as P


def release_statistics(
    net: AnalyticNetwork,
    layer: int,
    train: ArrayDataset | Any,
    stats: LayerStatistics,
    dp: DPConfig,
    run_config: Mapping[str, Any],
    partition_id: int,
    config: Mapping[str, Any],
) -> LayerStatistics:
    """What the client sends: ``stats`` unchanged, or its DP release when ``dp`` is enabled."""
    if not dp.enabled:
        return stats
    seed = int(run_config.get(DP_SEED, -1))
    return private_statistics(
        net,
        layer,
        *((train.x, train.y) if isinstance(train, ArrayDataset) else (train, None)),
        dp,
        seed=None if seed < 0 else seed,
        partition_id=partition_id,
        batch_size=int(config.get(P.BATCH_SIZE, 256)),
    )


def dp_metrics(dp: DPConfig) -> dict[str, float]:
    """Reply metrics announcing the client's DP parameters (empty when DP is off)."""
    if not dp.enabled:
        return {}
    return {DP_NOISE_MULTIPLIER: float(dp.noise_multiplier), DP_CLIP_NORM: float(dp.clip_norm)}
