"""Execute the tutorial notebooks with nbclient; regenerate the committed, executed copies.

``.venv/bin/python notebooks/run.py`` runs every ``*.ipynb`` here (or the ones named), in this
folder, with the ``python3`` kernel of this interpreter, matplotlib's headless inline backend and
Flower's telemetry off, and prints the time of each. Stored outputs are cleared before a run, so a
run never depends on them; the files are not modified (``--save DIR`` writes the executed copies,
unnormalized, to ``DIR``). A run fails when a cell raises, or when the kernel's interpreter is not
this one (``sys.prefix`` printed by the notebook's summary cell).

``.venv/bin/python notebooks/run.py --commit`` (what ``notebooks/_build.py`` runs) regenerates the
committed notebooks: it renders each from the cell sources in ``_build.py``, executes it and
writes it in place in a normalized form, so that re-running it on the same machine changes
nothing but the figures that plot wall time:

- notebook and cell metadata are exactly what ``_build.py`` renders: the kernel's
  ``language_info`` (Python version) and nbclient's per-cell ``execution`` timestamps are dropped;
- execution counts are 1..n over the code cells; stream outputs are merged per cell
  (nbclient's ``coalesce_streams``: where a print splits into messages depends on timing);
- every wall-clock time printed as ``<number> s`` (or ``ms`` / ``sec`` / ``seconds``) is
  replaced by ``[time] s`` (``TIMING``), and the paths of this interpreter's prefix, of the
  repository and of the home folder by ``<sys.prefix>``, ``<repo>`` and ``~``;
- the outputs of cells tagged ``volatile`` are not saved: the ``summary`` cells (their
  ``SUMMARY {json}`` line holds raw timings) carry that tag; they are executed all the same;
- figures (``image/png``) are kept, so the plots show on the repository page.

The cell sources of the committed files must equal ``_build.py``'s, every code cell must have run
and no timing may remain: ``tests/test_notebooks.py`` checks that (fast), and re-executes both
notebooks from their sources in CI (``-m notebooks``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SUMMARY_TAG = "summary"
VOLATILE_TAG = "volatile"  # outputs of cells with this tag are not committed
SUMMARY_PREFIX = "SUMMARY "
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
# a wall-clock time as the notebooks print it: "0.8 s", "(13.4 s)", "26.8 s;" ("s=5" is not one)
TIMING = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?= ?(?:s|ms|sec|secs|seconds)(?![\w=]))")
TIME_PLACEHOLDER = "[time]"


def build() -> ModuleType:
    """``notebooks/_build.py``, the cell sources of every notebook, as a module."""
    spec = importlib.util.spec_from_file_location("notebooks_build", HERE / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fresh(name: str) -> nbformat.NotebookNode:
    """Notebook ``name`` as ``_build.py`` renders it: the committed sources, no outputs."""
    return nbformat.reads(build().render(name), as_version=4)


def execute(
    notebook: Path | nbformat.NotebookNode, timeout: int = 600
) -> tuple[nbformat.NotebookNode, float]:
    """Run a notebook in this folder from its sources; return the executed copy and the time (s).

    Parameters
    ----------
    notebook : Path or NotebookNode
        An ``.ipynb`` file (left unchanged on disk) or a notebook (left unchanged); stored
        outputs are cleared before running.
    timeout : int
        Seconds allowed per cell.

    """
    # headless: the inline backend renders with Agg and puts the figures in the outputs
    # (MPLBACKEND=Agg would render nothing: plt.show() is a no-op there)
    os.environ["MPLBACKEND"] = INLINE_BACKEND
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    if isinstance(notebook, nbformat.NotebookNode):
        nb = copy.deepcopy(notebook)
    else:
        nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",  # jupyter_client starts it with this interpreter (sys.executable)
        resources={"metadata": {"path": str(HERE)}},
        coalesce_streams=True,  # one stdout output per cell, whatever the message timing
    )
    start = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - start


def summary(nb: nbformat.NotebookNode) -> dict[str, Any]:
    """The JSON printed as ``SUMMARY {...}`` by the cell tagged ``summary``."""
    for cell in nb.cells:
        if SUMMARY_TAG not in cell.get("metadata", {}).get("tags", []):
            continue
        for output in cell.get("outputs", []):
            for line in output.get("text", "").splitlines():
                if line.startswith(SUMMARY_PREFIX):
                    return json.loads(line[len(SUMMARY_PREFIX) :])
    raise ValueError("no 'SUMMARY {...}' line in the output of the cell tagged 'summary'")


def mask(text: str) -> str:
    """``text`` with wall-clock times and local paths replaced by stable placeholders."""
    for path, placeholder in (
        (Path(sys.prefix).resolve(), "<sys.prefix>"),
        (Path(sys.prefix), "<sys.prefix>"),
        (REPO, "<repo>"),
        (Path.home(), "~"),
    ):
        text = text.replace(str(path), placeholder)
    return TIMING.sub(TIME_PLACEHOLDER, text)


def normalize(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """The committed form of executed notebook ``nb`` (a copy; see the module docstring)."""
    reference = fresh(name)
    out = copy.deepcopy(nb)
    if [c.source for c in out.cells] != [c.source for c in reference.cells]:
        raise ValueError(f"{name}: the cells differ from _build.py's")
    out.metadata = reference.metadata
    count = 0
    for cell, ref in zip(out.cells, reference.cells):
        cell.metadata = copy.deepcopy(ref.metadata)
        if cell.cell_type != "code":
            continue
        count += 1
        cell.execution_count = count
        if VOLATILE_TAG in cell.metadata.get("tags", []):
            cell.outputs = []
        for output in cell.outputs:
            if output.output_type == "stream":
                output.text = mask(output.text)
            if output.output_type == "execute_result":
                output.execution_count = count
            data = output.get("data", {})
            if "text/plain" in data:
                data["text/plain"] = mask(data["text/plain"])
    nbformat.validate(out)
    return out


def text(nb: nbformat.NotebookNode) -> str:
    """The file contents of notebook ``nb`` (as ``_build.render`` writes them)."""
    return nbformat.writes(nb) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run (or with ``--commit`` regenerate) the notebooks; 0 when all ran on this interpreter."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="file names in notebooks/ (default: all)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    parser.add_argument("--save", default="", help="folder for the executed copies")
    parser.add_argument(
        "--commit",
        action="store_true",
        help="render from _build.py, execute and write the normalized notebooks in place",
    )
    args = parser.parse_args(argv)
    known = (
        sorted(build().NOTEBOOKS) if args.commit else sorted(p.name for p in HERE.glob("*.ipynb"))
    )
    names = [Path(n).name for n in args.notebooks] or known
    status = 0
    for name in names:
        nb, seconds = execute(fresh(name) if args.commit else HERE / name, args.timeout)
        info = summary(nb)
        same = Path(info["kernel-prefix"]).resolve() == Path(sys.prefix).resolve()
        print(f"{name}: {seconds:.1f} s, kernel prefix {info['kernel-prefix']}", flush=True)
        if not same:
            print(f"  the kernel ran outside this environment ({sys.prefix})", file=sys.stderr)
            status = 1
            continue
        if args.save:
            out = Path(args.save)
            out.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out / name)
        if args.commit:
            committed = normalize(nb, name)
            (HERE / name).write_text(text(committed), encoding="utf-8")
            figures = sum(
                "image/png" in o.get("data", {})
                for c in committed.cells
                for o in c.get("outputs", [])
            )
            size = (HERE / name).stat().st_size
            print(f"  wrote {HERE / name} ({size / 1e3:.0f} kB, {figures} figures)", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
