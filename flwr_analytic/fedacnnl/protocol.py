"""Wire format shared by the FedACnnL strategy and client app (Message API and legacy API).

FedACnnL / pFedACnnL (Gu et al., "Analytic Personalized Federated Meta-Learning", arXiv 2502.06915)
train one layer per round. The server sends the solved global layers ``< l`` (a slice of the
:class:`~flwr_analytic.models.SpecNet` ``state_dict``, float64) and a ``ConfigRecord`` naming the layer,
the architecture, the target scheme, the seed and the precision; the client replies with the packed
statistics ``(G, B, n)`` of layer ``l`` (:meth:`~flwr_analytic.analytic.LayerStatistics.pack`) and a
``MetricRecord`` holding ``num-examples``, ``partition-id`` and ``layer``. Config keys are kebab-case.

Weights travel as float64 ``state_dict`` tensors built from the solved design-space matrices, so the
client's forward pass uses exactly the server's solution (the exactness of FedACnnL relies on it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from flwr_analytic.analytic import AnalyticNetwork, Regularization, TargetScheme
from flwr_analytic.analytic.design import conv_to_weight, weight_to_conv
from flwr_analytic.models import Architecture, ConvSpec, DenseSpec

#: ``ConfigRecord`` keys sent by the strategy.
LAYER = "layer"
ARCHITECTURE = "architecture"
SCHEME = "scheme"
SEED = "seed"
DTYPE = "dtype"
BATCH_SIZE = "batch-size"
LAM = "lam"
LAM_RULE = "lam-rule"
PERSONALIZE_LAYERS = "personalize-layers"
SERVER_ROUND = "server-round"

#: ``MetricRecord`` keys of client replies.
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"

#: Default record keys.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
STATISTICS_KEY = "statistics"
METRICS_KEY = "metrics"
#: Evaluation messages of group-wise runs carry the node's group output layer under this key.
GROUP_ARRAYS_KEY = "group-arrays"


# --------------------------------------------------------------------------------- architecture
def architecture_to_json(arch: Architecture) -> str:
    """Serialize an :class:`~flwr_analytic.models.Architecture` (every layer spec) to JSON."""
    hidden = [
        {"type": "conv" if isinstance(s, ConvSpec) else "dense", **asdict(s)} for s in arch.hidden
    ]
    return json.dumps(
        {
            "name": arch.name,
            "input-shape": list(arch.input_shape),
            "num-classes": arch.num_classes,
            "hidden": hidden,
        },
        sort_keys=True,
    )


def architecture_from_json(text: str) -> Architecture:
    """Inverse of :func:`architecture_to_json`."""
    spec = json.loads(text)
    hidden: list[ConvSpec | DenseSpec] = []
    for layer in spec["hidden"]:
        kind = layer.pop("type")
        hidden.append(ConvSpec(**layer) if kind == "conv" else DenseSpec(**layer))
    return Architecture(
        spec["name"], tuple(spec["input-shape"]), tuple(hidden), int(spec["num-classes"])
    )


def schemes_to_json(net: AnalyticNetwork) -> str:
    """The per-hidden-layer target schemes of ``net`` as JSON ``[[name, encoding], ...]``."""
    return json.dumps([[s.name, s.encoding] for s in net.schemes])


def schemes_from_json(text: str) -> list[TargetScheme]:
    """Inverse of :func:`schemes_to_json`."""
    return [TargetScheme(name, encoding) for name, encoding in json.loads(text)]


def network_config(net: AnalyticNetwork, batch_size: int) -> dict[str, Any]:
    """The ``ConfigRecord`` entries a client needs to rebuild ``net``'s client half."""
    return {
        ARCHITECTURE: architecture_to_json(net.arch),
        SCHEME: schemes_to_json(net),
        SEED: int(net.seed),
        DTYPE: net.dtype,
        BATCH_SIZE: int(batch_size),
    }


