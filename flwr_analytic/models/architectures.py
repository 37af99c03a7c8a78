"""Layer-by-layer architecture specs shared by analytic training and backprop training.

An :class:`Architecture` is a stack of hidden :class:`ConvSpec` / :class:`DenseSpec` layers followed by a
linear output layer onto the classes. The same spec builds a plain :class:`torch.nn.Module`
(:func:`build_module`), so an analytically trained network exports to a model that runs anywhere, and
backprop can train the identical network for reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity")


POOL_TYPES = ("max", "avg", "grid")


@dataclass(frozen=True)
class ConvSpec:
    """``Conv2d(C_in, out_channels, kernel_size, padding)`` → activation → pooling.

    ``pool_type`` ``"max"`` / ``"avg"``: ``pool``×``pool`` windows; ``"grid"``: average over a
    ``pool``×``pool`` grid of equal regions (``AdaptiveAvgPool2d(pool)``; ``pool = 2`` is the quadrant
    pooling of Coates, Lee, Ng, AISTATS 2011). ``contrast``: when set, every patch is
    contrast-normalized before the filters, ``p ← (p − p̄) / √(var(p) + contrast)`` (per patch, over
    its ``C_in·k²`` entries; see :class:`ContrastConv2d`).
    """

    out_channels: int
    kernel_size: int
    padding: int = 0
    activation: str = "relu"
    pool: int = 2
    pool_type: str = "max"
    contrast: float | None = None


@dataclass(frozen=True)
class DenseSpec:
    """``Linear(in, out_features)`` → activation (input flattened first)."""

    out_features: int
    activation: str = "relu"


LayerSpec = ConvSpec | DenseSpec


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class ConvGeometry:
    """Where a ``Conv2d`` reads its input: the im2col geometry of its design rows.

    A design row is the ``C_in × kh × kw`` patch under one output position (flattened like
    ``Conv2d.weight``), so ``D = C_in·kh·kw + 1``. Output size per axis:
    ``⌊(H + 2p − d(k − 1) − 1)/s⌋ + 1``.
    """

    in_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @classmethod
    def of(
        cls,
        in_channels: int,
        kernel: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
    ) -> ConvGeometry:
        """Build from ``Conv2d``-style ints or pairs."""
        return cls(in_channels, _pair(kernel), _pair(stride), _pair(padding), _pair(dilation))

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Output positions ``(H_out, W_out)`` on an ``h × w`` input."""
        out = []
        for size, k, s, p, d in zip(
            (h, w), self.kernel, self.stride, self.padding, self.dilation, strict=True
        ):
            out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return out[0], out[1]

    @property
    def patch_size(self) -> int:
        """``C_in·kh·kw``."""
        return self.in_channels * self.kernel[0] * self.kernel[1]


