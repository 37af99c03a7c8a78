"""Output a person reads (issue 14): short log lines, one per layer round, a table and a PNG.

A FedACnnL run through the app's server (``run_fedacnnl`` on a ``LocalGrid`` of 20 clients) and a
meta run (``run_meta_in_process``) are captured at INFO: no line reaches 200 characters, no line
carries per-client lists (those are in the results JSON), layers are numbered ``k/L`` from 1, the
run ends with the table of global vs personalized accuracy, and the chart is written next to the
results JSON and named in the summary.
"""

from __future__ import annotations

import json
import logging
import struct
import sys

import numpy as np
import pytest
from flwr.app import MetricRecord

from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
from flwr_analytic.fedacnnl import LocalGrid, resolve_run_config
from flwr_analytic.report import (
    accuracy_table,
    client_summary,
    per_client_accuracy,
    short_list,
    write_accuracy_png,
)
from flwr_analytic.strategies import run_fedacnnl, run_meta_in_process
from flwr_analytic.strategies.fedacnnl_server import write_report
from flwr_analytic.strategies.metering import Progress, ReadableMetricRecord, round_line
from flwr_analytic.strategies.records import RoundRecord

NUM_CLIENTS = 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _info_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        line
        for r in caplog.records
        if r.levelno == logging.INFO
        for line in r.getMessage().splitlines()
    ]


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def fedacnnl_run(tmp_path_factory):
    """``(summary, INFO lines, results path)`` of a 20-client digits run through the app's server."""
    results = tmp_path_factory.mktemp("run") / "results.json"
    cfg = resolve_run_config({"min-nodes": NUM_CLIENTS, "results-path": str(results)})
    grid = LocalGrid(make_fedacnnl_client_app(run_config=cfg), NUM_CLIENTS, cfg, seed=3)
    handler = _Collect()
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(handler)
    try:
        _, summary = run_fedacnnl(grid, cfg)
    finally:
        flwr_logger.removeHandler(handler)
    return summary, handler.lines, results


