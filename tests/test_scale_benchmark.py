"""The scale benchmark's quick mode (slow: several Ray simulations on digits).

Runs ``benchmarks/scale.py --quick`` and checks that what it reports is consistent: the per-round
time split (from the ``Metered`` round records) never exceeds the round, rounds fit in the server's
wall time and that in the process's, every client replied, the Flower models equal the in-process
(no Flower) model, the in-process loop equals :func:`fit_federated`, Ray's process tree was sampled
(workers included) and every round's memory peak was cut out by the step stamps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale") / "scale_quick.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), out


def _runs(payload):
    return {**payload["naive"], **payload["scaled"]}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_config_and_environment_recorded(quick):
    payload, out = quick
    env = payload["environment"]
    assert env["cpu_count"] >= 1 and env["flwr"] and env["torch"]
    assert payload["config"]["seed"] == 0 and payload["config"]["quick"] is True
    assert payload["config"]["backend-config"] == {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0}
    }
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_time_split_within_wall_time(quick):
    payload, _ = quick
    runs = _runs(payload)
    assert {r["aggregation"] for r in runs.values()} == {"sorted", "streaming"}
    for key, r in runs.items():
        n = r["clients"]
        assert r["num-nodes"] == n, key
        train = [x for x in r["rounds"] if x["kind"] == "train"]
        assert [x["layer"] for x in train] == [0, 1, 2], key
        for x in r["rounds"]:
            assert x["num-replies"] == n, (key, x)
            parts = x["client-compute-per-worker"] + x["server-solve"]
            assert 0 < parts <= x["round-time"], (key, x)
            assert x["overhead"] == pytest.approx(x["round-time"] - parts)
            assert x["client-compute-max"] <= x["client-compute-sum"]
            assert x["peak-rss-gib"] > 0, (key, x)  # the round's window of the memory timeline
        assert sum(x["round-time"] for x in r["rounds"]) <= r["server-wall-time"], key
        assert r["server-wall-time"] <= r["wall-time"] <= r["process-time"], key
        # the sampled tree holds the simulation process and Ray's processes
        assert r["max-processes"] > 1 and r["peak-rss-gib"] > r["peak-rss-server-gib"] > 0, key
        assert r["bytes-received"] > 0 and r["bytes-sent"] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_models_equal_in_process(quick):
    payload, _ = quick
    for key, r in _runs(payload).items():
        diff = r["vs-inprocess"]
        if r["aggregation"] == "sorted":  # same order as in-process: equal to rounding
            assert diff["max-abs-diff"] <= 1e-12 * diff["scale"], key
        else:  # arrival order: within the spread of the same sum taken in other orders
            assert diff["max-abs-diff"] <= 2 * diff["order-spread"], key
    ov = payload["overhead"]
    # the in-process loop is fit_federated's computation, in the same order
    assert ov["inprocess"]["fit-federated-max-abs-diff"] == 0.0
    local = ov["localgrid"]
    assert local["vs-inprocess"]["max-abs-diff"] <= 1e-12 * local["vs-inprocess"]["scale"]
    # sorted aggregation is bit-reproducible across runtimes: Ray and LocalGrid give one model
    assert local["model-sha256"] == ov["ray"]["model-sha256"]
    assert local["global-accuracy"] == ov["ray"]["global-accuracy"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_overhead_fedavg_and_serialization_reported(quick):
    payload, _ = quick
    ov = payload["overhead"]
    assert [r["layer"] for r in ov["rounds"]] == [0, 1, 2]
    for r in ov["rounds"]:
        compute = r["inprocess-compute"] + r["inprocess-solve"]
        assert r["localgrid-overhead-s"] == pytest.approx(r["localgrid-round"] - compute)
        assert r["localgrid-overhead-pct"] == pytest.approx(
            100 * r["localgrid-overhead-s"] / compute
        )
    assert 0 < ov["localgrid-serde-time"] < ov["localgrid"]["server-wall-time"]
    fa = payload["fedavg"]
    assert [r["round"] for r in fa["rounds"]] == [1, 2]
    assert all(0 < r["train-time"] <= r["round-time"] for r in fa["rounds"])
    assert all(r["bytes-received"] > 0 for r in fa["rounds"])  # every round got client updates
    assert all(r["peak-rss-gib"] > 0 for r in fa["rounds"])
    assert sum(r["round-time"] for r in fa["rounds"]) <= fa["wall-time"] and fa["peak-rss-gib"] > 0
    for row in payload["serialization"]["rows"]:
        # the protobuf carries every float64 of the packed statistics
        assert row["proto-bytes"] >= 8 * row["floats"]
        assert row["flower-roundtrip-s"] > 0