def network_from_config(config: Mapping[str, Any]) -> AnalyticNetwork:
    """The client's :class:`AnalyticNetwork` (no layer solved yet) from a strategy's config."""
    arch = architecture_from_json(str(config[ARCHITECTURE]))
    schemes: Sequence[TargetScheme] = schemes_from_json(str(config[SCHEME]))
    return AnalyticNetwork(
        arch,
        schemes if schemes else "label-pca",
        seed=int(config[SEED]),
        dtype=str(config[DTYPE]),
    )


def personal_regularization(config: Mapping[str, Any]) -> Regularization:
    """Return pFedACnnL's λ rule from a strategy's evaluate config."""
    return Regularization(float(config[LAM]), str(config[LAM_RULE]))


# -------------------------------------------------------------------------------------- weights
def layer_keys(layer: int) -> tuple[str, str]:
    """``state_dict`` keys of ``layer``'s weight and bias."""
    return f"blocks.{layer}.op.weight", f"blocks.{layer}.op.bias"


def weights_state_dict(net: AnalyticNetwork, upto: int | None = None) -> dict[str, torch.Tensor]:
    """float64 ``state_dict`` entries of the solved layers ``< upto`` (all solved layers by default).

    Built from the design-space matrices ``W_l`` (not from the module, which may be float32), so
    the values are the server's exact solution; loads into ``build_module(arch)`` (``strict=True``
    once every layer is solved).
    """
    upto = net.solved_layers if upto is None else upto
    if upto > net.solved_layers:
        raise ValueError(f"layers < {upto} requested, only {net.solved_layers} are solved")
    out: dict[str, torch.Tensor] = {}
    for layer in range(upto):
        w = np.asarray(net.weights[layer], dtype=np.float64)
        spec = net.arch.spec(layer)
        if isinstance(spec, ConvSpec):
            weight, bias = weight_to_conv(w, net.arch.input_shape_of(layer)[0], spec.kernel_size)
        else:
            weight, bias = w[:-1].T, w[-1]
        kw, kb = layer_keys(layer)
        out[kw] = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float64))
        out[kb] = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float64))
    return out


def install_layers(
    net: AnalyticNetwork, arrays: Mapping[str, np.ndarray], upto: int | None = None
) -> int:
    """Install the layers ``< upto`` found in ``arrays`` (``state_dict`` numpy arrays) into ``net``.

    With ``upto=None`` every consecutive layer present is installed. Returns the number installed.
    Raises ``KeyError`` when a requested layer is missing.
    """
    count = 0
    while count < net.num_layers and (upto is None or count < upto):
        kw, kb = layer_keys(count)
        if kw not in arrays or kb not in arrays:
            if upto is None:
                break
            raise KeyError(f"the global model lacks layer {count} ({kw!r}); needed below {upto}")
        weight = np.asarray(arrays[kw], dtype=np.float64)
        bias = np.asarray(arrays[kb], dtype=np.float64)
        if isinstance(net.arch.spec(count), ConvSpec):
            net.set_layer(count, conv_to_weight(weight, bias))
        else:
            net.set_layer(count, np.vstack([weight.T, bias[None, :]]))
        count += 1
    return count


def weights_digest(net: AnalyticNetwork, upto: int) -> str:
    """A SHA-256 fingerprint of the layers ``< upto`` (to tell whether kept statistics are stale)."""
    h = hashlib.sha256()
    for layer in range(upto):
        h.update(np.ascontiguousarray(net.weights[layer], dtype=np.float64).tobytes())
    return h.hexdigest()


def personalized_layers(net: AnalyticNetwork, which: str) -> list[int]:
    """Layers pFedACnnL personalizes: the output layer (``"last"``) or every layer with targets."""
    if which == "last":
        return [net.num_layers - 1]
    if which == "all":
        return [
            layer
            for layer in range(net.num_layers)
            if net.needs_statistics(layer) and net.num_targets(layer) > 0
        ]
    raise ValueError(f"personalize-layers must be 'last' or 'all', got {which!r}")
