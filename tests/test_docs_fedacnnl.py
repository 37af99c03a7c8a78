"""docs/flower_quickstart.md: its project files and `flwr run` command work as written (slow).

Each ``toml``/``python`` block names its file in its first line; the test writes them into a fresh
project folder and runs the ``bash`` block's ``flwr run`` command there, in a private ``FLWR_HOME``
with no Flower configuration (Flower writes its default, whose connection ``local`` is a managed
local simulation SuperLink).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from flower_processes import BIN, format_run_config, owned_processes, stop_owned_processes

from flwr_analytic.simulate import offline_env

DOC = Path(__file__).resolve().parents[1] / "docs" / "flower_quickstart.md"


def project_files(text: str) -> dict[str, str]:
    """``{path: content}`` of the blocks whose first line is ``# <path>``."""
    blocks = re.findall(r"```(?:toml|python)\n# (\S+)\n(.*?)```", text, flags=re.S)
    return dict(blocks)


def run_command(text: str) -> list[str]:
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S) if "flwr run" in b]
    (line,) = [ln for ln in block.splitlines() if ln.startswith("flwr run")]
    return shlex.split(line)


def test_quickstart_is_a_flower_project():
    text = DOC.read_text()
    files = project_files(text)
    assert sorted(files) == [
        "my_project/__init__.py",
        "my_project/client_app.py",
        "my_project/server_app.py",
        "pyproject.toml",
    ]
    for name, code in files.items():
        if name.endswith(".py"):
            compile(code, name, "exec")
    assert "make_fedacnnl_client_app" in files["my_project/client_app.py"]
    assert "FedACnnL(" in files["my_project/server_app.py"]
    assert "federations" not in files["pyproject.toml"]  # connections live in Flower's config
    assert "run_simulation" not in text  # the deprecated entry point
    assert run_command(text)[:4] == ["flwr", "run", ".", "--stream"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quickstart_project_runs_with_flwr_run(tmp_path):
    text = DOC.read_text()
    project = tmp_path / "my-project"
    for name, code in project_files(text).items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(code)
    env = offline_env(tmp_path / "flwr")  # no config.toml: Flower writes its default
    model_path = tmp_path / "model.pt"
    command = [str(BIN / "flwr")] + run_command(text)[1:]
    command += ["--run-config", format_run_config({"model-path": str(model_path)})]
    try:
        done = subprocess.run(
            command,
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=280,
            check=False,
        )
    finally:
        stop_owned_processes(str((tmp_path / "flwr").resolve()))
    assert owned_processes(str((tmp_path / "flwr").resolve())) == []
    out = done.stdout
    assert done.returncode == 0, out[-4000:]
    assert "Traceback" not in out and "deprecated" not in out.lower(), out[-4000:]
    assert "legacy usage" not in out, out[-4000:]
    assert "(10 simulated SuperNodes)" in out, out[-4000:]
    (found,) = re.findall(r"global accuracy (0\.\d+), personalized (0\.\d+)", out)
    global_acc, personal_acc = map(float, found)
    assert global_acc > 0.5 and personal_acc >= global_acc - 0.05
    state = torch.load(model_path)  # the ServerApp's plain torch.nn.Module state_dict
    assert state and all(torch.isfinite(v).all() for v in state.values())
