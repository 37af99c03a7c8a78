"""Execute the tutorials in notebooks/ top to bottom (nbclient) and check what they claim.

The two executions are marked ``notebooks`` and ``slow`` (a minute or two each); the check that
the committed files are the generator's output, without outputs, is fast. Each notebook prints its
key numbers as ``SUMMARY {json}`` in its last cell (tagged ``summary``); the checks below read
them. Run with ``.venv/bin/python -m pytest -q -m notebooks tests/test_notebooks.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from flwr_analytic.meta import step_cost

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT = 600


def _execute(name: str, figures_expected: int, monkeypatch: pytest.MonkeyPatch) -> dict:
    runner = _load("notebook_runner", NOTEBOOKS / "run.py")
    # headless matplotlib that still puts the figures in the outputs (Agg would drop them)
    monkeypatch.setenv("MPLBACKEND", runner.INLINE_BACKEND)
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    nb, _ = runner.execute(NOTEBOOKS / name, timeout=CELL_TIMEOUT)
    outputs = [output for cell in nb.cells for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == figures_expected, f"{len(figures)} figures rendered"
    info = runner.summary(nb)
    # the kernel ran on this interpreter's environment (.venv), not some other python3
    assert Path(info["kernel-prefix"]).resolve() == Path(sys.prefix).resolve()
    return info


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebooks_are_generated_and_have_no_outputs():
    """Fast: the .ipynb files are what notebooks/_build.py writes, without outputs."""
    import nbformat

    build = _load("notebook_build", NOTEBOOKS / "_build.py")
    assert sorted(build.NOTEBOOKS) == sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    for name in build.NOTEBOOKS:
        text = (NOTEBOOKS / name).read_text(encoding="utf-8")
        assert text == build.render(name), f"{name} differs from _build.py: rerun it"
        nb = nbformat.reads(text, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, name


@pytest.mark.notebooks
@pytest.mark.slow
def test_analytic_fl_in_five_minutes(monkeypatch):
    info = _execute("analytic_fl_in_five_minutes.ipynb", 3, monkeypatch)
    fed, avg = info["fedacnnl"], info["fedavg"]
    # FedACnnL = centralized training on the pooled data; the Flower run = the core run
    assert fed["federated-vs-centralized-max-rel"] <= 1e-9
    assert fed["global-accuracy"] == pytest.approx(fed["core-global-accuracy"], abs=1e-12)
    assert fed["personal-accuracy"] == pytest.approx(fed["core-personal-accuracy"], abs=1e-12)
    assert fed["train-rounds"] == 3  # one round per layer of the digits CNN
    # pFedACnnL beats the global analytic model, and no client gets worse
    assert fed["personal-accuracy"] > fed["global-accuracy"]
    assert np.all(np.array(fed["personal-clients"]) >= np.array(fed["global-clients"]))
    # FedACnnL beats FedAvg on the same CNN at equal rounds and after all FedAvg rounds
    assert fed["global-accuracy"] > avg["global-accuracy"][fed["train-rounds"] - 1]
    assert fed["global-accuracy"] > max(avg["global-accuracy"])
    assert fed["personal-accuracy"] > max(avg["finetuned-accuracy"])
    # and it trains in less wall time than the FedAvg run
    assert fed["train-seconds"] < avg["train-seconds"][-1]


@pytest.mark.notebooks
@pytest.mark.slow
def test_nu_step_meta_learning(monkeypatch):
    info = _execute("nu_step_meta_learning.ipynb", 1, monkeypatch)
    for nu, err in info["gradient-check"].items():
        assert err["exact"] <= 1e-10, nu  # exact = autograd through the unrolled steps
        assert err["first-order"] > 1e-3, nu  # the first-order direction is a different one
    runs = info["runs"]
    assert set(runs) == {"nu=0 (FedAvg)"} | {
        f"nu={nu} {mode}" for nu in (1, 2, 3) for mode in ("exact", "first-order")
    }
    for name, run in runs.items():
        # equal local work: tau = round(budget / cost of one meta-step), at least 1
        assert run["tau"] == max(1, round(12 / step_cost(run["nu"], run["mode"]))), name
        assert len(run["curve"]) == 6 and run["curve"][-1] == pytest.approx(run["acc"][-1])
        # the models are trained to be fine-tuned: 5 local steps help every one of them
        assert run["curve"][-1] > run["curve"][0], name
    final = {name: run["acc"][-1] for name, run in runs.items()}
    # what the text says: FedAvg + fine-tuning is best at this equal budget, and more inner
    # steps do not beat nu = 1 in first-order mode (margins of 6 and 15+ points in our run)
    assert final["nu=0 (FedAvg)"] > max(v for k, v in final.items() if k != "nu=0 (FedAvg)")
    assert final["nu=1 first-order"] > max(final["nu=2 first-order"], final["nu=3 first-order"])
