"""Final-model digests pinned across the Flower-side redesign (issue 16).

The SHA-256 of the final global model of a fixed configuration, run through the app's server
(`run_fedacnnl`) and client app on an in-process grid with random node ids and shuffled replies.
The digests were taken on the code *before* the redesign (commit 12d9be5) and must not change:
sorted aggregation with and without group-wise output layers, streaming aggregation (the in-process
grid with one message in flight returns replies in push order, so the arrival-order sum is
reproducible too), and DP
release with a fixed noise seed.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
from flwr_analytic.fedacnnl import LocalGrid, resolve_run_config
from flwr_analytic.strategies.fedacnnl_server import run_fedacnnl

BASE = {
    "dataset": "digits",
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.5,
    "model": "cnn",
    "cnn-channels": "8,16",
    "min-nodes": 6,
    "seed": 7,
    "results-path": "",
}

PINNED = {
    "sorted": "4618d3d4a8589089787f1aacd1bd20fa87a65a7c7166257d5e0680877b9c435a",
    "sorted-groups": "3d08c11db226323ad864ccaceb7f968e1f8f0f933fe720ad0f7e376bdd5817c4",
    "streaming": "ca07a5e1fa1e47ed7ec7a88e3cdab505b70a3af48f9ec9811329b3edb2d63b71",
    "dp": "ffaec99b3cdfdc1052dc1831fe50048faf56596b42e50cb692beb8d44ae79493",
}

CASES = {
    "sorted": {},
    "sorted-groups": {"num-groups": 2},
    "streaming": {"aggregation": "streaming", "max-in-flight": 1},
    "dp": {"dp-noise-multiplier": 1.0, "dp-clip-norm": 3.0, "dp-seed": 11},
}


def run_digest(case: str) -> str:
    """SHA-256 of the final model's digest and the evaluation metrics (group-wise heads and
    personalized models are only visible in the latter)."""
    cfg = resolve_run_config({**BASE, **CASES[case]})
    grid = LocalGrid(make_fedacnnl_client_app(), 6, cfg, seed=13)
    _, summary = run_fedacnnl(grid, cfg)
    evaluation = {
        k: v
        for k, v in summary["evaluate"].items()
        if k.startswith(("global-", "personal-", "group-")) or k == "client-ids"
    }
    text = summary["model-sha256"] + json.dumps(evaluation, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("case", list(CASES))
def test_final_model_digest_is_unchanged(case):
    assert run_digest(case) == PINNED[case]


if __name__ == "__main__":  # print the digests (used once, to pin them)
    for name in CASES:
        print(name, run_digest(name))
