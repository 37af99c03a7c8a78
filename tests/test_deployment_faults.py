"""Faults in a real deployment (issue 13): a SuperLink and SuperNodes on loopback, ``flwr run``.

Each scenario runs ``apps/fedacnnl`` (digits or MNIST, a small model) against real
``flower-superlink`` / ``flower-supernode`` processes (``LocalDeployment`` of
``tests/flower_processes.py``) and judges the run from the results JSON (``results-path``) and the
streamed log:

1. a SuperNode killed (``SIGKILL``, with its app processes) after layer 1 with ``min-nodes`` =
   nodes: the run ends within a bound, later layers sum exactly the survivors' partitions;
2. a hostile SuperNode claiming an honest node's partition, and one disagreeing on
   ``num-partitions``, joining after layer 1: both rejected, the honest node kept, the model equal
   to the honest run's, partition 2 counted once in the evaluation;
3. a stale checkpoint (``partitioner`` changed): the ServerApp refuses it, no results are written
   (``flwr run`` itself exits 0: the log and the results file tell);
4. a SuperNode whose data loader fails (``data-path`` to a missing file) and one whose node config
   sets a run-config key: their partitions are named in ``failed-partitions``;
5. TLS, SuperNode authentication and ``--database``: a node with an unregistered key is refused;
   a restarted node (same key) and a restarted SuperLink (same database) keep every node id, and
   the same ``flwr run`` resumes from the checkpoint to the uninterrupted run's model.

Two tests pin defects of the package found here and since fixed (the round line counted a dead
node as rejected too; a node rejected for its ``num-partitions`` was still evaluated).

Every process started here is stopped by id at the end, also on failure.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from flower_processes import LocalDeployment, owned_processes, write_node_key, write_tls_files
from flwr.common.constant import SUPERLINK_NODE_ID

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "fedacnnl"
MNIST = ROOT.parent / "shared" / "data" / "mnist70k.npz"  # as conftest.SHARED_DATA

# small and quick: digits, a two-layer MLP (a hidden layer and the output layer), float64
BASE = {
    "dataset": "digits",
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.5,
    "model": "mlp",
    "mlp-hidden": 32,
    "seed": 1,
}
LAYER_1_SOLVED = r"layer 1/2 \(round 1\)"
# Flower 1.42: a SuperNode that dies without saying so stays "online" for 2 heartbeats of 30 s
HEARTBEAT_EXPIRY = 60.0


def _summary(path: Path) -> dict:
    return json.loads(path.read_text())


def _train_rounds(summary: dict) -> list[dict]:
    return [r for r in summary["rounds"] if r["kind"] == "train"]


def _all_named(summary: dict, key: str) -> list[int]:
    """Every node id listed under ``key`` (``failed-nodes``, ``missing-nodes``) in any round."""
    return [n for r in summary["rounds"] for n in r.get(key, [])]


def _rejected(record: dict) -> dict[int, str]:
    """A round's rejected replies: node id -> reason."""
    return {r["node-id"]: r["reason"] for r in record.get("rejected", [])}


def _json(output: str) -> dict:
    """The JSON document a ``flwr ... --format json`` command printed."""
    return json.loads(output[output.index("{") :])


def _run_id(output: str) -> int:
    """The run id ``flwr run`` printed (``Successfully started run <id>``)."""
    return int(re.search(r"Successfully started run (\d+)", output).group(1))


