"""Start and stop Flower processes for local runs: ``flwr run`` and a loopback deployment.

Everything started here runs with a private, unique base directory (``FLWR_HOME``, ``RAY_TMPDIR``)
and is stopped by process id afterwards: the processes found by that unique directory in their
command line or environment (the SuperLink that ``flwr run`` starts detached, the simulation
process, Ray's workers), never by name. Test and benchmark tooling, not part of the package: the
tests import it as ``flower_processes`` (pytest puts ``tests/`` on ``sys.path``), ``benchmarks/``
after adding ``tests/`` to ``sys.path``; ``docs/deployment.md`` shows its use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_dir(base: Path | str) -> Path:
    """Ray's temp dir for ``base``: short (Ray's socket paths must stay under 108 bytes)."""
    digest = hashlib.sha1(str(Path(base).resolve()).encode()).hexdigest()[:10]
    return Path("/tmp") / f"ray-fa-{digest}"


def flower_env(base: Path) -> dict[str, str]:
    """Environment for offline Flower processes owned by ``base`` (created if needed).

    Sets ``FLWR_HOME`` and ``RAY_TMPDIR`` under ``base``, disables telemetry, update checks and
    runtime dependency installation, gives ``flwr run``'s managed local SuperLink free ports, and
    puts this interpreter's ``bin`` first on ``PATH``.
    """
    base = Path(base).resolve()
    (base / "home").mkdir(parents=True, exist_ok=True)
    ray_dir(base).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(base / "home"),
            "RAY_TMPDIR": str(ray_dir(base)),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "PYTHONUNBUFFERED": "1",
            # Flower's CLI starts `flower-superlink` & co. by name: use this environment's
            "PATH": os.pathsep.join([str(BIN), env.get("PATH", "")]),
        }
    )
    return env


def format_run_config(config: Mapping[str, Any]) -> str:
    """``--run-config`` string: ``key=value`` pairs, strings single-quoted, booleans lower case."""
    parts = []
    for key, value in config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = "'" + str(value).replace("'", "") + "'"
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def owned_processes(base: Path | str) -> list[int]:
    """Pids (not this process) whose command line or environment names ``base`` or its Ray dir."""
    needles = (str(Path(base).resolve()).encode(), str(ray_dir(base)).encode())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        text = _read(entry / "cmdline") + b"\0" + _read(entry / "environ")
        if any(n in text for n in needles):
            pids.append(int(entry.name))
    return pids


def stop_owned_processes(base: Path | str, grace: float = 10.0) -> list[int]:
    """SIGTERM the processes owned by ``base``, SIGKILL what is left after ``grace`` s.

    Also removes ``base``'s Ray temp dir. Returns the pids that were signalled.
    """
    pids = owned_processes(base)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and owned_processes(base):
        time.sleep(0.2)
    for pid in owned_processes(base):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(ray_dir(base), ignore_errors=True)
    return pids


def flwr_run(
    app_dir: Path,
    env: Mapping[str, str],
    run_config: Mapping[str, Any] | None = None,
    connection: str | None = None,
    timeout: float = 300.0,
) -> subprocess.CompletedProcess:
    """``flwr run <app_dir> [connection] --stream --run-config ...``; waits for the run to end.

    Note that ``flwr run`` migrates a ``[tool.flwr.federations]`` table of ``app_dir``'s
    ``pyproject.toml`` into ``$FLWR_HOME/config.toml`` and comments it out in place: run it on a
    copy of the app.
    """
    cmd = [str(BIN / "flwr"), "run", str(app_dir)]
    if connection:
        cmd.append(connection)
    cmd.append("--stream")
    if run_config:
        cmd += ["--run-config", format_run_config(run_config)]
    return subprocess.run(
        cmd, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
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
        # Flower 1.41's SuperLink serves the Fleet, Control and Runtime APIs on one HTTP port
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
        home = Path(self.env["FLWR_HOME"])
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "deployment"\n\n'
            f'[superlink.{self.connection}]\naddress = "127.0.0.1:{p["superlink"]}"\ninsecure = true\n'
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
