"""A user's model traced into FedACnnL's layers: :class:`TracedArchitecture` and its module.

Built by :func:`~flwr_analytic.models.tracing.trace_model` (which says what is supported). The
traced architecture has the interface of :class:`~flwr_analytic.models.Architecture`; its module
runs the user's own graph, stopping at the input of any trainable layer, and keeps the user's
parameter names, so ``state_dict`` loads into the user's class.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from flwr_analytic.models.architectures import ConvGeometry


class UnsupportedModelError(ValueError):
    """The model is not a chain of layers FedACnnL can solve (raised before any round)."""


@dataclass(frozen=True)
class TracedLayer:
    """One trainable layer of a traced model.

    Attributes
    ----------
    name : str
        The module's qualified name in the user's model (``"conv1"``, ``"features.0"``).
    kind : {"conv", "dense"}
        ``Conv2d`` or ``Linear``.
    input_shape : tuple of int
        Shape of one sample's input to the layer: ``(C, H, W)`` or ``(F,)``.
    out_width : int
        Output channels / features.
    bias : bool
        Whether the layer has a bias.
    activation : str
        The activation right after it as the target schemes read it (``relu``, ``tanh``,
        ``sigmoid`` or ``identity``).
    geometry : ConvGeometry or None
        im2col geometry of a conv layer.

    """

    name: str
    kind: str
    input_shape: tuple[int, ...]
    out_width: int
    bias: bool
    activation: str
    geometry: ConvGeometry | None = None

    @property
    def design_dim(self) -> int:
        """``D``: ``C_in·kh·kw + 1`` (conv) or ``F + 1`` (dense); the bias column is always there."""
        if self.geometry is not None:
            return self.geometry.patch_size + 1
        return int(self.input_shape[0]) + 1


class _Stop(Exception):  # noqa: N818 - control flow, not an error
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()  # no args: nothing for torch.fx to format into a message
        self.value = value


class _UptoInterpreter(fx.Interpreter):
    """Runs the graph and stops with the input of the call to module ``stop``."""

    def __init__(self, module: nn.Module, graph: fx.Graph, stop: str | None) -> None:
        super().__init__(module, garbage_collect_values=True, graph=graph)
        self.stop = stop
        # torch.fx would annotate every exception with the node's traceback (milliseconds per
        # batch); stopping is not an error
        self.extra_traceback = False

    def call_module(self, target, args, kwargs):  # noqa: ANN001, ANN201, D102
        if target == self.stop:
            raise _Stop(args[0])
        return super().call_module(target, args, kwargs)


class TracedModule(nn.Module):
    """The user's traced model with ``forward(x, upto)``; parameters keep the user's names."""

    def __init__(self, graph_module: fx.GraphModule, layer_names: tuple[str, ...]) -> None:
        super().__init__()
        for name, child in graph_module.named_children():
            self.add_module(name, child)
        self.graph = copy.deepcopy(graph_module.graph)
        self.layer_names = layer_names

    def layer_op(self, layer: int) -> nn.Module:
        """The ``Conv2d`` / ``Linear`` of ``layer``."""
        return self.get_submodule(self.layer_names[layer])

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """The model's output, or the input of layer ``upto`` when given."""
        stop = None if upto is None else self.layer_names[upto]
        # canonical strides: numpy gives a size-1 axis (one channel) any stride, which PyTorch may
        # read as channels-last; a conv then returns channels-last and the model's x.view fails
        x = x.to(memory_format=torch.contiguous_format)
        try:
            return _UptoInterpreter(self, self.graph, stop).run(x)
        except _Stop as reached:
            return reached.value


class TracedArchitecture:
    """A traced user model with the interface of :class:`~flwr_analytic.models.Architecture`.

    Build it with :func:`trace_model`. ``layers`` are the trainable layers in order; the last is
    the output layer onto ``num_classes``.
    """

    def __init__(
        self,
        name: str,
        input_shape: tuple[int, ...],
        layers: tuple[TracedLayer, ...],
        graph_module: fx.GraphModule,
        graph_digest: str,
    ) -> None:
        self.name = name
        self.input_shape = tuple(int(s) for s in input_shape)
        self.layers = layers
        self.hidden = layers[:-1]
        self.num_classes = layers[-1].out_width
        self.graph_digest = graph_digest
        self._graph_module = graph_module

    @property
    def num_layers(self) -> int:
        """Trainable layers, output included."""
        return len(self.layers)

    def input_shape_of(self, layer: int) -> tuple[int, ...]:
        """Shape of one sample's input to ``layer``."""
        return self.layers[layer].input_shape

    def design_dim(self, layer: int) -> int:
        """``D`` of ``layer``."""
        return self.layers[layer].design_dim

    def out_width(self, layer: int) -> int:
        """Output channels / features of ``layer``."""
        return self.layers[layer].out_width

    def conv_geometry(self, layer: int) -> ConvGeometry | None:
        """im2col geometry of a conv ``layer``; ``None`` for a dense one."""
        return self.layers[layer].geometry

    def activation(self, layer: int) -> str:
        """Activation after ``layer``, as the target schemes read it."""
        return self.layers[layer].activation

    def has_bias(self, layer: int) -> bool:
        """Whether ``layer`` has a bias (without one, its bias row is solved as 0)."""
        return self.layers[layer].bias

    def contrast(self, layer: int) -> float | None:
        """Patch contrast normalization is not part of a traced model (``None``)."""
        return None

    def param_keys(self, layer: int) -> tuple[str, str | None]:
        """The user's ``state_dict`` keys of ``layer``'s weight and bias (``None``: no bias)."""
        name = self.layers[layer].name
        return f"{name}.weight", (f"{name}.bias" if self.layers[layer].bias else None)

    def build_module(self) -> TracedModule:
        """A copy of the traced model (``forward(x, upto)``, ``layer_op(l)``)."""
        names = tuple(layer.name for layer in self.layers)
        return TracedModule(copy.deepcopy(self._graph_module), names)

    def describe(self) -> dict[str, Any]:
        """JSON-able description; a client compares it with its own model's."""
        return {
            "name": self.name,
            "traced": True,
            "input-shape": list(self.input_shape),
            "num-classes": self.num_classes,
            "graph": self.graph_digest,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def __repr__(self) -> str:
        kinds = ", ".join(f"{layer.name}:{layer.kind}" for layer in self.layers)
        return f"TracedArchitecture({self.name}, input {self.input_shape}, [{kinds}])"


__all__ = ["TracedArchitecture", "TracedLayer", "TracedModule", "UnsupportedModelError"]
