"""Flower pieces of the meta app, driven in-process with hand-built Messages (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg, FedProx

from flwr_analytic.clients import handle_evaluate, handle_train, make_meta_client_app
from flwr_analytic.meta import MetaConfig, evaluate, meta_train
from flwr_analytic.meta.config import local_steps_for, resolve_run_config
from flwr_analytic.meta.task import build_model, client_tensors, round_rng
from flwr_analytic.strategies import (
    InProcessGrid,
    Metered,
    NuStepMetaFedAvg,
    PFedMe,
    build_meta_strategy,
    personalized_metrics_aggregation,
    run_meta_in_process,
)

RUN = {
    "dataset": "digits",
    "model": "cnn",
    "num-server-rounds": 2,
    "history-path": "",
    "local-steps": 3,
    "finetune-steps": 3,
    "min-partition-size": 20,
}
NODES = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def grid():
    # also sets the task identity that instruction messages need
    return InProcessGrid(make_meta_client_app(RUN), NODES, RUN)


def _context(pid):
    return Context(
        run_id=1,
        node_id=pid + 1,
        state=RecordDict(),
        run_config=dict(RUN),
        node_config={"partition-id": pid, "num-partitions": NODES},
    )


def _initial():
    return ArrayRecord(build_model(resolve_run_config(RUN), seed=0).state_dict())


def _msg(arrays, config, mtype=MessageType.TRAIN, node=1):
    return Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord(config)}),
        dst_node_id=node,
        message_type=mtype,
    )


def _close(a: ArrayRecord, b: ArrayRecord, tol=0.0):
    return all(np.abs(a[k].numpy() - b[k].numpy()).max() <= tol for k in a.keys())


def test_strategy_sends_meta_config_in_kebab_case(grid):
    strategy = NuStepMetaFedAvg(
        nu=3,
        alpha=0.02,
        beta=0.1,
        mode="exact",
        local_steps=7,
        inner_batch_size=8,
        outer_batch_size=9,
        hessian_batch_size=10,
        hessian_batches="reuse",
        delta=1e-4,
        finetune_steps=4,
    )
    metered = Metered(strategy)  # bytes and times of any strategy: the metering wrapper
    msgs = list(metered.configure_train(1, _initial(), ConfigRecord(), grid))
    assert len(msgs) == NODES
    cfg = msgs[0].content["config"]
    assert cfg["local-algorithm"] == "meta" and cfg["meta-nu"] == 3 and cfg["meta-mode"] == "exact"
    assert (cfg["meta-alpha"], cfg["meta-beta"], cfg["local-steps"]) == (0.02, 0.1, 7)
    sizes = (cfg["inner-batch-size"], cfg["outer-batch-size"], cfg["hessian-batch-size"])
    assert sizes == (8, 9, 10) and cfg["hessian-batches"] == "reuse"
    assert cfg["hf-delta"] == 1e-4 and cfg["server-round"] == 1
    ev = list(metered.configure_evaluate(1, _initial(), ConfigRecord(), grid))[0].content["config"]
    assert (ev["finetune-steps"], ev["finetune-lr"]) == (4, 0.02)
    size = NODES * sum(len(a.data) for a in _initial().values())
    assert [(r["kind"], r["bytes-sent"]) for r in metered.history] == [
        ("train", size),
        ("evaluate", size),
    ]
    with pytest.raises(ValueError):
        NuStepMetaFedAvg(mode="newton")
    assert isinstance(strategy, FedAvg)


def test_aggregate_train_is_weighted_by_examples(grid):
    strategy = Metered(NuStepMetaFedAvg())
    list(strategy.configure_train(1, _initial(), ConfigRecord(), grid))
    msgs = list(strategy.configure_train(1, _initial(), ConfigRecord(), grid))
    replies = []
    for msg, (val, n) in zip(msgs, [(1.0, 10), (3.0, 30)], strict=False):
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.full(3, val, dtype=np.float32))}),
                "metrics": MetricRecord({"num-examples": n, "train-loss": val}),
            }
        )
        replies.append(Message(content, reply_to=msg))
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), (10 * 1.0 + 30 * 3.0) / 40)
    assert metrics["train-loss"] == pytest.approx(2.5)
    # serialized size of the two 3-float arrays (npy header included)
    assert strategy.history[0]["bytes-received"] == 2 * len(
        Array(np.zeros(3, dtype=np.float32)).data
    )
    assert metrics["bytes-received"] == strategy.history[0]["bytes-received"]


def test_personalized_metrics_aggregation():
    def rec(pid, n, correct):
        return RecordDict(
            {
                "metrics": MetricRecord(
                    {
                        "num-examples": n,
                        "partition-id": pid,
                        "correct-curve": correct,
                        "loss-curve": [1.0] * len(correct),
                        "acc": correct[-1] / n,
                        "loss": 1.0,
                    }
                )
            }
        )

    records = [rec(2, 10, [1.0, 9.0]), rec(0, 30, [3.0, 15.0]), rec(1, 60, [6.0, 60.0])]
    m = personalized_metrics_aggregation(records, "num-examples")
    accs = np.array([0.5, 1.0, 0.9])  # ordered by partition id
    assert m["acc"] == pytest.approx(84 / 100) and m["acc-s0"] == pytest.approx(0.1)
    assert m["acc-clients"] == pytest.approx(list(accs)) and m["client-ids"] == [0.0, 1.0, 2.0]
    assert m["acc-client-mean"] == pytest.approx(accs.mean())
    assert m["acc-client-std"] == pytest.approx(accs.std())
    assert m["acc-client-min"] == pytest.approx(0.5)
    assert m["acc-client-p10"] == pytest.approx(np.percentile(accs, 10))
    assert m["acc-curve"] == pytest.approx([0.1, 0.84]) and m["num-test"] == 100


def test_client_train_meta_matches_the_core_loop(grid):
    strategy = NuStepMetaFedAvg(
        nu=2,
        alpha=0.05,
        beta=0.1,
        mode="exact",
        local_steps=2,
        inner_batch_size=16,
        outer_batch_size=16,
        hessian_batch_size=16,
    )
    msg = list(strategy.configure_train(3, _initial(), ConfigRecord(), grid))[0]
    reply = handle_train(msg, _context(1))
    got = reply.content["arrays"]
    cfg = resolve_run_config(RUN)
    x, y, _, _ = client_tensors(cfg, 1, NODES)
    model = build_model(cfg, seed=0)
    meta_train(
        model,
        x,
        y,
        MetaConfig(
            nu=2,
            alpha=0.05,
            beta=0.1,
            mode="exact",
            local_steps=2,
            inner_batch_size=16,
            outer_batch_size=16,
            hessian_batch_size=16,
        ),
        round_rng(0, 1, 3, 0),
    )
    assert _close(got, ArrayRecord(model.state_dict()))
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == len(y) and metrics["hvp-evals"] == 4


def test_client_nu_zero_equals_fedavg_sgd_client(grid):
    meta = NuStepMetaFedAvg(nu=0, beta=0.1, local_steps=4, outer_batch_size=32)
    m1 = list(meta.configure_train(2, _initial(), ConfigRecord(), grid))[0]
    sgd_cfg = {"local-algorithm": "sgd", "lr": 0.1, "local-steps": 4, "batch-size": 32}
    m2 = list(FedAvg().configure_train(2, _initial(), ConfigRecord(sgd_cfg), grid))[0]
    a = handle_train(m1, _context(0)).content["arrays"]
    b = handle_train(m2, _context(0)).content["arrays"]
    assert _close(a, b) and not _close(a, _initial(), 1e-6)


def test_client_fedprox_reads_flowers_proximal_mu(grid):
    sgd_cfg = {"local-algorithm": "sgd", "lr": 0.5, "local-steps": 5, "batch-size": 32}
    w0 = _initial()
    out = {}
    for mu in (0.0, 1.0):
        msg = list(FedProx(proximal_mu=mu).configure_train(1, w0, ConfigRecord(sgd_cfg), grid))[0]
        assert msg.content["config"]["proximal-mu"] == mu
        out[mu] = handle_train(msg, _context(2)).content["arrays"]
    dist = {
        mu: sum(float(((a[k].numpy() - w0[k].numpy()) ** 2).sum()) for k in w0.keys())
        for mu, a in out.items()
    }
    assert dist[1.0] < dist[0.0]


def test_client_evaluate_curve(grid):
    msg = _msg(
        _initial(),
        {"finetune-steps": 3, "finetune-lr": 0.1, "finetune-batch-size": 16, "server-round": 1},
        MessageType.EVALUATE,
    )
    reply = handle_evaluate(msg, _context(3))
    m = reply.content["metrics"]
    assert len(m["correct-curve"]) == 4 and m["partition-id"] == 3
    cfg = resolve_run_config(RUN)
    _, _, xt, yt = client_tensors(cfg, 3, NODES)
    loss0, correct0 = evaluate(build_model(cfg, seed=0), xt, yt)
    assert m["correct-curve"][0] == correct0 and m["loss-curve"][0] == pytest.approx(loss0)
    assert m["num-examples"] == len(yt) and m["acc"] == m["correct-curve"][-1] / len(yt)


def test_pfedme_server_mixing(grid):
    strategy = PFedMe(beta=0.25)
    w0 = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    msgs = list(strategy.configure_train(1, w0, ConfigRecord(), grid))
    assert msgs[0].content["config"]["local-algorithm"] == "pfedme"
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(np.full(2, 4.0, dtype=np.float32))}),
                    "metrics": MetricRecord({"num-examples": 5}),
                }
            ),
            reply_to=m,
        )
        for m in msgs[:2]
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), 1.0)


def test_build_strategy_for_every_algorithm_and_equal_budget():
    kinds = {
        "meta": NuStepMetaFedAvg,
        "per-fedavg-fo": NuStepMetaFedAvg,
        "per-fedavg-hf": NuStepMetaFedAvg,
        "fedavg": FedAvg,
        "fedavg-ft": FedAvg,
        "fedprox": FedProx,
        "pfedme": PFedMe,
    }
    for algo, kind in kinds.items():
        strategy, train_cfg, eval_cfg = build_meta_strategy(
            {"algorithm": algo, "grad-budget": 24, "nu": 3, "mode": "exact"}
        )
        assert isinstance(strategy, Metered) and isinstance(strategy.innermost(), kind), algo
        assert eval_cfg["finetune-steps"] == (0 if algo == "fedavg" else 2)
    s, _, _ = build_meta_strategy({"algorithm": "per-fedavg-hf"})
    assert (s.nu, s.mode) == (1, "hessian-free")
    cfg = resolve_run_config({"grad-budget": 24, "nu": 3, "mode": "exact"})
    assert local_steps_for("meta", cfg) == 2  # 3 + 1 gradients + 3 HVPs (2 each) = 10
    assert local_steps_for("fedavg", cfg) == 24 and local_steps_for("pfedme", cfg) == 5
    assert local_steps_for("per-fedavg-fo", cfg) == 12
    assert local_steps_for("per-fedavg-hf", cfg) == 6
    with pytest.raises(ValueError):
        resolve_run_config({"algorithm": "scaffold"})


def test_in_process_run_nu0_is_fedavg_and_writes_history(tmp_path):
    path = tmp_path / "h.json"
    res_meta, hist = run_meta_in_process(
        {**RUN, "algorithm": "meta", "nu": 0, "history-path": str(path)}, num_nodes=NODES
    )
    res_avg, _ = run_meta_in_process({**RUN, "algorithm": "fedavg-ft"}, num_nodes=NODES)
    assert _close(res_meta.arrays, res_avg.arrays)
    saved = json.loads(path.read_text())
    assert [(h["round"], h["kind"]) for h in saved["history"]] == [
        (1, "train"),
        (1, "evaluate"),
        (2, "train"),
        (2, "evaluate"),
    ]
    assert saved["run-config"]["nu"] == 0
    for h in saved["history"]:
        assert h["bytes-sent"] > 0  # the model to every client (and back after training)
        assert h["bytes-received"] == (h["bytes-sent"] if h["kind"] == "train" else 0)
        assert h["round-time"] > 0 and h["num-sent"] == h["num-replies"] == NODES
        if h["kind"] == "evaluate":
            ev = h["metrics"]
            assert ev["num-clients"] == NODES and len(ev["acc-curve"]) == 4
            assert ev["acc-client-min"] <= ev["acc-client-p10"] <= ev["acc-client-mean"]
            per_client = h["client-metrics"]["num-examples"]  # the metering wrapper's
            assert len(per_client) == NODES and sum(per_client) == ev["num-test"]
    assert hist == saved["history"]


def test_in_process_per_fedavg_equals_meta_nu1():
    fo, _ = run_meta_in_process({**RUN, "algorithm": "per-fedavg-fo"}, num_nodes=NODES)
    meta, _ = run_meta_in_process(
        {**RUN, "algorithm": "meta", "nu": 1, "mode": "first-order"}, num_nodes=NODES
    )
    assert _close(fo.arrays, meta.arrays)
    pf, hist = run_meta_in_process(
        {**RUN, "algorithm": "pfedme", "num-server-rounds": 1}, num_nodes=NODES
    )
    assert hist[0]["kind"] == "train" and hist[0]["metrics"]["grad-evals"] == pytest.approx(3 * 5)


def test_evaluate_every_and_test_cap():
    _, hist = run_meta_in_process(
        {**RUN, "num-server-rounds": 3, "evaluate-every": 2, "eval-test-cap": 5, "local-steps": 1},
        num_nodes=NODES,
    )
    assert [(h["round"], h["kind"]) for h in hist if h["kind"] == "evaluate"] == [
        (2, "evaluate"),
        (3, "evaluate"),
    ]
    assert hist[2]["metrics"]["num-test"] == 5 * NODES


def test_app_config_is_valid_and_mirrors_the_defaults():
    from pathlib import Path

    from flwr.common.config import get_fused_config_from_dir, get_project_config, validate_config

    from flwr_analytic.meta.config import DEFAULT_RUN_CONFIG

    app_dir = Path(__file__).resolve().parents[1] / "apps" / "meta"
    ok, errors, _ = validate_config(get_project_config(app_dir), project_dir=app_dir)
    assert ok, errors
    assert get_fused_config_from_dir(app_dir, {}) == DEFAULT_RUN_CONFIG
    components = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "meta_app.server_app:app",
        "clientapp": "meta_app.client_app:app",
    }


def test_app_modules_only_wire_package_objects(monkeypatch):
    import importlib
    from pathlib import Path

    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "apps" / "meta"))
    server = importlib.import_module("meta_app.server_app")
    client = importlib.import_module("meta_app.client_app")
    assert isinstance(server.app, ServerApp) and isinstance(client.app, ClientApp)
