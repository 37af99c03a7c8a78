"""Start and stop Flower processes for local runs: ``flwr run`` and a loopback deployment.

Everything started here runs with a private, unique base directory (``FLWR_HOME``, ``RAY_TMPDIR``)
and is stopped by process id afterwards: the processes found by that unique directory in their
command line or environment (the SuperLink that ``flwr run`` starts detached, the simulation
process, Ray's workers), never by name. Test and benchmark tooling, not part of the package: the
tests import it as ``flower_processes`` (pytest puts ``tests/`` on ``sys.path``), ``benchmarks/``
after adding ``tests/`` to ``sys.path``; ``docs/deployment.md`` shows its use. The environment,
``flwr run`` and process-ownership helpers are those of the main job (``flwr_analytic.simulate``).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr_analytic.simulate import (
    LOCAL_CONNECTION,
    format_config,
    free_port,
    offline_env,
    owned_processes,
    ray_dir,
    run_app,
    simulation_config,
    stop_owned_processes,
    write_flower_config,
)

BIN = Path(sys.executable).parent
format_run_config = format_config

__all__ = [
    "LOCAL_CONNECTION",
    "LocalDeployment",
    "flower_env",
    "flwr_run",
    "format_run_config",
    "free_port",
    "owned_processes",
    "ray_dir",
    "simulation_config",
    "stop_owned_processes",
]


def flower_env(base: Path | str) -> dict[str, str]:
    """Environment for offline Flower processes owned by ``base``, with a local connection.

    :func:`flwr_analytic.simulate.offline_env` (private ``FLWR_HOME`` and ``RAY_TMPDIR``, no
    telemetry, update checks or dependency installation, free ports for the managed local
    SuperLink) plus ``$FLWR_HOME/config.toml`` holding the SuperLink connection
    ``local-simulation`` (``address = ":local:"``), the default of ``flwr run``.
    """
    env = offline_env(base)
    write_flower_config(env["FLWR_HOME"])
    return env


def flwr_run(
    app_dir: Path | str,
    env: Mapping[str, str],
    run_config: Mapping[str, Any] | None = None,
    connection: str | None = None,
    timeout: float = 300.0,
    num_supernodes: int | None = None,
) -> subprocess.CompletedProcess:
    """``flwr run <app_dir> <connection> --stream --run-config ...``; waits for the run to end.

    ``connection`` defaults to ``local-simulation``; ``num_supernodes`` (with 2 CPUs per client)
    goes to ``--federation-config``. ``stdout`` holds stdout and stderr interleaved.
    """
    return run_app(
        app_dir,
        env,
        connection=connection or LOCAL_CONNECTION,
        run_config=run_config,
        federation_config=simulation_config(num_supernodes) if num_supernodes else None,
        timeout=timeout,
    )


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


class LocalDeployment:
    """A real Flower deployment on loopback: one SuperLink and ``num_nodes`` SuperNodes.

    ``flower-superlink --insecure`` and ``flower-supernode --insecure`` processes with distinct
    127.0.0.1 ports; SuperNode ``k`` gets ``--node-config "partition-id=k num-partitions=N"``. A
    SuperLink connection named :attr:`connection` is written to ``$FLWR_HOME/config.toml`` so that
    ``flwr run <app> deployment`` targets it. Use as a context manager: every process is stopped on
    exit, also on failure.
    """

    connection = "deployment"

    def __init__(self, base: Path, num_nodes: int = 3, startup_timeout: float = 60.0) -> None:
        self.base = Path(base).resolve()
        self.env = flower_env(self.base)
        self.num_nodes = num_nodes
        self.startup_timeout = startup_timeout
        # Flower 1.41/1.42's SuperLink serves the Fleet, Control and Runtime APIs on one HTTP port
        self.ports = {"superlink": free_port(), "nodes": [free_port() for _ in range(num_nodes)]}
        self.processes: list[subprocess.Popen] = []
        self.logs = self.base / "logs"

    def _spawn(self, name: str, cmd: list[str]) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        out = (self.logs / f"{name}.log").open("w")
        self.processes.append(
            subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        )

    def start(self) -> LocalDeployment:
        """Start the SuperLink, wait for it, start the SuperNodes, write the CLI connection."""
        p = self.ports
        self._spawn(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(p["superlink"]),
            ],
        )
        _wait_port(p["superlink"], self.startup_timeout)
        for k, port in enumerate(p["nodes"]):
            self._spawn(
                f"supernode-{k}",
                [
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{p['superlink']}",
                    "--node-config",
                    f"partition-id={k} num-partitions={self.num_nodes}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
            )
        address = f"127.0.0.1:{p['superlink']}"
        write_flower_config(
            self.env["FLWR_HOME"], {self.connection: {"address": address, "insecure": True}}
        )
        time.sleep(2.0)  # the strategy itself waits until `min-nodes` SuperNodes are connected
        self.check_alive()
        return self

    def check_alive(self) -> None:
        """Raise ``RuntimeError`` naming the first process that exited."""
        for proc in self.processes:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; see {self.logs}")

    def run(
        self, app_dir: Path, run_config: Mapping[str, Any] | None = None, timeout: float = 300.0
    ) -> subprocess.CompletedProcess:
        """``flwr run app_dir deployment --stream`` against this SuperLink."""
        self.check_alive()
        return flwr_run(app_dir, self.env, run_config, self.connection, timeout)

    def stop(self) -> None:
        """Stop every process started here (SuperLink, SuperNodes and their app processes)."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        stop_owned_processes(self.base)

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
