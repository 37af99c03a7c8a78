"""FedACnnL strategy + client app in-process (no Ray): exactness, validation, personalization."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from rounding import TOL, output_rounding_bound

from flwr_analytic.analytic import (
    AnalyticNetwork,
    Regularization,
    fit_centralized,
    fit_federated,
    personalize,
)
from flwr_analytic.clients.fedacnnl_client import (
    evaluate_global_and_personal,
    layer_statistics,
    make_fedacnnl_client_app,
)
from flwr_analytic.data import ArrayDataset, federated_split
from flwr_analytic.fedacnnl import LocalGrid
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.models import build_module, cnn, mlp
from flwr_analytic.strategies.fedacnnl import FedACnnL, aggregate_personalized_evaluation
from flwr_analytic.strategies.metering import Metered

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def _loader(data: ArrayDataset, split):
    def load(context):
        return split.client(data, int(context.node_config["partition-id"]))

    return load


def _rel(ws, refs):
    return [float(np.abs(w - r).max() / np.abs(r).max()) for w, r in zip(ws, refs, strict=True)]


@pytest.mark.parametrize(
    ("method", "kwargs"), [("iid", {}), ("dirichlet", {"alpha": 0.1})], ids=["iid", "dir0.1"]
)
def test_strategy_equals_centralized(digits, method, kwargs):
    split = federated_split(digits, 20, method, seed=1, **kwargs)
    arch = cnn(digits.input_shape, 10, channels=(8, 16))
    grid = LocalGrid(make_fedacnnl_client_app(_loader(digits, split)), 20, seed=5)
    strategy = FedACnnL(arch, "label-pca", seed=3, min_train_nodes=20, min_available_nodes=20)
    result = Metered(strategy).start(grid)  # the metering wrapper adds bytes and times
    assert len(result.train_metrics_clientapp) == arch.num_layers

    pooled = np.concatenate(split.train)
    ref = fit_centralized(
        AnalyticNetwork(arch, "label-pca", seed=3), digits.x[pooled], digits.y[pooled]
    )
    *hidden, output = _rel(strategy.net.weights, ref.weights)
    last = strategy.server.layer_statistics[arch.num_layers - 1]
    bound = output_rounding_bound(strategy.net, last)
    assert max(hidden) <= TOL and output <= bound, (hidden, output, bound)

    # the final ArrayRecord loads into the exported torch model and predicts like the reference
    module = build_module(arch).double()
    module.load_state_dict(result.arrays.to_torch_state_dict())
    probe = digits.x[pooled[:50]]
    with torch.no_grad():
        out = module(torch.as_tensor(probe, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(out, ref.predict(probe), rtol=1e-7, atol=1e-9)

    # evaluation: per-client global and personalized metrics equal the core's closed form
    ev = result.evaluate_metrics_clientapp[arch.num_layers]
    assert ev["num-clients"] == sum(len(t) > 0 for t in split.test)
    fed = AnalyticNetwork(arch, "label-pca", seed=3)
    fit = fit_federated(fed, [(digits.x[i], digits.y[i]) for i in split.train])
    correct_g = correct_p = total = 0
    for k, test in enumerate(split.test):
        own = fed.with_weights(personalize(fed, fit.client_statistics[k], Regularization(0.1)))
        correct_g += fed.evaluate(digits.x[test], digits.y[test])["correct"]
        correct_p += own.evaluate(digits.x[test], digits.y[test])["correct"]
        total += len(test)
    assert ev["global-accuracy"] == pytest.approx(correct_g / total)
    assert ev["personal-accuracy"] == pytest.approx(correct_p / total)
    for key in ("global-accuracy", "personal-loss"):
        vals = np.array(ev[f"{key}-clients"])
        assert ev[f"{key}-client-mean"] == pytest.approx(vals.mean())
        assert ev[f"{key}-client-min"] == pytest.approx(vals.min())
        assert ev[f"{key}-client-p10"] == pytest.approx(np.percentile(vals, 10))
    assert ev["client-ids"] == sorted(ev["client-ids"])
    # rounds report bytes and time
    for r, m in result.train_metrics_clientapp.items():
        assert m["layer"] == r - 1 and m["num-clients"] == 20 and m["num-rejected"] == 0
        assert m["bytes-received"] > 0 and m["round-time"] > 0
    assert result.train_metrics_clientapp[1]["bytes-sent"] == 0  # layer 0: nothing solved yet
    assert result.train_metrics_clientapp[2]["bytes-sent"] > 0


def test_result_independent_of_node_ids_and_reply_order(digits):
    split = federated_split(digits, 6, "dirichlet", alpha=0.3, seed=0)
    arch = mlp(digits.input_shape, 10, hidden=32)
    weights = []
    for seed in (0, 1):
        grid = LocalGrid(make_fedacnnl_client_app(_loader(digits, split)), 6, seed=seed)
        strategy = FedACnnL(arch, "label-pca", min_train_nodes=6, fraction_evaluate=0.0)
        strategy.start(grid)
        weights.append(strategy.net.weights)
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)  # bit-identical: summed in partition-id order


def _train_replies(strategy, grid, data, split):
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    return msgs, list(grid.send_and_receive(msgs))


def test_bad_replies_are_rejected_and_run_continues(digits, caplog):
    split = federated_split(digits, 4, "iid", seed=0)
    arch = mlp(digits.input_shape, 10, hidden=16)
    grid = LocalGrid(make_fedacnnl_client_app(_loader(digits, split)), 4, shuffle_replies=False)
    strategy = FedACnnL(arch, min_train_nodes=4)
    msgs, replies = _train_replies(strategy, grid, digits, split)
    good = replies[0]

    def forged(mutate):
        packed = {k: v.numpy().copy() for k, v in good.content[P.STATISTICS_KEY].items()}
        metrics = dict(good.content[P.METRICS_KEY])
        mutate(packed, metrics)
        content = RecordDict(
            {
                P.STATISTICS_KEY: ArrayRecord({k: Array(v) for k, v in packed.items()}),
                P.METRICS_KEY: MetricRecord(metrics),
            }
        )
        return Message(content=content, reply_to=msgs[0])

    def nan(p, m):
        p["gram-triu"][3] = np.nan

    def shape(p, m):
        p["cross"] = p["cross"][:, :3].copy()

    def count(p, m):
        m["num-examples"] = int(m["num-examples"]) + 5

    def layer(p, m):
        m["layer"] = 1

    bad = [forged(f) for f in (nan, shape, count, layer)]
    arrays, metrics = strategy.aggregate_train(1, replies[1:] + bad)
    assert arrays is not None and metrics["num-rejected"] == 4 and metrics["num-clients"] == 3
    reasons = " | ".join(r["reason"] for r in strategy.history[-1]["rejected"])
    for word in ("non-finite", "target columns", "count", "layer"):
        assert word in reasons
    assert "Rejected reply" in caplog.text
    # the solved layer is the one of the three valid clients
    ref = AnalyticNetwork(arch)
    kept = sorted(int(r.content[P.METRICS_KEY]["partition-id"]) for r in replies[1:])
    three = [split.client(digits, k)[0] for k in kept]
    fit_federated(ref, [(d.x, d.y) for d in three])
    assert max(_rel(strategy.net.weights[:1], ref.weights[:1])) <= TOL


def test_strict_strategy_stops_on_bad_reply(digits):
    split = federated_split(digits, 3, "iid", seed=0)
    grid = LocalGrid(make_fedacnnl_client_app(_loader(digits, split)), 3)
    strategy = FedACnnL(mlp(digits.input_shape, 10, hidden=8), accept_failures=False)
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    replies = list(grid.send_and_receive(msgs))
    replies[0].content[P.METRICS_KEY]["num-examples"] = 1
    with pytest.raises(RuntimeError, match="rejected"):
        strategy.aggregate_train(1, replies)


def test_client_failure_is_logged_and_skipped(digits):
    split = federated_split(digits, 4, "iid", seed=0)
    base = _loader(digits, split)

    def flaky(context):
        if context.node_config["partition-id"] == 2:
            raise OSError("disk gone")
        return base(context)

    grid = LocalGrid(make_fedacnnl_client_app(flaky, cache=False), 4)
    strategy = FedACnnL(mlp(digits.input_shape, 10, hidden=8), min_train_nodes=4)
    result = strategy.start(grid)
    assert all(m["num-clients"] == 3 for m in result.train_metrics_clientapp.values())
    assert "disk gone" in strategy.history[0]["rejected"][0]["reason"]
    assert result.evaluate_metrics_clientapp[2]["num-clients"] == 3


def test_num_rounds_and_random_layers(digits):
    arch = cnn(digits.input_shape, 10, channels=(8, 16))
    strategy = FedACnnL(arch, ["random", "label-pca"])
    assert strategy.num_rounds == 2 and strategy.net.solved_layers == 1
    split = federated_split(digits, 3, "iid", seed=0)
    grid = LocalGrid(make_fedacnnl_client_app(_loader(digits, split)), 3)
    with pytest.raises(ValueError, match="needs 2 rounds"):
        strategy.start(grid, num_rounds=1)
    result = strategy.start(grid, num_rounds=5)
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert [m["layer"] for m in result.train_metrics_clientapp.values()] == [1, 2]


def test_centralized_evaluate_fn(digits):
    split = federated_split(digits, 3, "iid", seed=0)
    arch = mlp(digits.input_shape, 10, hidden=16)
    grid = LocalGrid(make_fedacnnl_client_app(_loader(digits, split)), 3)
    calls = []

    def evaluate_fn(server_round, arrays):
        calls.append(server_round)
        module = build_module(arch)
        module.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            pred = module(torch.as_tensor(digits.x)).argmax(1).numpy()
        return MetricRecord({"accuracy": float(np.mean(pred == digits.y))})

    result = FedACnnL(arch, fraction_evaluate=0.0).start(grid, evaluate_fn=evaluate_fn)
    assert calls == [2] and result.evaluate_metrics_serverapp[2]["accuracy"] > 0.9
    assert result.evaluate_metrics_clientapp == {}


def test_client_functions_and_kept_statistics(digits):
    split = federated_split(digits, 2, "dirichlet", alpha=0.5, seed=0)
    train, test = split.client(digits, 0)
    arch = mlp(digits.input_shape, 10, hidden=16)
    server = AnalyticNetwork(arch)
    fit_federated(server, [(digits.x[i], digits.y[i]) for i in split.train])
    extra = {P.LAM: 0.1, P.LAM_RULE: "relative", P.PERSONALIZE_LAYERS: "last", P.LAYER: 1}
    cfg = P.network_config(server, 64) | extra
    arrays = {k: v.numpy() for k, v in P.weights_state_dict(server).items()}
    net, stats = layer_statistics(cfg, arrays, train)
    assert stats.count == len(train)
    kept = {1: (P.weights_digest(net, 1), stats)}
    m1, _ = evaluate_global_and_personal(cfg, arrays, train, test, kept)
    m2, _ = evaluate_global_and_personal(cfg, arrays, train, test, None)
    assert m1["stats-reused"] == 1 and m2["stats-reused"] == 0
    assert m1["personal-accuracy"] == m2["personal-accuracy"]
    stale = {1: ("0" * 64, stats)}
    assert evaluate_global_and_personal(cfg, arrays, train, test, stale)[0]["stats-reused"] == 0


def test_evaluation_aggregation_weights():
    def rec(pid, n, acc):
        return RecordDict(
            {
                "m": MetricRecord(
                    {
                        "num-examples": n,
                        "partition-id": pid,
                        "global-accuracy": acc,
                        "global-loss": 1 - acc,
                        "personal-accuracy": acc,
                        "personal-loss": 0.5,
                    }
                )
            }
        )

    out = aggregate_personalized_evaluation([rec(1, 30, 0.5), rec(0, 10, 1.0), rec(2, 0, 0.0)])
    assert out["num-clients"] == 2 and out["client-ids"] == [0, 1]
    assert out["global-accuracy"] == pytest.approx((10 + 15) / 40)
    assert out["global-accuracy-client-mean"] == pytest.approx(0.75)
    assert out["global-accuracy-client-std"] == pytest.approx(0.25)
    assert out["global-accuracy-client-min"] == pytest.approx(0.5)


def test_legacy_adapters_in_process(digits):
    """Legacy NumPyClient + legacy strategy driven by hand (the Ray run is in the slow tests)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from legacy_driver import client_manager

    from flwr_analytic.clients.fedacnnl_legacy import FedACnnLNumPyClient
    from flwr_analytic.strategies.fedacnnl_legacy import FedACnnLLegacy

    split = federated_split(digits, 4, "dirichlet", alpha=0.5, seed=2)
    arch = cnn(digits.input_shape, 10, channels=(8, 16))
    clients = {
        900 - k: FedACnnLNumPyClient(*split.client(digits, k), partition_id=k) for k in range(4)
    }
    manager = client_manager(clients)
    strategy = FedACnnLLegacy(arch, seed=3, min_train_nodes=4, min_available_nodes=4)
    params = strategy.initialize_parameters(manager)
    for rnd in range(1, strategy.num_rounds + 1):
        results = []
        for proxy, ins in strategy.configure_fit(rnd, params, manager):
            arrays, n, metrics = clients[proxy.node_id].fit(
                parameters_to_ndarrays(ins.parameters), ins.config
            )
            res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, metrics)
            results.append((proxy, res))
        params, metrics = strategy.aggregate_fit(rnd, results[::-1], [])
        assert metrics["num-clients"] == 4
        assert strategy.configure_evaluate(rnd, params, manager) == [] or rnd == 3
    ref = AnalyticNetwork(arch, seed=3)
    fit = fit_federated(ref, [(digits.x[i], digits.y[i]) for i in split.train])
    assert max(_rel(strategy.net.weights, ref.weights)) <= TOL
    evals = []
    for proxy, ins in strategy.configure_evaluate(3, params, manager):
        loss, n, m = clients[proxy.node_id].evaluate(
            parameters_to_ndarrays(ins.parameters), ins.config
        )
        evals.append((proxy, type("R", (), {"loss": loss, "num_examples": n, "metrics": m})()))
    loss, agg = strategy.aggregate_evaluate(3, evals, [])
    k = 0
    own = ref.with_weights(personalize(ref, fit.client_statistics[k], Regularization(0.1)))
    expected = own.evaluate(digits.x[split.test[k]], digits.y[split.test[k]])["accuracy"]
    assert strategy.evaluation["personal-accuracy-clients"][0] == pytest.approx(expected)
    assert agg["num-clients"] == 4 and "personal-accuracy-clients" not in agg


