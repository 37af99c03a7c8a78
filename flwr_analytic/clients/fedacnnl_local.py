"""The client half of FedACnnL / pFedACnnL as pure functions (no Flower message handling).

Gu et al., "Analytic Personalized Federated Meta-Learning" (arXiv 2502.06915). A client's data is
an :class:`~flwr_analytic.data.ArrayDataset` or the user's own loaders
(:class:`~flwr_analytic.data.batches.LoaderData`: a ``DataLoader`` of dict or ``(x, y)`` batches);
statistics and evaluation stream over its batches. With a user's model the server's description is
checked against the node's own ``model`` (:func:`~flwr_analytic.fedacnnl.protocol.network_from_config`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flwr_analytic.analytic import (
    AnalyticNetwork,
    LambdaChoice,
    LayerStatistics,
    output_design,
    personalize,
)
from flwr_analytic.analytic.label_shift import product_of_experts
from flwr_analytic.analytic.quadratic_head import head_scores, stage_statistics
from flwr_analytic.data import ArrayDataset, from_hf_dataset
from flwr_analytic.data.batches import LoaderData
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.fedacnnl import stage_protocol as S

#: A client's data: arrays, or the user's loader (``LoaderData``, a ``DataLoader``).
ClientData = ArrayDataset | LoaderData | Any
#: The global layers as ``state_dict`` arrays by key, or the legacy list of weight/bias pairs.
LayerArrays = Mapping[str, np.ndarray] | Sequence[np.ndarray]


def as_client_data(
    data: Any, image_key: str | None = None, label_key: str | None = None
) -> ClientData:
    """A client's data in the form the functions below take.

    An ``ArrayDataset`` or ``LoaderData`` as it is; a flwr-datasets partition (a Hugging Face
    ``datasets.Dataset``, e.g. ``FederatedDataset(...).load_partition(k)``) as an ``ArrayDataset``
    (:func:`~flwr_analytic.data.from_hf_dataset`; images scaled to ``[0, 1]``); anything else (your
    ``DataLoader``) as ``LoaderData`` with the keys of its dict batches.
    """
    if isinstance(data, ArrayDataset | LoaderData):
        return data
    if hasattr(data, "column_names") and hasattr(data, "features"):
        return from_hf_dataset(data, image_key, label_key)
    return LoaderData(data, image_key, label_key)


def check_data(net: AnalyticNetwork, data: ClientData) -> None:
    """Shape and label range of in-memory data (a loader's batches are checked as they stream)."""
    if not isinstance(data, ArrayDataset):
        return
    if tuple(data.input_shape) != tuple(net.arch.input_shape):
        raise ValueError(
            f"data samples have shape {data.input_shape}, the model expects {net.arch.input_shape}"
        )
    if len(data) and int(data.y.max()) >= net.arch.num_classes:
        raise ValueError(f"labels exceed the model's {net.arch.num_classes} classes")


def num_samples(data: ClientData) -> int:
    """Samples in ``data`` (a loader: ``len(loader.dataset)``; ``-1`` when unknown)."""
    try:
        return len(data)
    except TypeError:
        return -1


def layer_statistics(
    config: Mapping[str, Any],
    arrays: LayerArrays,
    train: ClientData,
    model: P.ModelSource | None = None,
) -> tuple[AnalyticNetwork, LayerStatistics]:
    """Client half of one FedACnnL round: ``(G_k, B_k, n_k)`` of ``config["layer"]``.

    Parameters
    ----------
    config : mapping
        The strategy's train config (see :mod:`flwr_analytic.fedacnnl.protocol`).
    arrays : mapping of str to numpy.ndarray, or list
        The global layers ``< layer`` as ``state_dict`` arrays (legacy API: weight/bias list).
    train : ArrayDataset or LoaderData
        The client's training data (streamed batch by batch).
    model : torch.nn.Module or callable, optional
        The node's own model, when the server trains a user's model.

    Returns
    -------
    (AnalyticNetwork, LayerStatistics)
        The client's network (layers ``< layer`` installed) and the layer's statistics.

    """
    net = P.network_from_config(config, model)
    layer = int(config[P.LAYER])
    if not 0 <= layer < net.num_layers:
        raise ValueError(f"layer {layer + 1} out of range 1..{net.num_layers}")
    check_data(net, train)
    P.install_layers(net, arrays, upto=layer)
    batch = int(config[P.BATCH_SIZE])
    if S.SECOND_STAGE in config:  # the second stage's round: statistics of [h, q, 1]
        stage = S.stage_from_arrays(arrays)
        return net, stage_statistics(net, stage, *_xy(train), batch_size=batch)
    P.install_round(net, arrays, config)
    return net, net.statistics(layer, *_xy(train), batch_size=batch)


def _xy(data: ClientData) -> tuple[Any, Any]:
    """``(x, y)`` arrays of in-memory data (the historical path), or ``(source, None)``."""
    return (data.x, data.y) if isinstance(data, ArrayDataset) else (data, None)


def evaluate_global_and_personal(
    config: Mapping[str, Any],
    arrays: LayerArrays,
    train: ClientData,
    test: ClientData,
    kept: Mapping[int, tuple[str, LayerStatistics]] | None = None,
    group_arrays: Mapping[str, np.ndarray] | None = None,
    model: P.ModelSource | None = None,
    second_stage: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, float], dict[int, tuple[str, LayerStatistics]]]:
    """Accuracy and loss of the global model and of the client's pFedACnnL model on ``test``.

    The personalized layers use the statistics the client kept from training when they were
    computed with the same global layers below (matching fingerprint); otherwise (e.g. the client
    was not sampled in that round) they are recomputed from ``train``. With ``group_arrays`` (the
    output layer of the client's group, group-wise runs) the group model and its personalization
    are scored too (``group-*``, ``group-personal-*``). With ``second_stage`` (the arrays of
    :func:`~flwr_analytic.fedacnnl.stage_protocol.stage_arrays`) the second-stage head and the
    product of experts are scored too (:func:`second_stage_metrics`).

    With ``personal-lambda = "auto"`` in ``config`` the output layer's λ is the client's own
    (:func:`choose_output_lambdas`: exact leave-one-out on ``train``, one more forward pass over
    it, no communication); hidden layers (``personalize-layers = "all"``) keep the fixed ``lam``.
    With ``personal-recalibration = ρ > 0`` the personalized output layer is then recalibrated on
    the client's output statistics (:mod:`flwr_analytic.analytic.recalibration`).

    Returns
    -------
    (metrics, statistics)
        ``global-*`` / ``personal-*`` accuracy, loss and correct counts, ``num-examples`` (test
        size), ``stats-reused``, with auto λ ``personal-lambda`` (the chosen ρ; ``inf``: the
        global layer kept; ``group-personal-lambda`` likewise); and the statistics used per layer.

    """
    net = P.network_from_config(config, model)
    check_data(net, test)
    if P.install_layers(net, arrays) != net.num_layers:
        raise KeyError("the evaluation message does not carry every layer of the model")
    reg = P.personal_regularization(config)
    which = str(config[P.PERSONALIZE_LAYERS])
    per_layer: list[LayerStatistics | None] = [None] * net.num_layers
    used: dict[int, tuple[str, LayerStatistics]] = {}
    reused = 0
    for layer in P.personalized_layers(net, which):
        digest = P.weights_digest(net, layer)
        if kept and layer in kept and kept[layer][0] == digest:
            stats = kept[layer][1]
            reused += 1
        else:
            stats = net.statistics(layer, *_xy(train), batch_size=int(config[P.BATCH_SIZE]))
        per_layer[layer] = stats
        used[layer] = (digest, stats)
    group = None
    if group_arrays:
        group = net.with_weights(net.weights)  # type: ignore[arg-type]
        last = net.num_layers - 1
        P.install_layers(group, {**_state_of(net), **dict(group_arrays)}, upto=last + 1)
    choices: dict[str, LambdaChoice | None] = {"personal": None, "group-personal": None}
    if P.personal_lambda_mode(config) == "auto":
        choices = choose_output_lambdas(config, net, group, train, per_layer[-1])
    recal = P.personal_recalibration(config)
    own = personalize(net, per_layer, reg, which, output=choices["personal"], recalibration=recal)
    models = [("global", net), ("personal", net.with_weights(own))]
    personal_head, local = own[-1], per_layer[-1]
    if group is not None:
        choice = choices["group-personal"]
        own = personalize(group, per_layer, reg, which, output=choice, recalibration=recal)
        models += [("group", group), ("group-personal", group.with_weights(own))]
    metrics: dict[str, float] = {"train-examples": num_samples(train)}
    for prefix, choice in choices.items():
        if choice is not None:
            metrics[f"{prefix}-lambda"] = float(choice.rho)
    for prefix, scored in models:
        res = scored.evaluate(*_xy(test))
        metrics[P.NUM_EXAMPLES] = int(res["num-examples"])
        if res["num-examples"] == 0:
            res = {"accuracy": 0.0, "loss": 0.0, "correct": 0}
        metrics[f"{prefix}-accuracy"] = float(res["accuracy"])
        metrics[f"{prefix}-loss"] = float(res["loss"])
        metrics[f"{prefix}-correct"] = int(res["correct"])
    metrics["stats-reused"] = reused
    if second_stage:
        metrics.update(second_stage_metrics(config, net, personal_head, local, second_stage, test))
    return metrics, used


