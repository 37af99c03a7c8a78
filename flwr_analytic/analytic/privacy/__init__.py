"""Privacy for analytic federated learning: secure aggregation and differential privacy.

FedACnnL / pFedACnnL (Gu et al., arXiv 2502.06915) only ever need the *sums* ``Σ_k G_k``,
``Σ_k B_k``, ``Σ_k n_k`` of the clients' layer statistics, so two standard protections apply (no
Flower imports here; the Flower adapters are :mod:`flwr_analytic.clients.fedacnnl_secagg`,
:mod:`flwr_analytic.strategies.fedacnnl_secagg` and :mod:`flwr_analytic.strategies.fedacnnl_dp`):

:mod:`~.secagg`
    Flower's SecAgg+ (Bell et al., CCS 2020): a fixed-point encoding whose masked mean is the sum,
    entrywise within ``ε_G = K s c/Q``, and the resulting bound on the solved ``W``.
:mod:`~.mechanism`
    The Gaussian mechanism: clipping ``‖[a, 1]‖ ≤ C``, ``‖t‖ ≤ τ`` (sensitivity
    ``Δ = 2PC√(C² + τ²)``), noise ``σ = zΔ`` on ``triu(G)`` and ``B``, and the server's public
    ridge ``γ_DP = (κ/2)·2σ√(KD)`` for the noisy sum.
:mod:`~.accounting`
    ``μ = √(Σ_l 1/z_l²)``-GDP composition (Dong, Roth & Su 2022) and the exact ``(ε, δ)`` curve of
    the analytic Gaussian mechanism (Balle & Wang 2018), evaluated by Google's ``dp-accounting``.
:mod:`~.release`
    Release policies (:class:`ExactRelease`, :class:`DPRelease`): the server's per-reply checks,
    solve and privacy report for exact or noisy statistics.

Every name is re-exported here (``from flwr_analytic.analytic.privacy import X``).
"""

from flwr_analytic.analytic.privacy.accounting import (
    classical_sigma_ratio,
    gaussian_delta,
    gaussian_epsilon,
    gdp_mu,
    noise_multiplier_for,
    privacy_report,
    zcdp_epsilon,
)
from flwr_analytic.analytic.privacy.mechanism import (
    DP_CLIP_NORM,
    DP_DELTA,
    DP_NOISE_MULTIPLIER,
    DP_RIDGE_FACTOR,
    DP_SEED,
    DP_TARGET_BOUND,
    DPConfig,
    add_gaussian_noise,
    clip_design_rows,
    clip_target_rows,
    clipped_statistics,
    dp_from_config,
    dp_regularization,
    dp_ridge,
    dp_system,
    noise_rng,
    private_statistics,
    public_prior,
    rows_per_sample,
    solve_noisy_layer,
    validate_released,
)
from flwr_analytic.analytic.privacy.release import (
    RELEASE_KEY,
    DPRelease,
    ExactRelease,
    ReleasePolicy,
    one_hot_classes,
)
from flwr_analytic.analytic.privacy.secagg import (
    SECAGG_CLIPPING_RANGE,
    SECAGG_COUNT_SCALE,
    SECAGG_QUANTIZATION_RANGE,
    SECAGG_SCALE,
    SecAggEncoding,
    SecAggRangeError,
    solve_perturbation_bound,
)

__all__ = [
    "DP_CLIP_NORM",
    "DP_DELTA",
    "DP_NOISE_MULTIPLIER",
    "DP_RIDGE_FACTOR",
    "DP_SEED",
    "DP_TARGET_BOUND",
    "RELEASE_KEY",
    "SECAGG_CLIPPING_RANGE",
    "SECAGG_COUNT_SCALE",
    "SECAGG_QUANTIZATION_RANGE",
    "SECAGG_SCALE",
    "DPConfig",
    "DPRelease",
    "ExactRelease",
    "ReleasePolicy",
    "SecAggEncoding",
    "SecAggRangeError",
    "add_gaussian_noise",
    "classical_sigma_ratio",
    "clip_design_rows",
    "clip_target_rows",
    "clipped_statistics",
    "dp_from_config",
    "dp_regularization",
    "dp_ridge",
    "dp_system",
    "gaussian_delta",
    "gaussian_epsilon",
    "gdp_mu",
    "noise_multiplier_for",
    "noise_rng",
    "one_hot_classes",
    "private_statistics",
    "privacy_report",
    "public_prior",
    "rows_per_sample",
    "solve_noisy_layer",
    "solve_perturbation_bound",
    "validate_released",
    "zcdp_epsilon",
]
