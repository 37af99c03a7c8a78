"""Issue 12: an analytic head for any backbone (``AnalyticHead``) and analytic warm start.

In process (``LocalGrid``: random node ids, shuffled replies): a ResNet-ish model with BatchNorm
and a residual addition (refused by FedACnnL) trains with FedAvg, then ``AnalyticHead`` solves its
``fc`` head from the clients' float64 feature statistics. The head equals the centralized ridge
solution on the pooled features (computed here without the package's hook), each client's
pFedACnnL head equals ``(G_k + λI)⁻¹(B_k + λW)`` and scores what the client reported. Slow: the
same through ``flwr run`` on a local simulation (CIFAR-10 npz). ``warm_start``: FedACnnL, then
FedAvg from its float32 model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path

import analytic_head_project as ahp
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

from flwr_analytic.analytic import LayerStatistics, Regularization, StatisticsError
from flwr_analytic.analytic.head import RandomFeatures, expand_head, head_matrix, personal_head
from flwr_analytic.clients import add_analytic_head_handlers, add_fedacnnl_handlers
from flwr_analytic.clients.analytic_head_client import kept_head_statistics
from flwr_analytic.data import federated_split, load_digits
from flwr_analytic.grid import LocalGrid
from flwr_analytic.models import UnsupportedModelError
from flwr_analytic.strategies import AnalyticHead, FedACnnL, StrategyWrapper, warm_start
from flwr_analytic.strategies.analytic_head import decode_head_reply
from flwr_analytic.strategies.warm_start import to_float32

NUM_NODES = 4
DIGITS = load_digits()
SPLIT = federated_split(DIGITS, NUM_NODES, "dirichlet", alpha=0.5, test_fraction=0.2, seed=1)
GAMMA, LAM = 1e-4, 0.5
ROUNDS = 5  # FedAvg rounds after the warm start


load_data = ahp.make_load_data(DIGITS, SPLIT)
ResNetish, Net, add_fedavg_handlers = ahp.ResNetish, ahp.Net, ahp.add_fedavg_handlers


def features(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The head's input computed without hooks: ``fc`` swapped for an identity, float64."""
    model = model.double().eval()
    model.fc = nn.Identity()
    with torch.no_grad():
        return model(torch.from_numpy(x).double()).numpy()


def backbone(arrays: ArrayRecord) -> nn.Module:
    """``ResNetish`` with every entry of ``arrays`` but the head's."""
    state = {k: v for k, v in arrays.to_torch_state_dict().items() if not k.startswith("fc.")}
    model = ResNetish()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    return model


def design(h: np.ndarray) -> np.ndarray:
    return np.hstack([h, np.ones((len(h), 1))])


def one_hot(y: np.ndarray) -> np.ndarray:
    return np.eye(10)[y]


def ridge(a: np.ndarray, y: np.ndarray, rho: float) -> np.ndarray:
    """Centralized ridge on ``A``: ``(AᵀA + ρ·trace(AᵀA)/D I)⁻¹AᵀY`` by ``np.linalg.solve``."""
    gram = a.T @ a
    gamma = rho * np.trace(gram) / len(gram)
    return np.linalg.solve(gram + gamma * np.eye(len(gram)), a.T @ one_hot(y))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def pooled(part: int) -> tuple[np.ndarray, np.ndarray]:
    """Every client's train (``part=0``) or test (``part=1``) samples, in partition order."""
    pieces = [SPLIT.client(DIGITS, k)[part] for k in range(NUM_NODES)]
    return np.concatenate([p.x for p in pieces]), np.concatenate([p.y for p in pieces])


def head_app() -> ClientApp:
    app = add_fedavg_handlers(ClientApp(), ResNetish, load_data)
    return add_analytic_head_handlers(app, load_data, model=ResNetish, head="fc")


def fedavg(**kw) -> FedAvg:
    return FedAvg(min_train_nodes=NUM_NODES, min_evaluate_nodes=NUM_NODES,
                  min_available_nodes=NUM_NODES, **kw)  # fmt: skip


