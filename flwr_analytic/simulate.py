"""The main job through Flower: FedACnnL + pFedACnnL on digits with 20 simulated SuperNodes (Ray).

Runs the Flower app ``apps/fedacnnl`` with ``flwr run`` on a local simulation SuperLink (Flower's
supported simulation path; Ray backend, 2 CPUs per client), offline, in a private temporary
``FLWR_HOME``; streams the run's log, prints global vs pFedACnnL-personalized accuracy, bytes and
time, and stops every process it started. ``flwr-analytic-simulate --help`` lists the options.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr_analytic.demo import print_headline

#: The SuperLink connection written to the private ``$FLWR_HOME/config.toml``: Flower's managed
#: local SuperLink in simulation mode (started by ``flwr run``, stopped here by process id).
LOCAL_CONNECTION = "local-simulation"

#: ``apps/fedacnnl`` of a clone (``pip install -e``); an installed wheel writes it on the fly.
CLONE_APP = Path(__file__).resolve().parents[1] / "apps" / "fedacnnl"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class FlowerRunError(RuntimeError):
    """``flwr run`` failed, or the run ended without writing its results."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_dir(base: Path | str) -> Path:
    """Ray's temp dir for ``base``: short, as Ray's socket paths must stay under 108 bytes."""
    digest = hashlib.sha1(str(Path(base).resolve()).encode()).hexdigest()[:10]
    return Path("/tmp") / f"ray-fa-{digest}"


def offline_env(base: Path | str) -> dict[str, str]:
    """Environment for offline Flower processes owned by ``base`` (created if needed).

    ``FLWR_HOME`` and ``RAY_TMPDIR`` under ``base``; telemetry, update checks and runtime
    dependency installation off; free ports for the local SuperLink that ``flwr run`` starts;
    this interpreter's ``bin`` first on ``PATH`` (Flower starts ``flower-superlink`` by name);
    Ray's accelerator override at its announced future default (no ``FutureWarning``).
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
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "PYTHONUNBUFFERED": "1",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        }
    )
    return env


def write_flower_config(
    flwr_home: Path | str, connections: Mapping[str, Mapping[str, Any]] | None = None
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with SuperLink connections; the first is the default.

    Parameters
    ----------
    flwr_home : Path or str
        The private ``FLWR_HOME``.
    connections : mapping, optional
        Connection name -> its keys (``address``, ``insecure``, ...). Default: one
        :data:`LOCAL_CONNECTION` with ``address = ":local:"`` (Flower's managed local SuperLink).

    Returns
    -------
    Path
        The file written.
    """
    connections = connections or {LOCAL_CONNECTION: {"address": ":local:"}}
    lines = ["[superlink]", f'default = "{next(iter(connections))}"', ""]
    for name, keys in connections.items():
        lines.append(f"[superlink.{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
        lines.append("")
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def format_config(config: Mapping[str, Any]) -> str:
    """``--run-config`` / ``--federation-config`` string: ``key=value`` pairs (TOML values)."""
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


def simulation_config(num_supernodes: int, num_cpus: int = 2, num_gpus: float = 0.0) -> dict:
    """``--federation-config`` of a Ray simulation: ``num_supernodes`` nodes, resources per client."""
    return {
        "num-supernodes": num_supernodes,
        "backend": "ray",
        "client-resources-num-cpus": num_cpus,
        "client-resources-num-gpus": num_gpus,
    }


def app_pyproject() -> dict[str, Any]:
    """The ``pyproject.toml`` of ``apps/fedacnnl`` as a dict (run config = the table's defaults)."""
    from flwr_analytic.fedacnnl.config import DEFAULT_RUN_CONFIG

    return {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "fedacnnl-app",
            "version": "0.1.0",
            "description": "FedACnnL and pFedACnnL (Gu et al., arXiv 2502.06915) with flwr-analytic",
            "license": "Apache-2.0",
            "dependencies": ["flwr[simulation]>=1.41,<1.43", "flwr-analytic"],
        },
        "tool": {
            "hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
            "flwr": {
                "app": {
                    "publisher": "flwr-analytic",
                    "components": {
                        "serverapp": "fedacnnl_app.server_app:app",
                        "clientapp": "fedacnnl_app.client_app:app",
                    },
                    "config": dict(DEFAULT_RUN_CONFIG),
                }
            },
        },
    }


def write_app(dest: Path | str) -> Path:
    """Write the Flower app of ``apps/fedacnnl`` (wiring only) into ``dest``; returns ``dest``."""
    import tomli_w  # a dependency of flwr's CLI

    dest = Path(dest)
    package = dest / "fedacnnl_app"
    package.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(tomli_w.dumps(app_pyproject()))
    (package / "__init__.py").write_text('"""Flower app of FedACnnL / pFedACnnL."""\n')
    for side, factory in (("server", "strategies"), ("client", "clients")):
        (package / f"{side}_app.py").write_text(
            f"from flwr_analytic.{factory}.fedacnnl_{side} import make_fedacnnl_{side}_app\n\n"
            f"app = make_fedacnnl_{side}_app()\n"
        )
    return dest


