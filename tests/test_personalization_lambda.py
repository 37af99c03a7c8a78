"""The pFedACnnL λ-sweep benchmark (``benchmarks/personalization_lambda.py``) in its quick mode.

Runs the script on digits (one seed, Dirichlet(0.1), 20 clients) into a temporary folder and checks
what the README table is built from: ρ → ∞ reproduces the global model's per-client predictions, the
validation-chosen ρ is scored with the same numbers as the sweep, the gains are personalized − global,
the cached-input fast path was checked against the full forward pass, and ``--render`` prints the
claim side by side.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "personalization_lambda.py"


def run(*args: str) -> str:
    # one BLAS thread: the small Cholesky solves of digits do not gain from more, and threads that
    # spin on a shared 2-core machine make them slower
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pl") / "pl.json"
    # ρ = 1e6: so strong a pull towards W that the personalized model must predict like the global one
    run("--quick", "--alphas", "0.1", "--lambdas", "0.1", "1e6", "--out", str(out))
    return out, json.loads(out.read_text())


def test_json_has_config_environment_and_runs(quick: tuple[Path, dict]) -> None:
    out, result = quick
    assert result["config"]["datasets"] == ["digits"]
    assert result["config"]["lambdas"] == [0.1, 1e6]
    assert result["environment"]["cpu_count"] >= 1
    assert result["paper_claim"]["gain_points_low"] == 4.0
    (r,) = result["runs"]
    assert (r["dataset"], r["alpha"], r["seed"], r["clients"]) == ("digits", 0.1, 0, 20)
    assert set(r["personalized"]) == {"0.1", "1e+06"}
    (s,) = result["summary"]
    assert s["seeds"] == [0]
    for key in ("global", "personalized_default", "gain_default_points", "gain_oracle_points"):
        assert np.isfinite(s[key]["mean"])
    assert out.with_name("pl_accuracy_vs_lambda.png").stat().st_size > 0
    assert out.with_name("pl_per_client.png").stat().st_size > 0


def test_infinite_lambda_is_the_global_model(quick: tuple[Path, dict]) -> None:
    (r,) = quick[1]["runs"]
    assert r["personalized"]["1e+06"]["per_client_correct"] == r["global"]["per_client_correct"]
    assert r["personalized"]["1e+06"]["gain"]["weighted_points"] == 0.0
    # the fast path (cached head inputs) was checked against the full forward for every client,
    # at the global model and at the default ρ
    assert r["full_forward_checks"] == 2 * r["clients"]


def test_gains_and_choices_are_consistent(quick: tuple[Path, dict]) -> None:
    (r,) = quick[1]["runs"]
    counts = np.array(r["client_test_counts"])
    glob = np.array(r["global"]["per_client_correct"])
    assert r["global"]["weighted"] == pytest.approx(glob.sum() / counts.sum())
    pers = r["personalized"]["0.1"]
    correct = np.array(pers["per_client_correct"])
    assert pers["gain"]["weighted_points"] == pytest.approx(
        100 * (correct.sum() - glob.sum()) / counts.sum()
    )
    assert pers["gain"]["clients_better"] == int(np.sum(correct > glob))
    assert pers["client_min"] == pytest.approx(np.min(correct / counts))
    # the per-client validation choice is scored with the sweep's own test counts
    val = r["validation_per_client"]
    for k, key in enumerate(val["lambdas"]):
        table = r["global"] if key == "inf" else r["personalized"][key]
        assert val["per_client_correct"][k] == table["per_client_correct"][k]
    # the oracle is the best shared ρ on the test set (ρ = ∞ included)
    best = max([r["global"]["weighted"], *(p["weighted"] for p in r["personalized"].values())])
    assert r["oracle_shared"]["weighted"] == best


def test_render_prints_the_claim_side_by_side(
    quick: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the script imports benchmarks/common.py
    spec = importlib.util.spec_from_file_location("personalization_lambda", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.print_tables(quick[1])
    text = capsys.readouterr().out
    assert "| data set | α | seeds | global (FedACnnL) |" in text
    row = next(line for line in text.splitlines() if line.startswith("| digits | 0.1 | 1 |"))
    assert row.endswith("+4 to +8 |")