# ------------------------------------------------------------------------ analytic head, in process
@pytest.fixture(scope="module")
def head_run():
    torch.manual_seed(0)
    grid = LocalGrid(head_app(), NUM_NODES, {}, seed=3)
    strategy = AnalyticHead(fedavg(), head="fc", gamma=GAMMA, lam=LAM, min_train_nodes=NUM_NODES)
    start = time.perf_counter()
    result = strategy.start(
        grid,
        initial_arrays=ArrayRecord(ResNetish().state_dict()),
        train_config=ConfigRecord({"lr": 0.05}),
        num_rounds=2,
    )
    return grid, strategy, result, time.perf_counter() - start


def test_fedacnnl_refuses_the_model():
    with pytest.raises(UnsupportedModelError):
        FedACnnL(ResNetish(), input_shape=(1, 8, 8))


def test_global_head_equals_the_centralized_ridge_solution(head_run):
    grid, strategy, result, wall = head_run
    assert strategy.head_round == 3 and set(result.train_metrics_clientapp) == {1, 2, 3}
    train = result.train_metrics_clientapp[3]
    assert train["num-clients"] == NUM_NODES and train["num-rejected"] == 0
    assert train["num-examples"] == sum(len(SPLIT.client(DIGITS, k)[0]) for k in range(NUM_NODES))
    assert train["head-dim"] == 33
    assert list(grid.get_node_ids()) != list(range(1, NUM_NODES + 1))  # random node ids
    x, y = pooled(0)
    w_ref = ridge(design(features(backbone(result.arrays), x)), y, GAMMA)
    w = head_matrix({k: v.numpy() for k, v in result.arrays.items()}, "fc")
    assert result.arrays["fc.weight"].numpy().dtype == np.float64
    assert rel(w, w_ref) <= 1e-9, rel(w, w_ref)
    np.testing.assert_array_equal(w, strategy.weights)
    # the result is a state_dict of the user's model, with the new head
    model = ResNetish()
    model.load_state_dict(result.arrays.to_torch_state_dict(), strict=True)
    print(f"\nAnalyticHead(FedAvg) in process: 2 FedAvg rounds + head round, {wall:.1f} s")


def test_each_client_personal_head_is_pfedacnnl(head_run):
    grid, strategy, result, _ = head_run
    metrics = result.evaluate_metrics_clientapp[3]
    assert metrics["num-clients"] == NUM_NODES and metrics["num-stats-reused"] == NUM_NODES
    ids = list(metrics["client-ids"])
    assert sorted(ids) == list(range(NUM_NODES))
    model = backbone(result.arrays)
    w = strategy.weights
    for context in grid.contexts.values():
        pid = int(context.node_config["partition-id"])
        _, stats = kept_head_statistics(context)
        train, test = SPLIT.client(DIGITS, pid)
        a = design(features(backbone(result.arrays), train.x))
        assert (
            rel(stats.gram, a.T @ a) <= 1e-12 and rel(stats.cross, a.T @ one_hot(train.y)) <= 1e-12
        )
        lam = LAM * np.trace(stats.gram) / stats.dim
        direct = np.linalg.solve(stats.gram + lam * np.eye(stats.dim), stats.cross + lam * w)
        mine = personal_head(stats, w, Regularization(LAM))
        assert rel(mine, direct) <= 1e-9
        # the accuracies the client reported are those of W and of its W_k on its test set
        scores = design(features(backbone(result.arrays), test.x))
        i = ids.index(pid)
        for key, head in (("global", w), ("personal", direct)):
            acc = float(np.mean((scores @ head).argmax(1) == test.y))
            assert metrics[f"{key}-accuracy-clients"][i] == pytest.approx(acc, abs=1e-12), key
    del model
    print(f"\nhead: global {metrics['global-accuracy']:.4f}, personal "
          f"{metrics['personal-accuracy']:.4f}; FedAvg round 2 "
          f"{result.evaluate_metrics_clientapp[2]['eval_acc']:.4f}")  # fmt: skip


