"""The scale benchmark's parent side: run one child process and sample its process tree's memory.

:func:`run_child` starts ``scale_runs.py`` on a spec in a private directory (its own ``FLWR_HOME``
and Ray temp dir), samples the resident and proportional memory of the child, its descendants and
every process owned by that directory (Ray's GCS, raylet and workers) every ``interval`` seconds,
stops whatever is left by process id, and returns the child's result with the peaks and timeline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # flower_processes

RUNS = Path(__file__).resolve().parent / "scale_runs.py"
GIB = 2**30


def _tree(pid: int, base: Path) -> list[Any]:
    """The child, its descendants, and any process owned by its Flower/Ray directory."""
    import psutil
    from flower_processes import owned_processes

    procs: dict[int, Any] = {}
    try:
        root = psutil.Process(pid)
        procs[pid] = root
        for p in root.children(recursive=True):
            procs[p.pid] = p
    except psutil.NoSuchProcess:
        pass
    for other in owned_processes(base):
        if other not in procs:
            try:
                procs[other] = psutil.Process(other)
            except psutil.NoSuchProcess:
                pass
    return list(procs.values())


def _child_env(base: Path) -> dict[str, str]:
    """The current environment plus the Flower/Ray variables owned by ``base``; one BLAS thread."""
    from flower_processes import flower_env

    owned = {k: v for k, v in flower_env(base).items() if k.startswith(("FLWR_", "RAY_"))}
    return {
        **os.environ,
        **owned,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_NUM_THREADS": "1",
    }


def run_child(kind: str, spec: dict[str, Any], log_dir: Path, interval: float = 0.5) -> dict:
    """Run ``kind`` in a child process; sample its process tree's RSS every ``interval`` s."""
    import psutil
    from flower_processes import stop_owned_processes

    with tempfile.TemporaryDirectory(prefix="flwr-scale-") as tmp:
        base = Path(tmp)
        spec = {**spec, "base": str(base), "kind": kind}
        (base / "spec.json").write_text(json.dumps(spec))
        log_dir.mkdir(parents=True, exist_ok=True)
        tag = f"{kind}-{spec.get('runtime', '')}-{spec.get('aggregation', '')}-{spec.get('clients', '')}"
        log_path = log_dir / f"{tag}.log"
        t0 = time.perf_counter()
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, str(RUNS), str(base / "spec.json")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(base),
            )
            # (time, Σ RSS, the child's own RSS, number of processes, Σ PSS): RSS counts pages
            # shared between processes (Ray's object store, libraries) once per process, PSS
            # splits them; Σ PSS is the tree's real footprint, Σ RSS an upper bound
            timeline: list[tuple[float, float, float, int, float]] = []
            try:
                while proc.poll() is None:
                    total = own = pss = 0.0
                    procs = _tree(proc.pid, base)
                    for p in procs:
                        try:
                            info = p.memory_full_info()
                        except (psutil.NoSuchProcess, psutil.AccessDenied):
                            continue
                        total += info.rss
                        pss += getattr(info, "pss", info.rss)
                        own += info.rss if p.pid == proc.pid else 0
                    timeline.append((time.time(), total / GIB, own / GIB, len(procs), pss / GIB))
                    time.sleep(interval)
            finally:
                if proc.poll() is None:
                    proc.kill()
                stop_owned_processes(base)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"child {tag} failed (exit {proc.returncode}); log tail:\n{tail}")
        result = json.loads((base / "result.json").read_text())
        if (base / "model.npz").exists():
            with np.load(base / "model.npz") as z:
                result["model"] = {k: z[k] for k in z.files}
    result["process-time"] = elapsed
    result["peak-rss-gib"] = max((t[1] for t in timeline), default=0.0)
    result["peak-rss-server-gib"] = max((t[2] for t in timeline), default=0.0)
    result["max-processes"] = max((t[3] for t in timeline), default=0)
    result["peak-pss-gib"] = max((t[4] for t in timeline), default=0.0)
    result["timeline"] = timeline
    result["log"] = str(log_path)
    return result
