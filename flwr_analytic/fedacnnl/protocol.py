"""Wire format shared by the FedACnnL strategy and client app (Message API and legacy API).

FedACnnL / pFedACnnL (Gu et al., "Analytic Personalized Federated Meta-Learning", arXiv 2502.06915)
train one layer per round. The server sends the solved global layers ``< l`` (a slice of the
:class:`~flwr_analytic.models.SpecNet` ``state_dict``, float64) and a ``ConfigRecord`` naming the layer,
the architecture, the target scheme, the seed and the precision; the client replies with the packed
statistics ``(G, B, n)`` of layer ``l`` (:meth:`~flwr_analytic.analytic.LayerStatistics.pack`) and a
``MetricRecord`` holding ``num-examples``, ``partition-id`` and ``layer``. Config keys are kebab-case.

Weights travel as float64 ``state_dict`` tensors built from the solved design-space matrices, so the
client's forward pass uses exactly the server's solution (the exactness of FedACnnL relies on it).
For a user's own model (:func:`~flwr_analytic.models.trace_model`) the keys are the user's parameter
names, so the arrays load into the user's class; the architecture entry then describes the traced
layers, and each client traces its own copy of the model and checks that it is the same.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn

from flwr_analytic.analytic import AnalyticNetwork, AutoLambda, Regularization, TargetScheme
from flwr_analytic.analytic.design import design_to_params, params_to_design
from flwr_analytic.analytic.whitening import AssignmentRound
from flwr_analytic.models import (
    Architecture,
    ConvSpec,
    DenseSpec,
    TracedArchitecture,
    UnsupportedModelError,
    trace_model,
)

#: A user's model: an ``nn.Module`` instance or a function/class returning one (e.g. ``Net``).
ModelSource = nn.Module | Callable[[], nn.Module]

#: ``ConfigRecord`` keys sent by the strategy.
LAYER = "layer"
#: Round of the layer's fit (``zca-kmeans``: 0 for ``G``, then Lloyd's iteration ``t``); the client
#: echoes it in its reply's metrics. Sent only when > 0, so one-round layers' messages are unchanged.
STAGE = "stage"
#: The ``zca-kmeans`` assignment weights (D x K) of a Lloyd's round, beside the solved layers.
ASSIGNMENT_KEY = "kmeans.assignment"
ARCHITECTURE = "architecture"
SCHEME = "scheme"
SEED = "seed"
DTYPE = "dtype"
#: Sent only when true: the network trains on mirrored images too (:mod:`~flwr_analytic.analytic.mirror`).
MIRROR = "mirror"
BATCH_SIZE = "batch-size"
LAM = "lam"
LAM_RULE = "lam-rule"
PERSONALIZE_LAYERS = "personalize-layers"
SERVER_ROUND = "server-round"

#: ``MetricRecord`` keys of client replies.
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"

#: Default record keys.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
STATISTICS_KEY = "statistics"
METRICS_KEY = "metrics"
#: Evaluation messages of group-wise runs carry the node's group output layer under this key.
GROUP_ARRAYS_KEY = "group-arrays"


# ------------------------------------------------------------------------------- client errors
#: Prefix of a client error's reason: ``"partition-id=3: ValueError: ..."`` names the partition.
_ERROR_PREFIX = "partition-id="


def client_error_reason(partition_id: int, exc: BaseException) -> str:
    """The reason of a client's error reply, naming its partition (``partition-id=<k>: ...``)."""
    return f"{_ERROR_PREFIX}{int(partition_id)}: {type(exc).__name__}: {exc}"


def error_partition(reason: str) -> int | None:
    """The partition named by :func:`client_error_reason` (``None``: not named, or unknown)."""
    if not reason.startswith(_ERROR_PREFIX):
        return None
    head = reason[len(_ERROR_PREFIX) :].split(":", 1)[0]
    return int(head) if head.lstrip("-").isdigit() and int(head) >= 0 else None