def test_auto_lambda_heads_are_each_clients_own_validated_choice(head_run):
    """``personal_lambda="auto"``: every client's head is ``select_lambda`` on its own features."""
    from flwr_analytic.analytic.personal_lambda import select_lambda
    from flwr_analytic.analytic.solvers import effective_dof

    grid, _, first, _ = head_run
    strategy = AnalyticHead(
        fedavg(), head="fc", gamma=GAMMA, personal_lambda="auto", min_train_nodes=NUM_NODES
    )
    result = strategy.start(grid, initial_arrays=first.arrays, num_rounds=0)
    metrics = result.evaluate_metrics_clientapp[1]
    ids, w = list(metrics["client-ids"]), strategy.weights
    assert sorted(ids) == list(range(NUM_NODES))
    chosen = []
    rows = [design(features(backbone(result.arrays), SPLIT.client(DIGITS, p)[0].x)) for p in ids]
    # the h̄ = df/N the server sent: the global head's effective degrees of freedom over N rows
    gram = sum(a.T @ a for a in rows)
    leverage = effective_dof(gram, strategy.gamma) / sum(len(a) for a in rows)
    assert 0.0 < leverage < 1.0
    for pid in range(NUM_NODES):
        train, test = SPLIT.client(DIGITS, pid)
        a = design(features(backbone(result.arrays), train.x))
        choice = select_lambda(
            a, train.y, w, gram=a.T @ a, cross=a.T @ one_hot(train.y), leverage=leverage
        )
        i = ids.index(pid)
        assert metrics["personal-lambda-clients"][i] == choice.rho
        scores = design(features(backbone(result.arrays), test.x))
        acc = float(np.mean((scores @ choice.weights).argmax(1) == test.y))
        assert metrics["personal-accuracy-clients"][i] == pytest.approx(acc, abs=1e-12)
        chosen.append(choice.rho)
    kept = metrics["personal-lambda-global"]
    assert sum(metrics["personal-lambda-counts"]) + kept == NUM_NODES
    assert kept == sum(np.isinf(chosen))
    print(f"\nauto λ heads: ρ per client {chosen}; personal {metrics['personal-accuracy']:.4f}")
    with pytest.raises(ValueError, match="personal_lambda: 'cv' is not allowed"):
        AnalyticHead(fedavg(), head="fc", personal_lambda="cv")


def test_recalibrated_heads_refit_each_clients_scores(head_run):
    """``personal_recalibration=ρ``: each client's ``W_k`` then refitted on ``[A W_k, 1]``."""
    grid, _, first, _ = head_run
    strategy = AnalyticHead(fedavg(), head="fc", gamma=GAMMA, lam=LAM, min_train_nodes=NUM_NODES,
                            personal_recalibration=0.01)  # fmt: skip
    result = strategy.start(grid, initial_arrays=first.arrays, num_rounds=0)
    metrics = result.evaluate_metrics_clientapp[1]
    ids, w = list(metrics["client-ids"]), strategy.weights
    for pid in range(NUM_NODES):
        train, test = SPLIT.client(DIGITS, pid)
        a = design(features(backbone(result.arrays), train.x))
        gram, cross = a.T @ a, a.T @ one_hot(train.y)
        lam = LAM * np.trace(gram) / len(gram)
        w_k = np.linalg.solve(gram + lam * np.eye(len(gram)), cross + lam * w)
        x = design(a @ w_k)  # the client's scores and a ones column: [s, 1]
        penalty = np.diag([0.01 * np.trace(x[:, :-1].T @ x[:, :-1]) / 10] * 10 + [0.0])
        v = np.linalg.solve(x.T @ x + penalty, x.T @ one_hot(train.y) + penalty @ np.eye(11, 10))
        scores = design(features(backbone(result.arrays), test.x)) @ w_k
        acc = float(np.mean((design(scores) @ v).argmax(1) == test.y))
        i = ids.index(pid)
        assert metrics["personal-accuracy-clients"][i] == pytest.approx(acc, abs=1e-12)
    print(f"\nrecalibrated heads: personal {metrics['personal-accuracy']:.4f} (global "
          f"{metrics['global-accuracy']:.4f})")  # fmt: skip
    with pytest.raises(ValueError, match="personal_recalibration: -1"):
        AnalyticHead(fedavg(), head="fc", personal_recalibration=-1)


