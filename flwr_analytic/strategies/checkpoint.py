"""Checkpoint files: atomic ``.npz`` files (plain arrays + one JSON document) and fingerprints.

:class:`~flwr_analytic.strategies.checkpointing.Checkpointed` writes one after every round of any
strategy, and ``start()`` with the same configuration continues from it. A checkpoint is one
``.npz`` file written to ``<path>.tmp`` and moved over ``path`` with ``os.replace`` (atomic on
POSIX and Windows), so a crash while writing leaves the previous checkpoint intact. It holds only
plain numeric arrays and a JSON string (loaded with ``allow_pickle=False``).

Each checkpoint records a *fingerprint* of the configuration that determines the model; resuming with a
different configuration raises :class:`CheckpointMismatchError` naming every differing key.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flwr_analytic.strategies.utils import jsonable

#: Name of the JSON document inside the ``.npz``.
META_KEY = "__meta__"


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a run with another configuration (or another strategy)."""


def write_checkpoint(path: str | Path, arrays: Mapping[str, np.ndarray], meta: Mapping) -> Path:
    """Atomically write ``arrays`` and the JSON document ``meta`` to ``path`` (an ``.npz`` file).

    The file is written to ``<path>.tmp``, flushed and fsync-ed, then renamed over ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if META_KEY in arrays:
        raise ValueError(f"array name {META_KEY!r} is reserved")
    tmp = path.with_name(path.name + ".tmp")
    payload = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    payload[META_KEY] = np.array(json.dumps(jsonable(dict(meta))))
    with open(tmp, "wb") as fh:
        np.savez(fh, **payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint written by :func:`write_checkpoint`; check its ``format`` is ``kind``.

    Returns
    -------
    (arrays, meta)
        The arrays by name and the JSON document.

    Raises
    ------
    CheckpointMismatchError
        When the file is a checkpoint of another kind (e.g. of another strategy).

    """
    with open(path, "rb") as fh:
        data = np.load(io.BytesIO(fh.read()), allow_pickle=False)
        arrays = {k: data[k] for k in data.files if k != META_KEY}
        meta = json.loads(str(data[META_KEY]))
    if meta.get("format") != kind:
        raise CheckpointMismatchError(
            f"{path} is a {meta.get('format')!r} checkpoint, expected {kind!r}"
        )
    return arrays, meta


def check_fingerprint(saved: Mapping[str, Any], current: Mapping[str, Any], path: Any) -> None:
    """Raise :class:`CheckpointMismatchError` naming every key where ``saved != current``."""
    saved, current = jsonable(dict(saved)), jsonable(dict(current))
    diff = [
        f"{key}: checkpoint {saved.get(key, '<absent>')!r} != this run {current.get(key, '<absent>')!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if diff:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written with another configuration ({'; '.join(diff)}); "
            "resume with the same configuration or delete the checkpoint to start over"
        )


def random_state() -> list[Any]:
    """Python's global ``random`` state (Flower samples nodes with it) as JSON-able lists."""
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_random_state(state: list[Any]) -> None:
    """Inverse of :func:`random_state`."""
    version, internal, gauss = state
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))


__all__ = [
    "CheckpointMismatchError",
    "check_fingerprint",
    "random_state",
    "read_checkpoint",
    "set_random_state",
    "write_checkpoint",
]