def second_stage_metrics(
    config: Mapping[str, Any],
    net: AnalyticNetwork,
    personal_head: np.ndarray,
    local: LayerStatistics | None,
    arrays: Mapping[str, np.ndarray],
    test: ClientData,
) -> dict[str, float]:
    """Accuracy of the global second-stage head and of the product of experts on ``test``.

    The product (:func:`~flwr_analytic.analytic.label_shift.product_of_experts`) is the
    second-stage head ``f`` moved to this client's class prior (Saerens et al., Neural Computation
    2002), times its pFedACnnL head ``s_k = [h, 1]W_k``:
    ``log softmax(T·f) + log(π_k/π) + w · log softmax(T·s_k)``. ``π_k`` comes from the bias row of
    the client's own output-layer ``B_k`` (its label counts), ``π`` from the pooled counts the
    server sends: no extra communication. ``T`` and ``w`` are the evaluate config's.
    """
    if local is None:
        raise ValueError("the second stage's scoring needs this client's output-layer statistics")
    stage = S.stage_from_arrays(arrays)
    for key in (S.WEIGHTS, S.POOLED_COUNTS):
        if key not in arrays:
            raise KeyError(f"a second-stage evaluation message needs the array {key!r}")
    settings = S.scoring_settings(float(config[S.TEMPERATURE]), float(config[S.WEIGHT]))
    w_stage = np.asarray(arrays[S.WEIGHTS], dtype=np.float64)
    batch = int(config[P.BATCH_SIZE])
    f, heads, y = head_scores(net, stage, w_stage, {"personal": personal_head}, *_xy(test), batch)
    joint = product_of_experts(
        f,
        heads["personal"],
        local.cross[-1],
        np.asarray(arrays[S.POOLED_COUNTS], dtype=np.float64),
        settings[S.TEMPERATURE],
        settings[S.WEIGHT],
    )
    out: dict[str, float] = {}
    for prefix, scores in (("second-stage", f), ("product", joint)):
        correct = int(np.sum(scores.argmax(1) == y)) if len(y) else 0
        out[f"{prefix}-accuracy"] = correct / len(y) if len(y) else 0.0
        out[f"{prefix}-correct"] = correct
    return out


