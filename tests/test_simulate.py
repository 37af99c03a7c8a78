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


OPTIONS = ("dataset", "num-clients", "partitioner", "alpha", "model", "scheme", "seed", "results")


def test_help_lists_every_option_with_its_default_and_allowed_values():
    done = subprocess.run(
        [str(BIN / "flwr-analytic-simulate"), "--help"], capture_output=True, text=True, check=True
    )
    assert done.stderr == ""
    text = " ".join(done.stdout.split())  # argparse wraps the help lines
    for option in OPTIONS:
        assert f"--{option}" in text
    helps = {a.dest: a.help % vars(a) for a in simulate.build_parser()._actions if a.dest != "help"}
    assert sorted(helps) == sorted(o.replace("-", "_") for o in OPTIONS)
    for dest, text in helps.items():
        assert "default: " in text, dest
    allowed = {
        "partitioner": "iid, dirichlet, pathological, precomputed",
        "model": "linear, mlp, lenet5, cnn",
        "scheme": "label-encoding, pca, label-pca, random, random-standardized",
        "dataset": "digits, mnist, fashion-mnist, cifar10 or hub:<repo id>",
        "alpha": "> 0",
        "seed": ">= 0",
        "num_clients": ">= 1",
    }
    for dest, values in allowed.items():
        assert values in helps[dest], dest
    assert "default: dirichlet" in helps["partitioner"] and "default: 20" in helps["num_clients"]


def test_options_map_to_run_config_keys():
    parser = simulate.build_parser()
    args = parser.parse_args(["--partitioner", "pathological", "--num-clients", "5"])
    cfg = simulate.run_config_from_args(args, "/tmp/r.json")
    assert cfg["partitioner"] == "pathological" and cfg["min-nodes"] == 5
    assert cfg["results-path"] == "/tmp/r.json"
    # no options: the embedded default run (digits, 20 clients, Dirichlet(0.1), cnn, label-pca)
    default = simulate.run_config_from_args(parser.parse_args([]), "r.json")
    assert default == {
        "dataset": "digits",
        "min-nodes": 20,
        "partitioner": "dirichlet",
        "dirichlet-alpha": 0.1,
        "model": "cnn",
        "scheme": "label-pca",
        "seed": 0,
        "results-path": "r.json",
    }
    assert set(default) == {*simulate.OPTION_KEYS.values(), "results-path"}
    with pytest.raises(SystemExit):  # not an allowed value: argparse says so, nothing runs
        parser.parse_args(["--partitioner", "shards"])
    with pytest.raises(ValueError, match="dirichlet-alpha"):
        simulate.run_config_from_args(parser.parse_args(["--alpha", "0"]), "r.json")


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
