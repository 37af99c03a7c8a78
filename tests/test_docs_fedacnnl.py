"""docs/flower_quickstart.md: its python block runs as written (Ray simulation, slow)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from flower_processes import flower_env, stop_owned_processes

DOC = Path(__file__).resolve().parents[1] / "docs" / "flower_quickstart.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_quickstart_has_one_python_block():
    (block,) = python_blocks(DOC.read_text())
    compile(block, str(DOC), "exec")
    assert "make_fedacnnl_client_app" in block and "FedACnnL(" in block


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quickstart_block_runs(tmp_path):
    (block,) = python_blocks(DOC.read_text())
    script = tmp_path / "quickstart.py"
    script.write_text(block)
    env = flower_env(tmp_path / "flwr")
    try:
        done = subprocess.run(
            [sys.executable, str(script)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=220,
            check=False,
        )
    finally:
        stop_owned_processes(str((tmp_path / "flwr").resolve()))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert re.search(r"global accuracy 0\.\d+, personalized 0\.\d+", done.stdout)
