"""Local-update settings in the meta app's training messages: one table for strategies and client.

A strategy sends the settings of its clients' local update in the training ``ConfigRecord``:
``"local-algorithm"`` names the update (``meta``, ``sgd``, ``pfedme``) and :data:`TRAIN_KEYS` the
config key of each of its keyword arguments (:class:`~flwr_analytic.meta.MetaConfig`,
:func:`~flwr_analytic.meta.sgd_train`, :func:`~flwr_analytic.meta.pfedme_train`). Values travel as
the type the update declares for the keyword (``int``, ``float``, ``str``). No Flower imports.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, get_type_hints

from flwr_analytic.meta.baselines import pfedme_train, sgd_train
from flwr_analytic.meta.local_training import MetaConfig

#: The config key naming the local update.
LOCAL_ALGORITHM = "local-algorithm"


def _keys(*same: str, **renamed: str) -> dict[str, str]:
    """Keyword -> config key: each of ``same`` in kebab case, ``renamed`` as given."""
    return {name: name.replace("_", "-") for name in same} | renamed


#: Per local update: the keyword arguments it reads from the training config and their keys.
TRAIN_KEYS: dict[str, dict[str, str]] = {
    "meta": _keys(
        "local_steps",
        "inner_batch_size",
        "outer_batch_size",
        "hessian_batch_size",
        "hessian_batches",
        nu="meta-nu",
        alpha="meta-alpha",
        beta="meta-beta",
        mode="meta-mode",
        delta="hf-delta",
    ),
    "sgd": _keys("lr", "local_steps", "batch_size"),
    "pfedme": _keys(
        "local_steps",
        "batch_size",
        lr="pfedme-lr",
        personal_lr="pfedme-personal-lr",
        lam="pfedme-lambda",
        inner_steps="pfedme-k",
    ),
}

#: The local update of each ``local-algorithm``, whose annotations type the values.
LOCAL_UPDATES: dict[str, Callable[..., Any]] = {
    "meta": MetaConfig,
    "sgd": sgd_train,
    "pfedme": pfedme_train,
}


def _typed(algorithm: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (keyword -> value) of ``algorithm``'s settings as the types its update declares."""
    if algorithm not in TRAIN_KEYS:
        raise ValueError(f"unknown local-algorithm {algorithm!r}; allowed: {', '.join(TRAIN_KEYS)}")
    hints = _hints(algorithm)
    return {name: hints[name](value) for name, value in values.items()}


@functools.cache
def _hints(algorithm: str) -> dict[str, Any]:
    """The annotations of ``algorithm``'s local update (resolved once)."""
    return get_type_hints(LOCAL_UPDATES[algorithm])


def encode_settings(algorithm: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The training-config entries of ``algorithm`` with ``settings`` (keyword -> value).

    ``{"local-algorithm": algorithm, <key>: <typed value>, ...}`` for every keyword of
    :data:`TRAIN_KEYS`; ``settings`` may hold more (e.g. a strategy's ``vars``).
    """
    keys = TRAIN_KEYS.get(algorithm, {})
    typed = _typed(algorithm, {name: settings[name] for name in keys})
    return {LOCAL_ALGORITHM: algorithm, **{keys[name]: value for name, value in typed.items()}}


def decode_settings(algorithm: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``algorithm``'s local update read from a training config.

    Inverse of :func:`encode_settings`. Raises ``ValueError`` for an unknown ``algorithm`` and
    ``KeyError`` for a missing key.
    """
    keys = TRAIN_KEYS.get(algorithm, {})
    return _typed(algorithm, {name: config[key] for name, key in keys.items()})


__all__ = ["LOCAL_ALGORITHM", "LOCAL_UPDATES", "TRAIN_KEYS", "decode_settings", "encode_settings"]
