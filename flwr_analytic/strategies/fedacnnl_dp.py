"""Deprecated: ``DPFedACnnL`` is ``FedACnnL(release=DPRelease(dp))`` (kept one release).

Differentially private release is a policy of :class:`~flwr_analytic.strategies.fedacnnl.FedACnnL`
(:class:`~flwr_analytic.analytic.privacy.release.DPRelease`: the checks that honest noisy statistics
pass and the public ridge ``γ_DP = κ σ √(K D)``), so it combines with streaming and groups.
"""

from __future__ import annotations

import warnings
from typing import Any

from flwr_analytic.analytic.privacy import DPConfig
from flwr_analytic.analytic.privacy.release import DPRelease
from flwr_analytic.strategies.fedacnnl import FedACnnL


class DPFedACnnL(FedACnnL):
    """Deprecated alias of ``FedACnnL(..., release=DPRelease(dp, delta, ridge_factor))``."""

    def __init__(
        self,
        *args: Any,
        dp: DPConfig,
        delta: float = 1e-5,
        ridge_factor: float = 2.0,
        **kwargs: Any,
    ) -> None:
        warnings.warn(
            "DPFedACnnL is deprecated: use FedACnnL(..., release=DPRelease(dp))",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(*args, release=DPRelease(dp, delta, ridge_factor), **kwargs)

    @property
    def dp(self) -> DPConfig:
        """The clients' DP parameters."""
        return self.release.dp


__all__ = ["DPFedACnnL"]
