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

import datetime
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
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
    "StreamedRun",
    "TLSFiles",
    "descendants",
    "flower_env",
    "flwr_run",
    "format_run_config",
    "free_port",
    "owned_processes",
    "ray_dir",
    "simulation_config",
    "stop_owned_processes",
    "write_node_key",
    "write_tls_files",
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


def descendants(pid: int) -> list[int]:
    """Process ids of every descendant of ``pid`` (children first found by ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children.get(child, []))
    return out


# ------------------------------------------------------------------------------ TLS and node keys
@dataclass(frozen=True)
class TLSFiles:
    """PEM files of a test CA and of a SuperLink certificate it signed (``localhost``, 127.0.0.1)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def write_tls_files(directory: Path | str, days: int = 2) -> TLSFiles:
    """Write a self-signed CA and a server certificate for ``localhost`` / ``127.0.0.1``.

    ``flower-superlink --ssl-ca-certfile ca.pem --ssl-certfile server.pem --ssl-keyfile
    server.key``; SuperNodes verify it with ``--root-certificates ca.pem`` and ``flwr`` with
    ``root-certificates = "ca.pem"`` in its connection. Test material: keys are not encrypted.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("flwr-analytic test CA"))
        .issuer_name(name("flwr-analytic test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    files.server_key.chmod(0o600)
    return files


def write_node_key(directory: Path | str, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (NIST P-384, OpenSSH format): ``(private, public)``.

    As ``ssh-keygen -t ecdsa -b 384 -N "" -f <name>``: the private key goes to
    ``flower-supernode --auth-supernode-private-key``, the public one to ``flwr supernode
    register``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return private, public


# ------------------------------------------------------------------------------- streamed runs
class StreamedRun:
    """``flwr run ... --stream`` in the background; its output is collected line by line.

    :meth:`wait_for` blocks until a line matches (to act in the middle of a run: kill a node after
    layer 1, start another); :meth:`wait` returns the ``CompletedProcess``. :meth:`stop` kills
    ``flwr run`` by its id (the run itself is the SuperLink's: stop the deployment).
    """

    def __init__(self, cmd: list[str], env: Mapping[str, str], timeout: float) -> None:
        self.cmd, self.lines, self.started = cmd, [], time.monotonic()
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._timer = threading.Timer(timeout, self.proc.kill)
        self._timer.start()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        """Everything printed so far."""
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first match of the regular expression ``pattern`` in a line of the output.

        Raises ``TimeoutError`` (with the output's tail) after ``timeout`` s or when the run ended
        without such a line.
        """
        regex, deadline, seen = re.compile(pattern), time.monotonic() + timeout, 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                left = deadline - time.monotonic()
                ended = not self._reader.is_alive()
                if left <= 0 or ended:
                    tail = "".join(self.lines[-40:])
                    why = "the run ended" if ended else f"{timeout:.0f} s passed"
                    raise TimeoutError(f"no line matches {pattern!r} ({why}):\n{tail}")
                self._changed.wait(min(left, 1.0))

    def wait(self) -> subprocess.CompletedProcess:
        """Wait for ``flwr run`` to end (or be killed by the timeout); its result."""
        try:
            self.proc.wait()
            self._reader.join(timeout=10)
        finally:
            self._timer.cancel()
        self.wall = time.monotonic() - self.started
        return subprocess.CompletedProcess(self.cmd, self.proc.returncode, self.output, "")

    def stop(self) -> None:
        """Kill ``flwr run`` if it still runs."""
        self._timer.cancel()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _node_config_text(config: Mapping[str, Any] | str) -> str:
    """``--node-config`` text: ``key=value`` pairs, strings quoted (TOML values)."""
    return config if isinstance(config, str) else format_run_config(config)


class LocalDeployment:
    """A real Flower deployment on loopback: one SuperLink and ``num_nodes`` SuperNodes.

    ``flower-superlink --insecure`` and ``flower-supernode --insecure`` processes with distinct
    127.0.0.1 ports; SuperNode ``k`` gets ``--node-config "partition-id=k num-partitions=N"``. A
    SuperLink connection named :attr:`connection` is written to ``$FLWR_HOME/config.toml`` so that
    ``flwr run <app> deployment`` targets it. Use as a context manager: every process is stopped on
    exit, also on failure.

    Options for fault tests (defaults keep the behaviour above): ``node_configs`` adds keys to
    node ``k``'s node config (``{2: {"data-path": "/missing.npz"}}``); ``tls`` serves the SuperLink
    over TLS with these files (:func:`write_tls_files`; SuperNodes and ``flwr`` verify it with the
    CA); ``supernode_auth`` enables SuperNode authentication: a key pair per node
    (:func:`write_node_key`) is registered with ``flwr supernode register`` before the node starts
    with ``--auth-supernode-private-key``; ``database`` is the SuperLink's ``--database`` file (its
    state survives :meth:`kill_superlink` + :meth:`restart_superlink`). :meth:`start_node`,
    :meth:`kill_node`, :meth:`restart_node` and :meth:`node_id` act on single nodes (by name:
    ``supernode-<k>`` or the name given to :meth:`start_node`), :meth:`log` reads a process's log
    (``superlink`` or a node), :meth:`flwr` runs a ``flwr`` command against this deployment and
    :meth:`start_run` runs ``flwr run`` in the background (a :class:`StreamedRun`). Used by
    ``tests/test_deployment_faults.py``.
    """

    connection = "deployment"

    def __init__(
        self,
        base: Path,
        num_nodes: int = 3,
        startup_timeout: float = 60.0,
        *,
        node_configs: Mapping[int, Mapping[str, Any]] | None = None,
        tls: TLSFiles | None = None,
        supernode_auth: bool = False,
        database: Path | str | None = None,
    ) -> None:
        self.base = Path(base).resolve()
        self.env = flower_env(self.base)
        self.num_nodes = num_nodes
        self.startup_timeout = startup_timeout
        self.node_configs = dict(node_configs or {})
        self.tls, self.supernode_auth = tls, supernode_auth
        self.database = None if database is None else Path(database)
        # Flower 1.41/1.42's SuperLink serves the Fleet, Control and Runtime APIs on one HTTP port
        self.ports = {"superlink": free_port(), "nodes": [free_port() for _ in range(num_nodes)]}
        self.processes: list[subprocess.Popen] = []
        self.nodes: dict[str, subprocess.Popen] = {}
        self.node_args: dict[str, tuple[dict[str, Any] | str, Path | None, int]] = {}
        self.node_logs: dict[str, Path] = {}
        self.unwatched: set[str] = set()  # nodes killed or expected to exit
        self.logs = self.base / "logs"
        self.keys = self.base / "keys"

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_file = self.logs / f"{name}.log"
        for i in range(1, 100):  # a restarted node writes a new log: supernode-2.1.log, ...
            if not log_file.exists():
                break
            log_file = self.logs / f"{name}.{i}.log"
        out = log_file.open("w")
        proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        self.processes.append(proc)
        self.node_logs[name] = log_file
        if name == "superlink":
            self.superlink = proc
        else:
            self.nodes[name] = proc
        return proc

    def _security(self) -> list[str]:
        return ["--insecure"] if self.tls is None else []

    @property
    def address(self) -> str:
        """The SuperLink's address (Fleet, Control and Runtime APIs)."""
        return f"127.0.0.1:{self.ports['superlink']}"

    def _start_superlink(self) -> None:
        cmd = [str(BIN / "flower-superlink"), *self._security()]
        if self.tls is not None:
            cmd += ["--ssl-ca-certfile", str(self.tls.ca_cert)]
            cmd += ["--ssl-certfile", str(self.tls.server_cert)]
            cmd += ["--ssl-keyfile", str(self.tls.server_key)]
        if self.supernode_auth:
            cmd.append("--enable-supernode-auth")
        if self.database is not None:
            cmd += ["--database", str(self.database)]
        port = self.ports["superlink"]
        self._spawn("superlink", [*cmd, "--host", "127.0.0.1", "--port", str(port)])
        _wait_port(port, self.startup_timeout)

    def kill_superlink(self, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to the SuperLink and the processes it started (its ServerApp): a crash."""
        proc = self.superlink
        pids = [proc.pid, *descendants(proc.pid)] if proc.poll() is None else []
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
        return pids

    def restart_superlink(self) -> subprocess.Popen:
        """Start the SuperLink again on its port, with its flags (``--database``: its state)."""
        if self.superlink.poll() is None:
            raise ValueError("the SuperLink is still running")
        self._start_superlink()
        return self.superlink

    def start(self) -> LocalDeployment:
        """Start the SuperLink, wait for it, start the SuperNodes, write the CLI connection."""
        p = self.ports
        self._start_superlink()
        connection: dict[str, Any] = {"address": self.address}
        if self.tls is None:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(self.tls.ca_cert)
        write_flower_config(self.env["FLWR_HOME"], {self.connection: connection})
        for k, port in enumerate(p["nodes"]):
            config = {
                "partition-id": k,
                "num-partitions": self.num_nodes,
                **self.node_configs.get(k, {}),
            }
            key = self.register_key(f"supernode-{k}") if self.supernode_auth else None
            self._start(f"supernode-{k}", config, key, port)
        time.sleep(2.0)  # the strategy itself waits until `min-nodes` SuperNodes are connected
        self.check_alive()
        return self

    def register_key(self, name: str) -> Path:
        """Write a key pair for node ``name`` and register its public key; the private key."""
        private, public = write_node_key(self.keys, name)
        done = self.flwr(["supernode", "register", str(public), self.connection])
        if done.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed: {done.stdout}{done.stderr}")
        return private

    def flwr(self, args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        """``flwr <args>`` in this deployment's environment (e.g. ``["ls", "deployment"]``)."""
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def _start(
        self,
        name: str,
        node_config: Mapping[str, Any] | str,
        key: Path | None,
        port: int,
    ) -> subprocess.Popen:
        cmd = [str(BIN / "flower-supernode"), *self._security(), "--superlink", self.address]
        if self.tls is not None:
            cmd += ["--root-certificates", str(self.tls.ca_cert)]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        cmd += ["--node-config", _node_config_text(node_config)]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        stored = node_config if isinstance(node_config, str) else dict(node_config)
        self.node_args[name] = (stored, key, port)
        return self._spawn(name, cmd)

    def start_node(
        self,
        name: str,
        node_config: Mapping[str, Any] | str,
        key: Path | None = None,
        may_exit: bool = False,
    ) -> subprocess.Popen:
        """Start one more SuperNode ``name`` (e.g. a hostile one) with this node config.

        ``may_exit``: the node is expected to stop (e.g. refused by the SuperLink), so
        :meth:`check_alive` does not watch it.
        """
        if name in self.nodes and self.nodes[name].poll() is None:
            raise ValueError(f"node {name!r} is running")
        if may_exit:
            self.unwatched.add(name)
        return self._start(name, node_config, key, free_port())

    def kill_node(self, name: str, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to SuperNode ``name`` and every process it started (a machine dying).

        Returns the process ids signalled. With ``SIGKILL`` the SuperLink notices only when
        the node's heartbeats stop (Flower 1.42: within 2 × 30 s).
        """
        proc = self.nodes[name]
        self.unwatched.add(name)
        pids = [proc.pid, *descendants(proc.pid)] if proc.poll() is None else []
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if pids:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        return pids

    def restart_node(self, name: str) -> subprocess.Popen:
        """Start SuperNode ``name`` again with its node config and key (after :meth:`kill_node`)."""
        if self.nodes[name].poll() is None:
            raise ValueError(f"node {name!r} is still running")
        config, key, port = self.node_args[name]
        self.unwatched.discard(name)
        return self._start(name, config, key, port)

    def node_id(self, name: str, timeout: float = 60.0) -> int:
        """The node id SuperNode ``name`` logged (``SuperNode ID: ...``) in its current log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.node_logs[name].read_text(errors="replace")
            if match := re.search(r"SuperNode ID: (\d+)", text):
                return int(match.group(1))
            if self.nodes[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.nodes[name].returncode}:\n{text}")
            time.sleep(0.5)
        raise TimeoutError(f"{name} logged no node id in {timeout:.0f} s")

    def log(self, name: str) -> str:
        """The current log of ``superlink`` or of a SuperNode."""
        return self.node_logs[name].read_text(errors="replace")

    def check_alive(self) -> None:
        """Raise ``RuntimeError`` naming the first process that exited."""
        unwatched = {self.nodes[name] for name in self.unwatched}
        for proc in self.processes:
            if proc.poll() is not None and proc not in unwatched and self._current(proc):
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; see {self.logs}")

    def _current(self, proc: subprocess.Popen) -> bool:
        """Whether ``proc`` is the SuperLink or the latest process of a node (not a restarted one)."""
        return proc is self.superlink or any(p is proc for p in self.nodes.values())

    def run(
        self, app_dir: Path, run_config: Mapping[str, Any] | None = None, timeout: float = 300.0
    ) -> subprocess.CompletedProcess:
        """``flwr run app_dir deployment --stream`` against this SuperLink."""
        self.check_alive()
        return flwr_run(app_dir, self.env, run_config, self.connection, timeout)

    def start_run(
        self, app_dir: Path, run_config: Mapping[str, Any] | None = None, timeout: float = 300.0
    ) -> StreamedRun:
        """:meth:`run` in the background: a :class:`StreamedRun` (stopped with the deployment)."""
        self.check_alive()
        flwr = BIN / "flwr"
        cmd = [str(flwr), "run", str(app_dir), self.connection, "--stream"]
        if run_config:
            cmd += ["--run-config", format_run_config(run_config)]
        run = StreamedRun(cmd, self.env, timeout)
        self._runs = [*getattr(self, "_runs", []), run]
        return run

    def stop(self) -> None:
        """Stop every process started here (SuperLink, SuperNodes and their app processes)."""
        for run in getattr(self, "_runs", []):
            run.stop()
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