# --------------------------------------------------------------------------------- architecture
def architecture_to_json(arch: Architecture | TracedArchitecture) -> str:
    """Serialize an architecture (every layer spec, or a traced model's description) to JSON."""
    if isinstance(arch, TracedArchitecture):
        return json.dumps({"traced": arch.describe()}, sort_keys=True)
    hidden = [
        {"type": "conv" if isinstance(s, ConvSpec) else "dense", **asdict(s)} for s in arch.hidden
    ]
    for layer in hidden:  # unset options are left out, so older messages stay byte-identical
        if layer.get("contrast", 0) is None:
            del layer["contrast"]
    return json.dumps(
        {
            "name": arch.name,
            "input-shape": list(arch.input_shape),
            "num-classes": arch.num_classes,
            "hidden": hidden,
        },
        sort_keys=True,
    )


def architecture_from_json(
    text: str, model: ModelSource | None = None
) -> Architecture | TracedArchitecture:
    """Inverse of :func:`architecture_to_json`; a traced model is rebuilt from ``model``.

    Raises
    ------
    UnsupportedModelError
        When the server trains a user's model and ``model`` is missing or traces differently.

    """
    spec = json.loads(text)
    if "traced" in spec:
        return _traced_from(spec["traced"], model)
    hidden: list[ConvSpec | DenseSpec] = []
    for layer in spec["hidden"]:
        kind = layer.pop("type")
        hidden.append(ConvSpec(**layer) if kind == "conv" else DenseSpec(**layer))
    return Architecture(
        spec["name"], tuple(spec["input-shape"]), tuple(hidden), int(spec["num-classes"])
    )


def _traced_from(described: dict[str, Any], model: ModelSource | None) -> TracedArchitecture:
    name = described["name"]
    if model is None:
        raise UnsupportedModelError(
            f"the server trains your model {name!r}: give the client app the same model "
            "(make_fedacnnl_client_app(..., model=...))"
        )
    module = model if isinstance(model, nn.Module) else model()
    arch = trace_model(module, tuple(described["input-shape"]))
    mine = json.loads(json.dumps(arch.describe()))
    if mine != described:
        diff = sorted(k for k in described if mine.get(k) != described[k])
        raise UnsupportedModelError(
            f"this node's model ({arch.name}) differs from the server's ({name}) in {diff}"
        )
    return arch


def schemes_to_json(net: AnalyticNetwork) -> str:
    """The per-hidden-layer target schemes of ``net`` as JSON ``[[name, encoding], ...]``.

    A ``zca-*`` scheme adds its options as a third element (``TargetScheme.describe``).
    """
    out = []
    for scheme in net.schemes:
        options = {k: v for k, v in scheme.describe().items() if k not in ("name", "encoding")}
        out.append([scheme.name, scheme.encoding] + ([options] if options else []))
    return json.dumps(out)


def schemes_from_json(text: str) -> list[TargetScheme]:
    """Inverse of :func:`schemes_to_json`."""
    return [
        TargetScheme(item[0], item[1], **(item[2] if len(item) > 2 else {}))
        for item in json.loads(text)
    ]


def network_config(net: AnalyticNetwork, batch_size: int) -> dict[str, Any]:
    """The ``ConfigRecord`` entries a client needs to rebuild ``net``'s client half."""
    return {
        ARCHITECTURE: architecture_to_json(net.arch),
        SCHEME: schemes_to_json(net),
        SEED: int(net.seed),
        DTYPE: net.dtype,
        BATCH_SIZE: int(batch_size),
        **({MIRROR: True} if net.mirror else {}),  # absent: not mirrored (older servers)
    }


def network_from_config(
    config: Mapping[str, Any], model: ModelSource | None = None
) -> AnalyticNetwork:
    """The client's :class:`AnalyticNetwork` (no layer solved yet) from a strategy's config.

    ``model`` is the node's own model when the server trains a user's model (traced here and
    checked against the server's description).
    """
    arch = architecture_from_json(str(config[ARCHITECTURE]), model)
    schemes: Sequence[TargetScheme] = schemes_from_json(str(config[SCHEME]))
    return AnalyticNetwork(
        arch,
        schemes if schemes else "label-pca",
        seed=int(config[SEED]),
        dtype=str(config[DTYPE]),
        mirror=bool(config.get(MIRROR, False)),
    )


