"""A checkpoint is resumed only by the run that wrote it: data keys are part of its fingerprint.

Issue 13, finding 3: re-running with ``partitioner='iid'`` at the same ``checkpoint-path`` used to
"resume" (train 0 rounds) and return the Dirichlet model under an ``iid`` label.
"""

from __future__ import annotations

import numpy as np
import pytest

from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
from flwr_analytic.fedacnnl import LocalGrid, resolve_run_config
from flwr_analytic.fedacnnl.data import DATA_KEYS, data_fingerprint, path_identity
from flwr_analytic.strategies.checkpoint import CheckpointMismatchError
from flwr_analytic.strategies.fedacnnl_server import run_fedacnnl


def _run(cfg):
    return run_fedacnnl(LocalGrid(make_fedacnnl_client_app(run_config=cfg), 4, cfg), cfg)


def test_a_checkpoint_of_other_data_is_refused_naming_the_keys(tmp_path):
    base = {
        "model": "cnn",
        "cnn-channels": "4,8",
        "results-path": "",
        "fraction-evaluate": 0.0,
        "min-nodes": 4,
        "checkpoint-path": str(tmp_path / "run.npz"),
    }
    cfg = resolve_run_config(base)
    _, first = _run(cfg)
    _, again = _run(cfg)  # the same configuration resumes the finished run: no new round
    assert again["model-sha256"] == first["model-sha256"]
    for change, key in (
        ({"partitioner": "iid"}, "partitioner"),
        ({"dirichlet-alpha": 0.5}, "dirichlet-alpha"),
        ({"test-fraction": 0.5}, "test-fraction"),
    ):
        other = resolve_run_config({**base, **change})
        with pytest.raises(CheckpointMismatchError, match=rf"{key}: checkpoint .* != this run"):
            _run(other)


def test_data_path_identity_follows_the_content(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, x=np.zeros(10))
    np.savez(b, x=np.ones(10))
    assert path_identity("") == ""
    assert path_identity(str(a)) != path_identity(str(b))
    ident = path_identity(str(a))
    a.write_bytes(b.read_bytes())  # other data at the same path
    assert path_identity(str(a)) != ident
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "part").write_bytes(b"123")
    before = path_identity(str(folder))
    (folder / "part").write_bytes(b"124")
    assert path_identity(str(folder)) != before
    fp = data_fingerprint({"data-path": str(a)})
    assert set(fp) == {*DATA_KEYS, "data-path"} and fp["data-path"] == path_identity(str(a))
