"""The quadratic second stage through the FedACnnL app: ``strategies.SecondStage`` + the client app.

Issue 15. On an in-process grid (digits, 10 clients, label skew): the second stage's head equals the
centralized one on the pooled data (float64, <= 1e-9 relative); each client's ``second-stage`` and
``product`` accuracies are those of the formulas computed here from its own data; the run summary
and table carry them; bad replies are rejected by name and, when too few remain, the second stage
is left out while the first-stage model and its evaluation are kept.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg

from flwr_analytic.analytic import QuadraticStage, Regularization
from flwr_analytic.analytic.label_shift import product_of_experts
from flwr_analytic.analytic.quadratic_head import stage_statistics
from flwr_analytic.analytic.solvers import personalized_solve, ridge_solve
from flwr_analytic.clients import make_fedacnnl_client_app
from flwr_analytic.config_checks import ConfigError
from flwr_analytic.fedacnnl import LocalGrid, resolve_run_config
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.fedacnnl.config import load_cached_dataset, split_from_config
from flwr_analytic.report import accuracy_table
from flwr_analytic.strategies import SecondStage
from flwr_analytic.strategies.fedacnnl_server import build_fedacnnl_strategy, run_fedacnnl

K = 12
BASE = {
    "dataset": "digits",
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.3,
    "min-partition-size": 10,
    "model": "cnn",
    "cnn-channels": "8,16",
    "min-nodes": 10,
    "seed": 3,
    "gamma": 1e-3,
    "gamma-rule": "standardized",
    "lam": 3.0,
    "lam-rule": "standardized",
    "results-path": "",
}


def _cfg(**overrides):
    return resolve_run_config({**BASE, **overrides})


def _grid(cfg):
    return LocalGrid(make_fedacnnl_client_app(run_config=cfg), 10, cfg, seed=5)


def _clients(cfg):
    split = split_from_config(cfg, 10)
    data = load_cached_dataset("digits", "", "train")
    return [split.client(data, k) for k in range(10)]


@pytest.fixture(scope="module")
def trained():
    cfg = _cfg()
    strategy = SecondStage(build_fedacnnl_strategy(cfg), K, temperature=6.0, weight=0.7)
    result = strategy.start(_grid(cfg))
    return cfg, strategy, result


def test_second_stage_equals_centralized(trained):
    cfg, strategy, _ = trained
    net, last = strategy.net, strategy.net.num_layers - 1
    train = [c[0] for c in _clients(cfg)]
    x, y = np.concatenate([t.x for t in train]), np.concatenate([t.y for t in train])
    pooled = net.statistics(last, x, y)
    central = QuadraticStage.from_gram(pooled.gram, K)
    diff = np.abs(central.projection - strategy.stage.projection).max(0)
    assert np.all(diff <= 1e-9 * np.abs(central.projection).max(0)), diff  # per component
    assert np.array_equal(strategy.pooled, pooled.cross[-1])  # the pooled class counts
    stats = stage_statistics(net, strategy.stage, x, y)
    w2 = ridge_solve(stats.gram, stats.cross, net.output_reg)
    rows = strategy.stage.rows(_head(net, x))  # the pooled rows [h, q, 1]
    rel = np.abs(rows @ (w2 - strategy.weights)).max() / np.abs(rows @ w2).max()
    assert strategy.weights.shape == (net.design_dim(last) + K * (K + 1) // 2, 10)
    assert rel <= 1e-9, rel
    assert strategy.finished and strategy.num_rounds == strategy.strategy.num_rounds + 1


def test_client_metrics_follow_the_formulas(trained):
    cfg, strategy, result = trained
    ev = result.evaluate_metrics_clientapp[max(result.evaluate_metrics_clientapp)]
    net, last = strategy.net, strategy.net.num_layers - 1
    w_global = net.weights[last]
    reg = Regularization(3.0, "standardized")
    second, product = [], []
    for train, test in _clients(cfg):
        own = net.statistics(last, train.x, train.y)
        w_k = personalized_solve(own.gram, own.cross, w_global, reg)
        rows = np.hstack([_head(net, test.x), np.ones((len(test.y), 1))])
        f = strategy.stage.rows(rows[:, :-1]) @ strategy.weights
        joint = product_of_experts(f, rows @ w_k, own.cross[-1], strategy.pooled, 6.0, 0.7)
        second.append(np.mean(f.argmax(1) == test.y))
        product.append(np.mean(joint.argmax(1) == test.y))
    assert list(ev["client-ids"]) == list(range(10))
    assert np.allclose(ev["second-stage-accuracy-clients"], second, atol=1e-12)
    assert np.allclose(ev["product-accuracy-clients"], product, atol=1e-12)
    # the product moves the global head to each client's labels: far above it on label skew
    assert ev["product-accuracy"] > ev["second-stage-accuracy"] > 0.5


def _head(net, x):
    import torch

    h = net.layer_input(net.num_layers - 1, x)
    return torch.flatten(h, 1).to(torch.float64).numpy()


def test_run_fedacnnl_summary_and_table():
    cfg = _cfg(**{"second-stage": K})
    _, summary = run_fedacnnl(_grid(cfg), cfg)
    train = [r for r in summary["rounds"] if r["kind"] == "train"]
    assert [bool(r.get("second-stage")) for r in train] == [False] * (len(train) - 1) + [True]
    assert train[-1]["num-valid"] == 10 and train[-1]["partitions"] == list(range(10))
    assert sorted(int(k) for k in summary["layer-partitions"]) == list(range(summary["layers"]))
    for key in ("second-stage-accuracy", "product-accuracy"):
        assert 0.5 < summary[key] <= 1.0
    lines = accuracy_table(summary["evaluate"])
    assert [line.split()[0] for line in lines[1:]] == [
        "global",
        "personalized",
        "second",
        "product",
    ]


def _stage_round(cfg):
    """A trained first stage, the second stage's messages and its clients' replies."""
    strategy = SecondStage(build_fedacnnl_strategy(cfg), K)
    grid = _grid(cfg)
    server_round = 0
    while not strategy.strategy.finished:
        server_round += 1
        replies = grid.send_and_receive(strategy.configure_train(server_round, None, None, grid))
        strategy.aggregate_train(server_round, replies)
    assert not list(strategy.configure_evaluate(server_round, None, None, grid))  # not yet
    messages = strategy.configure_train(server_round + 1, None, None, grid)
    return strategy, grid, server_round + 1, list(grid.send_and_receive(messages))


def _tamper(msg, **arrays):
    record = msg.content[P.STATISTICS_KEY]
    for key, value in arrays.items():
        record[key] = Array(np.ascontiguousarray(value))


def test_bad_replies_are_rejected_by_name():
    strategy, _, server_round, replies = _stage_round(_cfg())
    first = replies[0]
    count = first.content[P.STATISTICS_KEY]["count"].numpy()
    _tamper(first, count=count + 1)
    _tamper(replies[1], cross=np.zeros((3, 10)))
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    assert isinstance(arrays, ArrayRecord) and metrics["num-valid"] == 8
    record = strategy.history[-1]
    reasons = sorted(r["reason"] for r in record.details["rejected"])
    assert len(reasons) == 2
    assert any("count" in r for r in reasons) and any("cross" in r or "shape" in r for r in reasons)
    assert strategy.weights is not None and strategy.finished


def test_a_claim_of_another_nodes_partition_is_rejected():
    strategy, _, server_round, replies = _stage_round(_cfg())
    metrics = replies[0].content[P.METRICS_KEY]
    theirs = next(
        r.content[P.METRICS_KEY][P.PARTITION_ID]
        for r in replies[1:]
        if r.content[P.METRICS_KEY][P.PARTITION_ID] != metrics[P.PARTITION_ID]
    )
    metrics[P.PARTITION_ID] = theirs  # node 0 claims a partition another connected node holds
    _, out = strategy.aggregate_train(server_round, replies)
    (rejected,) = strategy.history[-1].details["rejected"]
    assert rejected["node-id"] == replies[0].metadata.src_node_id
    assert f"duplicate partition-id {theirs}: held by node" in rejected["reason"]
    assert out["num-valid"] == 9 and strategy.weights is not None


def test_too_few_valid_replies_keep_the_first_stage():
    strategy, grid, server_round, replies = _stage_round(_cfg())
    for msg in replies:
        _tamper(msg, cross=np.zeros((3, 10)))
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    assert arrays is None and metrics["num-valid"] == 0
    assert strategy.finished and strategy.weights is None and "valid replies" in strategy.skipped
    messages = list(strategy.configure_evaluate(server_round, strategy.global_arrays(), None, grid))
    assert len(messages) == 10  # the first-stage model is evaluated as without the stage
    ev = strategy.aggregate_evaluate(server_round, grid.send_and_receive(messages))
    assert ev["personal-accuracy"] > 0.5 and "product-accuracy" not in ev


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"second-stage": 5, "dp-noise-multiplier": 1.0, "dp-clip-norm": 10.0}, "second-stage"),
        ({"second-stage": 5, "personalize-layers": "all"}, "personalize-layers"),
        ({"second-stage": -1}, "second-stage"),
        ({"scoring-temperature": 0.0}, "scoring-temperature"),
        ({"scoring-weight": -1.0}, "scoring-weight"),
    ],
)
def test_bad_config_names_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        _cfg(**overrides)


def test_bad_wrapper_arguments():
    inner = build_fedacnnl_strategy(_cfg())
    width = inner.net.design_dim(inner.net.num_layers - 1) - 1
    for kwargs, needle in (
        ({"components": 0}, "components"),
        ({"components": width + 1}, "head features"),
        ({"temperature": 0.0}, "scoring-temperature"),
        ({"weight": float("nan")}, "scoring-weight"),
    ):
        with pytest.raises(ValueError, match=needle):
            SecondStage(inner, **kwargs)
    with pytest.raises(TypeError, match="wraps a FedACnnL strategy, got FedAvg"):
        SecondStage(FedAvg())
    with pytest.raises(ValueError, match="personalize_layers"):
        SecondStage(build_fedacnnl_strategy(_cfg(**{"personalize-layers": "all"})))
