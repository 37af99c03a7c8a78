"""FedACnnL whose clients release differentially private statistics (server side).

The clients clip their design rows and add Gaussian noise to ``(G_k, B_k)`` once per layer
(:mod:`flwr_analytic.clients.fedacnnl_dp`, :mod:`flwr_analytic.analytic.privacy`). Honest noisy
statistics are symmetric and finite but may have negative diagonal entries and be indefinite, so
this strategy (i) checks replies with
:func:`~flwr_analytic.analytic.privacy.validate_released` instead of the exact-data checks and
rejects replies whose announced ``dp-noise-multiplier`` / ``dp-clip-norm`` differ from its own, and
(ii) regularizes with the public ``γ_DP = κ σ √(K D)`` (``κ = 2``: the spectral-norm edge of the
summed symmetric noise of ``K`` clients): a public pseudo-client ``(γ_DP I', 0, 0)`` is added to the
sum (``I'`` without the count entry, so the sum keeps a positive diagonal and passes the exact-data
checks of the solve) and ``γ_DP`` is added to the layer's ridge (so the bias direction is covered).
FedACnnL: Gu et al.,
arXiv 2502.06915; Gaussian mechanism and accounting: Balle & Wang (2018), Dong, Roth & Su (2022).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flwr_analytic.analytic import LayerStatistics, StatisticsError
from flwr_analytic.analytic.privacy import (
    DP_CLIP_NORM,
    DP_NOISE_MULTIPLIER,
    DPConfig,
    dp_regularization,
    dp_ridge,
    privacy_report,
    public_prior,
    rows_per_sample,
    validate_released,
)
from flwr_analytic.strategies.fedacnnl import FedACnnL

#: Sort key of the public ridge pseudo-client (after every real reply).
_PRIOR_KEY = (2, -1, -1)


class DPFedACnnL(FedACnnL):
    """:class:`FedACnnL` for clients that add Gaussian noise to their statistics.

    Parameters
    ----------
    *args, **kwargs
        Those of :class:`~flwr_analytic.strategies.fedacnnl.FedACnnL`.
    dp : DPConfig
        The clients' noise multiplier ``z``, clip norm ``C`` and target bound ``τ`` (public).
    delta : float (default: 1e-5)
        The ``δ`` at which :meth:`privacy` reports ``ε``.
    ridge_factor : float (default: 2.0)
        ``κ`` of the public ridge ``γ_DP = κ σ √(K D)`` (0 disables it).

    """

    def __init__(
        self,
        *args: Any,
        dp: DPConfig,
        delta: float = 1e-5,
        ridge_factor: float = 2.0,
        **kwargs: Any,
    ) -> None:
        if not dp.enabled:
            raise ValueError(
                f"DPFedACnnL needs {DP_NOISE_MULTIPLIER} > 0 (use FedACnnL without DP)"
            )
        if not (0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not (math.isfinite(ridge_factor) and ridge_factor >= 0):
            raise ValueError(f"ridge_factor must be >= 0, got {ridge_factor}")
        self.dp, self.delta, self.ridge_factor = dp, float(delta), float(ridge_factor)
        super().__init__(*args, **kwargs)
        if self.num_groups >= 2:
            raise ValueError("DPFedACnnL does not support group-wise models (num_groups >= 2)")

    def check_statistics(
        self,
        packed: dict[str, np.ndarray],
        num_examples: Any,
        layer: int,
        claimed_layer: Any = None,
    ) -> LayerStatistics:
        """Checks that hold for honest noisy statistics (no sign / definiteness checks)."""
        if claimed_layer is not None and int(claimed_layer) != layer:
            raise StatisticsError(f"statistics of layer {claimed_layer}, expected {layer}")
        stats = LayerStatistics.unpack(packed)
        validate_released(stats, self.net.design_dim(layer), self.net.num_targets(layer))
        if isinstance(num_examples, list) or int(num_examples) != stats.count:
            raise StatisticsError(f"{self.weighted_by_key}={num_examples} but count={stats.count}")
        return stats

    def _read_reply(self, msg: Any, layer: int) -> tuple[tuple[int, int, int], LayerStatistics]:
        metrics = next(iter(msg.content.metric_records.values()), {})
        for key, mine in (
            (DP_NOISE_MULTIPLIER, self.dp.noise_multiplier),
            (DP_CLIP_NORM, self.dp.clip_norm),
        ):
            theirs = metrics.get(key)
            if theirs is None or not math.isclose(float(theirs), mine, rel_tol=1e-12):
                raise StatisticsError(f"reply announces {key}={theirs}, the server expects {mine}")
        return super()._read_reply(msg, layer)

    def sigma(self, layer: int) -> float:
        """The clients' noise standard deviation ``σ = zΔ`` for ``layer``."""
        return self.dp.sigma(rows_per_sample(self.net, layer), self.net.num_targets(layer))

    def solve_layer(
        self, valid: list[tuple[tuple[int, int, int], LayerStatistics]], entry: dict[str, Any]
    ) -> bool:
        """Solve with the public prior and ridge ``γ_DP`` (:func:`dp_regularization`)."""
        layer = self.net.solved_layers
        if len(valid) < self.min_valid_replies or self.ridge_factor == 0:
            return super().solve_layer(valid, entry)
        dim, targets = self.net.design_dim(layer), self.net.num_targets(layer)
        gamma = self.ridge_factor / 2.0 * dp_ridge(self.sigma(layer), len(valid), dim)
        noisy_gram = sum(stats.gram for _, stats in valid)
        attr = "output_reg" if self.net.is_output(layer) else "hidden_reg"
        base = getattr(self.net, attr)
        setattr(self.net, attr, dp_regularization(base, noisy_gram, gamma))
        try:
            solved = super().solve_layer(
                [*valid, (_PRIOR_KEY, public_prior(dim, targets, gamma))], entry
            )
        finally:
            setattr(self.net, attr, base)
        entry["num-valid"] = int(entry.get("num-valid", 1)) - 1
        entry["dp-ridge"] = gamma
        entry["dp-sigma"] = self.sigma(layer)
        return solved

    def privacy(self) -> dict[str, Any]:
        """Each client's ``(ε, δ)`` over the layers released so far (or all layers if none yet)."""
        released = [r for r in self.history if r.get("kind") == "train"]
        layers = len(released) or self.num_rounds
        report = privacy_report([self.dp.noise_multiplier] * layers, self.delta)
        report["released-layers"] = layers
        report["clip-norm"] = self.dp.clip_norm
        report["target-bound"] = self.dp.target_bound
        return report
