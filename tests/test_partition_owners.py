"""Partitions bound to node identity (issue 13, findings 2 and 4), in process.

A sixth node that claims an honest node's ``partition-id`` (with other data) used to displace the
honest data in every layer when its random node id was smaller, while the log blamed the honest
node; with identical data the evaluation counted the partition twice. Now the node that first
contributed a partition holds it: a later claim from another connected node is rejected naming both
nodes; nodes must agree on ``num-partitions``; a node that is gone hands its partition over; the
evaluation counts each partition once; the SuperLink's own "node unavailable" errors count as
missing nodes (not as failed client 1); a client whose data loader fails names its partition.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_DATA
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
from flwr_analytic.data import federated_split
from flwr_analytic.fedacnnl import LocalGrid
from flwr_analytic.models import mlp
from flwr_analytic.strategies import FedACnnL

NUM = 4


class JoiningGrid(LocalGrid):
    """``LocalGrid`` where extra nodes (given node configs) connect after ``after`` rounds."""

    def __init__(self, *args, extra: dict[int, dict], after: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.extra, self.after, self.rounds = extra, after, 0

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        self.rounds += 1
        if self.rounds == self.after:
            for node_id, node_config in self.extra.items():
                self.contexts[node_id] = Context(1, node_id, node_config, RecordDict(), {})
        return replies


def _app(digits, split, other=None):
    def load(context):
        k = int(context.node_config["partition-id"])
        if context.node_config.get("hostile"):
            return other.client(digits, k)
        return split.client(digits, k)

    return make_fedacnnl_client_app(load, cache=False)


def _strategy(digits, **kwargs):
    return FedACnnL(mlp(digits.input_shape, 10, hidden=24), seed=2, min_train_nodes=NUM,
                    min_available_nodes=NUM, min_evaluate_nodes=NUM, **kwargs)  # fmt: skip


@pytest.fixture
def honest(digits):
    split = federated_split(digits, NUM, "dirichlet", alpha=0.5, test_fraction=0.2, seed=3)
    strategy = _strategy(digits)
    result = strategy.start(grid=LocalGrid(_app(digits, split), NUM, seed=5))
    return split, strategy, result


def test_a_later_claim_of_a_held_partition_is_rejected_naming_both(digits, honest, caplog):
    split, ref, ref_result = honest
    other = federated_split(digits, NUM, "iid", test_fraction=0.2, seed=9)  # other data
    hostile = {1: {"partition-id": 2, "num-partitions": NUM, "hostile": True}}  # smallest id
    grid = JoiningGrid(_app(digits, split, other), NUM, seed=5, extra=hostile)
    strategy = _strategy(digits)
    result = strategy.start(grid=grid)
    owner = strategy.server.owners.owner[2]
    assert owner != 1
    rounds = [r for r in strategy.history if r.kind == "train"]
    assert rounds[1].details["partitions"] == [0, 1, 2, 3]  # the honest data kept
    reason = {r["node-id"]: r["reason"] for r in rounds[1].details["rejected"]}[1]
    assert f"partition-id 2: held by node {owner} since layer 1" in reason
    assert "claim of node 1 is rejected" in reason
    conflicts = strategy.server.owners.conflicts
    why = f"node {owner} has held it since layer 1"
    assert conflicts[0] == {"partition": 2, "kept": owner, "rejected": 1, "layer": 1, "why": why}
    for w, r in zip(strategy.net.weights, ref.net.weights, strict=True):
        np.testing.assert_array_equal(w, r)  # the honest model, bit for bit
    ev, ev_ref = (x.evaluate_metrics_clientapp[2] for x in (result, ref_result))
    assert ev["num-examples"] == ev_ref["num-examples"]  # each partition counted once
    assert ev["global-accuracy"] == ev_ref["global-accuracy"]


def test_nodes_that_disagree_on_num_partitions_are_rejected(digits, honest):
    split, ref, _ = honest
    other = federated_split(digits, NUM + 1, "iid", test_fraction=0.2, seed=9)
    hostile = {1: {"partition-id": 4, "num-partitions": NUM + 1, "hostile": True}}
    strategy = _strategy(digits)
    strategy.start(grid=JoiningGrid(_app(digits, split, other), NUM, seed=5, extra=hostile))
    rounds = [r for r in strategy.history if r.kind == "train"]
    reason = {r["node-id"]: r["reason"] for r in rounds[1].details["rejected"]}[1]
    assert (
        reason
        == f"num-partitions={NUM + 1} disagrees with the run's {NUM} (the first accepted node's)"
    )
    for w, r in zip(strategy.net.weights, ref.net.weights, strict=True):
        np.testing.assert_array_equal(w, r)


class RestartingGrid(LocalGrid):
    """The node of partition 1 restarts after the first round with a new node id."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        old = [n for n, c in self.contexts.items() if c.node_config["partition-id"] == 1][0]
        if old != 77:
            ctx = self.contexts.pop(old)
            self.contexts[77] = Context(1, 77, ctx.node_config, RecordDict(), {})
        return replies


def test_a_restarted_node_gets_its_partition_back_once_the_old_one_is_gone(digits, honest, caplog):
    split, ref, _ = honest
    strategy = _strategy(digits)
    strategy.start(grid=RestartingGrid(_app(digits, split), NUM, seed=5))
    assert strategy.server.owners.owner[1] == 77
    assert "partition-id 1 moves from node" in caplog.text and "to node 77" in caplog.text
    for w, r in zip(strategy.net.weights, ref.net.weights, strict=True):
        np.testing.assert_array_equal(w, r)