def personal_regularization(config: Mapping[str, Any]) -> Regularization:
    """Return pFedACnnL's λ rule from a strategy's evaluate config."""
    return Regularization(float(config[LAM]), str(config[LAM_RULE]))


# ---- per-client λ (issue 15): how the output layer's λ is set; ConfigRecord and MetricRecord key
#: ``fixed``: λ = ``lam`` for every client; ``auto``: each client picks its output layer's ρ by
#: exact leave-one-out on its own data (:mod:`flwr_analytic.analytic.personal_lambda`).
PERSONAL_LAMBDA = "personal-lambda"
PERSONAL_LAMBDA_MODES = ("fixed", "auto")
#: ``auto``: the global output layer's mean leverage ``h̄ = df/N`` (one float), which corrects the
#: clients' left-out scores of a layer fitted with their own samples
#: (:func:`~flwr_analytic.analytic.personal_lambda.global_leverage`).
GLOBAL_LEVERAGE = "global-leverage"
#: ρ of each client's local recalibration of its output layer, after λ (``0``: none;
#: :mod:`flwr_analytic.analytic.recalibration`).
PERSONAL_RECALIBRATION = "personal-recalibration"


def evaluate_settings(
    lam: float,
    lam_rule: str,
    mode: str,
    leverage: Callable[[], float],
    recalibration: float = 0.0,
) -> dict[str, Any]:
    """The evaluate config's pFedACnnL entries: λ, its rule and mode, ``h̄``, recalibration ρ."""
    out: dict[str, Any] = {LAM: float(lam), LAM_RULE: lam_rule, PERSONAL_LAMBDA: mode}
    if mode == "auto":
        out[GLOBAL_LEVERAGE] = float(leverage())
    out[PERSONAL_RECALIBRATION] = float(recalibration)
    return out


def personal_recalibration(config: Mapping[str, Any]) -> float | None:
    """The recalibration's ρ from an evaluate config (``None``: off, or not sent)."""
    rho = float(config.get(PERSONAL_RECALIBRATION, 0.0))
    if not (math.isfinite(rho) and rho >= 0):
        raise ValueError(f"{PERSONAL_RECALIBRATION} must be finite and >= 0, got {rho!r}")
    return rho if rho > 0 else None


def auto_lambda_policy(config: Mapping[str, Any]) -> AutoLambda:
    """The clients' auto-λ policy: the default grid and ``z``, in the run's λ rule.

    ``standardized`` runs choose a standardized ``ρ``; ``relative`` and ``absolute`` runs a relative
    one (an absolute λ has no scale to grid over).
    """
    rule = "standardized" if str(config[LAM_RULE]) == "standardized" else "relative"
    return AutoLambda(rule=rule)


def personal_lambda_mode(config: Mapping[str, Any]) -> str:
    """``fixed`` or ``auto``, from an evaluate config (``fixed`` when the server did not say)."""
    mode = str(config.get(PERSONAL_LAMBDA, "fixed"))
    if mode not in PERSONAL_LAMBDA_MODES:
        raise ValueError(f"{PERSONAL_LAMBDA} must be one of {PERSONAL_LAMBDA_MODES}, got {mode!r}")
    return mode


# ---- end of per-client λ


# -------------------------------------------------------------------------------------- weights
def layer_keys(net: AnalyticNetwork, layer: int) -> tuple[str, ...]:
    """``state_dict`` keys of ``layer``'s weight and (when it has one) bias."""
    kw, kb = net.arch.param_keys(layer)
    return (kw,) if kb is None else (kw, kb)


def weights_state_dict(net: AnalyticNetwork, upto: int | None = None) -> dict[str, torch.Tensor]:
    """float64 ``state_dict`` entries of the solved layers ``< upto`` (all solved layers by default).

    Built from the design-space matrices ``W_l`` (not from the module, which may be float32), so
    the values are the server's exact solution; loads into ``arch.build_module()`` or, for a traced
    model, the user's class (``strict=True`` once every layer is solved).
    """
    upto = net.solved_layers if upto is None else upto
    if upto > net.solved_layers:
        raise ValueError(f"layers < {upto} requested, only {net.solved_layers} are solved")
    out: dict[str, torch.Tensor] = {}
    for layer in range(upto):
        w = np.asarray(net.weights[layer], dtype=np.float64)
        params = design_to_params(w, net.arch.conv_geometry(layer))
        for key, value in zip(layer_keys(net, layer), params, strict=False):
            out[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64))
    return out


