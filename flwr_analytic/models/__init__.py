"""Model architectures as layer specs or traced user modules, and their torch modules (no Flower)."""

from flwr_analytic.models.architectures import (
    ACTIVATIONS,
    ARCHITECTURES,
    Architecture,
    ContrastConv2d,
    ConvGeometry,
    ConvSpec,
    DenseSpec,
    LayerSpec,
    SpecNet,
    build_module,
    cnn,
    coates,
    get_architecture,
    lenet5,
    linear,
    mlp,
)
from flwr_analytic.models.traced import TracedArchitecture, TracedLayer, UnsupportedModelError
from flwr_analytic.models.tracing import as_architecture, trace_model

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "Architecture",
    "ConvGeometry",
    "ConvSpec",
    "DenseSpec",
    "LayerSpec",
    "SpecNet",
    "TracedArchitecture",
    "TracedLayer",
    "UnsupportedModelError",
    "as_architecture",
    "ContrastConv2d",
    "build_module",
    "cnn",
    "coates",
    "get_architecture",
    "lenet5",
    "linear",
    "mlp",
    "trace_model",
]