def test_random_feature_expansion_is_the_ridge_on_expanded_features(head_run):
    """``expansion``: the head of ``[h, relu(hRᵀ + r), 1]``, loadable with ``expand_head``."""
    grid, _, first, _ = head_run
    expansion = RandomFeatures(48, seed=5)
    strategy = AnalyticHead(fedavg(), head="fc", gamma=GAMMA, lam=LAM, expansion=expansion,
                            min_train_nodes=NUM_NODES)  # fmt: skip
    # no FedAvg round: the head is solved on the given model
    result = strategy.start(grid, initial_arrays=first.arrays, num_rounds=0)
    assert result.train_metrics_clientapp[1]["head-dim"] == 32 + 48 + 1
    r, b = expansion.draw(32)
    x, y = pooled(0)
    h = features(backbone(first.arrays), x)
    expanded = np.hstack([h, np.maximum(h @ r.T + b, 0.0)])
    w_ref = ridge(design(expanded), y, GAMMA)
    assert rel(strategy.weights, w_ref) <= 1e-9
    model = expand_head(ResNetish(), "fc", expansion).double().eval()
    model.load_state_dict(result.arrays.to_torch_state_dict(), strict=True)
    xt, _ = pooled(1)
    with torch.no_grad():
        out = model(torch.from_numpy(xt).double()).numpy()
    ht = features(backbone(first.arrays), xt)
    ref = design(np.hstack([ht, np.maximum(ht @ r.T + b, 0.0)])) @ w_ref
    assert rel(out, ref) <= 1e-9
    assert 0.0 < result.evaluate_metrics_clientapp[1]["personal-accuracy"] <= 1.0


def test_metered_outside_records_the_head_round(head_run):
    """The head's rounds pass through the wrappers outside ``AnalyticHead``."""
    from flwr_analytic.strategies import Metered

    grid, _, first, _ = head_run
    strategy = Metered(AnalyticHead(fedavg(), head="fc", gamma=GAMMA, min_train_nodes=NUM_NODES))
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("flwr").addHandler(handler)
    try:
        result = strategy.start(grid, initial_arrays=first.arrays, num_rounds=0)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    # the head's round is past the loop's plan, and its line says so (not "round 1/0")
    assert any(line.startswith("round 1 (after the 0 planned): 4/4 clients") for line in lines)
    records = {(r.round, r.kind): r for r in strategy.history}
    assert records[(1, "train")].num_sent == NUM_NODES
    assert records[(1, "train")].bytes_received > 0
    assert records[(1, "evaluate")].num_replies == NUM_NODES
    assert result.train_metrics_clientapp[1]["bytes-received"] > 0
    with pytest.raises(ValueError, match="not an nn.Linear"):
        AnalyticHead(fedavg(), head="conv1").start(grid, initial_arrays=first.arrays, num_rounds=0)


def test_bad_statistics_are_rejected():
    stats = LayerStatistics.zeros(5, 10)
    content = RecordDict(
        {"statistics": ArrayRecord({k: Array(v) for k, v in stats.pack().items()}),
         "metrics": MetricRecord({"num-examples": 0, "partition-id": 1})}
    )  # fmt: skip
    msg = Message(content, dst_node_id=7, message_type="train.analytic_head")
    with pytest.raises(StatisticsError, match="expected \\(33, 10\\)"):
        decode_head_reply(msg, 33, 10)


def test_wrong_head_names_fail_early():
    with pytest.raises(ValueError, match="must be an nn.Linear"):
        add_analytic_head_handlers(ClientApp(), load_data, model=ResNetish, head="bn1")
    with pytest.raises(ValueError, match="nn.Linear modules are \\['fc'\\]"):
        add_analytic_head_handlers(ClientApp(), load_data, model=ResNetish, head="fc3")