@dataclass(frozen=True)
class Architecture:
    """Hidden layers plus a linear output layer onto ``num_classes``.

    Attributes
    ----------
    name : str
        Name of the architecture.
    input_shape : tuple[int, int, int]
        ``(C, H, W)`` of one sample.
    hidden : tuple[LayerSpec, ...]
        Hidden layers in order (conv layers must come before dense ones).
    num_classes : int
        Width of the output layer.

    """

    name: str
    input_shape: tuple[int, int, int]
    hidden: tuple[LayerSpec, ...]
    num_classes: int
    shapes: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shapes: list[tuple[int, ...]] = [tuple(self.input_shape)]
        seen_dense = False
        for i, spec in enumerate(self.hidden):
            if spec.activation not in ACTIVATIONS:
                raise ValueError(f"layer {i}: activation {spec.activation!r} not in {ACTIVATIONS}")
            cur = shapes[-1]
            if isinstance(spec, ConvSpec):
                if seen_dense:
                    raise ValueError(f"layer {i}: conv layers must precede dense layers")
                if spec.pool_type not in POOL_TYPES:
                    raise ValueError(f"layer {i}: pool_type must be one of {POOL_TYPES}")
                if spec.contrast is not None and not spec.contrast > 0:
                    raise ValueError(f"layer {i}: contrast must be > 0 or None")
                c, h, w = cur
                h = h + 2 * spec.padding - spec.kernel_size + 1
                w = w + 2 * spec.padding - spec.kernel_size + 1
                if spec.pool_type == "grid":
                    h, w = (spec.pool, spec.pool) if min(h, w) >= spec.pool else (0, 0)
                else:
                    h, w = h // spec.pool, w // spec.pool
                if h < 1 or w < 1:
                    raise ValueError(
                        f"{self.name}: layer {i} (kernel {spec.kernel_size}, pool {spec.pool}) does "
                        f"not fit its {cur[1]}x{cur[2]} input"
                    )
                shapes.append((spec.out_channels, h, w))
            else:
                seen_dense = True
                shapes.append((spec.out_features,))
        shapes.append((self.num_classes,))
        object.__setattr__(self, "shapes", tuple(shapes))

    @property
    def num_layers(self) -> int:
        """Trainable layers, output included."""
        return len(self.hidden) + 1

    def spec(self, layer: int) -> LayerSpec:
        """Spec of ``layer``; the output layer is a linear :class:`DenseSpec`."""
        if layer == len(self.hidden):
            return DenseSpec(self.num_classes, activation="identity")
        return self.hidden[layer]

    def input_shape_of(self, layer: int) -> tuple[int, ...]:
        """Shape of one sample's input to ``layer`` (before flattening)."""
        return self.shapes[layer]

    def design_dim(self, layer: int) -> int:
        """Design width ``D`` of ``layer``: ``C_in·k² + 1`` (conv) or ``in_features + 1`` (dense)."""
        spec, shape = self.spec(layer), self.shapes[layer]
        if isinstance(spec, ConvSpec):
            return shape[0] * spec.kernel_size**2 + 1
        n = 1
        for s in shape:
            n *= s
        return n + 1

    def out_width(self, layer: int) -> int:
        """Output channels / features of ``layer``."""
        spec = self.spec(layer)
        return spec.out_channels if isinstance(spec, ConvSpec) else spec.out_features

    # The interface the analytic network reads (shared with a traced user model).
    def conv_geometry(self, layer: int) -> ConvGeometry | None:
        """im2col geometry of a conv ``layer`` (stride 1); ``None`` for a dense layer."""
        spec = self.spec(layer)
        if not isinstance(spec, ConvSpec):
            return None
        return ConvGeometry.of(self.shapes[layer][0], spec.kernel_size, 1, spec.padding)

    def activation(self, layer: int) -> str:
        """Activation after ``layer`` (one of :data:`ACTIVATIONS`)."""
        return self.spec(layer).activation

    def has_bias(self, layer: int) -> bool:
        """Whether ``layer`` has a bias (always, for a spec architecture)."""
        return True

    def contrast(self, layer: int) -> float | None:
        """The patch contrast-normalization offset of a conv ``layer`` (``None``: off)."""
        spec = self.spec(layer)
        return spec.contrast if isinstance(spec, ConvSpec) else None

    def param_keys(self, layer: int) -> tuple[str, str | None]:
        """``state_dict`` keys of ``layer``'s weight and bias in :class:`SpecNet`."""
        return f"blocks.{layer}.op.weight", f"blocks.{layer}.op.bias"

    def build_module(self) -> SpecNet:
        """A fresh :class:`SpecNet` (``forward(x, upto)``, ``layer_op(l)``)."""
        return SpecNet(self)

    def describe(self) -> dict:
        """JSON-able description (fingerprints compare it)."""
        return {
            "name": self.name,
            "input-shape": list(self.input_shape),
            "num-classes": self.num_classes,
            "hidden": [_describe_spec(s) for s in self.hidden],
        }


def _describe_spec(spec: LayerSpec) -> dict:
    """A spec as a dict; ``contrast`` only when set (so older descriptions, and fingerprints, hold)."""
    out = {"type": type(spec).__name__, **asdict(spec)}
    if out.get("contrast", 0) is None:
        del out["contrast"]
    return out


