"""The main job through Flower: FedACnnL + pFedACnnL on digits with 20 simulated SuperNodes (Ray).

Runs the same ``ServerApp`` / ``ClientApp`` as ``apps/fedacnnl`` with Flower's simulation engine
(``flwr.simulation.run_simulation``, Ray backend), offline, in a private temporary ``FLWR_HOME``;
prints global vs pFedACnnL-personalized accuracy, bytes and time per round, and stops every process
it started. ``flwr-analytic-simulate --help`` lists the options.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from flwr_analytic.demo import print_headline


def _ray_dir(base: Path) -> Path:
    """Ray's temp dir for ``base``: short, as Ray's socket paths must stay under 108 bytes."""
    return Path("/tmp") / f"ray-fa-{hashlib.sha1(str(base).encode()).hexdigest()[:10]}"


def _use_offline_flower(base: Path) -> None:
    """Point Flower and Ray at ``base`` (``FLWR_HOME``, ``RAY_TMPDIR``), with no network access.

    Telemetry, update checks and runtime dependency installation are turned off.
    """
    (base / "home").mkdir(parents=True, exist_ok=True)
    _ray_dir(base).mkdir(parents=True, exist_ok=True)
    os.environ.update(
        {
            "FLWR_HOME": str(base / "home"),
            "RAY_TMPDIR": str(_ray_dir(base)),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
    )


def _read_or_empty(path: Path) -> bytes:
    """The bytes of ``path``, or none when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError:  # the process is gone, or not ours to read
        return b""


def _processes_of(base: Path) -> list[int]:
    """Pids (not this one) whose command line or environment names ``base`` or its Ray dir."""
    needles = (str(base).encode(), str(_ray_dir(base)).encode())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        text = _read_or_empty(entry / "cmdline") + b"\0" + _read_or_empty(entry / "environ")
        if any(n in text for n in needles):
            pids.append(int(entry.name))
    return pids


def _stop_processes_of(base: Path, grace: float = 10.0) -> None:
    """Stop what this run started (Ray's services and workers inherit ``RAY_TMPDIR``), by id.

    SIGTERM, then SIGKILL for what is left after ``grace`` s; removes the Ray temp dir.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _processes_of(base):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and time.monotonic() < deadline and _processes_of(base):
            time.sleep(0.2)
    shutil.rmtree(_ray_dir(base), ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    """Run the simulation; returns the run summary written by the server app."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-clients", type=int, default=20)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--scheme", default="label-pca")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="", help="where to keep the results JSON")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="flwr-analytic-") as tmp:
        base = Path(tmp).resolve()
        _use_offline_flower(base)
        from flwr.simulation import run_simulation

        from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
        from flwr_analytic.strategies.fedacnnl_server import make_fedacnnl_server_app

        results = Path(args.results) if args.results else Path(tmp) / "results.json"
        cfg = {
            "dataset": args.dataset,
            "partitioner": "dirichlet",
            "dirichlet-alpha": args.alpha,
            "model": args.model,
            "scheme": args.scheme,
            "seed": args.seed,
            "min-nodes": args.num_clients,
            "results-path": str(results),
        }
        start = time.perf_counter()
        try:
            run_simulation(
                server_app=make_fedacnnl_server_app(cfg),
                client_app=make_fedacnnl_client_app(run_config=cfg),
                num_supernodes=args.num_clients,
                backend_config={"client_resources": {"num_cpus": 2, "num_gpus": 0.0}},
            )
        finally:
            _stop_processes_of(base)
        summary = json.loads(results.read_text())
    wall = time.perf_counter() - start
    print(
        f"\nFedACnnL through Flower's simulation: {args.dataset}, {summary['num-nodes']} SuperNodes, "
        f"Dirichlet({args.alpha}), {summary['architecture']} ({summary['layers']} layer rounds)"
    )
    print_headline(
        summary["global-accuracy"],
        summary["personal-accuracy"],
        f"bytes sent {summary['bytes-sent'] / 1e6:.2f} MB, "
        f"received {summary['bytes-received'] / 1e6:.2f} MB; "
        f"server wall time {summary['wall-time']:.1f} s (with Ray start-up {wall:.1f} s)",
        measure="test accuracy",
        personalized="pFedACnnL personalized",
    )
    return summary


def cli() -> None:
    """Console entry point ``flwr-analytic-simulate``."""
    main()


if __name__ == "__main__":
    cli()
