"""Streaming aggregation (StreamingFedACnnL) and ``keep-statistics=false`` on an in-process grid.

The streaming server adds each reply to one float64 accumulator as it arrives; the model must equal
the sorted (hold-everything) server's to float64 rounding, whatever the window of messages in
flight. Its checks of bad replies, dropouts and retries run in ``test_bad_input.py`` and
``test_faults.py`` (parametrized over both strategies).
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from flwr_analytic.analytic import fit_federated
from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app, resolved_context
from flwr_analytic.fedacnnl import LocalGrid, resolve_run_config
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.fedacnnl.config import load_cached_dataset, split_from_config
from flwr_analytic.strategies.fedacnnl_server import build_fedacnnl_strategy, run_fedacnnl

BASE = {
    "dataset": "digits",
    "partitioner": "iid",
    "model": "cnn",
    "cnn-channels": "8,16",
    "min-nodes": 10,
    "seed": 3,
    "results-path": "",
}


def _run(**overrides):
    cfg = resolve_run_config({**BASE, **overrides})
    result, summary = run_fedacnnl(LocalGrid(make_fedacnnl_client_app(), 10, cfg, seed=5), cfg)
    return result.arrays.to_torch_state_dict(), summary


@pytest.fixture(scope="module")
def sorted_run():
    return _run()


@pytest.fixture(scope="module")
def order_spread(sorted_run):
    """Largest weight change from summing the same clients' statistics in other orders."""
    cfg = resolve_run_config(BASE)
    split = split_from_config(cfg, 10)
    data = load_cached_dataset("digits", "", "train")
    clients = [split.client(data, k)[0] for k in range(10)]
    ref_state, _ = sorted_run
    rng = np.random.default_rng(0)
    spread = 0.0
    for _ in range(3):
        net = build_fedacnnl_strategy(cfg).net
        fit_federated(net, [(clients[k].x, clients[k].y) for k in rng.permutation(10)], 256)
        state = P.weights_state_dict(net)
        spread = max(spread, max(float((state[k] - ref_state[k]).abs().max()) for k in state))
    return spread


@pytest.mark.parametrize("window", [0, 3])
def test_streaming_equals_sorted(sorted_run, order_spread, window):
    ref_state, ref = sorted_run
    state, summary = _run(aggregation="streaming", **{"max-in-flight": window})
    diff = max(float((state[k] - ref_state[k]).abs().max()) for k in ref_state)
    # arrival order instead of partition order: a rounding-level change, within what reordering
    # the sum does (triangle inequality: two orders differ by at most twice the spread)
    assert 0 < order_spread < 1e-6 and diff <= 2 * order_spread, (diff, order_spread)
    train = [r for r in summary["rounds"] if r["kind"] == "train"]
    assert [r["num-valid"] for r in train] == [10, 10, 10]
    assert [r["bytes-received"] for r in train] == [
        r["bytes-received"] for r in ref["rounds"] if r["kind"] == "train"
    ]
    for r in train:  # timings of the streaming path
        assert 0 < r["client-compute-time-max"] <= r["client-compute-time"] < r["round-time"]
        assert 0 <= r["solve-time"] < r["round-time"] and r["aggregate-time"] > 0
    assert summary["global-accuracy"] == pytest.approx(ref["global-accuracy"], abs=1e-12)


def test_recomputed_statistics_personalize_the_same(sorted_run):
    _, ref = sorted_run
    assert ref["evaluate"]["num-stats-reused"] == 10
    _, summary = _run(**{"keep-statistics": False})
    assert summary["evaluate"]["num-stats-reused"] == 0
    assert summary["model-sha256"] == ref["model-sha256"]
    assert summary["personal-accuracy"] == pytest.approx(ref["personal-accuracy"], abs=1e-12)


def test_streaming_configuration_errors():
    with pytest.raises(ValueError, match="aggregation"):
        build_fedacnnl_strategy({**BASE, "aggregation": "fast"})
    strategy = build_fedacnnl_strategy({**BASE, "aggregation": "streaming", "max-in-flight": 4})
    assert strategy.server.aggregation == "streaming" and strategy.max_in_flight == 4
    with pytest.raises(ValueError, match="max.in.flight"):
        build_fedacnnl_strategy({**BASE, "aggregation": "streaming", "max-in-flight": -1})
    context = Context(
        run_id=1,
        node_id=1,
        node_config={},
        state=RecordDict(),
        run_config={"keep-statistics": "no"},
    )
    with pytest.raises(ValueError, match="keep-statistics"):
        resolved_context(context)


def test_streaming_with_groups_equals_sorted_groups():
    """Streaming aggregation keeps the output layer's per-client statistics for the groups only."""
    runs = {}
    for aggregation in ("sorted", "streaming"):
        cfg = resolve_run_config(
            {**BASE, "partitioner": "dirichlet", "num-groups": 3, "aggregation": aggregation}
        )
        grid = LocalGrid(make_fedacnnl_client_app(), 10, cfg, seed=5)
        strategy = build_fedacnnl_strategy(cfg)
        strategy.start(grid)
        runs[aggregation] = strategy
    ref, got = runs["sorted"].server, runs["streaming"].server
    assert sorted(got.group_weights) == sorted(ref.group_weights) and len(ref.group_weights) >= 2
    # the same clients in the same groups (node ids are seeded: the same in both runs)
    assert got.group_of_node == ref.group_of_node
    # hidden layers summed in another order (rounding, ~1e-15) amplified by the condition number of
    # a few label-skewed clients' output Gram: equal to well within 1e-6 relative
    scale = max(np.abs(w).max() for w in ref.group_weights.values())
    for g, w in ref.group_weights.items():
        assert np.abs(got.group_weights[g] - w).max() <= 1e-6 * scale, g
    assert isinstance(got.open_sum, type(None))  # the kept statistics are dropped once solved
