"""Your own ``torch.nn.Module``, traced into the layer sequence FedACnnL solves (``torch.fx``).

FedACnnL (Gu et al., arXiv 2502.06915) solves a network one trainable layer at a time: layer ``l``'s
design rows are its input, computed by the solved layers ``< l`` and the fixed operations between
them. :func:`trace_model` traces a user's module with :func:`torch.fx.symbolic_trace` and accepts it
when it is such a chain:

* **trainable layers**: ``Conv2d`` (any kernel, stride, padding, dilation; ``groups=1``, zero
  padding; bias or not) and ``Linear`` on ``(N, F)`` inputs; the last one is a ``Linear`` whose
  output is the model's output (only reshapes and dropout may follow it);
* **between them**: element-wise activations (``ReLU``, ``LeakyReLU``, ``GELU``, ``ELU``, ``SiLU``,
  ``Tanh``, ``Sigmoid``, ``Identity``; modules, ``torch.*`` / ``F.*`` functions and tensor
  methods), pooling (``MaxPool2d``, ``AvgPool2d``, adaptive pooling), ``Flatten`` / ``view`` /
  ``reshape`` / ``flatten``, ``Dropout`` (identity: the model runs in eval mode), and arithmetic
  with a constant (``x * 2``, ``x / 255``);
* anything else is refused before the first round by :class:`UnsupportedModelError`, naming the
  node, the module and its type: ``BatchNorm`` (its batch statistics are not a function of the
  solved layers alone), residual additions and any other operation joining two tensors,
  attention, recurrent layers, a module called twice (shared weights), parameters read directly.

The traced model is exact: its forward pass is the user's own graph, so federated statistics equal
the pooled data's for every layer, as for the package's own architectures. The solved weights keep
the user's parameter names (``conv1.weight``, ...): ``state_dict`` loads into the user's class.
"""

from __future__ import annotations

import copy
import hashlib
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from flwr_analytic.models.architectures import Architecture, ConvGeometry
from flwr_analytic.models.traced import TracedArchitecture, TracedLayer, UnsupportedModelError

#: Activation modules and the name the target schemes use (tanh/sigmoid are inverted, others not).
ACTIVATION_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.LeakyReLU: "relu",
    nn.GELU: "relu",
    nn.ELU: "relu",
    nn.SiLU: "relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
}
ACTIVATION_FUNCTIONS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.leaky_relu: "relu",
    F.gelu: "relu",
    F.elu: "relu",
    F.silu: "relu",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
}
ACTIVATION_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
POOL_FUNCTIONS = (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d)
#: Operations that only reshape or (in eval mode) pass through.
RESHAPE_MODULES = (nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Identity)
RESHAPE_FUNCTIONS = (torch.flatten, torch.reshape, F.dropout, F.dropout2d)
RESHAPE_METHODS = ("view", "reshape", "flatten", "contiguous")
SCALAR_OPS = (operator.mul, operator.truediv, operator.add, operator.sub, torch.mul, torch.div)
SUPPORTED = (
    "Conv2d (groups=1, zero padding) and Linear layers, the last a Linear giving the output, joined "
    "by element-wise activations (ReLU, LeakyReLU, GELU, ELU, SiLU, Tanh, Sigmoid, Identity), "
    "pooling (MaxPool2d, AvgPool2d, adaptive pooling), Flatten/view/reshape, Dropout and "
    "arithmetic with constants"
)


# ------------------------------------------------------------------------------------ tracing
def _refuse(node: fx.Node, what: str, gm: fx.GraphModule | None = None) -> UnsupportedModelError:
    if node.op == "call_module" and gm is not None:
        module = gm.get_submodule(str(node.target))
        what = f"module {node.target!r} ({type(module).__name__}): {what}"
    else:
        what = f"operation {node.name!r} ({_target_name(node)}): {what}"
    return UnsupportedModelError(f"{what}. FedACnnL supports {SUPPORTED}.")


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return f"{node.op} {target}"
    return getattr(target, "__name__", repr(target))