def test_app_server_function_writes_results(tmp_path, digits):
    import json

    from flwr_analytic.fedacnnl import resolve_run_config
    from flwr_analytic.strategies.fedacnnl_server import run_fedacnnl

    cfg = resolve_run_config(
        {
            "partitioner": "iid",
            "model": "cnn",
            "cnn-channels": "8,16",
            "centralized-eval": True,
            "results-path": str(tmp_path / "r.json"),
            "model-path": str(tmp_path / "m.pt"),
            "min-nodes": 5,
        }
    )
    grid = LocalGrid(make_fedacnnl_client_app(), 5, cfg)
    result, summary = run_fedacnnl(grid, cfg)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["model-sha256"] == summary["model-sha256"] and saved["num-nodes"] == 5
    assert [r["layer"] for r in saved["rounds"] if r["kind"] == "train"] == [0, 1, 2]
    assert saved["bytes-sent"] > 0 and saved["bytes-received"] > 0 and saved["wall-time"] > 0
    ev = saved["evaluate"]
    assert 0.8 < ev["global-accuracy"] <= 1 and 0.8 < ev["personal-accuracy"] <= 1
    assert ev["num-examples"] == saved["centralized-evaluate"]["num-examples"]
    assert saved["centralized-evaluate"]["accuracy"] == pytest.approx(ev["global-accuracy"])
    module = build_module(cnn(digits.input_shape, 10, channels=(8, 16)))
    module.load_state_dict(torch.load(tmp_path / "m.pt"))
    with pytest.raises(KeyError, match="unknown run-config key"):
        resolve_run_config({"gama": 1.0})