def locate_app(workdir: Path | str) -> Path:
    """``apps/fedacnnl`` of the clone when there is one, else a copy written into ``workdir``."""
    if (CLONE_APP / "pyproject.toml").is_file():
        return CLONE_APP
    return write_app(Path(workdir) / "fedacnnl")


def _read_or_empty(path: Path) -> bytes:
    """The bytes of ``path``, or none when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError:  # the process is gone, or not ours to read
        return b""


def owned_processes(base: Path | str) -> list[int]:
    """Pids (not this one) whose command line or environment names ``base`` or its Ray dir."""
    needles = (str(Path(base).resolve()).encode(), str(ray_dir(base)).encode())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        text = _read_or_empty(entry / "cmdline") + b"\0" + _read_or_empty(entry / "environ")
        if any(n in text for n in needles):
            pids.append(int(entry.name))
    return pids


def stop_owned_processes(base: Path | str, grace: float = 10.0) -> list[int]:
    """Stop what a run in ``base`` started (the local SuperLink, the simulation, Ray), by id.

    SIGTERM, then SIGKILL for what is left after ``grace`` s; removes the Ray temp dir.
    Returns the pids that were signalled.
    """
    signalled = owned_processes(base)
    _signal(signalled, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and owned_processes(base):
        time.sleep(0.2)
    _signal(owned_processes(base), signal.SIGKILL)
    shutil.rmtree(ray_dir(base), ignore_errors=True)
    return signalled


def _signal(pids: list[int], sig: signal.Signals) -> None:
    """Send ``sig`` to each of ``pids`` that still exists."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def run_app(
    app: Path | str,
    env: Mapping[str, str],
    *,
    connection: str = LOCAL_CONNECTION,
    run_config: Mapping[str, Any] | None = None,
    federation_config: Mapping[str, Any] | None = None,
    echo: bool = False,
    timeout: float | None = None,
) -> subprocess.CompletedProcess:
    """``flwr run <app> <connection> --stream [--federation-config ...] [--run-config ...]``.

    Parameters
    ----------
    app : Path or str
        The Flower app's folder.
    env : mapping
        The environment (see :func:`offline_env`); its ``FLWR_HOME`` holds the connection.
    connection : str
        The SuperLink connection of ``$FLWR_HOME/config.toml``.
    run_config, federation_config : mapping, optional
        Run-config overrides; the simulation settings (see :func:`simulation_config`).
    echo : bool
        Print the output line by line as it arrives (ANSI colours dropped when not on a terminal).
    timeout : float, optional
        Kill ``flwr run`` after this many seconds.

    Returns
    -------
    subprocess.CompletedProcess
        With ``stdout`` = stdout and stderr interleaved.
    """
    flwr = Path(sys.executable).parent / "flwr"
    cmd = [str(flwr) if flwr.exists() else "flwr", "run", str(app), connection, "--stream"]
    if federation_config:
        cmd += ["--federation-config", format_config(federation_config)]
    if run_config:
        cmd += ["--run-config", format_config(run_config)]
    proc = subprocess.Popen(
        cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    timer = threading.Timer(timeout, proc.kill) if timeout else None
    if timer:
        timer.start()
    keep_colours = sys.stdout.isatty()
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if echo:
                print(line if keep_colours else _ANSI.sub("", line), end="", flush=True)
        proc.wait()
    finally:
        if timer:
            timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines), "")


#: Each option of ``flwr-analytic-simulate`` and the run-config key of ``apps/fedacnnl`` it sets;
#: every other key keeps the app's default (:data:`flwr_analytic.fedacnnl.config.RUN_CONFIG`).
OPTION_KEYS = {
    "dataset": "dataset",
    "num_clients": "min-nodes",
    "partitioner": "partitioner",
    "alpha": "dirichlet-alpha",
    "model": "model",
    "scheme": "scheme",
    "seed": "seed",
}


