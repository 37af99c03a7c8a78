"""Fault injection: dropouts, retries, server restarts, clients joining/leaving, determinism.

The FedACnnL strategy and the ν-step meta strategy run in-process on grids that drop, fail or
disconnect chosen clients in chosen rounds, or "kill the server" (raise a ``BaseException`` from
the grid, as a SIGKILL / KeyboardInterrupt would end ``start``). Results are compared bit for bit
(``arrays_digest`` / ``assert_array_equal``) with uninterrupted runs and with the analytic core.
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message
from flwr.common import Error

from flwr_analytic.analytic import (
    AnalyticNetwork,
    LayerStatistics,
    Regularization,
    StatisticsError,
    add_client_statistics,
    fit_centralized,
    fit_federated,
    merge,
    remove_client_statistics,
    ridge_solve,
)
from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
from flwr_analytic.data import ArrayDataset, federated_split
from flwr_analytic.fedacnnl import LocalGrid
from flwr_analytic.models import cnn, linear, mlp
from flwr_analytic.strategies import FedACnnL, InProcessGrid, run_meta, run_meta_in_process
from flwr_analytic.strategies.checkpoint import CheckpointMismatchError, read_checkpoint
from flwr_analytic.strategies.checkpointing import Checkpointed
from flwr_analytic.strategies.fedacnnl_server import arrays_digest
from flwr_analytic.strategies.wrapper import StrategyWrapper

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
pytestmark = pytest.mark.faults


class ServerKilled(BaseException):
    """Raised by a grid to end the server loop the way a kill would (not an ``Exception``)."""


class FaultyGrid(LocalGrid):
    """A :class:`LocalGrid` that injects faults, chosen per call of ``send_and_receive`` (a round).

    Parameters
    ----------
    faults : dict, optional
        ``{call: {partition-id: kind}}`` with ``kind`` one of ``"timeout"`` (no reply), ``"error"``
        (an error reply, as from a client exception), ``"disconnect"`` (no reply, and the node
        leaves ``get_node_ids`` for good).
    drop_prob : float
        Probability that any message of any call gets no reply (seeded by ``fault_seed``).
    kill_at : int, optional
        The call that raises :class:`ServerKilled` (the server process dies).
    in_partition_order : bool
        Return the replies sorted by partition id instead of shuffled (a known arrival order, so
        the streaming strategy's arrival-order sums can be predicted bit for bit).

    """

    def __init__(self, client_app, num_nodes, *, faults=None, drop_prob=0.0, fault_seed=0,
                 kill_at=None, in_partition_order=False, **kwargs):  # fmt: skip
        super().__init__(client_app, num_nodes, **kwargs)
        self.in_partition_order = in_partition_order
        self.faults = faults or {}
        self.drop_prob = drop_prob
        self.fault_rng = random.Random(fault_seed)
        self.kill_at = kill_at
        self.calls = 0
        self.disconnected: set[int] = set()
        self.partition = {n: int(c.node_config["partition-id"]) for n, c in self.contexts.items()}
        self.node_of = {p: n for n, p in self.partition.items()}
        self.dropped: list[list[int]] = []  # partitions without a statistics reply, per call

    def get_node_ids(self):  # noqa: D102
        return [n for n in self.contexts if n not in self.disconnected]

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102
        self.calls += 1
        if self.kill_at == self.calls:
            raise ServerKilled(f"server killed at grid call {self.calls}")
        plan = dict(self.faults.get(self.calls, {}))
        replies, dropped = [], []
        for msg in messages:
            node = msg.metadata.dst_node_id
            pid = self.partition[node]
            kind = plan.get(pid)
            if kind is None and self.drop_prob and self.fault_rng.random() < self.drop_prob:
                kind = "timeout"
            if kind == "disconnect":
                self.disconnected.add(node)
            if node in self.disconnected or kind == "timeout":
                dropped.append(pid)
                continue
            if kind == "error":
                dropped.append(pid)
                replies.append(
                    Message(Error(code=0, reason="injected client failure"), reply_to=msg)
                )
                continue
            replies.append(self._call(msg))
        self.dropped.append(sorted(dropped))
        self._rng.shuffle(replies)
        if self.in_partition_order:
            replies.sort(key=lambda m: self.partition[m.metadata.src_node_id])
        return replies


def _loader(data: ArrayDataset, split):
    def load(context):
        return split.client(data, int(context.node_config["partition-id"]))

    return load


def _app(data, split):
    return make_fedacnnl_client_app(_loader(data, split))


def _strategy(arch, scheme="label-pca", streaming=False, checkpoint_path=None, **kwargs):
    base = {"seed": 3, "min_train_nodes": 2, "min_available_nodes": 2, "fraction_evaluate": 0.0}
    aggregation = "streaming" if streaming else "sorted"
    strategy = FedACnnL(arch, scheme, aggregation=aggregation, **{**base, **kwargs})
    return strategy if checkpoint_path is None else Checkpointed(strategy, checkpoint_path)


class DirectReplies(StrategyWrapper):
    """Hand the aggregation the grid's own ``send_and_receive`` replies (no reply stream).

    The fault grids inject through ``send_and_receive``; streaming aggregation would read replies
    through its push/pull reply stream (tested in ``test_fedacnnl_streaming.py``).
    """

    def reply_grid(self, grid):
        return grid


def _start(strategy, grid):
    """Run ``strategy`` on a fault-injecting grid (streaming sees the faulty replies directly)."""
    return DirectReplies(strategy).start(grid)


def _clients(data, split, parts):
    return [(data.x[split.train[k]], data.y[split.train[k]]) for k in parts]


def _expected_per_layer(arch, scheme, data, split, participants):
    """The core's per-layer solution: layer ``l`` from the clients ``participants[l]`` only."""
    net = AnalyticNetwork(arch, scheme, seed=3)
    for layer, parts in enumerate(participants):
        if not net.needs_statistics(layer):
            net.solve(layer, None)
            continue
        stats = [net.statistics(layer, x, y) for x, y in _clients(data, split, parts)]
        net.solve(layer, merge(stats))
    return net


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------------------------ dropouts
def test_client_missing_in_every_round_equals_training_without_it(digits):
    split = federated_split(digits, 5, "dirichlet", alpha=0.5, seed=1)
    arch = mlp(digits.input_shape, 10, hidden=32)
    drop = 2
    rounds = {r: {drop: "timeout"} for r in range(1, 4)}
    grid = FaultyGrid(_app(digits, split), 5, faults=rounds, seed=4)
    strategy = _strategy(arch, min_train_nodes=5)
    result = strategy.start(grid)

    others = [k for k in range(5) if k != drop]
    fed = AnalyticNetwork(arch, "label-pca", seed=3)
    fit_federated(fed, _clients(digits, split, others))
    for w, ref in zip(strategy.net.weights, fed.weights, strict=True):
        np.testing.assert_array_equal(w, ref)  # same sums, same order: bit for bit
    pooled = np.concatenate([split.train[k] for k in others])
    central = fit_centralized(
        AnalyticNetwork(arch, "label-pca", seed=3), digits.x[pooled], digits.y[pooled]
    )
    assert max(_rel(w, r) for w, r in zip(strategy.net.weights, central.weights)) <= 1e-9

    # the metrics name who was missing: the node id (its partition is unknown before it replied)
    first, second = result.train_metrics_clientapp[1], result.train_metrics_clientapp[2]
    assert first["num-missing"] == 1 and first["missing-nodes"] == [grid.node_of[drop]]
    assert "missing-partitions" not in first  # never replied: partition unknown
    assert second["num-clients"] == 4 and second["num-examples"] == len(pooled)
    entry = strategy.history[1]
    assert entry["missing-nodes"] == [grid.node_of[drop]] and entry["partitions"] == others


@pytest.mark.parametrize("streaming", [False, True], ids=["sorted", "streaming"])
def test_client_failing_in_one_round_equals_per_layer_expectation(digits, streaming):
    split = federated_split(digits, 4, "iid", seed=2)
    arch = cnn(digits.input_shape, 10, channels=(4, 8))
    # round 2 (layer 1): partition 1 errors; round 3 (output): partition 3 disconnects
    # (streaming sums in arrival order: replies arrive in partition order, so the sums are the
    # sorted strategy's, bit for bit)
    faults = {2: {1: "error"}, 3: {3: "disconnect"}}
    grid = FaultyGrid(_app(digits, split), 4, faults=faults, in_partition_order=streaming)
    strategy = _strategy(arch, min_train_nodes=4, streaming=streaming)
    result = _start(strategy, grid)
    expected = _expected_per_layer(
        arch, "label-pca", digits, split, [[0, 1, 2, 3], [0, 2, 3], [0, 1, 2]]
    )
    for w, ref in zip(strategy.net.weights, expected.weights, strict=True):
        np.testing.assert_array_equal(w, ref)
    m2, m3 = result.train_metrics_clientapp[2], result.train_metrics_clientapp[3]
    assert m2["num-failed"] == 1 and m2["failed-partitions"] == [1] and m2["num-clients"] == 3
    assert m3["missing-partitions"] == [3] and m3["num-missing"] == 1
    assert "injected client failure" in strategy.history[1]["rejected"][0]["reason"]


@pytest.mark.parametrize("streaming", [False, True], ids=["sorted", "streaming"])
def test_retry_completes_layer_with_the_union_of_attempts(digits, streaming):
    split = federated_split(digits, 3, "iid", seed=0)
    arch = mlp(digits.input_shape, 10, hidden=16)
    honest = _strategy(arch, min_train_nodes=3)
    honest_result = honest.start(LocalGrid(_app(digits, split), 3, seed=1))
    # layer 1's first attempt (round 2) misses partition 0: 2 < 3 valid replies -> retry (round 3)
    grid = FaultyGrid(
        _app(digits, split), 3, faults={2: {0: "timeout"}}, seed=1, in_partition_order=streaming
    )
    strategy = _strategy(
        arch, min_train_nodes=3, min_valid_replies=3, max_retries=1, streaming=streaming
    )
    result = _start(strategy, grid)
    if streaming:  # the carried sum of partitions 1, 2 plus the retry's partition 0
        expected = _expected_per_layer(arch, "label-pca", digits, split, [[0, 1, 2], [1, 2, 0]])
        for w, ref in zip(strategy.net.weights, expected.weights, strict=True):
            np.testing.assert_array_equal(w, ref)
        assert strategy.history[1]["missing-nodes"] == [grid.node_of[0]]
    else:
        assert arrays_digest(result.arrays) == arrays_digest(honest_result.arrays)
    assert [m["layer"] for m in result.train_metrics_clientapp.values()] == [0, 1, 1]
    retry = strategy.history[2]
    # the retry asked only the node that had not answered; the other two replies were kept
    assert retry["num-sent"] == 1 and retry["num-carried"] == 2 and retry["num-valid"] == 3


def test_too_few_replies_after_retries_raise_and_keep_solved_layers(digits, tmp_path, caplog):
    split = federated_split(digits, 3, "iid", seed=0)
    arch = cnn(digits.input_shape, 10, channels=(4, 8))
    path = tmp_path / "ckpt.npz"
    faults = {2: {0: "timeout"}, 3: {0: "error"}}
    grid = FaultyGrid(_app(digits, split), 3, faults=faults)
    strategy = _strategy(
        arch, min_train_nodes=3, min_valid_replies=3, max_retries=1, checkpoint_path=path
    )
    with (
        caplog.at_level(logging.INFO),
        pytest.raises(RuntimeError, match=r"^layer 2/3 could not be solved: 2 valid") as exc,
    ):
        strategy.start(grid)
    assert "min_valid_replies=3" in str(exc.value) and "partitions [0]" in str(exc.value)
    # the error, the retry warning and the round lines name the layer alike: 1-based, "k/L"
    assert "layer 2/3: 2 valid replies < min_valid_replies=3; retry 1 of 1" in caplog.text
    assert "layer 2/3: 1 replies missing (timeout or disconnect)" in caplog.text
    assert "layer 1 " not in caplog.text and "layer 1:" not in caplog.text
    assert strategy.net.solved_layers == 1 and strategy.net.weights[0] is not None
    # the solved layer is in the checkpoint; a restart with a healthy grid finishes the model
    arrays, meta = read_checkpoint(path, Checkpointed.FORMAT)
    assert meta["solved-layers"] == 1 and "gram-0" in arrays
    np.testing.assert_array_equal(arrays["weight-0"], strategy.net.weights[0])
    resumed = _strategy(arch, min_train_nodes=3, checkpoint_path=path)
    result = resumed.start(LocalGrid(_app(digits, split), 3))
    honest = _strategy(arch, min_train_nodes=3).start(LocalGrid(_app(digits, split), 3))
    assert arrays_digest(result.arrays) == arrays_digest(honest.arrays)


def test_retry_after_a_disconnect_fails_fast(digits):
    split = federated_split(digits, 3, "iid", seed=0)
    arch = mlp(digits.input_shape, 10, hidden=16)
    grid = FaultyGrid(_app(digits, split), 3, faults={2: {0: "disconnect"}})
    strategy = _strategy(arch, min_train_nodes=3, min_valid_replies=3, max_retries=2)
    with pytest.raises(
        RuntimeError, match=r"^layer 2/2 could not be solved: 2 valid .* 3 attempts"
    ):
        strategy.start(grid)  # the retries find nobody left to ask: no wait for reconnection
    assert [e["num-sent"] for e in strategy.history] == [3, 3, 0, 0]
    assert strategy.history[1]["missing-partitions"] == [0] and strategy.net.solved_layers == 1


def test_random_dropouts_are_survived_and_named(digits):
    split = federated_split(digits, 6, "dirichlet", alpha=0.3, seed=0)
    arch = cnn(digits.input_shape, 10, channels=(4, 8))
    grid = FaultyGrid(_app(digits, split), 6, drop_prob=0.3, fault_seed=7, seed=2)
    strategy = _strategy(arch, min_train_nodes=6, min_valid_replies=2, max_retries=0)
    strategy.start(grid)
    replied = [e["partitions"] for e in strategy.history if e["kind"] == "train"]
    assert [sorted(set(range(6)) - set(r)) for r in replied] == grid.dropped[:3]
    assert any(grid.dropped)  # the seed drops someone
    expected = _expected_per_layer(arch, "label-pca", digits, split, replied)
    for w, ref in zip(strategy.net.weights, expected.weights, strict=True):
        np.testing.assert_array_equal(w, ref)


# -------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("kill_at", [2, 3, 4], ids=["after-layer-0", "after-layer-1", "in-eval"])
def test_server_restart_resumes_bit_identical(digits, tmp_path, kill_at):
    split = federated_split(digits, 4, "dirichlet", alpha=0.5, seed=3)
    arch = cnn(digits.input_shape, 10, channels=(4, 8))
    kw = {"min_train_nodes": 4, "fraction_evaluate": 1.0, "min_evaluate_nodes": 4}
    honest = _strategy(arch, **kw).start(LocalGrid(_app(digits, split), 4, seed=0))
    path = tmp_path / "fedacnnl.npz"
    grid = FaultyGrid(_app(digits, split), 4, kill_at=kill_at, seed=0)
    with pytest.raises(ServerKilled):
        _strategy(arch, checkpoint_path=path, **kw).start(grid)
    # a checkpoint at the end of every round: killed in round r, the run resumes after round r - 1
    # (the evaluation is in the round of the last layer: killed there, that layer is solved again)
    assert read_checkpoint(path, Checkpointed.FORMAT)[1]["solved-layers"] == min(kill_at - 1, 2)
    assert not (tmp_path / "fedacnnl.npz.tmp").exists()
    # a fresh server process: new strategy object, new node ids
    fresh = _strategy(arch, checkpoint_path=path, **kw)
    result = fresh.start(LocalGrid(_app(digits, split), 4, seed=9))
    assert arrays_digest(result.arrays) == arrays_digest(honest.arrays)
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    assert [e["layer"] for e in fresh.history if e["kind"] == "train"] == [0, 1, 2]
    ev, ev_honest = result.evaluate_metrics_clientapp[3], honest.evaluate_metrics_clientapp[3]
    assert ev["personal-accuracy"] == ev_honest["personal-accuracy"]


def test_run_config_checkpoint_path_resumes_the_app(tmp_path):
    from flwr_analytic.fedacnnl import resolve_run_config
    from flwr_analytic.strategies.fedacnnl_server import run_fedacnnl

    cfg = resolve_run_config(
        {"model": "cnn", "cnn-channels": "4,8", "results-path": "", "fraction-evaluate": 0.0}
    )
    _, honest = run_fedacnnl(LocalGrid(make_fedacnnl_client_app(run_config=cfg), 4, cfg), cfg)
    ckpt = {**cfg, "checkpoint-path": str(tmp_path / "run.npz")}
    grid = FaultyGrid(make_fedacnnl_client_app(run_config=ckpt), 4, run_config=ckpt, kill_at=3)
    with pytest.raises(ServerKilled):
        run_fedacnnl(grid, ckpt)
    _, resumed = run_fedacnnl(LocalGrid(make_fedacnnl_client_app(run_config=ckpt), 4, ckpt), ckpt)
    assert resumed["model-sha256"] == honest["model-sha256"]
    assert [r["layer"] for r in resumed["rounds"] if r["kind"] == "train"] == [0, 1, 2]


def test_resume_refuses_another_configuration(digits, tmp_path):
    split = federated_split(digits, 3, "iid", seed=0)
    arch = mlp(digits.input_shape, 10, hidden=16)
    path = tmp_path / "c.npz"
    _strategy(arch, checkpoint_path=path).start(LocalGrid(_app(digits, split), 3))
    with pytest.raises(
        CheckpointMismatchError, match=r"gamma: checkpoint 1e-06 != this run 0\.001"
    ):
        _strategy(arch, gamma=1e-3, checkpoint_path=path).start(LocalGrid(_app(digits, split), 3))
    with pytest.raises(CheckpointMismatchError, match="architecture"):
        other = mlp(digits.input_shape, 10, hidden=8)
        _strategy(other, checkpoint_path=path).start(LocalGrid(_app(digits, split), 3))
    # the refused runs did not touch the checkpoint
    assert read_checkpoint(path, Checkpointed.FORMAT)[1]["fingerprint"]["gamma"] == 1e-6


# ----------------------------------------------------------------------- add / remove clients
def test_add_clients_updates_output_layer_exactly(digits, tmp_path):
    split = federated_split(digits, 5, "dirichlet", alpha=0.5, seed=4)
    arch = mlp(digits.input_shape, 10, hidden=32)
    path = tmp_path / "c.npz"
    grid = FaultyGrid(
        _app(digits, split), 5, faults={r: {3: "timeout", 4: "timeout"} for r in (1, 2)}
    )
    strategy = _strategy(arch, min_train_nodes=5, checkpoint_path=path)
    strategy.start(grid)
    out = arch.num_layers - 1
    hidden = strategy.net.weights[:-1]
    new = [strategy.net.statistics(out, x, y) for x, y in _clients(digits, split, [3, 4])]
    w = strategy.add_clients([new[0], new[1].pack()])  # LayerStatistics or the packed form

    every = [strategy.net.statistics(out, x, y) for x, y in _clients(digits, split, range(5))]
    ref = ridge_solve(merge(every).gram, merge(every).cross, Regularization(1e-6))
    np.testing.assert_array_equal(w, ref)  # ((G0+G1+G2)+G3)+G4: the same sum as merge(0..4)
    np.testing.assert_array_equal(strategy.net.weights[-1], ref)
    for a, b in zip(strategy.net.weights[:-1], hidden, strict=True):
        np.testing.assert_array_equal(a, b)  # hidden layers untouched
    assert strategy.server.layer_statistics[out].count == sum(len(split.train[k]) for k in range(5))
    # the update is in the checkpoint
    reloaded = _strategy(arch, min_train_nodes=5, checkpoint_path=path)
    reloaded.restore()
    np.testing.assert_array_equal(reloaded.net.weights[-1], ref)
    assert reloaded.history[-1]["kind"] == "add-clients"


@pytest.mark.parametrize(
    ("model", "scheme"), [("linear", "label-pca"), ("mlp", "random")], ids=["linear", "mlp-random"]
)
def test_remove_client_is_exact_unlearning_for_data_independent_hidden_layers(
    digits, model, scheme
):
    split = federated_split(digits, 4, "dirichlet", alpha=0.5, seed=5)
    arch = linear(digits.input_shape, 10) if model == "linear" else mlp(digits.input_shape, 10, 48)
    strategy = _strategy(arch, scheme, min_train_nodes=4)
    strategy.start(LocalGrid(_app(digits, split), 4, seed=2))
    out, gone = arch.num_layers - 1, 1
    [(x, y)] = _clients(digits, split, [gone])
    strategy.remove_clients([strategy.net.statistics(out, x, y)])

    without = AnalyticNetwork(arch, scheme, seed=3)
    fit_federated(without, _clients(digits, split, [0, 2, 3]))
    for layer, (w, ref) in enumerate(zip(strategy.net.weights, without.weights, strict=True)):
        if layer < out:
            np.testing.assert_array_equal(w, ref)  # drawn from the seed, no data
        else:
            assert _rel(w, ref) <= 1e-9  # (ΣG) − G_k vs Σ_{i≠k} G_i: float64 rounding only
    assert strategy.server.layer_statistics[out].count == sum(
        len(split.train[k]) for k in (0, 2, 3)
    )


def test_remove_client_with_label_pca_is_exact_only_for_the_output_layer(digits):
    split = federated_split(digits, 4, "dirichlet", alpha=0.3, seed=6)
    arch = mlp(digits.input_shape, 10, hidden=32)
    strategy = _strategy(arch, min_train_nodes=4)
    strategy.start(LocalGrid(_app(digits, split), 4))
    out, gone = arch.num_layers - 1, 2
    stats = [strategy.net.statistics(out, x, y) for x, y in _clients(digits, split, range(4))]
    strategy.remove_clients([stats[gone]])
    rest = merge(s for k, s in enumerate(stats) if k != gone)
    assert (
        _rel(strategy.net.weights[-1], ridge_solve(rest.gram, rest.cross, Regularization(1e-6)))
        <= 1e-9
    )
    # ... but the hidden layer still carries client 2's data: retraining without it differs
    retrained = AnalyticNetwork(arch, "label-pca", seed=3)
    fit_federated(retrained, _clients(digits, split, [0, 1, 3]))
    assert _rel(strategy.net.weights[0], retrained.weights[0]) > 1e-3


def test_removal_is_checked(digits):
    split = federated_split(digits, 3, "iid", seed=0)
    net = AnalyticNetwork(linear(digits.input_shape, 10))
    stats = [net.statistics(0, x, y) for x, y in _clients(digits, split, range(3))]
    total = merge(stats)
    again = add_client_statistics(remove_client_statistics(total, [stats[1]]), [stats[1]])
    np.testing.assert_allclose(again.gram, total.gram, rtol=1e-12, atol=1e-9)
    with pytest.raises(StatisticsError, match="count would be negative"):
        remove_client_statistics(stats[0], [stats[0], stats[1]])
    x, y = digits.x[:20] * 100.0, digits.y[:20]  # never part of the aggregate
    with pytest.raises(StatisticsError, match="indefinite Gram"):
        remove_client_statistics(total, [net.statistics(0, x, y)])
    bad = LayerStatistics(stats[0].gram[:-1, :-1].copy(), stats[0].cross[:-1].copy(), 5)
    with pytest.raises(StatisticsError, match="client statistics #0"):
        remove_client_statistics(total, [bad])
    strategy = _strategy(linear(digits.input_shape, 10))
    with pytest.raises(RuntimeError, match="trained model"):
        strategy.add_clients(stats)


# ---------------------------------------------------------------------------- determinism
def test_same_seed_same_model_whatever_node_ids_and_reply_order(digits):
    split = federated_split(digits, 5, "dirichlet", alpha=0.3, seed=0)
    arch = cnn(digits.input_shape, 10, channels=(4, 8))
    digests, faulty = set(), set()
    for seed in (0, 1, 2):
        grid = LocalGrid(_app(digits, split), 5, seed=seed)
        digests.add(arrays_digest(_strategy(arch, min_train_nodes=5).start(grid).arrays))
        grid = FaultyGrid(_app(digits, split), 5, faults={2: {1: "error"}}, seed=seed)
        faulty.add(arrays_digest(_strategy(arch, min_train_nodes=5).start(grid).arrays))
    assert len(digests) == 1 and len(faulty) == 1 and digests != faulty


# ------------------------------------------------------------------------------ meta resume
META = {
    "dataset": "digits",
    "model": "cnn",
    "num-server-rounds": 3,
    "history-path": "",
    "local-steps": 2,
    "finetune-steps": 1,
    "min-partition-size": 20,
    "fraction-train": 0.5,  # 2 of 4 nodes: resuming must restore Flower's sampling state
    "evaluate-every": 2,
}


class KilledInProcessGrid(InProcessGrid):
    """:class:`InProcessGrid` whose ``kill_at``-th ``send_and_receive`` kills the server."""

    def __init__(self, *args, kill_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.kill_at, self.calls = kill_at, 0

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102
        self.calls += 1
        if self.calls == self.kill_at:
            raise ServerKilled(f"server killed at grid call {self.calls}")
        return super().send_and_receive(messages, timeout=timeout)


@pytest.fixture()
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.usefixtures("_one_thread")
@pytest.mark.parametrize("algorithm", ["meta", "fedavg-ft"])
def test_meta_strategy_resume_is_bit_identical(tmp_path, algorithm):
    from flwr_analytic.clients.meta_client import make_meta_client_app

    cfg = {**META, "algorithm": algorithm}
    honest, _ = run_meta_in_process(cfg, num_nodes=4)
    path = tmp_path / f"{algorithm}.npz"
    ckpt = {**cfg, "checkpoint-path": str(path)}
    # calls: round 1 train, round 1 evaluate (none sent), round 2 train <- killed
    grid = KilledInProcessGrid(make_meta_client_app(), 4, ckpt, kill_at=3)
    with pytest.raises(ServerKilled):
        run_meta(grid, ckpt)
    assert read_checkpoint(path, Checkpointed.FORMAT)[1]["server-round"] == 1
    resumed, history = run_meta(InProcessGrid(make_meta_client_app(), 4, ckpt), ckpt)
    assert arrays_digest(resumed.arrays) == arrays_digest(honest.arrays)
    assert [h["round"] for h in history if h["kind"] == "train"] == [1, 2, 3]
    assert sorted(resumed.evaluate_metrics_clientapp) == [2, 3]
    # beta is the meta step size (a strategy attribute) or FedAvg's local rate (train-config lr)
    with pytest.raises(
        CheckpointMismatchError, match=r"beta: checkpoint \S+ != this run 0\.5|'lr': 0\.5"
    ):
        run_meta(InProcessGrid(make_meta_client_app(), 4, ckpt), {**ckpt, "beta": 0.5})


@pytest.mark.usefixtures("_one_thread")
def test_metered_fedavg_resumes_through_the_same_wrapper(tmp_path):
    """Flower's own FedAvg, metered and checkpointed by the wrappers FedACnnL uses.

    The resumed run equals an uninterrupted one bit for bit and its metered history holds every
    round; ``Checkpointed`` inside another wrapper is refused before any round (that wrapper would
    be neither saved nor see the resumed round numbers).
    """
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    from flwr_analytic.clients.meta_client import make_meta_client_app
    from flwr_analytic.meta.config import resolve_run_config as resolve_meta
    from flwr_analytic.meta.task import build_model
    from flwr_analytic.strategies import Metered, SortedReplies

    cfg = resolve_meta({**META, "algorithm": "fedavg", "evaluate-every": 1})
    train_config = ConfigRecord({"local-algorithm": "sgd", "lr": 0.05, "local-steps": 2})
    train_config["batch-size"] = 32
    path = tmp_path / "fedavg.npz"

    def run(grid, checkpoint):
        random.seed(0)
        fedavg = SortedReplies(FedAvg(fraction_train=0.5, min_train_nodes=2, min_available_nodes=4))
        strategy = Checkpointed(Metered(fedavg), path) if checkpoint else Metered(fedavg)
        initial = ArrayRecord(build_model(cfg, seed=0).state_dict())
        result = strategy.start(grid, initial, num_rounds=3, train_config=train_config)
        return result, strategy

    honest, _ = run(InProcessGrid(make_meta_client_app(), 4, cfg), checkpoint=False)
    with pytest.raises(ServerKilled):  # calls: round 1 train, round 1 evaluate, round 2 train
        run(KilledInProcessGrid(make_meta_client_app(), 4, cfg, kill_at=3), checkpoint=True)
    assert read_checkpoint(path, Checkpointed.FORMAT)[1]["server-round"] == 1
    resumed, strategy = run(InProcessGrid(make_meta_client_app(), 4, cfg), checkpoint=True)
    assert arrays_digest(resumed.arrays) == arrays_digest(honest.arrays)
    assert sorted(resumed.train_metrics_clientapp) == [1, 2, 3]
    trained = [r["round"] for r in strategy.history_records() if r["kind"] == "train"]
    assert trained == [1, 2, 3]  # round 1 from the checkpoint, rounds 2 and 3 run again
    outside = Metered(Checkpointed(FedAvg(min_available_nodes=4), tmp_path / "other.npz"))
    with pytest.raises(ValueError, match="Checkpointed must be the outermost wrapper"):
        outside.start(InProcessGrid(make_meta_client_app(), 4, cfg), ArrayRecord(), num_rounds=1)
    assert not (tmp_path / "other.npz").exists()


class ShuffledInProcessGrid(InProcessGrid):
    """:class:`InProcessGrid` returning the replies in a seeded random order."""

    def __init__(self, *args, order_seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.order = random.Random(order_seed)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.order.shuffle(replies)
        return replies


@pytest.mark.usefixtures("_one_thread")
def test_meta_strategy_same_seed_same_model_whatever_reply_order():
    from flwr_analytic.clients.meta_client import make_meta_client_app

    cfg = {**META, "algorithm": "meta", "num-server-rounds": 2, "fraction-train": 1.0}
    digests = set()
    for order_seed in (0, 1):
        grid = ShuffledInProcessGrid(make_meta_client_app(), 4, cfg, order_seed=order_seed)
        result, _ = run_meta(grid, cfg)
        digests.add(arrays_digest(result.arrays))
    assert len(digests) == 1  # replies are averaged in node-id order