# ------------------------------------------------------------------- the same through `flwr run`
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_analytic_head_runs_with_flwr_run(tmp_path, monkeypatch):
    import quickstart_project as qp
    from flower_processes import (
        flower_env,
        owned_processes,
        simulation_config,
        stop_owned_processes,
    )

    from flwr_analytic.simulate import run_app

    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10_20k.npz"
    if not data.is_file():
        pytest.skip(f"{data} not present")
    nodes, rounds = 4, 1
    project = ahp.write_head_project(tmp_path / "project")
    out, cwd, base = tmp_path / "out", tmp_path / "cwd", (tmp_path / "flwr").resolve()
    out.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # `flwr run` runs here: the project's final_model.pt lands here
    env = qp.project_env(flower_env(base), data, out)
    start = time.perf_counter()
    try:
        done = run_app(
            project, env, timeout=540,
            run_config={"num-server-rounds": rounds, "fraction-train": 1.0, "lr": 0.01},
            federation_config=simulation_config(nodes, num_cpus=qp.whole_cpu()),
        )  # fmt: skip
    finally:
        stop_owned_processes(base)
    wall = time.perf_counter() - start
    assert owned_processes(base) == []
    log = done.stdout
    (tmp_path / "flwr_run.log").write_text(log)
    assert done.returncode == 0 and "Traceback" not in log, log[-4000:]
    assert (cwd / "final_model.pt").is_file()
    summary = json.loads((out / "results.json").read_text())
    head_round = summary["head-round"]
    assert head_round == rounds + 1
    assert sorted(summary["train"], key=int) == [str(r) for r in range(1, rounds + 2)]
    train, evaluation = summary["train"][str(head_round)], summary["evaluate"][str(head_round)]
    assert train["num-clients"] == nodes and train["head-dim"] == 129
    assert evaluation["num-clients"] == nodes
    assert sorted(evaluation["client-ids"]) == list(range(nodes))
    glob, pers = evaluation["global-accuracy"], evaluation["personal-accuracy"]
    assert f"head: global {glob:.4f}, personalized {pers:.4f}" in log
    assert 0.1 < glob < 1.0 and pers > glob  # Dirichlet(0.1) clients hold few labels
    # the head equals the centralized ridge solution on every client's pooled features
    monkeypatch.setenv(qp.DATA_ENV, str(data))
    spec = importlib.util.spec_from_file_location("head_task", project / qp.PACKAGE / "task.py")
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    state = torch.load(out / "state_dict.pt")
    model = task.Net()
    model.load_state_dict(state, strict=True)  # the user's Net, with the solved head
    model = model.double().eval()
    model.fc3 = nn.Identity()
    hs, ys = [], []
    with torch.no_grad():
        for pid in range(nodes):
            trainloader, _ = task.load_data(pid, nodes)
            for batch in trainloader:
                hs.append(model(batch["img"].double()).numpy())
                ys.append(batch["label"].numpy())
    h, y = np.concatenate(hs), np.concatenate(ys)
    assert len(y) == train["num-examples"]
    w_ref = ridge(design(h), y, 1e-4)
    w = np.vstack([state["fc3.weight"].numpy().T, state["fc3.bias"].numpy()[None]])
    assert state["fc3.weight"].dtype == torch.float64
    assert rel(w, w_ref) <= 1e-9, rel(w, w_ref)
    fedavg_acc = summary["evaluate"][str(rounds)]["eval_acc"]
    check = time.perf_counter() - start - wall
    print(
        f"\nAnalyticHead(FedAvg x{rounds}) via flwr run, {nodes} SuperNodes, CIFAR-10 20k "
        f"Dirichlet(0.1), ResNet-ish Net: FedAvg {fedavg_acc:.4f} -> head global {glob:.4f}, "
        f"personalized {pers:.4f}; |W - W_ref|/|W_ref| = {rel(w, w_ref):.1e}; flwr run {wall:.1f} s, "
        f"centralized check {check:.1f} s"
    )


# --------------------------------------------------------------------------------- warm start
class FirstArrays(StrategyWrapper):
    """Keep the arrays of every ``configure_train`` call (the model each round starts from)."""

    def __init__(self, strategy):
        super().__init__(strategy)
        self.seen: dict[int, ArrayRecord] = {}

    def configure_train(self, server_round, arrays, config, grid):
        self.seen[server_round] = arrays
        config = ConfigRecord({**dict(config), "round": server_round})
        return self.strategy.configure_train(server_round, arrays, config, grid)