def _wait_for_log(deployment: LocalDeployment, name: str, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in deployment.log(name):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not log {text!r} in {timeout:.0f} s")
        time.sleep(0.5)


def _stopped(deployment: LocalDeployment) -> None:
    assert owned_processes(str(deployment.base)) == []
    assert all(p.poll() is not None for p in deployment.processes)


def _reference(cfg: dict, num_nodes: int) -> tuple[dict, dict]:
    """The honest run in-process (LocalGrid, ``num_nodes`` partitions): (summary, state_dict)."""
    from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
    from flwr_analytic.fedacnnl import LocalGrid, resolve_run_config
    from flwr_analytic.strategies.fedacnnl_server import run_fedacnnl

    cfg = resolve_run_config({**cfg, "results-path": "", "model-path": "", "checkpoint-path": ""})
    result, summary = run_fedacnnl(LocalGrid(make_fedacnnl_client_app(), num_nodes, cfg), cfg)
    return summary, result.arrays.to_torch_state_dict()


# ------------------------------------------------------------------------- 1. a SuperNode dies
@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """3 SuperNodes, ``min-nodes=3``; SuperNode 2 and its app processes get SIGKILL after layer 1."""
    base = tmp_path_factory.mktemp("killed")
    cfg = {
        **BASE,
        "min-nodes": 3,
        "availability-timeout": 15.0,
        "round-timeout": 120.0,
        "results-path": str(base / "killed.json"),
    }
    deployment = LocalDeployment(base / "deploy", num_nodes=3)
    with deployment:
        dead = deployment.node_id("supernode-2")
        run = deployment.start_run(APP, cfg, timeout=400)
        run.wait_for(LAYER_1_SOLVED, timeout=240)
        killed_at = time.monotonic()
        assert deployment.kill_node("supernode-2")
        done = run.wait()
        after_kill = time.monotonic() - killed_at
    (base / "run.log").write_text(done.stdout)
    _stopped(deployment)
    return {
        "done": done,
        "after-kill": after_kill,
        "dead": dead,
        "summary": _summary(base / "killed.json"),
        "cfg": cfg,
    }


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_killed_supernode_run_ends_with_the_survivors(killed_run):
    done, summary, dead = killed_run["done"], killed_run["summary"], killed_run["dead"]
    assert done.returncode == 0, done.stdout[-3000:]
    # bounded: the dead node's heartbeats expire (≤ 60 s), then each later round waits at most
    # availability-timeout for it (evaluation) before going on with the connected nodes
    bound = HEARTBEAT_EXPIRY + killed_run["cfg"]["availability-timeout"] + 120.0
    assert killed_run["after-kill"] < bound, killed_run["after-kill"]
    # layer 1 summed all three partitions, layer 2 exactly the survivors'
    assert summary["layer-partitions"] == {"0": [0, 1, 2], "1": [0, 1]}
    layer2 = _train_rounds(summary)[1]
    assert layer2["missing-partitions"] == [2] and layer2["missing-nodes"] == [dead]
    assert layer2["num-valid"] == 2 and "rejected" not in layer2
    # a dead node is missing, never failed; the SuperLink's own id is no client
    assert _all_named(summary, "failed-nodes") == []
    assert SUPERLINK_NODE_ID not in _all_named(summary, "missing-nodes")
    assert SUPERLINK_NODE_ID not in summary["partition-owners"]["owner"].values()
    # the evaluation waited availability-timeout for min-nodes, then went on with the survivors
    assert (
        "evaluation: 2 nodes connected after 15 s (min-nodes 3); missing partitions [2]; "
        "going on with the 2 connected" in done.stdout
    ), done.stdout[-3000:]
    assert "replies missing (timeout or disconnect): partitions [2]" in done.stdout
    assert summary["evaluate"]["client-ids"] == [0, 1]
    assert summary["partition-owners"]["conflicts"] == []


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_killed_supernode_round_line_counts_it_once(killed_run):
    """The round's log line names the dead node as missing and not also as rejected."""
    line = next(ln for ln in killed_run["done"].stdout.splitlines() if "layer 2/2 (round 2)" in ln)
    assert "2/3 clients, 0 rejected, 1 missing" in line, line


# -------------------------------------------------- 2. hostile duplicate and num-partitions
@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """Without authentication. Two SuperNodes join during layer 1: ``duplicate`` with the node
    config of honest node 2 (same partition, same data), ``disagrees`` with partition 3 of 4."""
    base = tmp_path_factory.mktemp("hostile")
    cfg = {
        **BASE,
        "min-nodes": 3,
        "availability-timeout": 30.0,
        "round-timeout": 120.0,
        "results-path": str(base / "hostile.json"),
        "model-path": str(base / "hostile.pt"),
    }
    deployment = LocalDeployment(base / "deploy", num_nodes=3)
    with deployment:
        honest = {k: deployment.node_id(f"supernode-{k}") for k in range(3)}
        run = deployment.start_run(APP, cfg, timeout=400)
        # the honest nodes have their layer-1 messages: the hostile nodes are sampled from layer 2
        _wait_for_log(deployment, "supernode-0", "Receiving: train", timeout=120)
        deployment.start_node("duplicate", {"partition-id": 2, "num-partitions": 3})
        deployment.start_node("disagrees", {"partition-id": 3, "num-partitions": 4})
        hostile = {name: deployment.node_id(name) for name in ("duplicate", "disagrees")}
        done = run.wait()
    (base / "run.log").write_text(done.stdout)
    _stopped(deployment)
    ref_summary, ref_state = _reference(cfg, 3)
    return {
        "done": done,
        "honest": honest,
        "hostile": hostile,
        "summary": _summary(base / "hostile.json") if done.returncode == 0 else None,
        "state": torch.load(base / "hostile.pt") if done.returncode == 0 else None,
        "reference": (ref_summary, ref_state),
    }


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_hostile_duplicate_partition_is_rejected(hostile_run):
    done, honest = hostile_run["done"], hostile_run["honest"]
    duplicate, disagrees = hostile_run["hostile"]["duplicate"], hostile_run["hostile"]["disagrees"]
    assert done.returncode == 0, done.stdout[-3000:]
    summary = hostile_run["summary"]
    assert summary["num-nodes"] == 5
    # layer 1 (before they joined) and layer 2 sum exactly the honest partitions
    assert summary["layer-partitions"] == {"0": [0, 1, 2], "1": [0, 1, 2]}
    owners = summary["partition-owners"]
    assert owners["owner"] == {str(k): n for k, n in honest.items()}
    assert owners["num-partitions"] == 3
    assert [
        (c["partition"], c["kept"], c["rejected"], c["layer"]) for c in owners["conflicts"]
    ] == [(2, honest[2], duplicate, 1)]
    rejected = _rejected(_train_rounds(summary)[1])
    assert set(rejected) == {duplicate, disagrees}
    assert rejected[duplicate].startswith(
        f"duplicate partition-id 2: held by node {honest[2]} since layer 1; "
        f"the claim of node {duplicate} is rejected"
    ), rejected[duplicate]
    assert rejected[disagrees].startswith("num-partitions=4 disagrees with the run's 3")
    assert f"Rejected reply from node {duplicate}: duplicate partition-id 2" in done.stdout
    # the honest node is kept: the model is the honest run's (3 partitions, no hostile data)
    ref_summary, ref_state = hostile_run["reference"]
    state = hostile_run["state"]
    diff = max(float((state[k] - ref_state[k]).abs().max()) for k in ref_state)
    assert state.keys() == ref_state.keys() and diff <= 1e-9, diff
    # the evaluation counts partition 2 once, the honest node's; the duplicate is rejected
    ev, ref_ev = summary["evaluate"], ref_summary["evaluate"]
    assert ev["client-ids"].count(2) == 1
    for key in ("global-accuracy-clients", "personal-accuracy-clients"):
        mine = dict(zip(ev["client-ids"], ev[key], strict=True))
        ref = dict(zip(ref_ev["client-ids"], ref_ev[key], strict=True))
        assert [mine[k] for k in range(3)] == pytest.approx([ref[k] for k in range(3)], abs=1e-12)
    evaluation = [r for r in summary["rounds"] if r["kind"] == "evaluate"][0]
    assert (
        _rejected(evaluation)
        .get(duplicate, "")
        .startswith(f"duplicate partition-id 2 (held by node {honest[2]}): counted once")
    ), evaluation


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_hostile_disagreeing_node_is_not_evaluated(hostile_run):
    """The evaluation holds the honest run's clients and examples only."""
    assert hostile_run["done"].returncode == 0, hostile_run["done"].stdout[-3000:]
    ev, ref_ev = hostile_run["summary"]["evaluate"], hostile_run["reference"][0]["evaluate"]
    assert ev["client-ids"] == [0, 1, 2]
    assert ev["num-examples"] == ref_ev["num-examples"]
    assert ev["global-accuracy"] == pytest.approx(ref_ev["global-accuracy"], abs=1e-12)


# ---------------------------------------- 3 and 4. failing data loader, refused node config
@pytest.fixture(scope="module")
def failing_nodes(tmp_path_factory):
    """4 SuperNodes on MNIST: node 2's ``data-path`` is missing, node 3 sets ``seed`` in its node
    config. Run A writes a checkpoint; run B (``partitioner=iid``, same checkpoint) follows on the
    same deployment."""
    if not MNIST.is_file():
        pytest.skip(f"{MNIST} not present")
    base = tmp_path_factory.mktemp("failing")
    cfg = {
        "dataset": "mnist",
        "data-path": str(MNIST),
        "partitioner": "dirichlet",
        "dirichlet-alpha": 1.0,
        "model": "linear",
        "seed": 1,
        "min-nodes": 4,
        "availability-timeout": 30.0,
        "round-timeout": 120.0,
        "results-path": str(base / "a.json"),
        "checkpoint-path": str(base / "fedacnnl.npz"),
    }
    node_configs = {2: {"data-path": str(base / "missing" / "mnist70k.npz")}, 3: {"seed": 5}}
    deployment = LocalDeployment(base / "deploy", num_nodes=4, node_configs=node_configs)
    with deployment:
        ids = {k: deployment.node_id(f"supernode-{k}") for k in range(4)}
        t0 = time.monotonic()
        run_a = deployment.run(APP, cfg, timeout=300)
        wall_a = time.monotonic() - t0
        checkpoint = (base / "fedacnnl.npz").read_bytes() if run_a.returncode == 0 else b""
        stale = {**cfg, "partitioner": "iid", "results-path": str(base / "b.json")}
        t0 = time.monotonic()
        run_b = deployment.run(APP, stale, timeout=300)
        wall_b = time.monotonic() - t0
        listing = deployment.flwr(["ls", deployment.connection, "--format", "json"])
    (base / "run-a.log").write_text(run_a.stdout)
    (base / "run-b.log").write_text(run_b.stdout)
    _stopped(deployment)
    return {
        "base": base,
        "ids": ids,
        "a": run_a,
        "b": run_b,
        "wall": (wall_a, wall_b),
        "checkpoint": checkpoint,
        "ls": listing,
    }


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_failing_data_loader_and_refused_node_config_are_named(failing_nodes):
    run_a, ids = failing_nodes["a"], failing_nodes["ids"]
    assert run_a.returncode == 0, run_a.stdout[-3000:]
    summary = _summary(failing_nodes["base"] / "a.json")
    (layer,) = _train_rounds(summary)
    assert summary["layer-partitions"] == {"0": [0, 1]}
    assert layer["failed-partitions"] == [2, 3]
    assert layer["failed-nodes"] == sorted([ids[2], ids[3]])
    assert "missing-partitions" not in layer
    assert SUPERLINK_NODE_ID not in _all_named(summary, "failed-nodes")
    reasons = _rejected(layer)
    assert reasons[ids[2]].startswith("client error: partition-id=2: DatasetNotFoundError")
    assert str(failing_nodes["base"] / "missing" / "mnist70k.npz") in reasons[ids[2]]
    assert reasons[ids[3]].startswith("client error: partition-id=3: ConfigError: node config")
    assert "['seed']" in reasons[ids[3]]
    assert summary["evaluate"]["client-ids"] == [0, 1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stale_checkpoint_is_refused_and_the_failure_is_visible(failing_nodes):
    """``flwr run`` returns 0 although the ServerApp failed (Flower 1.42): the streamed log names
    the mismatch, no results file is written, the checkpoint is untouched."""
    run_b, base = failing_nodes["b"], failing_nodes["base"]
    assert failing_nodes["checkpoint"], failing_nodes["a"].stdout[-3000:]
    assert "CheckpointMismatchError" in run_b.stdout, run_b.stdout[-3000:]
    assert "partitioner: checkpoint 'dirichlet' != this run 'iid'" in run_b.stdout
    assert not (base / "b.json").exists()
    assert (base / "fedacnnl.npz").read_bytes() == failing_nodes["checkpoint"]
    # Flower 1.41 / 1.42: `flwr run` exits 0 although the ServerApp failed (docs/deployment.md
    # tells operators how to see it; update both if a Flower release changes this)
    assert run_b.returncode == 0
    # the refusal comes before any round
    assert "layer 1/1 (round 1)" not in run_b.stdout
    assert failing_nodes["wall"][1] < 60.0, failing_nodes["wall"]
    # `flwr ls` tells: run A finished:completed, run B finished:failed
    listing = failing_nodes["ls"]
    assert listing.returncode == 0, listing.stdout + listing.stderr
    runs = _json(listing.stdout)["runs"]
    status = {int(r["run-id"]): r["status"] for r in runs}
    assert status == {
        _run_id(failing_nodes["a"].stdout): "finished:completed",
        _run_id(run_b.stdout): "finished:failed",
    }, runs


# ------------------------------- 5. TLS, SuperNode authentication, SuperLink crash and resume
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_tls_auth_restarts_keep_node_ids_and_the_run_resumes(tmp_path):
    """A SuperLink over TLS with ``--enable-supernode-auth`` and ``--database``; each SuperNode's
    public key registered with ``flwr supernode register``; a node with an unregistered key is
    refused. After layer 1: SuperNode 2 is stopped, then the SuperLink and its ServerApp get
    SIGKILL. Restarted (same flags, same key), every node has its node id again; the interrupted
    run is stopped with ``flwr stop`` and the same ``flwr run`` resumes from the checkpoint:
    layer 2 sums partition 2 from the restarted node (no conflict) and the model equals the
    uninterrupted run's."""
    tls = write_tls_files(tmp_path / "tls")
    cfg = {
        **BASE,
        "min-nodes": 3,
        "availability-timeout": 60.0,
        "round-timeout": 120.0,
        "results-path": str(tmp_path / "resumed.json"),
        "model-path": str(tmp_path / "resumed.pt"),
        "checkpoint-path": str(tmp_path / "fedacnnl.npz"),
    }
    deployment = LocalDeployment(
        tmp_path / "deploy",
        num_nodes=3,
        tls=tls,
        supernode_auth=True,
        database=tmp_path / "state.db",
    )
    with deployment:
        ids = {k: deployment.node_id(f"supernode-{k}") for k in range(3)}
        intruder_key, _ = write_node_key(deployment.keys, "intruder")  # never registered
        deployment.start_node(
            "intruder", {"partition-id": 2, "num-partitions": 3}, key=intruder_key, may_exit=True
        )
        run = deployment.start_run(APP, cfg, timeout=400)
        run.wait_for(LAYER_1_SOLVED, timeout=240)
        deployment.kill_node("supernode-2", signal.SIGTERM)  # a clean stop: it deactivates
        deployment.kill_superlink()  # a crash, during layer 2
        crashed = run.wait()
        assert not (tmp_path / "resumed.json").exists()
        deployment.restart_superlink()
        deployment.restart_node("supernode-2")
        restarted = deployment.node_id("supernode-2")
        # the interrupted run is still "running" in the SuperLink's database: stop it
        old = _run_id(crashed.stdout)
        listing = deployment.flwr(["ls", deployment.connection, "--format", "json"])
        before = {int(r["run-id"]): r["status"] for r in _json(listing.stdout)["runs"]}
        stopped = deployment.flwr(["stop", str(old), deployment.connection])
        resumed = deployment.run(APP, cfg, timeout=300)
        (tmp_path / "crashed.log").write_text(crashed.stdout)
        (tmp_path / "resumed.log").write_text(resumed.stdout)
        assert resumed.returncode == 0, resumed.stdout[-3000:]
        superlink_logs = deployment.logs.glob("superlink*.log")
        superlink_log = "".join(p.read_text(errors="replace") for p in superlink_logs)
        intruder_log = deployment.log("intruder")
    _stopped(deployment)
    assert "Uvicorn running on https://" in superlink_log
    # the intruder never became a node
    assert "SuperNode ID" not in intruder_log and "Failed to activate SuperNode" in intruder_log
    assert "No SuperNode found with the given public key" in superlink_log
    # node ids survived the node's and the SuperLink's restarts (keys and --database)
    assert restarted == ids[2]
    assert before[old] == "running" and stopped.returncode == 0, (before, stopped)
    assert "Resuming after round 1 from checkpoint" in resumed.stdout, resumed.stdout[-3000:]
    assert "layer 1/2 (round 1)" not in resumed.stdout
    summary = _summary(tmp_path / "resumed.json")
    assert summary["num-nodes"] == 3
    assert summary["layer-partitions"] == {"0": [0, 1, 2], "1": [0, 1, 2]}
    owners = summary["partition-owners"]
    assert owners["owner"] == {str(k): n for k, n in ids.items()}
    assert owners["conflicts"] == []
    assert _all_named(summary, "failed-nodes") == [] == _all_named(summary, "missing-nodes")
    ref_summary, ref_state = _reference(cfg, 3)
    state = torch.load(tmp_path / "resumed.pt")
    diff = max(float((state[k] - ref_state[k]).abs().max()) for k in ref_state)
    assert state.keys() == ref_state.keys() and diff <= 1e-9, diff
    assert summary["evaluate"]["client-ids"] == [0, 1, 2]
    assert summary["global-accuracy"] == pytest.approx(ref_summary["global-accuracy"], abs=1e-12)