class ContrastConv2d(nn.Conv2d):
    """A ``Conv2d`` that contrast-normalizes every patch before its filters.

    With ``p̄`` and ``var(p)`` the mean and variance of the ``C_in·k²`` entries of the patch under an
    output position: ``y = wᵀ(p − p̄·1)/√(var(p) + ε) + b``, computed as one batched GEMM of the
    filters with the normalized patches (``unfold``), which writes the output once. Filters whose
    second half negates the first (the polarity split ``[c; −c]``) take one GEMM of half the width.
    Patch normalization of Coates, Lee, Ng (AISTATS 2011); zero padding counts as pixels, as in
    :func:`~flwr_analytic.analytic.design.conv_rows`. Parameters are those of ``Conv2d`` (stride 1,
    no dilation, one group).
    """

    def __init__(self, *args, contrast: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.contrast = float(contrast)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        n, _, h, w = x.shape
        patches = torch.nn.functional.unfold(x, self.kernel_size, padding=self.padding)
        patches = patches - patches.mean(1, keepdim=True)  # (N, C·k², L)
        patches = patches * torch.rsqrt(patches.pow(2).mean(1, keepdim=True) + self.contrast)
        weight, bias = self.weight.reshape(self.out_channels, -1), self.bias
        half = self.out_channels // 2
        mirrored = (
            not (torch.is_grad_enabled() and self.weight.requires_grad)  # autograd: the full GEMM
            and self.out_channels % 2 == 0
            and torch.equal(weight[half:], -weight[:half])
        )
        if mirrored:  # filters [c; −c] (polarity split): z₂ = −(z₁ − b₁) + b₂, one GEMM of half
            out = torch.empty(n, self.out_channels, patches.shape[-1], dtype=patches.dtype)
            b = torch.zeros(self.out_channels, dtype=patches.dtype) if bias is None else bias
            torch.baddbmm(
                b[None, :half, None],
                weight[None, :half].expand(n, -1, -1),
                patches,
                out=out[:, :half],
            )
            torch.sub((b[:half] + b[half:])[None, :, None], out[:, :half], out=out[:, half:])
        else:
            weight = weight[None].expand(n, -1, -1)
            out = (
                torch.bmm(weight, patches)
                if bias is None
                else torch.baddbmm(bias[None, :, None], weight, patches)
            )
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        return out.reshape(n, self.out_channels, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1)


def activation_module(name: str) -> nn.Module:
    """The ``torch.nn`` module of an activation name."""
    return {
        "relu": nn.ReLU(),
        "tanh": nn.Tanh(),
        "sigmoid": nn.Sigmoid(),
        "identity": nn.Identity(),
    }[name]


class LayerBlock(nn.Module):
    """One layer: ``op`` (``Conv2d`` or ``Linear``), activation, optional pooling."""

    def __init__(self, op: nn.Module, activation: str, pool: nn.Module | None, flatten: bool):
        super().__init__()
        self.op = op
        self.act = activation_module(activation)
        if isinstance(op, ContrastConv2d) and activation == "relu":
            self.act = nn.ReLU(inplace=True)  # a wide layer's output is written once
        self.pool = pool if pool is not None else nn.Identity()
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.flatten:
            x = torch.flatten(x, 1)
        return self.pool(self.act(self.op(x)))


class SpecNet(nn.Module):
    """A plain ``torch.nn.Module`` of an :class:`Architecture` (``blocks[l].op`` holds layer l)."""

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        blocks = []
        for layer in range(arch.num_layers):
            spec, shape = arch.spec(layer), arch.input_shape_of(layer)
            if isinstance(spec, ConvSpec):
                args = (shape[0], spec.out_channels, spec.kernel_size)
                op: nn.Module = (
                    nn.Conv2d(*args, padding=spec.padding)
                    if spec.contrast is None
                    else ContrastConv2d(*args, padding=spec.padding, contrast=spec.contrast)
                )
                pool: nn.Module | None = None
                if spec.pool_type == "grid":
                    pool = nn.AdaptiveAvgPool2d(spec.pool)
                elif spec.pool > 1:
                    pool = (
                        nn.MaxPool2d(spec.pool)
                        if spec.pool_type == "max"
                        else nn.AvgPool2d(spec.pool)
                    )
                blocks.append(LayerBlock(op, spec.activation, pool, flatten=False))
            else:
                op = nn.Linear(arch.design_dim(layer) - 1, spec.out_features)
                blocks.append(LayerBlock(op, spec.activation, None, flatten=len(shape) > 1))
        self.blocks = nn.ModuleList(blocks)

    def layer_op(self, layer: int) -> nn.Module:
        """The ``Conv2d`` / ``Linear`` of ``layer``."""
        return self.blocks[layer].op

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Logits, or the input of layer ``upto`` when given."""
        for block in self.blocks[: upto if upto is not None else len(self.blocks)]:
            x = block(x)
        return x


def build_module(arch: Architecture) -> SpecNet:
    """A fresh (randomly initialized) torch module for ``arch``."""
    return SpecNet(arch)


def linear(input_shape: tuple[int, int, int], num_classes: int = 10) -> Architecture:
    """One linear layer on the pixels (the analytic baseline)."""
    return Architecture("linear", tuple(input_shape), (), num_classes)


def mlp(
    input_shape: tuple[int, int, int], num_classes: int = 10, hidden: int | None = None
) -> Architecture:
    """One hidden ReLU layer of width ``hidden``.

    The default width ``min(1024, 2 · input pixels)`` is the most that PCA filter pairs can fill.
    """
    if hidden is None:
        hidden = min(1024, 2 * input_shape[0] * input_shape[1] * input_shape[2])
    return Architecture("mlp", tuple(input_shape), (DenseSpec(hidden),), num_classes)


def lenet5(input_shape: tuple[int, int, int], num_classes: int = 10) -> Architecture:
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling: conv 6 → conv 16 → 120 → 84 → classes.

    The first conv is padded so 28x28 inputs follow the classic 32x32 layout; inputs smaller than
    16 pixels use 3x3 kernels.
    """
    k, p = (5, 2) if input_shape[1] >= 16 else (3, 1)
    hidden = (
        ConvSpec(6, k, padding=p),
        ConvSpec(16, k, padding=0 if k == 5 else 1),
        DenseSpec(120),
        DenseSpec(84),
    )
    return Architecture("lenet5", tuple(input_shape), hidden, num_classes)


def cnn(
    input_shape: tuple[int, int, int],
    num_classes: int = 10,
    channels: tuple[int, ...] | None = None,
    dense: tuple[int, ...] = (),
) -> Architecture:
    """A wider conv net: conv layers of ``channels`` (ReLU, 2x2 max-pool each), dense, output.

    Conv ``channels[0]`` → conv ``channels[1]`` (→ ...), then optional hidden ReLU dense layers of
    widths ``dense``, then the linear output.

    28x28 inputs: 5x5 kernels, first conv padded (28 → 14 → 5x5 maps, the head sees 64·25 + 1 = 1601
    inputs); inputs smaller than 16 pixels: 3x3 padded kernels, default channels (16, 64).
    """
    small = input_shape[1] < 16
    if channels is None:
        channels = (16, 64) if small else (32, 64)
    hidden = []
    for i, c in enumerate(channels):
        if small:
            hidden.append(ConvSpec(c, 3, padding=1))
        else:
            hidden.append(ConvSpec(c, 5, padding=2 if i == 0 else 0))
    hidden.extend(DenseSpec(width) for width in dense)
    return Architecture("cnn", tuple(input_shape), tuple(hidden), num_classes)


#: Coates et al.'s offset 10 for 0..255 pixels, on the package's [0, 1] images.
CONTRAST = 10.0 / 255.0**2


def coates(
    input_shape: tuple[int, int, int],
    num_classes: int = 10,
    filters: int = 1600,
    kernel: int = 6,
    grid: int = 2,
    contrast: float | None = CONTRAST,
) -> Architecture:
    """One wide layer of filters on contrast-normalized patches, grid-pooled, then the output.

    Coates, Lee, Ng (AISTATS 2011): ``filters`` convolutions ``kernel``×``kernel`` (stride 1) on
    contrast-normalized patches, ReLU (with the ``zca-*`` schemes' bias ``−α``, the soft-threshold
    encoder ``max(0, cᵀx̃ − α)`` of Coates & Ng, ICML 2011), average pooling over a ``grid``×``grid``
    grid (quadrants), then the linear output on ``grid²·filters`` features. Train it with a
    ``zca-kmeans`` / ``zca-random`` hidden scheme and a standardized output ridge.
    """
    spec = ConvSpec(filters, kernel, 0, "relu", grid, "grid", contrast)
    return Architecture("coates", tuple(input_shape), (spec,), num_classes)


ARCHITECTURES = {"linear": linear, "mlp": mlp, "lenet5": lenet5, "cnn": cnn, "coates": coates}


def get_architecture(
    name: str, input_shape: tuple[int, int, int], num_classes: int = 10, **kwargs
) -> Architecture:
    """Build a ready-made architecture by name (one of :data:`ARCHITECTURES`)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name](tuple(input_shape), num_classes, **kwargs)