class UnavailableGrid(LocalGrid):
    """Partition 3's node is gone in the second round: the SuperLink answers for it."""

    def send_and_receive(self, messages, *, timeout=None):
        self.calls = getattr(self, "calls", 0) + 1
        messages = list(messages)
        gone = [n for n, c in self.contexts.items() if c.node_config["partition-id"] == 3][0]
        if self.calls != 2:
            return super().send_and_receive(messages, timeout=timeout)
        keep = [m for m in messages if m.metadata.dst_node_id != gone]
        replies = list(super().send_and_receive(keep, timeout=timeout))
        lost = next(m for m in messages if m.metadata.dst_node_id == gone)
        error = Message(Error(ErrorCode.NODE_UNAVAILABLE, "Node Unavailable"), reply_to=lost)
        error.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
        return [*replies, error]


def test_the_superlink_is_never_a_failed_client(digits, honest):
    split, _, _ = honest
    strategy = _strategy(digits, min_valid_replies=1)
    strategy.start(grid=UnavailableGrid(_app(digits, split), NUM, seed=5))
    second = [r for r in strategy.history if r.kind == "train"][1]
    assert second.details["missing-partitions"] == [3]
    assert "failed-nodes" not in second.details and "rejected" not in second.details


def test_a_failing_data_loader_names_its_partition(digits, honest):
    split, _, _ = honest

    def load(context):
        if int(context.node_config["partition-id"]) == 2:
            raise FileNotFoundError("/data/part-2.npz")
        return split.client(digits, int(context.node_config["partition-id"]))

    strategy = _strategy(digits)
    strategy.start(grid=LocalGrid(make_fedacnnl_client_app(load, cache=False), NUM, seed=5))
    first = [r for r in strategy.history if r.kind == "train"][0]
    assert first.details["failed-partitions"] == [2]
    reason = first.details["rejected"][0]["reason"]
    assert reason == "client error: partition-id=2: FileNotFoundError: /data/part-2.npz"


def test_node_config_overrides_are_honoured_or_refused(digits, tmp_path):
    """A node's ``data-path`` is its data (honoured); a server-side key is refused, not ignored."""
    from flwr_analytic.clients.fedacnnl_client import resolved_context
    from flwr_analytic.config_checks import ConfigError

    def context(node_config):
        return Context(1, 5, {"partition-id": 0, "num-partitions": 2, **node_config},
                       RecordDict(), {"model": "mlp"})  # fmt: skip

    path = str(tmp_path / "node-data.npz")
    resolved = resolved_context(context({"data-path": path, "client-threads": 2}))
    assert resolved.run_config["data-path"] == path and resolved.run_config["client-threads"] == 2
    with pytest.raises(ConfigError, match=r"node config: \['gamma'\] set run-config keys"):
        resolved_context(context({"gamma": 0.5}))
    # through the app: the node's missing file is named, with the node's partition
    mnist = SHARED_DATA / "mnist70k.npz"
    if not mnist.is_file():
        pytest.skip(f"{mnist} not present")
    run_config = {"dataset": "mnist", "data-path": str(mnist), "test-fraction": 0.5}
    grid = LocalGrid(make_fedacnnl_client_app(), 2, run_config, seed=1)
    grid.contexts[list(grid.contexts)[1]].node_config["data-path"] = path
    strategy = FedACnnL(mlp((1, 28, 28), 10, hidden=8), min_train_nodes=2, min_available_nodes=2)
    strategy.start(grid=grid)
    for record in (r for r in strategy.history if r.kind == "train"):
        assert record.details["partitions"] == [0]  # partition 1's node has no data at its path
        assert record.details["failed-partitions"] == [1]
        (reason,) = [r["reason"] for r in record.details["rejected"]]
        assert reason.startswith("client error: partition-id=1: DatasetNotFoundError")
        assert "node-data.npz" in reason


def test_a_node_that_disagrees_on_num_partitions_is_not_evaluated(digits, honest):
    split, _, ref_result = honest
    other = federated_split(digits, NUM + 1, "iid", test_fraction=0.2, seed=9)
    hostile = {1: {"partition-id": 4, "num-partitions": NUM + 1, "hostile": True}}
    strategy = _strategy(digits)
    result = strategy.start(
        grid=JoiningGrid(_app(digits, split, other), NUM, seed=5, extra=hostile)
    )
    ev, ev_ref = (x.evaluate_metrics_clientapp[2] for x in (result, ref_result))
    assert ev["client-ids"] == ev_ref["client-ids"] == list(range(NUM))
    assert ev["num-examples"] == ev_ref["num-examples"]
    rejected = [r for r in strategy.history if r.kind == "evaluate"][0].details["rejected"]
    assert rejected == [
        {
            "node-id": 1,
            "reason": f"num-partitions={NUM + 1} disagrees with the run's {NUM}: not evaluated",
        }
    ]


def test_the_round_line_counts_a_gone_node_as_missing_only(digits, honest, caplog):
    from flwr_analytic.strategies.metering import Metered

    split, _, _ = honest
    Metered(_strategy(digits, min_valid_replies=1)).start(
        grid=UnavailableGrid(_app(digits, split), NUM, seed=5)
    )
    assert "layer 2/2 (round 2): 3/4 clients, 0 rejected, 1 missing" in caplog.text
