"""Execute the tutorial notebooks top to bottom with nbclient and report time and key numbers.

``.venv/bin/python notebooks/run.py`` runs every ``*.ipynb`` here (or the ones named), in this
folder, with the ``python3`` kernel, ``MPLBACKEND=Agg`` and Flower's telemetry off. The
committed notebooks are not modified; ``--save DIR`` writes the executed copies (with outputs) to
``DIR``. The run fails when a cell raises, or when the kernel's interpreter is not this one
(``sys.prefix`` printed by the notebook's summary cell).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
SUMMARY_TAG = "summary"
SUMMARY_PREFIX = "SUMMARY "
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


def execute(path: Path, timeout: int = 600) -> tuple[nbformat.NotebookNode, float]:
    """Run notebook ``path`` in its folder; return the executed notebook and the wall time (s).

    Parameters
    ----------
    path : Path
        The ``.ipynb`` file (left unchanged on disk).
    timeout : int
        Seconds allowed per cell.

    """
    # headless: the inline backend renders with Agg and puts the figures in the outputs
    # (MPLBACKEND=Agg would render nothing: plt.show() is a no-op there)
    os.environ["MPLBACKEND"] = INLINE_BACKEND
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",  # jupyter_client starts it with this interpreter (sys.executable)
        resources={"metadata": {"path": str(path.parent)}},
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


def main(argv: list[str] | None = None) -> int:
    """Run the notebooks; exit status 0 when all ran on this interpreter."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="file names in notebooks/ (default: all)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    parser.add_argument("--save", default="", help="folder for the executed copies")
    args = parser.parse_args(argv)
    names = args.notebooks or sorted(p.name for p in HERE.glob("*.ipynb"))
    status = 0
    for name in names:
        path = HERE / Path(name).name
        nb, seconds = execute(path, args.timeout)
        info = summary(nb)
        same = Path(info["kernel-prefix"]).resolve() == Path(sys.prefix).resolve()
        print(f"{name}: {seconds:.1f} s, kernel prefix {info['kernel-prefix']}", flush=True)
        if not same:
            print(f"  the kernel ran outside this environment ({sys.prefix})", file=sys.stderr)
            status = 1
        if args.save:
            out = Path(args.save)
            out.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out / path.name)
    return status


if __name__ == "__main__":
    sys.exit(main())
