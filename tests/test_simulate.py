"""The main job (`flwr-analytic-simulate`, the README's first command) on `flwr run`.

Fast: its options, the Flower config it writes and the app it writes when there is no clone.
Slow: the console script itself, output captured as a user sees it, against the core run.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from flower_processes import owned_processes

from flwr_analytic import simulate
from flwr_analytic.demo import main as core_main

BIN = Path(sys.executable).parent
MIGRATION_NOTICE = ("legacy usage", "MIGRATION NOTICE", "will migrate")


def test_help_lists_the_options():
    done = subprocess.run(
        [str(BIN / "flwr-analytic-simulate"), "--help"], capture_output=True, text=True, check=True
    )
    for option in ("--num-clients", "--dataset", "--alpha", "--model", "--scheme", "--seed"):
        assert option in done.stdout
    assert "--results" in done.stdout and done.stderr == ""


def test_flower_config_holds_a_local_simulation_connection(tmp_path):
    path = simulate.write_flower_config(tmp_path)
    config = tomllib.loads(path.read_text())
    assert config == {
        "superlink": {"default": "local-simulation", "local-simulation": {"address": ":local:"}}
    }
    deployment = {"address": "127.0.0.1:9091", "insecure": True}
    path = simulate.write_flower_config(tmp_path, {"deployment": deployment})
    assert tomllib.loads(path.read_text())["superlink"] == {
        "default": "deployment",
        "deployment": deployment,
    }


def test_simulation_settings_go_to_federation_config_not_to_deprecated_options():
    from flwr.common.config import parse_config_args
    from flwr.supercore.utils import simulation_config_from_json

    text = simulate.format_config(simulate.simulation_config(20))
    parsed = {k.replace("-", "_"): v for k, v in parse_config_args([text]).items()}
    proto = simulation_config_from_json(parsed)  # what `flwr run --federation-config` sends
    assert proto.num_supernodes == 20 and proto.backend == "ray"
    assert proto.client_resources_num_cpus == 2 and proto.client_resources_num_gpus == 0.0


def test_run_config_string_round_trips_through_flower():
    from flwr.common.config import parse_config_args

    cfg = {"dataset": "digits", "dirichlet-alpha": 0.1, "seed": 0, "keep-statistics": True}
    assert parse_config_args([simulate.format_config(cfg)]) == cfg


def test_written_app_equals_apps_fedacnnl(tmp_path):
    """An installed wheel (no clone) runs the same app: same pyproject, same factories."""
    from flwr.cli.config_utils import load_and_validate

    app = simulate.write_app(tmp_path / "fedacnnl")
    clone = simulate.CLONE_APP
    with open(app / "pyproject.toml", "rb") as f, open(clone / "pyproject.toml", "rb") as g:
        assert tomllib.load(f) == tomllib.load(g)
    config, warnings = load_and_validate(app / "pyproject.toml", check_module=False)
    assert config["tool"]["flwr"]["app"]["components"]["serverapp"] == (
        "fedacnnl_app.server_app:app"
    )
    assert not warnings
    for side in ("server", "client"):
        name = f"fedacnnl_app/{side}_app.py"
        written = ast.parse((app / name).read_text())
        original = ast.parse((clone / name).read_text())
        # the same statements, docstrings aside
        assert [ast.dump(s) for s in written.body] == [
            ast.dump(s) for s in original.body if not isinstance(s, ast.Expr)
        ]
    assert simulate.locate_app(tmp_path) == clone  # from the clone, the clone's app


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_readme_main_job_through_flwr_run_equals_the_core_run(tmp_path):
    results = tmp_path / "results.json"
    done = subprocess.run(
        [str(BIN / "flwr-analytic-simulate"), "--results", str(results)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=280,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out[-4000:]
    assert "DEPRECATED" not in out and "deprecated" not in out.lower(), out[-4000:]
    assert "Traceback" not in out and "FutureWarning" not in out, out[-4000:]
    assert not any(text in out for text in MIGRATION_NOTICE), out[-4000:]
    assert "flwr run " in out and "local-simulation" in out  # the supported path
    assert re.search(
        r"sample-weighted test accuracy: global \d+\.\d\d%, pFedACnnL personalized \d+\.\d\d%", out
    )
    assert re.search(r"bytes sent \d+\.\d\d MB, received \d+\.\d\d MB; server wall time", out)
    assert "20 SuperNodes" in out
    # every process it started is gone, and its private FLWR_HOME with it
    (home,) = re.findall(r"private FLWR_HOME (\S+)", out)
    assert owned_processes(Path(home).parent) == [] and not Path(home).exists()

    summary = json.loads(results.read_text())
    core = core_main([])
    assert summary["num-nodes"] == 20
    assert summary["global-accuracy"] == pytest.approx(core["global_accuracy"], abs=1e-12)
    assert summary["personal-accuracy"] == pytest.approx(core["personalized_accuracy"], abs=1e-12)
    assert summary["personal-accuracy"] > summary["global-accuracy"]
    assert summary["bytes-received"] > 0