def test_group_wise_output_layers(digits):
    from flwr_analytic.analytic import ridge_solve

    split = federated_split(digits, 10, "pathological", classes_per_partition=2, seed=0)
    arch = mlp(digits.input_shape, 10, hidden=32)
    grid = LocalGrid(make_fedacnnl_client_app(_loader(digits, split)), 10)
    strategy = FedACnnL(arch, min_train_nodes=10, min_available_nodes=10, num_groups=3)
    result = strategy.start(grid)
    groups = strategy.history[-2]["groups"]  # the output layer's round
    assert sorted(sum(groups, [])) == list(range(10)) and len(groups) == 3
    # the single global model is unchanged by grouping
    ref = AnalyticNetwork(arch)
    fit_federated(ref, [(digits.x[i], digits.y[i]) for i in split.train])
    assert max(_rel(strategy.net.weights, ref.weights)) <= TOL
    # each group's output layer is the ridge solution on the group's pooled data
    for g, members in enumerate(groups):
        rows = np.concatenate([split.train[k] for k in members])
        stats = ref.statistics(ref.num_layers - 1, digits.x[rows], digits.y[rows])
        w = ridge_solve(stats.gram, stats.cross, ref.output_reg)
        assert max(_rel([strategy.server.group_weights[g]], [w])) <= TOL
    ev = result.evaluate_metrics_clientapp[2]
    for key in ("group-accuracy", "group-personal-accuracy", "group-loss"):
        assert 0 <= ev[key] and len(ev[f"{key}-clients"]) == 10
    # clients grouped by label distribution beat the single model on their own test data
    assert ev["group-accuracy"] > ev["global-accuracy"]