def output_layer_state(net: AnalyticNetwork, w: np.ndarray) -> dict[str, torch.Tensor]:
    """float64 ``state_dict`` entries of the output layer with weights ``w`` (e.g. a group's)."""
    params = design_to_params(np.asarray(w, dtype=np.float64), None)
    keys = layer_keys(net, net.num_layers - 1)
    return {
        k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in zip(keys, params, strict=False)
    }


def install_layers(
    net: AnalyticNetwork,
    arrays: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    upto: int | None = None,
) -> int:
    """Install the layers ``< upto`` found in ``arrays`` into ``net``.

    ``arrays`` holds ``state_dict`` numpy arrays by key, or (legacy API) the list
    ``[weight_0, bias_0, weight_1, bias_1, ...]`` (a layer without bias sends zeros). With
    ``upto=None`` every consecutive layer present is installed. Returns the number installed.
    Raises ``KeyError`` when a requested layer is missing.
    """
    if not isinstance(arrays, Mapping):
        arrays = _pairs_to_state(net, list(arrays))
    count = 0
    while count < net.num_layers and (upto is None or count < upto):
        keys = layer_keys(net, count)
        if any(k not in arrays for k in keys):
            if upto is None:
                break
            raise KeyError(
                f"the global model lacks layer {count + 1}/{net.num_layers} ({keys[0]!r}); "
                f"needed below layer {upto + 1}"
            )
        values = [np.asarray(arrays[k], dtype=np.float64) for k in keys]
        net.set_layer(count, params_to_design(values[0], values[1] if len(values) > 1 else None))
        count += 1
    return count


def round_content(net: AnalyticNetwork) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Config entries and arrays of the next layer's round beyond the solved layers.

    Empty for one-round layers; during a ``zca-kmeans`` fit, ``stage`` and the assignment weights.
    """
    if net.stage == 0:
        return {}, {}
    weights = torch.from_numpy(np.ascontiguousarray(net.kmeans.assignment()))  # type: ignore[union-attr]
    return {STAGE: net.stage}, {ASSIGNMENT_KEY: weights}


def install_round(
    net: AnalyticNetwork, arrays: Mapping[str, Any] | Sequence[Any], config: Mapping[str, Any]
) -> None:
    """Client side of :func:`round_content`: the k-means round's assignment weights, if any."""
    stage = int(config.get(STAGE, 0))
    if stage == 0:
        return
    if not isinstance(arrays, Mapping) or ASSIGNMENT_KEY not in arrays:
        raise KeyError(f"a k-means round (stage {stage}) needs {ASSIGNMENT_KEY!r} in the arrays")
    weights = np.asarray(arrays[ASSIGNMENT_KEY], dtype=np.float64)
    layer = int(config[LAYER])
    expected = (net.design_dim(layer), net.schemes[layer].filter_count(net.arch.out_width(layer)))
    if weights.shape != expected:
        raise ValueError(f"{ASSIGNMENT_KEY} has shape {weights.shape}, expected {expected}")
    net.kmeans = AssignmentRound(weights, stage - 1)


def weights_list(net: AnalyticNetwork) -> list[np.ndarray]:
    """The solved layers as the legacy list ``[weight_0, bias_0, ...]`` (zeros for no bias)."""
    out: list[np.ndarray] = []
    for layer in range(net.solved_layers):
        weight, bias = design_to_params(net.weights[layer], net.arch.conv_geometry(layer))
        out += [np.ascontiguousarray(weight), np.ascontiguousarray(bias)]
    return out


def _pairs_to_state(net: AnalyticNetwork, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    if len(arrays) % 2:
        raise ValueError(f"expected weight/bias pairs, got {len(arrays)} arrays")
    out = {}
    for layer in range(min(len(arrays) // 2, net.num_layers)):
        keys = layer_keys(net, layer)
        for key, value in zip(keys, arrays[2 * layer : 2 * layer + 2], strict=False):
            out[key] = value
    return out


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