class _Collect(logging.Handler):
    """The INFO messages (a module-scoped fixture cannot use ``caplog``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.INFO:
            self.lines += record.getMessage().splitlines()


def test_fedacnnl_log_lines_are_short_and_hold_no_per_client_lists(fedacnnl_run):
    summary, lines, _ = fedacnnl_run
    assert lines, "nothing logged at INFO"
    longest = max(lines, key=len)
    assert len(longest) < 200, longest
    ev = summary["evaluate"]
    assert len(ev["global-accuracy-clients"]) == NUM_CLIENTS  # the lists are in the JSON ...
    text = "\n".join(lines)
    for key in ("global-accuracy-clients", "client-ids", "personal-loss-clients"):
        assert key not in text  # ... and not in the log
    assert str(ev["client-ids"][:5])[:-1] not in text


def test_one_line_per_layer_round_numbered_from_one(fedacnnl_run):
    summary, lines, _ = fedacnnl_run
    layers = summary["layers"]
    rounds = [r for r in summary["rounds"] if r["kind"] == "train"]
    assert [r["layer"] for r in rounds] == list(range(layers))  # the JSON keeps 0-based indices
    per_round = [line for line in lines if line.startswith("layer ")]
    assert len(per_round) == len(rounds) == layers
    for k, (line, rec) in enumerate(zip(per_round, rounds, strict=True), start=1):
        assert line.startswith(f"layer {k}/{layers} (round {k}): {NUM_CLIENTS}/{NUM_CLIENTS} ")
        assert "0 rejected" in line and "sent " in line and "received " in line
        assert "elapsed " in line
        assert ("left" in line) == (1 < k < layers)  # an estimate from the 2nd to the last
        assert rec["num-valid"] == NUM_CLIENTS and rec["round-time"] > 0
    assert not [line for line in lines if "configure_train" in line or "aggregate_train" in line]
    assert not [line for line in lines if "layer 0" in line]


def test_configure_aggregate_and_round_lines_name_the_same_layer(caplog):
    """Each round's ``configure_train`` and ``aggregate_train`` (DEBUG) and round line (INFO) say
    the same ``layer k/L``, 1-based, while the JSON keeps the 0-based index."""
    cfg = resolve_run_config({"model": "mlp", "min-nodes": 3, "results-path": ""})
    grid = LocalGrid(make_fedacnnl_client_app(run_config=cfg), 3, cfg, seed=3)
    with caplog.at_level(logging.DEBUG, logger="flwr"):
        _, summary = run_fedacnnl(grid, cfg)
    layers, rounds, server_round = summary["layers"], {}, 0
    for record in caplog.records:
        text = record.getMessage()
        if text.startswith("[ROUND "):
            server_round = int(text.strip("[]").split()[1])
        for kind in ("configure_train", "aggregate_train", "round line"):
            prefix = "layer " if kind == "round line" else f"{kind}: layer "
            if text.startswith(prefix):
                rounds.setdefault(server_round, {})[kind] = text[len(prefix) :].split()[0]
    assert layers == 2 and sorted(rounds) == [1, 2]
    for r, said in rounds.items():  # round r fits layer r (no retries here)
        assert said == dict.fromkeys(("configure_train", "aggregate_train", "round line"),
                                     f"{r}/{layers}"), said  # fmt: skip
    assert [x["layer"] for x in summary["rounds"] if x["kind"] == "train"] == [0, 1]


def test_final_table_is_logged_with_the_evaluation_numbers(fedacnnl_run):
    summary, lines, _ = fedacnnl_run
    ev = summary["evaluate"]
    k = next(i for i, line in enumerate(lines) if line.startswith("accuracy "))
    header, glob, pers = lines[k : k + 3]
    assert header.split()[1:6] == ["weighted", "client", "mean", "min", "p10"]
    assert f"({NUM_CLIENTS} clients)" in header
    for line, prefix in ((glob, "global-accuracy"), (pers, "personal-accuracy")):
        shown = [float(c.rstrip("%")) / 100 for c in line.split()[1:]]
        expected = [ev[prefix + s] for s in ("", "-client-mean", "-client-min", "-client-p10")]
        assert shown == pytest.approx(expected, abs=5e-5)
    assert glob.startswith("global ") and pers.startswith("personalized ")


def test_report_png_is_written_next_to_the_results_and_named_in_the_summary(fedacnnl_run):
    summary, lines, results = fedacnnl_run
    png = results.with_suffix(".png")
    assert summary["report-png"] == str(png)
    assert json.loads(results.read_text())["report-png"] == str(png)
    assert png.stat().st_size > 10_000
    width, height = _png_size(png)
    assert width >= 600 and height >= 300
    assert any(str(png) in line for line in lines)


def test_per_client_accuracy_sorts_clients_and_keeps_pairs_together():
    ev = {
        "client-ids": [0, 1, 2, 3],
        "global-accuracy-clients": [0.9, 0.5, 0.9, 0.7],
        "personal-accuracy-clients": [0.95, 0.8, 0.85, 0.75],
    }
    ids, glob, pers = per_client_accuracy(ev)
    assert ids.tolist() == [1, 3, 0, 2]  # by global accuracy, ties by id
    assert glob.tolist() == [0.5, 0.7, 0.9, 0.9]
    assert pers.tolist() == [0.8, 0.75, 0.95, 0.85]
    with pytest.raises(ValueError, match="differ in length"):
        per_client_accuracy({**ev, "client-ids": [0, 1, 2]})


def test_png_of_many_clients_and_without_matplotlib(tmp_path, monkeypatch, caplog):
    rng = np.random.default_rng(0)
    glob = rng.uniform(0.3, 1.0, 300)
    ev = {
        "client-ids": list(range(300)),
        "global-accuracy-clients": glob.tolist(),
        "personal-accuracy-clients": np.minimum(1.0, glob + 0.1).tolist(),
    }
    png = write_accuracy_png(ev, tmp_path / "sub" / "many.png")
    width, _ = _png_size(png)
    assert width <= 2400  # the figure is capped in width
    assert write_report({"num-clients": 0}, tmp_path / "none.png") is None
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if absent
    with caplog.at_level(logging.WARNING):
        assert write_report(ev, tmp_path / "absent.png") is None
    assert "pip install matplotlib" in caplog.text
    assert not (tmp_path / "absent.png").exists()


def test_accuracy_table_matches_client_summary():
    g, p, n = np.array([1.0, 0.5, 0.75]), np.array([1.0, 0.75, 1.0]), np.array([2, 2, 4])
    ev = {**client_summary(g, n, "global-accuracy"), **client_summary(p, n, "personal-accuracy")}
    header, glob, pers = accuracy_table(ev)
    assert "clients)" not in header  # no num-clients given
    assert glob.split()[1:] == ["75.00%", "75.00%", "50.00%", "55.00%"]
    assert pers.split()[1:] == ["93.75%", "91.67%", "75.00%", "80.00%"]
    assert accuracy_table({"num-clients": 0}) == []
    assert accuracy_table({"global-accuracy": 0.5})[1].split() == ["global", "50.00%"] + ["-"] * 3


def test_readable_metric_record_is_short_and_keeps_the_values():
    values = {f"metric-{k}": k / 3 for k in range(30)} | {"client-ids": list(range(1000))}
    record = ReadableMetricRecord(values)
    assert isinstance(record, MetricRecord) and dict(record) == values
    sent = MetricRecord.inflate(record.deflate())  # travels as a plain MetricRecord
    assert type(sent) is MetricRecord and dict(sent) == values
    text = str(record)
    assert len(text) <= ReadableMetricRecord.MAX_CHARS and text.endswith(" more}")
    assert "metric-1: 0.3333" in text and "[1000 values]" not in text  # cut before the list
    assert str(ReadableMetricRecord({"n": 3, "ids": [1, 2]})) == "{n: 3, ids: [2 values]}"
    assert short_list(range(3)) == "[0, 1, 2]"
    assert short_list(range(100), shown=3) == "[0, 1, 2] … +97 more"


def test_round_line_and_progress_estimate():
    record = RoundRecord(4, "train", num_sent=5, num_replies=4, bytes_sent=2_500_000,
                         bytes_received=1200, seconds=1.5)  # fmt: skip
    record.details.update({"layer": 1, "num-valid": 3, "rejected": [{"node-id": 7}]})
    line = round_line(record, 3, "unused")
    assert line == (
        "layer 2/3 (round 4): 3/5 clients, 1 rejected, 1 missing, sent 2.5 MB, "
        "received 1.2 kB, 1.50 s"
    )
    record.details["stage"] = 2  # a zca-kmeans layer's second Lloyd round
    assert round_line(record, 3, "unused").startswith("layer 2/3 (round 4, k-means iteration 2): ")
    record.details = {"solved": False}
    assert round_line(record, None, "round 4/9", errors=1).startswith(
        "round 4/9: 3/5 clients, 1 rejected, 1 missing"
    )
    assert round_line(record, None, "round 4/9").endswith("not solved")
    progress = Progress(total=5, done=1)  # one unit done before (a resumed run)
    assert progress.text().startswith("elapsed ") and "left" not in progress.text()
    progress.step(1.0, completed=True)  # the first unit pays for start-up: no estimate yet
    assert "left" not in progress.text()
    progress.step(100.0, completed=True)  # the last unit took longer than the mean so far
    assert progress.text().endswith("~3 min 20 s left")  # 2 units left x 100 s
    progress.step(2.0, completed=False)  # a retry: no unit done, the last round took 2 s
    assert progress.done == 3 and progress.text().endswith("~4.00 s left")
    progress.step(1.0, completed=True)
    progress.step(1.0, completed=True)
    assert progress.done == 5 and "left" not in progress.text()


META_RUN = {
    "dataset": "digits",
    "model": "cnn",
    "num-server-rounds": 2,
    "local-steps": 2,
    "finetune-steps": 3,
    "min-partition-size": 20,
}


def test_meta_run_logs_short_lines_and_keeps_lists_in_the_json(caplog, tmp_path):
    path = tmp_path / "history.json"
    with caplog.at_level(logging.INFO):
        result, history = run_meta_in_process({**META_RUN, "history-path": str(path)}, 4)
    lines = _info_lines(caplog)
    longest = max(lines, key=len)
    assert len(longest) < 200, longest
    text = "\n".join(lines)
    assert "acc-clients" not in text and "acc-curve" not in text and "client-ids" not in text
    assert [line.split(":")[0] for line in lines if line.startswith("round ")] == [
        "round 1/2",
        "round 2/2",
    ]
    assert any("(global model) →" in line and "after 3 fine-tuning steps" in line for line in lines)
    assert any(str(path) in line for line in lines)
    # Flower's loop logs and prints the returned records: scalars only; the lists are in the JSON
    for record in [
        *result.train_metrics_clientapp.values(),
        *result.evaluate_metrics_clientapp.values(),
    ]:
        assert not [k for k, v in record.items() if isinstance(v, list)]
    for record in result.train_metrics_clientapp.values():  # whole counts print as integers
        assert type(record["local-steps"]) is int and type(record["grad-evals"]) is int
    assert "'local-steps': '2'" in text and "'samples-processed': '" in text
    assert "e+0" not in text.split("'samples-processed': '")[1].split("'")[0]
    saved = json.loads(path.read_text())["history"]
    evaluated = [h for h in saved if h["kind"] == "evaluate"]
    assert [h["metrics"]["client-ids"] for h in evaluated] == [[0, 1, 2, 3]] * 2
    assert all(isinstance(c, int) for c in evaluated[-1]["metrics"]["client-ids"])
    assert len(evaluated[-1]["metrics"]["acc-curve"]) == 4
    assert history == saved
