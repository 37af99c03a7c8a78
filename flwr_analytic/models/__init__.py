"""Model architectures as layer specs, and their plain torch modules (no Flower imports)."""

from flwr_analytic.models.architectures import (
    ACTIVATIONS,
    ARCHITECTURES,
    Architecture,
    ConvSpec,
    DenseSpec,
    LayerSpec,
    SpecNet,
    build_module,
    cnn,
    get_architecture,
    lenet5,
    linear,
    mlp,
)

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "Architecture",
    "ConvSpec",
    "DenseSpec",
    "LayerSpec",
    "SpecNet",
    "build_module",
    "cnn",
    "get_architecture",
    "lenet5",
    "linear",
    "mlp",
]