def build_parser() -> argparse.ArgumentParser:
    """The options (:data:`OPTION_KEYS`), each help with its default and allowed values.

    Defaults and allowed values come from the app's table, except ``--num-clients`` (20).
    """
    from flwr_analytic.data import DATASETS
    from flwr_analytic.fedacnnl.config import RUN_CONFIG

    d = RUN_CONFIG.defaults
    allowed = {k: [str(v) for v in RUN_CONFIG.params[k].constraint.values]
               for k in ("partitioner", "model", "scheme")}  # fmt: skip
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Any other run-config key of apps/fedacnnl: `flwr run apps/fedacnnl --run-config` "
        "(docs/deployment.md).",
    )
    add = parser.add_argument
    add("--dataset", default=d["dataset"], metavar="NAME",
        help=f"data set: {', '.join(DATASETS)} or hub:<repo id> (Hugging Face); "
        "default: %(default)s (embedded, offline)")  # fmt: skip
    add("--num-clients", type=int, default=20, metavar="N",
        help="simulated SuperNodes (clients), an integer >= 1; default: %(default)s")  # fmt: skip
    add("--partitioner", default=d["partitioner"], choices=allowed["partitioner"], metavar="NAME",
        help=f"how clients get data: {', '.join(allowed['partitioner'])} (precomputed: the split "
        "stored with the data, mnist: 20 clients); default: %(default)s")  # fmt: skip
    add("--alpha", type=float, default=d["dirichlet-alpha"], metavar="A",
        help="Dirichlet concentration of the label split (--partitioner dirichlet), a number "
        "> 0, smaller is more skewed; default: %(default)s")  # fmt: skip
    add("--model", default=d["model"], choices=allowed["model"], metavar="NAME",
        help=f"architecture: {', '.join(allowed['model'])}; default: %(default)s")  # fmt: skip
    add("--scheme", default=d["scheme"], choices=allowed["scheme"], metavar="NAME",
        help=f"targets of the hidden layers: {', '.join(allowed['scheme'])}; "
        "default: %(default)s")  # fmt: skip
    add("--seed", type=int, default=d["seed"], metavar="S",
        help="seed of the split, random targets and sampling, an integer >= 0; "
        "default: %(default)s")  # fmt: skip
    add("--results", default="results/fedacnnl_results.json", metavar="PATH",
        help="the results JSON (the per-client accuracy chart, PNG, goes next to it); "
        '"" keeps neither; default: %(default)s')  # fmt: skip
    return parser


def run_config_from_args(args: argparse.Namespace, results: Path | str) -> dict[str, Any]:
    """The run config of parsed options (:data:`OPTION_KEYS`) plus ``results-path``.

    Raises
    ------
    flwr_analytic.config_checks.ConfigError
        For a value the app's table does not allow (checked before any process starts).
    """
    from flwr_analytic.fedacnnl.config import resolve_run_config

    cfg = {key: getattr(args, option) for option, key in OPTION_KEYS.items()}
    cfg["results-path"] = str(results)
    resolve_run_config(cfg)
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """Run the simulation; returns the run summary written by the server app."""
    from flwr_analytic.config_checks import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = run_config_from_args(args, args.results)
    except ConfigError as err:
        parser.error(str(err))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flwr-analytic-") as tmp:
        base = Path(tmp).resolve()
        env = offline_env(base)
        write_flower_config(env["FLWR_HOME"])
        app = locate_app(base)
        results = Path(args.results).resolve() if args.results else base / "results.json"
        results.parent.mkdir(parents=True, exist_ok=True)
        results.unlink(missing_ok=True)
        cfg["results-path"] = str(results)
        print(
            f"flwr run {app} {LOCAL_CONNECTION}: Flower's local simulation SuperLink, "
            f"{args.num_clients} SuperNodes (Ray, 2 CPUs each)\nprivate FLWR_HOME {env['FLWR_HOME']}",
            flush=True,
        )
        try:
            done = run_app(
                app,
                env,
                run_config=cfg,
                federation_config=simulation_config(args.num_clients),
                echo=True,
            )
        finally:
            stop_owned_processes(base)
        if done.returncode != 0 or not results.is_file():
            raise FlowerRunError(
                f"`flwr run` exited with {done.returncode} and "
                f"{'wrote' if results.is_file() else 'did not write'} {results} (log above)"
            )
        summary = json.loads(results.read_text())
    wall = time.perf_counter() - start
    split = f"Dirichlet({args.alpha})" if args.partitioner == "dirichlet" else args.partitioner
    print(
        f"\nFedACnnL through Flower's simulation: {args.dataset}, {summary['num-nodes']} SuperNodes, "
        f"{split}, {summary['architecture']} ({summary['layers']} layer rounds)"
    )
    print_headline(
        summary["global-accuracy"],
        summary["personal-accuracy"],
        f"bytes sent {summary['bytes-sent'] / 1e6:.2f} MB, "
        f"received {summary['bytes-received'] / 1e6:.2f} MB; "
        f"server wall time {summary['wall-time']:.1f} s (with Flower and Ray start-up {wall:.1f} s)",
        measure="test accuracy",
        personalized="pFedACnnL personalized",
    )
    if args.results:
        print(f"results: {results}")
        if summary.get("report-png"):
            print(f"per-client global vs personalized accuracy: {summary['report-png']}")
    return summary


def cli() -> None:
    """Console entry point ``flwr-analytic-simulate`` (exit status 1 when the run fails)."""
    try:
        main()
    except FlowerRunError as err:
        sys.exit(f"flwr-analytic-simulate: {err}")


if __name__ == "__main__":
    cli()
