"""The tutorials in notebooks/: committed executed, and re-executed from their sources.

The committed ``.ipynb`` files carry their outputs (``notebooks/run.py --commit`` writes them); a
fast test checks they hold exactly the cells ``notebooks/_build.py`` renders, all executed, with
the figures and without wall-clock times. The two executions are marked ``notebooks`` and
``slow`` (a minute or two each): they run a fresh render of ``_build.py`` (no stored output is
used) and check what the text claims from the ``SUMMARY {json}`` line each notebook prints in
its last cell (tagged ``summary``). Run with
``.venv/bin/python -m pytest -q -m notebooks tests/test_notebooks.py``.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

from flwr_analytic.meta import step_cost

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT = 600
FIGURES = {"analytic_fl_in_five_minutes.ipynb": 3, "nu_step_meta_learning.ipynb": 1}
# besides the runner's own TIMING pattern: progress-bar rates and elapsed clocks
OTHER_VOLATILE = re.compile(r"\d\s*it/s|\d{1,2}:\d\d(?::\d\d)?(?![\d.])|\d{4}-\d\d-\d\dT\d\d")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _runner():
    return _load("notebook_runner", NOTEBOOKS / "run.py")


def _execute(name: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    runner = _runner()
    # headless matplotlib that still puts the figures in the outputs (Agg would drop them)
    monkeypatch.setenv("MPLBACKEND", runner.INLINE_BACKEND)
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    source = runner.fresh(name)  # the cells of _build.py, no outputs
    nb, _ = runner.execute(source, timeout=CELL_TIMEOUT)
    outputs = [output for cell in nb.cells for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == FIGURES[name], f"{len(figures)} figures rendered"
    info = runner.summary(nb)
    # the kernel ran on this interpreter's environment (.venv), not some other python3
    assert Path(info["kernel-prefix"]).resolve() == Path(sys.prefix).resolve()
    # and the committed form of this execution passes the fast test's output checks
    _check_outputs(name, runner.normalize(nb, name), runner)
    return info


def _texts(nb: nbformat.NotebookNode) -> list[str]:
    texts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", ""))
            texts.append(output.get("data", {}).get("text/plain", ""))
    return texts


def _check_outputs(name: str, nb: nbformat.NotebookNode, runner) -> None:
    """Every code cell ran, in order, without error; the figures are there; no timing or path."""
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), name
    outputs = [output for cell in code for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"], name
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == FIGURES[name], f"{name}: {len(figures)} figures"
    for cell in code:
        if runner.VOLATILE_TAG in cell.metadata.get("tags", []):
            assert cell.outputs == [], f"{name}: output of a cell tagged volatile"
    local = {str(Path(sys.prefix)), str(Path(sys.prefix).resolve()), str(Path.home())}
    for text in _texts(nb):
        assert not runner.TIMING.search(text), f"{name}: a wall-clock time in {text!r}"
        assert not OTHER_VOLATILE.search(text), f"{name}: a volatile value in {text!r}"
        assert not [p for p in local if p in text], f"{name}: a local path in {text!r}"


def test_committed_notebooks_are_executed_renders_of_build():
    """Fast: the .ipynb files hold _build.py's cells, executed, normalized as run.py commits."""
    runner = _runner()
    build = runner.build()
    assert sorted(build.NOTEBOOKS) == sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert sorted(build.NOTEBOOKS) == sorted(FIGURES)
    for name in build.NOTEBOOKS:
        text = (NOTEBOOKS / name).read_text(encoding="utf-8")
        nb = nbformat.reads(text, as_version=4)
        nbformat.validate(nb)
        rendered = runner.fresh(name)
        hint = f"{name} differs from notebooks/_build.py: rerun `python notebooks/run.py --commit`"
        assert nb.metadata == rendered.metadata, hint
        assert len(nb.cells) == len(rendered.cells), hint
        for cell, ref in zip(nb.cells, rendered.cells):
            # same kind, id, source and tags; no other metadata (no execution timestamps)
            assert (cell.cell_type, cell.id) == (ref.cell_type, ref.id), hint
            assert cell.source == ref.source, hint
            assert cell.metadata == ref.metadata, hint
        _check_outputs(name, nb, runner)
        # written by run.py --commit: normalizing it again changes nothing
        assert text == runner.text(runner.normalize(nb, name)), f"{name}: not normalized"


def test_timing_mask():
    runner = _runner()
    masked = runner.mask("fit in 0.8 s; 40 rounds (26.8 s, best 96%), 12 ms, s=0 0.789  s=5 1")
    assert masked == "fit in [time] s; 40 rounds ([time] s, best 96%), [time] ms, s=0 0.789  s=5 1"
    assert runner.mask(f"kernel: {sys.prefix}/bin/python") == "kernel: <sys.prefix>/bin/python"


@pytest.mark.notebooks
@pytest.mark.slow
def test_analytic_fl_in_five_minutes(monkeypatch):
    info = _execute("analytic_fl_in_five_minutes.ipynb", monkeypatch)
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
    info = _execute("nu_step_meta_learning.ipynb", monkeypatch)
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