def choose_output_lambdas(
    config: Mapping[str, Any],
    net: AnalyticNetwork,
    group: AnalyticNetwork | None,
    train: ClientData,
    statistics: LayerStatistics | None,
) -> dict[str, LambdaChoice | None]:
    """The client's own output-layer λ for the global (and group) layer, by leave-one-out.

    :func:`~flwr_analytic.analytic.personal_lambda.select_lambda` on the output layer's design rows
    of ``train``, with the default grid ``ρ ∈ {1e-4, 10^-3.75, …, 1e3, ∞}`` in the run's λ rule
    (:func:`~flwr_analytic.fedacnnl.protocol.auto_lambda_policy`); the final layer is solved from
    ``statistics``.
    """
    policy = P.auto_lambda_policy(config)
    design, labels = output_design(net, *_xy(train), batch_size=int(config[P.BATCH_SIZE]))
    gram = None if statistics is None else statistics.gram
    cross = None if statistics is None else statistics.cross
    leverage = float(config.get(P.GLOBAL_LEVERAGE, 0.0))  # the global layer's h̄ (both layers)
    out: dict[str, LambdaChoice | None] = {"personal": None, "group-personal": None}
    for key, model in (("personal", net), ("group-personal", group)):
        if model is not None:
            w = model.weights[-1]
            out[key] = policy.select(design, labels, w, gram=gram, cross=cross, leverage=leverage)
    return out


def _state_of(net: AnalyticNetwork) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in P.weights_state_dict(net).items()}


__all__ = [
    "ClientData",
    "as_client_data",
    "check_data",
    "choose_output_lambdas",
    "evaluate_global_and_personal",
    "layer_statistics",
    "num_samples",
    "second_stage_metrics",
]