def _inputs(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def _classify(node: fx.Node, gm: fx.GraphModule, meta: set[fx.Node]) -> str:
    """``trainable``, ``activation:<name>``, ``pool``, ``reshape``, ``scalar``, ``meta``."""
    op, target = node.op, node.target
    if op == "call_module":
        module = gm.get_submodule(str(target))
        if isinstance(module, nn.Conv2d | nn.Linear):
            return "trainable"
        if type(module) in ACTIVATION_MODULES:
            return f"activation:{ACTIVATION_MODULES[type(module)]}"
        if isinstance(module, POOL_MODULES):
            return "pool"
        if isinstance(module, RESHAPE_MODULES):
            return "reshape"
        why = "batch statistics are not a function of the solved layers"
        raise _refuse(node, why if "Norm" in type(module).__name__ else "not supported", gm)
    inputs = _inputs(node)
    if inputs and all(i in meta for i in inputs):
        return "meta"  # arithmetic on sizes, e.g. x.size(0) * 2
    if op == "call_method":
        if target in ("size", "dim"):
            return "meta"
        if target in ACTIVATION_METHODS:
            return f"activation:{ACTIVATION_METHODS[target]}"
        if target in RESHAPE_METHODS:
            return "reshape"
    if op == "call_function":
        if target is getattr and len(node.args) > 1 and node.args[1] == "shape":
            return "meta"
        if target in ACTIVATION_FUNCTIONS:
            return f"activation:{ACTIVATION_FUNCTIONS[target]}"
        if target in POOL_FUNCTIONS:
            return "pool"
        if target in RESHAPE_FUNCTIONS:
            return "reshape"
        if target in SCALAR_OPS:
            return "scalar"
    if op == "get_attr":
        raise _refuse(node, "reads a parameter or buffer directly")
    raise _refuse(node, "not supported")


def _tensor_input(node: fx.Node, kind: str, meta: set[fx.Node]) -> fx.Node | None:
    tensors = [i for i in _inputs(node) if i not in meta]
    if len(tensors) != 1 or (kind == "reshape" and node.args[0] is not tensors[0]):
        joined = "two tensors (a residual addition or a join)" if len(tensors) > 1 else "no input"
        raise _refuse(node, f"combines {joined}")
    return tensors[0]


def _check_trainable(node: fx.Node, gm: fx.GraphModule, shape: torch.Size) -> None:
    module = gm.get_submodule(str(node.target))
    if isinstance(module, nn.Linear):
        if len(shape) != 2:
            raise _refuse(node, f"a Linear must get (N, features) inputs, got {tuple(shape)}", gm)
        return
    if module.groups != 1:
        raise _refuse(node, f"groups={module.groups} (only groups=1 is supported)", gm)
    if module.padding_mode != "zeros":
        raise _refuse(node, f"padding_mode={module.padding_mode!r} (only 'zeros')", gm)


def _padding(module: nn.Conv2d, node: fx.Node, gm: fx.GraphModule) -> tuple[int, int]:
    if module.padding == "valid":
        return 0, 0
    if module.padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        if any(t % 2 for t in totals):
            raise _refuse(node, "padding='same' with an even kernel pads unevenly", gm)
        return totals[0] // 2, totals[1] // 2
    return int(module.padding[0]), int(module.padding[1])


def trace_model(model: nn.Module, input_shape: tuple[int, ...]) -> TracedArchitecture:
    """Trace ``model`` into the trainable layers FedACnnL solves, or refuse it.

    Parameters
    ----------
    model : torch.nn.Module
        The user's model (left unchanged; a copy in eval mode is traced).
    input_shape : tuple of int
        Shape of one sample, e.g. ``(3, 32, 32)``.

    Returns
    -------
    TracedArchitecture

    Raises
    ------
    UnsupportedModelError
        Naming the first node, module and type that FedACnnL cannot solve, and what is supported.

    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    copy_ = copy.deepcopy(model).eval().double()
    try:
        gm = fx.symbolic_trace(copy_)
    except Exception as exc:  # noqa: BLE001 - torch.fx raises many kinds
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(exc).__name__}: {exc}); "
            "data-dependent control flow in forward() is not supported"
        ) from exc
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(
            f"{type(model).__name__}.forward must take one input tensor, takes {len(placeholders)}"
        )
    try:
        ShapeProp(gm).propagate(torch.zeros((1, *input_shape), dtype=torch.float64))
    except Exception as exc:  # noqa: BLE001 - whatever the user's forward raises
        cause = exc.__cause__ or exc
        raise UnsupportedModelError(
            f"{type(model).__name__} does not run on a sample of shape {tuple(input_shape)} "
            f"({type(cause).__name__}: {str(cause).splitlines()[0]}); check input_shape"
        ) from exc
    meta: set[fx.Node] = set()
    kinds: dict[fx.Node, str] = {}
    parent: dict[fx.Node, fx.Node] = {}
    output: fx.Node | None = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            result = node.args[0]
            if not isinstance(result, fx.Node) or result in meta:
                raise UnsupportedModelError("forward must return a single tensor (the logits)")
            output = result
            continue
        kind = _classify(node, gm, meta)
        if kind == "meta":
            meta.add(node)
            continue
        kinds[node] = kind
        parent[node] = _tensor_input(node, kind, meta)
    # the path from the output back to the input must hold every tensor operation
    path: list[fx.Node] = []
    node = output
    while node is not None and node.op != "placeholder":
        path.append(node)
        node = parent[node]
    path.reverse()
    off_path = [n for n in kinds if n not in set(path)]
    if off_path:
        raise _refuse(off_path[0], "its result is not on the path from the input to the output", gm)
    layers = _layers(path, kinds, gm)
    digest = hashlib.sha256(gm.code.encode()).hexdigest()[:16]
    return TracedArchitecture(type(model).__name__, tuple(input_shape), layers, gm, digest)


def as_architecture(
    model: Any, input_shape: tuple[int, ...] | None = None
) -> Architecture | TracedArchitecture:
    """``model`` as an architecture: a spec or traced one as it is, an ``nn.Module`` traced.

    Raises
    ------
    ValueError
        For a module without ``input_shape``.
    TypeError
        For anything else.

    """
    if isinstance(model, Architecture | TracedArchitecture):
        return model
    if isinstance(model, nn.Module):
        if input_shape is None:
            raise ValueError(
                f"input_shape: give the shape of one sample to train your {type(model).__name__}"
                ", e.g. input_shape=(3, 32, 32)"
            )
        return trace_model(model, tuple(input_shape))
    raise TypeError(
        f"architecture: {model!r} is not allowed; give a torch.nn.Module (with input_shape) or an "
        "Architecture (flwr_analytic.models.get_architecture)"
    )


def _layers(
    path: list[fx.Node], kinds: dict[fx.Node, str], gm: fx.GraphModule
) -> tuple[TracedLayer, ...]:
    layers: list[TracedLayer] = []
    seen: set[str] = set()
    for i, node in enumerate(path):
        if kinds[node] != "trainable":
            continue
        name = str(node.target)
        if name in seen:
            raise _refuse(node, "is called twice (shared weights)", gm)
        seen.add(name)
        module = gm.get_submodule(name)
        shape = node.args[0].meta["tensor_meta"].shape
        _check_trainable(node, gm, shape)
        activation = "identity"
        for after in path[i + 1 :]:
            if kinds[after].startswith("activation:"):
                activation = kinds[after].split(":", 1)[1]
            if kinds[after] not in ("reshape", "scalar"):
                break
        geometry = None
        if isinstance(module, nn.Conv2d):
            geometry = ConvGeometry.of(
                module.in_channels,
                module.kernel_size,
                module.stride,
                _padding(module, node, gm),
                module.dilation,
            )
        out = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        layers.append(
            TracedLayer(
                name,
                "conv" if geometry else "dense",
                tuple(int(s) for s in shape[1:]),
                int(out),
                module.bias is not None,
                activation,
                geometry,
            )
        )
    if not layers:
        raise UnsupportedModelError(
            f"no Conv2d or Linear layer found. FedACnnL supports {SUPPORTED}."
        )
    last = next(n for n in reversed(path) if kinds[n] == "trainable")
    if not isinstance(gm.get_submodule(str(last.target)), nn.Linear):
        raise _refuse(last, "the output layer must be a Linear", gm)
    tail = [n for n in path[path.index(last) + 1 :] if kinds[n] != "reshape"]
    if tail:
        raise _refuse(tail[0], f"follows the output layer {last.target!r}; only reshapes may", gm)
    return tuple(layers)


__all__ = ["SUPPORTED", "as_architecture", "trace_model"]
