"""Run configuration of the FedACnnL app: one declarative table of every key (no Flower here).

Every key is kebab-case, as in ``[tool.flwr.app.config]`` of ``apps/fedacnnl/pyproject.toml`` (a
test keeps the two equal). :func:`resolve_run_config` turns a run config into a checked, read-only
:class:`~flwr_analytic.config_checks.RunConfig` once, at the app boundary. A node's partition comes
from its node config (``partition-id``, ``num-partitions``), which Flower's simulation sets
automatically and a real SuperNode receives via ``--node-config``; loading it is
:mod:`flwr_analytic.fedacnnl.data` (its names are re-exported here for old importers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr_analytic.analytic.privacy import DPConfig
from flwr_analytic.analytic.solvers import RULES
from flwr_analytic.analytic.targets import SCHEMES
from flwr_analytic.config_checks import (
    Boolean,
    ConfigError,
    ConfigTable,
    Interval,
    IntList,
    Options,
    Param,
    RunConfig,
    Satisfies,
    Text,
)
from flwr_analytic.data import DATASETS, PARTITIONERS
from flwr_analytic.data.loaders import SPLITS
from flwr_analytic.fedacnnl.protocol import PERSONAL_LAMBDA_MODES
from flwr_analytic.meta.task import DATASET_SHAPES
from flwr_analytic.models.architectures import ARCHITECTURES

_INT0, _INT1 = Interval(int, 0), Interval(int, 1)
_NONNEG, _POS = Interval(float, 0), Interval(float, 0, closed="right")


def _dataset_name(value: Any) -> bool:
    """A named data set (:data:`~flwr_analytic.data.DATASETS`) or ``hub:<repo id>``."""
    hub = isinstance(value, str) and value.startswith("hub:") and len(value) > 4
    return hub or (isinstance(value, str) and value in DATASETS)


def _cross_check(cfg: Mapping[str, Any]) -> None:
    """Rules between keys: differential privacy needs a clip norm > 1 and no second stage.

    Rows ``[a, 1]`` have norm >= 1, so ``dp-clip-norm`` <= 1 would clip every row to the bias
    alone (:class:`~flwr_analytic.analytic.privacy.DPConfig`). Whether there are more clients than
    samples is known once the data is loaded (:func:`~flwr_analytic.fedacnnl.data.split_from_config`).
    """
    if cfg["second-stage"] > 0 and cfg["dp-noise-multiplier"] > 0:
        raise ConfigError("second-stage: not allowed with dp-noise-multiplier > 0 (no DP for it)")
    if cfg["second-stage"] > 0 and cfg["personalize-layers"] != "last":
        raise ConfigError('second-stage: needs personalize-layers = "last" (its scoring uses h)')
    if cfg["dp-noise-multiplier"] > 0 and not cfg["dp-clip-norm"] > 1:
        raise ConfigError(
            f"dp-clip-norm: {cfg['dp-clip-norm']!r} is not allowed; must be > 1 when "
            "dp-noise-multiplier > 0 (rows [a, 1] have norm >= 1)"
        )


#: Every run-config key of the FedACnnL app: default, allowed values, one-line help. Ridges γ >= 0
#: and λ > 0 (Gu et al., arXiv 2502.06915: ``W = (ΣG + γI)⁻¹ΣB``, ``W_k = (G_k + λI)⁻¹(B_k + λW)``).
RUN_CONFIG = ConfigTable(
    (
        # rounds and data
        Param("num-server-rounds", 0, _INT0, "0 = one round per layer that needs statistics"),
        Param(
            "dataset",
            "digits",
            Satisfies(_dataset_name, f"allowed values: {', '.join([*DATASETS, 'hub:<repo id>'])}"),
            "a named data set or hub:<repo id> (Hugging Face)",
        ),
        Param("data-path", "", Text(), 'file or folder of the data ("" = search)'),
        Param("data-split", "train", Options(SPLITS), "which split of the data set to partition"),
        Param(
            "partitioner",
            "dirichlet",
            Options(PARTITIONERS),
            "how clients get data (precomputed: the split stored in the .npz)",
        ),
        Param("dirichlet-alpha", 0.1, _POS, "Dirichlet concentration of the label split"),
        Param("classes-per-partition", 2, _INT1, "labels per client (pathological)"),
        Param("min-partition-size", 0, _INT0, "resample the split until every part has this"),
        Param("test-fraction", 0.25, Interval(float, 0, 1, "left"), "local test share"),
        # model
        Param("model", "cnn", Options(ARCHITECTURES), "architecture"),
        Param("cnn-channels", "", IntList(), 'cnn: conv widths like "32,64" ("" = default)'),
        Param("cnn-dense", "", IntList(), 'cnn: dense widths like "128" ("" = none)'),
        Param("mlp-hidden", 0, _INT0, "mlp: hidden width (0 = default)"),
        Param("coates-filters", 0, _INT0, "coates: number of filters (0 = default 1,600)"),
        Param("coates-grid", 2, _INT1, "coates: pooling grid g×g (2 = quadrants)"),
        # analytic learning
        Param("scheme", "label-pca", Options(SCHEMES), "targets of the hidden layers"),
        Param("zca-threshold", 0.25, Interval(float), "zca-*: encoder α in max(0, cᵀx̃ − α)"),
        Param(
            "zca-polarity", False, Boolean(), "zca-kmeans/zca-random: channels c, −c (half learned)"
        ),
        Param("gamma", 1e-6, _NONNEG, "ridge γ of the output layer"),
        Param("hidden-gamma", 1e-2, _NONNEG, "ridge of the hidden label regressions"),
        Param(
            "gamma-rule",
            "relative",
            Options(RULES),
            "relative: γ·tr(G)/D; absolute: γ; standardized: γ·n·σ²",
        ),
        Param("lam", 0.1, _POS, "pFedACnnL λ: W_k = (G_k + λI)⁻¹(B_k + λW)"),
        Param("lam-rule", "relative", Options(RULES), "rule of λ, as gamma-rule"),
        Param(  # per-client λ (issue 15)
            "personal-lambda",
            "fixed",
            Options(PERSONAL_LAMBDA_MODES),
            "output-layer λ: fixed (lam) or auto (each client: exact leave-one-out, lam-rule ρ)",
        ),
        Param(
            "personal-recalibration",
            0.0,
            _NONNEG,
            "ρ > 0: each client refits its output layer's scores [s, 1] ↦ V (0: off)",
        ),
        Param("personalize-layers", "last", Options(("last", "all")), "layers pFedACnnL adapts"),
        Param(  # the quadratic second stage and its scoring (issue 15; strategies.SecondStage)
            "second-stage",
            0,
            _INT0,
            "k > 0: one more round, a head on [h, q(k leading whitened components), 1] (0 = off)",
        ),
        Param("scoring-temperature", 7.0, _POS, "second stage: T of log softmax(T·scores)"),
        Param("scoring-weight", 0.5, _NONNEG, "second stage: w of the pFedACnnL expert"),
        Param("mirror", False, Boolean(), "train on images and their mirrors, score the mean"),
        Param("seed", 0, _INT0, "seed of the split, random targets and sampling"),
        Param("dtype", "float64", Options(("float64", "float32")), "float32: faster, rounder"),
        Param("batch-size", 256, _INT1, "samples per forward pass when computing statistics"),
        # sampling and timeouts
        Param("fraction-train", 1.0, Interval(float, 0, 1, "right"), "share of nodes trained"),
        Param("fraction-evaluate", 1.0, Interval(float, 0, 1), "share of nodes evaluated"),
        Param("min-nodes", 2, _INT1, "nodes needed to start a round"),
        Param("round-timeout", 3600.0, _POS, "seconds to wait for the replies of a round"),
        Param(
            "availability-timeout",
            600.0,
            _NONNEG,
            "seconds a round waits for min-nodes; then it goes on with those connected",
        ),
        Param("num-groups", 0, _INT0, "group-wise output layers by label distribution (0 = off)"),
        Param("centralized-eval", False, Boolean(), "server scores the pooled client test sets"),
        # client
        Param("client-threads", 1, _INT0, "torch threads per ClientApp call (0 = leave as is)"),
        Param(
            "keep-statistics",
            True,
            Boolean(),
            "keep personalized layers' statistics in context.state (false: recompute)",
        ),
        # server aggregation
        Param(
            "aggregation",
            "sorted",
            Options(("sorted", "streaming")),
            "sorted: sum in partition order (bit-reproducible); streaming: memory O(D²)",
        ),
        Param("max-in-flight", 64, _INT0, "streaming: messages out at a time (0 = all)"),
        # differential privacy of each client's statistics (a node config may override dp-*)
        Param("dp-noise-multiplier", 0.0, _NONNEG, "Gaussian noise σ = z·Δ per layer (0 = off)"),
        Param("dp-clip-norm", 0.0, _NONNEG, "design rows [a, 1] clipped to this norm (> 1)"),
        Param("dp-target-bound", 1.0, _POS, "target rows clipped to this norm"),
        Param("dp-seed", -1, Interval(int, -1), "noise seed (-1 = OS entropy; keep it secret)"),
        # outputs
        Param("results-path", "fedacnnl_results.json", Text(), 'metrics JSON ("" = none)'),
        Param("model-path", "", Text(), 'final state_dict, torch.save ("" = none)'),
        Param("checkpoint-path", "", Text(), 'server .npz after every layer; resumes ("" = none)'),
    ),
    where="run-config",
    cross_check=_cross_check,
)

#: Defaults of every key (derived from :data:`RUN_CONFIG`; ``flwr run --run-config`` overrides).
DEFAULT_RUN_CONFIG: dict[str, Any] = RUN_CONFIG.defaults

#: Run-config keys that a SuperNode's own node config overrides: its data (``data-path``), its
#: threads, and noise it enforces whatever the server asks (``dp-*``). Any other run-config key in a
#: node config is refused (never silently ignored).
NODE_CONFIG_KEYS: tuple[str, ...] = (
    "data-path",
    "client-threads",
    *(k for k in RUN_CONFIG.keys if k.startswith("dp-")),
)


def resolve_run_config(run_config: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults overridden by ``run_config``, every key and value checked by :data:`RUN_CONFIG`.

    Idempotent: a :class:`~flwr_analytic.config_checks.RunConfig` of this table comes back as is.

    Raises
    ------
    flwr_analytic.config_checks.UnknownKeyError
        (a ``KeyError``) for a key not in :data:`RUN_CONFIG`, naming the closest known key
        (a likely typo: ``gama`` -> ``gamma``).
    flwr_analytic.config_checks.ConfigError
        (a ``ValueError``) for a value that is not allowed, naming the key and the allowed values.

    """
    return RUN_CONFIG.resolve(run_config)


def dp_config(cfg: RunConfig) -> DPConfig:
    """The :class:`~flwr_analytic.analytic.privacy.DPConfig` of a resolved run config.

    Disabled when ``dp-noise-multiplier`` is 0; the table already checked every ``dp-*`` value.
    """
    return DPConfig(
        noise_multiplier=float(cfg["dp-noise-multiplier"]),
        clip_norm=float(cfg["dp-clip-norm"]),
        target_bound=float(cfg["dp-target-bound"]),
    )


_DATA_NAMES = (
    "architecture_for",
    "load_cached_dataset",
    "load_partition_from_config",
    "split_from_config",
)


def __getattr__(name: str) -> Any:
    """The data-loading names that lived here (now :mod:`flwr_analytic.fedacnnl.data`)."""
    if name in _DATA_NAMES:
        from flwr_analytic.fedacnnl import data

        return getattr(data, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DATASET_SHAPES",
    "DEFAULT_RUN_CONFIG",
    "NODE_CONFIG_KEYS",
    "RUN_CONFIG",
    "dp_config",
    "resolve_run_config",
    *_DATA_NAMES,
]
