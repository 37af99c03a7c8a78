"""zca-kmeans and zca-random through the Flower strategy and client app (in process, no Ray).

The k-means layer takes ``1 + iterations`` rounds: ``G``, then one round of per-centroid sums and
counts per Lloyd's iteration, each message carrying the assignment weights. The result equals the
in-process federated fit, and a server killed in the middle of the k-means resumes bit-identically.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from test_faults import FaultyGrid, ServerKilled, _app

from flwr_analytic.analytic import AnalyticNetwork, fit_centralized
from flwr_analytic.analytic.targets import TargetScheme
from flwr_analytic.data import federated_split
from flwr_analytic.fedacnnl import LocalGrid
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.models import coates
from flwr_analytic.strategies.checkpoint import read_checkpoint
from flwr_analytic.strategies.checkpointing import Checkpointed
from flwr_analytic.strategies.fedacnnl import FedACnnL
from flwr_analytic.strategies.utils import arrays_digest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

SCHEME = TargetScheme("zca-kmeans", iterations=3, sample_stride=2)


def _arch(digits):
    return coates(digits.input_shape, 10, filters=16, kernel=3, grid=2, contrast=1e-3)


def _strategy(arch, scheme=SCHEME, path=None):
    kw = {"min_train_nodes": 4, "min_available_nodes": 4, "fraction_evaluate": 1.0}
    strategy = FedACnnL(arch, scheme, seed=3, min_evaluate_nodes=4, **kw)
    return strategy if path is None else Checkpointed(strategy, path)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize(
    "scheme",
    [
        SCHEME,
        TargetScheme("zca-kmeans", threshold=0.4, iterations=3, sample_stride=2, polarity=True),
    ],
)
def test_kmeans_layer_through_flower_equals_centralized(digits, scheme):
    split = federated_split(digits, 4, "dirichlet", alpha=0.5, seed=1)
    arch = _arch(digits)
    strategy = _strategy(arch, scheme)
    assert strategy.num_rounds == 1 + 3 + 1
    result = strategy.start(LocalGrid(_app(digits, split), 4, seed=2))
    train = [e for e in strategy.history if e["kind"] == "train"]
    assert [e["layer"] for e in train] == [0, 0, 0, 0, 1]
    pooled = np.concatenate(split.train)
    ref = fit_centralized(AnalyticNetwork(arch, scheme, seed=3), digits.x[pooled], digits.y[pooled])
    for w, r in zip(strategy.net.weights, ref.weights, strict=True):
        assert _rel(w, r) <= 1e-9
    ev = result.evaluate_metrics_clientapp[5]
    assert ev["global-accuracy"] > 0.6


def test_server_killed_during_kmeans_resumes_bit_identical(digits, tmp_path):
    split = federated_split(digits, 4, "dirichlet", alpha=0.5, seed=1)
    arch = _arch(digits)
    honest = _strategy(arch).start(LocalGrid(_app(digits, split), 4, seed=0))
    path = tmp_path / "kmeans.npz"
    with pytest.raises(ServerKilled):  # killed in round 3: after Lloyd's iteration 1
        _strategy(arch, path=path).start(FaultyGrid(_app(digits, split), 4, kill_at=3, seed=0))
    arrays, meta = read_checkpoint(path, Checkpointed.FORMAT)
    assert meta["solved-layers"] == 0 and int(arrays["kmeans-iteration"][0]) == 1
    resumed = _strategy(arch, path=path).start(LocalGrid(_app(digits, split), 4, seed=9))
    assert arrays_digest(resumed.arrays) == arrays_digest(honest.arrays)


def test_stale_stage_is_rejected(digits):
    arch = _arch(digits)
    strategy = FedACnnL(arch, SCHEME, seed=3)
    x, y = digits.x[:200], digits.y[:200]
    strategy.server.solve(strategy.net.statistics(0, x, y), 1)  # into Lloyd's round 1
    content, extra = P.round_content(strategy.net)
    assert content == {P.STAGE: 1} and extra[P.ASSIGNMENT_KEY].shape == (10, 16)
    stats = strategy.net.statistics(0, x, y)
    with pytest.raises(Exception, match="round 0 of the layer, expected 1"):
        strategy.server.check(stats.pack(), stats.count, 0, {"stage": 0})
    strategy.server.check(stats.pack(), stats.count, 0, {"stage": 1})


def test_kmeans_refused_with_dp(digits):
    from flwr_analytic.analytic.privacy.mechanism import DPConfig
    from flwr_analytic.analytic.privacy.release import DPRelease

    with pytest.raises(ValueError, match="zca-kmeans takes several rounds"):
        FedACnnL(_arch(digits), SCHEME, release=DPRelease(DPConfig(1.0, 2.0)))


def test_kmeans_refused_by_the_legacy_strategies(digits):
    from flwr_analytic.strategies.fedacnnl_legacy import FedACnnLLegacy

    with pytest.raises(ValueError, match="needs the Message-API FedACnnL"):
        FedACnnLLegacy(_arch(digits), SCHEME)
    FedACnnLLegacy(_arch(digits), "zca-random")  # one round per layer: fine


def test_run_config_keys_set_the_encoder_and_reach_the_clients(digits):
    from flwr_analytic.strategies.fedacnnl_server import build_fedacnnl_strategy

    cfg = {"model": "coates", "coates-filters": 16, "scheme": "zca-kmeans"}
    strategy = build_fedacnnl_strategy({**cfg, "zca-polarity": True, "zca-threshold": 0.4})
    scheme = strategy.net.schemes[0]
    assert (scheme.name, scheme.polarity, scheme.threshold) == ("zca-kmeans", True, 0.4)
    assert scheme.summary() == "zca-kmeans (α 0.4, polarity)"  # the strategy's start-up line
    assert P.schemes_from_json(P.schemes_to_json(strategy.net)) == [scheme]
    assert not build_fedacnnl_strategy(cfg).net.schemes[0].polarity  # the paper's encoder


def test_coates_grid_sets_the_pooling_grid_and_bad_grids_are_refused():
    from flwr_analytic.config_checks import ConfigError
    from flwr_analytic.strategies.fedacnnl_server import build_fedacnnl_strategy

    cfg = {"model": "coates", "coates-filters": 16, "scheme": "zca-kmeans"}
    for grid in (1, 2, 3):  # digits 8x8, 6x6 filters: 3x3 maps
        net = build_fedacnnl_strategy({**cfg, "coates-grid": grid}).net
        assert net.design_dim(1) == grid * grid * 16 + 1
    with pytest.raises(ConfigError, match="coates-grid: 4 on 'digits'.*does not fit"):
        build_fedacnnl_strategy({**cfg, "coates-grid": 4})
    with pytest.raises(ConfigError, match="coates-grid: 0 is not allowed"):
        build_fedacnnl_strategy({**cfg, "coates-grid": 0})


def test_polarity_bad_input_is_refused_before_any_round():
    from flwr_analytic.config_checks import ConfigError
    from flwr_analytic.strategies.fedacnnl_server import build_fedacnnl_strategy

    with pytest.raises(ConfigError, match="zca-polarity: polarity applies to zca-kmeans"):
        build_fedacnnl_strategy({"model": "coates", "scheme": "label-pca", "zca-polarity": True})
    with pytest.raises(ValueError, match="even number of channels"):
        cfg = {"model": "coates", "coates-filters": 15, "scheme": "zca-random"}
        build_fedacnnl_strategy({**cfg, "zca-polarity": True})