def test_warm_start_continues_from_fedacnnl():
    """FedACnnL, then FedAvg from its float32 model (IID clients, local full-batch Adam).

    Plain minibatch SGD from FedACnnL's label-pca solution diverges at any learning rate that
    moves it (its first layer is tiny, the next ones large: a sharp point), and non-IID FedAvg
    loses accuracy to client drift; hence IID clients and Adam here (see the doc).
    """
    split = federated_split(DIGITS, NUM_NODES, "iid", test_fraction=0.2, seed=1)
    load = ahp.make_load_data(DIGITS, split)
    tests = [split.client(DIGITS, k)[1] for k in range(NUM_NODES)]
    xt, yt = np.concatenate([t.x for t in tests]), np.concatenate([t.y for t in tests])

    def accuracy(_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = Net()
        model.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            pred = model(torch.from_numpy(xt)).argmax(1).numpy()
        return MetricRecord({"accuracy": float(np.mean(pred == yt))})

    app = add_fedavg_handlers(ClientApp(), Net, load)
    add_fedacnnl_handlers(app, load, model=Net)
    grid = LocalGrid(app, NUM_NODES, {}, seed=4)
    analytic = FedACnnL(Net(), input_shape=(1, 8, 8), min_train_nodes=NUM_NODES,
                        min_evaluate_nodes=NUM_NODES, min_available_nodes=NUM_NODES)  # fmt: skip
    then = FirstArrays(fedavg(fraction_evaluate=0.0))
    train_config = ConfigRecord({"lr": 1e-3, "optimizer": "adam", "steps": 10})
    start = time.perf_counter()
    result = warm_start(grid, analytic, then, num_rounds=ROUNDS, evaluate_fn=accuracy,
                        train_config=train_config)  # fmt: skip
    wall = time.perf_counter() - start
    # FedAvg's first round starts from FedACnnL's model, in float32
    first = then.seen[1]
    assert set(first.keys()) == set(Net().state_dict())
    for key, array in result.analytic.arrays.items():
        assert array.numpy().dtype == np.float64
        assert first[key].numpy().dtype == np.float32
        np.testing.assert_array_equal(first[key].numpy(), array.numpy().astype(np.float32))
    assert set(result.initial_arrays.keys()) == set(first.keys())
    # the FedACnnL phase is recorded beside FedAvg's rounds
    analytic_acc = result.analytic.evaluate_metrics_serverapp[analytic.num_rounds]["accuracy"]
    assert result.evaluate_metrics_serverapp[0]["accuracy"] == pytest.approx(analytic_acc)
    curve = [result.evaluate_metrics_serverapp[r]["accuracy"] for r in range(ROUNDS + 1)]
    assert curve[-1] >= analytic_acc, curve
    phases = result.phase_metrics()
    assert phases["analytic-time"] > 0 and phases["gradient-time"] > 0
    assert "analytic-global-accuracy" in phases and "analytic-personal-accuracy" in phases
    assert set(result.train_metrics_clientapp) == set(range(1, ROUNDS + 1))
    assert set(result.analytic.train_metrics_clientapp) == set(range(1, analytic.num_rounds + 1))
    # the same FedAvg from Net's random initialization, for comparison
    torch.manual_seed(0)
    scratch = fedavg(fraction_evaluate=0.0).start(
        grid, initial_arrays=ArrayRecord(Net().state_dict()), num_rounds=ROUNDS,
        evaluate_fn=accuracy, train_config=train_config,
    )  # fmt: skip
    scratch_acc = scratch.evaluate_metrics_serverapp[ROUNDS]["accuracy"]
    assert curve[-1] > scratch_acc
    print(f"\nwarm start: FedACnnL {analytic_acc:.4f} ({result.analytic_time:.1f} s), then "
          f"FedAvg x{ROUNDS} {[round(a, 4) for a in curve[1:]]} ({result.gradient_time:.1f} s); "
          f"FedAvg from scratch {scratch_acc:.4f}; wall {wall:.1f} s")  # fmt: skip


def test_to_float32_keeps_integers():
    record = ArrayRecord({"w": Array(np.ones(3)), "n": Array(np.array([3], dtype=np.int64))})
    out = to_float32(record)
    assert out["w"].numpy().dtype == np.float32 and out["n"].numpy().dtype == np.int64
