"""An analytic network: conv/FC layers trained one at a time from sufficient statistics.

Layer ``l``'s design rows are computed by forwarding the data through the already solved layers
``< l`` (fixed activations and pooling); its weights come from the summed statistics by the layer's
target scheme (hidden layers) or by ridge regression onto one-hot labels (output layer). The network
is a plain ``torch.nn.Module`` underneath (a :class:`~flwr_analytic.models.SpecNet`, or the user's own
model traced by :func:`~flwr_analytic.models.trace_model`), so it exports as a ``state_dict`` that
loads into that module. ACnnL: Zhuang, Lin, Yang, Toh, Information Sciences 2025; FedACnnL:
Gu et al., arXiv 2502.06915.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from flwr_analytic.analytic.design import (  # noqa: F401  (re-exported: the params maps)
    StatisticsAccumulator,
    contrast_normalize,
    conv_rows,
    design_to_params,
    grid_positions,
    params_to_design,
    without_bias,
)
from flwr_analytic.analytic.mirror import mirror_mean, with_mirrors
from flwr_analytic.analytic.solvers import Regularization, ridge_solve
from flwr_analytic.analytic.statistics import LayerStatistics, StatisticsError
from flwr_analytic.analytic.targets import TargetScheme, one_hot
from flwr_analytic.analytic.whitening import AssignmentRound, KMeansFit, encoder_filters
from flwr_analytic.data.batches import iter_batches
from flwr_analytic.models import Architecture, TracedArchitecture

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def layer_seed(seed: int, layer: int) -> int:
    """The seed of ``layer``'s random choices (encodings, random filters), derived from the run seed."""
    return int(np.random.SeedSequence([seed, layer]).generate_state(1)[0])


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``batch_size`` rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


class AnalyticNetwork:
    """A stack of analytic layers over an :class:`~flwr_analytic.models.Architecture`.

    Parameters
    ----------
    arch : Architecture or TracedArchitecture
        Layer specs, or a user's model traced by :func:`~flwr_analytic.models.trace_model`; the
        last layer is the linear output onto ``arch.num_classes``.
    scheme : str, TargetScheme, or a sequence of them
        Hidden-layer target scheme (``"label-pca"``, ``"pca"``, ``"label-encoding"``, ``"random"``):
        one for every hidden layer, or one per hidden layer.
    hidden_reg : Regularization
        Ridge rule of hidden layers that regress onto targets (label-encoding, label channels).
    output_reg : Regularization
        Ridge rule of the output layer.
    seed : int
        Seed of encodings and random filters (every client and the server must use the same).
    dtype : {"float64", "float32"}
        Precision of the forward pass and of each batch's Gram product (sums are always float64).
        ``float64`` makes federated and centralized training agree to rounding; ``float32`` is faster.
    mirror : bool
        Train on every sample and its left-right mirror, score by their mean (:mod:`.mirror`).

    """

    def __init__(
        self,
        arch: Architecture | TracedArchitecture,
        scheme: str | TargetScheme | Sequence[str | TargetScheme] = "label-pca",
        *,
        hidden_reg: Regularization | None = None,
        output_reg: Regularization | None = None,
        seed: int = 0,
        dtype: str = "float64",
        mirror: bool = False,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
        self.arch = arch
        given = [scheme] if isinstance(scheme, str | TargetScheme) else list(scheme)
        if len(given) == 1:
            given = given * len(arch.hidden)
        if len(given) != len(arch.hidden):
            raise ValueError(f"{len(given)} schemes given for {len(arch.hidden)} hidden layers")
        self.schemes = [s if isinstance(s, TargetScheme) else TargetScheme(s) for s in given]
        for layer, s in enumerate(self.schemes):  # an odd width with polarity: refused up front
            s.filter_count(arch.out_width(layer))
        self.hidden_reg = hidden_reg or Regularization(1e-2)
        self.output_reg = output_reg or Regularization(1e-6)
        self.seed = seed
        self.dtype, self.mirror = dtype, bool(mirror)
        self.module: torch.nn.Module = arch.build_module().to(_DTYPES[dtype]).eval()
        self.weights: list[np.ndarray | None] = [None] * arch.num_layers
        #: The next layer's k-means while a ``zca-kmeans`` layer is being fitted (else ``None``).
        self.kmeans: KMeansFit | AssignmentRound | None = None

    # ----------------------------------------------------------------------------------- shapes
    @property
    def num_layers(self) -> int:
        """Trainable layers, output included."""
        return self.arch.num_layers

    def is_output(self, layer: int) -> bool:
        """Whether ``layer`` is the output layer."""
        return layer == self.num_layers - 1

    def design_dim(self, layer: int) -> int:
        """``D`` of ``layer``."""
        return self.arch.design_dim(layer)

    def num_targets(self, layer: int) -> int:
        """Target columns ``m`` of ``layer``'s ``B`` (in the layer's current round)."""
        if self.is_output(layer):
            return self.arch.num_classes
        stage = self.stage if layer == self.solved_layers else 0
        return self.schemes[layer].num_targets(
            self.arch.out_width(layer), self.arch.num_classes, stage
        )

    @property
    def stage(self) -> int:
        """Round of the next layer's fit: 0, or ``t`` during k-means iteration ``t`` (1-based)."""
        return 0 if self.kmeans is None else self.kmeans.iteration + 1

    def rounds(self, layer: int) -> int:
        """Statistics rounds ``layer`` takes (several for ``zca-kmeans``)."""
        return 1 if self.is_output(layer) else self.schemes[layer].rounds

    def needs_statistics(self, layer: int) -> bool:
        """Whether ``layer`` is fitted from statistics (random layers are not)."""
        return self.is_output(layer) or self.schemes[layer].needs_statistics

    @property
    def solved_layers(self) -> int:
        """Number of leading layers already solved."""
        n = 0
        while n < self.num_layers and self.weights[n] is not None:
            n += 1
        return n

    # ---------------------------------------------------------------------------- client half
    def _as_tensor(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(x)
        return t.to(_DTYPES[self.dtype])

    def layer_targets(self, layer: int, y: np.ndarray) -> np.ndarray | None:
        """Per-sample targets ``t_n`` of ``layer`` (one-hot labels for the output layer)."""
        if self.is_output(layer):
            return one_hot(y, self.arch.num_classes)
        return self.schemes[layer].targets(
            y,
            self.arch.num_classes,
            self.arch.out_width(layer),
            self.arch.activation(layer),
            layer_seed(self.seed, layer),
        )

    @torch.no_grad()
    def layer_input(self, layer: int, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Input of ``layer`` for a batch: ``x`` forwarded through the solved layers ``< layer``."""
        if self.solved_layers < layer:
            raise RuntimeError(
                f"layer {layer} needs layers 0..{layer - 1} solved; {self.solved_layers} are"
            )
        return self.module(self._as_tensor(x), upto=layer)

    def rows_per_sample(self, layer: int) -> int:
        """Design rows ``P`` one sample contributes to ``layer``.

        ``P = 1`` for a dense layer; for a conv layer, its output positions on the layer's
        ``H x W`` input, ``P = H_out·W_out`` with ``H_out = ⌊(H + 2p − d(k − 1) − 1)/s⌋ + 1``
        (``P = (H + 2p − k + 1)(W + 2p − k + 1)`` at stride 1). Honest statistics have
        ``G[-1, -1] = P n``.
        """
        if self.arch.conv_geometry(layer) is None:
            return 1
        h_out, w_out = self._output_size(layer)
        if self.kmeans is not None and layer == self.solved_layers:
            stride = self.schemes[layer].sample_stride
            return -(-h_out // stride) * -(-w_out // stride)
        return h_out * w_out

    @torch.no_grad()
    def statistics(
        self,
        layer: int,
        x: Any,
        y: np.ndarray | None = None,
        batch_size: int = 256,
        *,
        rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
        targets: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> LayerStatistics:
        """``(G, B, n)`` of ``layer`` on ``(x, y)``, streamed in batches (the client's job).

        Memory is bounded by ``batch_size`` and the layer width, never by the data size.

        Parameters
        ----------
        layer : int
            The layer (its lower layers must be solved).
        x, y : array-like, or a data source and ``None``
            Samples and integer labels; or, with ``y=None``, any source of
            :func:`~flwr_analytic.data.batches.iter_batches` (an ``ArrayDataset``, the user's
            ``DataLoader`` of dict or ``(x, y)`` batches, a ``LoaderData``).
        batch_size : int
            Samples per batch (array sources; a loader keeps its own).
        rows : callable, optional
            Maps each batch's design rows ``(N, P, D − 1)`` (the bias entry implicit) to the rows
            that enter ``G`` and ``B``, e.g. DP clipping ``a ← a · min(1, √(C²−1)/‖a‖)``.
        targets : callable, optional
            Maps each batch's targets ``(N, m)`` likewise (e.g. clipping to ``‖t‖ ≤ τ``).

        """
        acc = StatisticsAccumulator(self.design_dim(layer), self.num_targets(layer), self.dtype)
        if y is not None:
            y = np.asarray(y)
            if len(y) != len(x):
                raise StatisticsError(f"{len(x)} samples but {len(y)} labels")
        kmeans = self.kmeans if layer == self.solved_layers else None
        stride = self.schemes[layer].sample_stride if kmeans is not None else 1
        a = torch.from_numpy(kmeans.assignment()) if kmeans is not None else None
        source = self._batches(x, y, batch_size)
        for xb, yb in with_mirrors(source) if self.mirror else source:
            patches = self.design_rows(layer, xb, stride)
            if a is not None:  # a Lloyd's round: each sampled row's nearest centroid
                a = a.to(patches.dtype)
                flat = patches.reshape(-1, patches.shape[-1])
                assigned = torch.addmm(a[-1], flat, a[:-1]).argmax(-1)
                acc.add_assigned(patches if rows is None else rows(patches), assigned)
                continue
            t = self.layer_targets(layer, yb) if acc.targets else None
            if t is not None and targets is not None:
                t = targets(t)
            acc.add_patches(patches if rows is None else rows(patches), t)
        return acc.result()

    def design_rows(self, layer: int, x: Any, stride: int = 1) -> torch.Tensor:
        """``layer``'s design rows of a batch, ``(N, P, D − 1)`` (the bias entry implicit).

        Conv layers: im2col patches (:func:`conv_rows`; with ``stride > 1`` only the positions of
        :func:`grid_positions`), contrast-normalized when the layer says so
        (:func:`contrast_normalize`); dense layers: the flattened input, ``P = 1``.
        """
        h = self.layer_input(layer, x)
        geometry = self.arch.conv_geometry(layer)
        if geometry is None:
            return torch.flatten(h, 1)[:, None, :]
        if stride > 1:  # the grid positions i, j ≡ 0 (mod stride): the same filters at stride·s
            sh, sw = geometry.stride
            geometry = dataclasses.replace(geometry, stride=(sh * stride, sw * stride))
        patches = conv_rows(h, geometry)
        eps = self.arch.contrast(layer)
        return patches if eps is None else contrast_normalize(patches, eps)

    @property
    def eval_batch(self) -> int:
        """Samples per prediction batch: 1,024, fewer when a conv output exceeds 2²⁶ values."""
        convs = [i for i in range(self.num_layers) if self.arch.conv_geometry(i) is not None]
        widest = max(
            (self.arch.out_width(i) * np.prod(self._output_size(i)) for i in convs), default=1
        )
        return int(max(1, min(1024, 2**26 // widest)))

    def _output_size(self, layer: int) -> tuple[int, int]:
        _, h, w = self.arch.input_shape_of(layer)
        return self.arch.conv_geometry(layer).output_size(h, w)  # type: ignore[union-attr]

    def _batches(self, x: Any, y: np.ndarray | None, batch_size: int) -> Iterable[tuple[Any, Any]]:
        """Batches of ``(x, y)`` arrays or of a data source, each checked against the input shape."""
        source = iter_batches((x, y) if y is not None else x, batch_size)
        for xb, yb in source:
            shape = tuple(int(s) for s in xb.shape[1:])
            if shape != tuple(self.arch.input_shape):
                raise StatisticsError(
                    f"data samples have shape {shape}, the model expects {tuple(self.arch.input_shape)}"
                )
            yield xb, yb

    # ---------------------------------------------------------------------------- server half
    def solve(
        self, layer: int, stats: LayerStatistics | None, reg: Regularization | None = None
    ) -> np.ndarray | None:
        """Fit ``layer`` from its summed statistics and install it; returns ``W`` (D x C_out).

        Output layer: ``W = (G + γI)⁻¹ AᵀY``; hidden layers: the target scheme's rule. A layer fitted
        over several rounds (``zca-kmeans``, :meth:`rounds`) returns ``None`` until its last round:
        :attr:`stage` then says which statistics the next call needs.

        Parameters
        ----------
        layer : int
            The next unsolved layer.
        stats : LayerStatistics or None
            The summed statistics (``None`` only for layers that need none, e.g. ``random``).
        reg : Regularization, optional
            The ridge rule of this solve only, instead of :attr:`output_reg` (output layer) or
            :attr:`hidden_reg` (hidden layers); e.g. the DP ridge. The attributes are not changed.

        """
        if self.solved_layers != layer:
            raise RuntimeError(
                f"layers are solved in order: next is {self.solved_layers}, got {layer}"
            )
        dim, width = self.design_dim(layer), self.arch.out_width(layer)
        if stats is not None:
            stats.validate(dim, self.num_targets(layer))
        if stats is not None and not self.arch.has_bias(layer):
            stats = without_bias(stats)
        if self.is_output(layer):
            if stats is None:
                raise ValueError("the output layer needs its statistics")
            w = ridge_solve(stats.gram, stats.cross, self.output_reg if reg is None else reg)
        elif self.schemes[layer].name == "zca-kmeans":
            scheme = self.schemes[layer]
            if stats is None:
                raise ValueError("zca-kmeans needs the layer's statistics")
            if self.kmeans is None:
                seed = layer_seed(self.seed, layer)
                count = scheme.filter_count(width)
                self.kmeans = KMeansFit.start(stats, count, scheme.zca_eps, seed)
            elif isinstance(self.kmeans, KMeansFit):
                self.kmeans.step(stats)
            else:
                raise RuntimeError("a client's k-means round view cannot solve the layer")
            if self.kmeans.iteration < scheme.iterations:
                return None
            filters = encoder_filters(self.kmeans.centroids, scheme.polarity)
            w = self.kmeans.white.design(filters, scheme.threshold)
            self.kmeans = None
        else:
            w = self.schemes[layer].weights(
                stats,
                dim,
                width,
                self.hidden_reg if reg is None else reg,
                layer_seed(self.seed, layer),
            )
        if not self.arch.has_bias(layer):
            w = np.array(w, dtype=np.float64)
            w[-1] = 0.0
        self.set_layer(layer, w)
        return w

    def set_layer(self, layer: int, w: np.ndarray) -> None:
        """Install design-space weights ``W`` (D x C_out) as ``layer``'s torch parameters."""
        dim, width = self.design_dim(layer), self.arch.out_width(layer)
        w = np.asarray(w, dtype=np.float64)
        if w.shape != (dim, width):
            raise ValueError(f"layer {layer} weights must be ({dim}, {width}), got {w.shape}")
        if not np.all(np.isfinite(w)):
            raise ValueError(f"layer {layer} weights are not finite")
        if not self.arch.has_bias(layer) and np.any(w[-1] != 0):
            raise ValueError(f"layer {layer} has no bias, but its weights' bias row is not 0")
        weight, bias = design_to_params(w, self.arch.conv_geometry(layer))
        op = self.module.layer_op(layer)
        op.weight.data = torch.from_numpy(np.ascontiguousarray(weight)).to(op.weight.dtype)
        if op.bias is not None:
            op.bias.data = torch.from_numpy(np.ascontiguousarray(bias)).to(op.bias.dtype)
        self.weights[layer] = w.copy()

    # ------------------------------------------------------------------------- use and export
    @torch.no_grad()
    def predict(self, x: Any, batch_size: int | None = None) -> np.ndarray:
        """Output scores (N x c) of the fully solved network on samples ``x`` or a data source."""
        if self.solved_layers != self.num_layers:
            raise RuntimeError(f"only {self.solved_layers} of {self.num_layers} layers are solved")
        batch_size = batch_size or self.eval_batch
        if isinstance(x, np.ndarray | torch.Tensor):
            chunks = (x[sl] for sl in batches(len(x), batch_size))
        else:
            chunks = (xb for xb, _ in self._batches(x, None, batch_size))

        def score(xb: Any) -> np.ndarray:
            return self.module(self._as_tensor(xb)).numpy()

        out = [mirror_mean(score, xb) if self.mirror else score(xb) for xb in chunks]
        return np.concatenate(out) if out else np.zeros((0, self.arch.num_classes))

    @torch.no_grad()
    def evaluate(self, x: Any, y: np.ndarray | None = None) -> dict[str, float]:
        """Accuracy and loss (mean squared error to one-hot, the layer's training objective).

        On samples and labels ``(x, y)``, or on a data source ``x`` with ``y=None`` (streamed).
        """
        correct, losses = 0, []
        if y is not None and len(y) == 0:
            source: Iterable[tuple[Any, Any]] = ()
        else:
            source = self._batches(x, y, self.eval_batch)
        for xb, yb in source:
            scores = self.predict(self._as_tensor(xb))
            correct += int(np.sum(scores.argmax(1) == yb))
            losses.append(np.sum((scores - one_hot(yb, self.arch.num_classes)) ** 2, axis=1))
        count = sum(len(batch) for batch in losses)
        if count == 0:
            return {"accuracy": float("nan"), "loss": float("nan"), "num-examples": 0}
        return {
            "accuracy": correct / count,
            "loss": float(np.mean(np.concatenate(losses))),
            "correct": correct,
            "num-examples": count,
        }

    def with_weights(self, weights: list[np.ndarray]) -> AnalyticNetwork:
        """A copy of this network with other layer weights (e.g. a client's personalized model)."""
        other = copy.deepcopy(self)
        for layer, w in enumerate(weights):
            other.set_layer(layer, w)
        return other

    def to_module(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The trained network as a plain ``torch.nn.Module`` (a copy, in ``dtype``)."""
        return copy.deepcopy(self.module).to(dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``state_dict`` of :meth:`to_module` in float64.

        Loads into ``arch.build_module()``; for a traced model, into the user's own class (its
        parameter names), e.g. ``Net().load_state_dict(net.state_dict())``.
        """
        return {k: v.clone() for k, v in self.module.state_dict().items()}

    def load_module(self, module: torch.nn.Module) -> None:
        """Install the weights of a module of this architecture (``SpecNet`` or the user's own).

        Inverse of :meth:`to_module` / :meth:`state_dict`: the layers are read by their
        ``state_dict`` keys (:meth:`arch.param_keys <flwr_analytic.models.Architecture.param_keys>`).
        """
        state = module.state_dict()
        for layer in range(self.num_layers):
            kw, kb = self.arch.param_keys(layer)
            weight = state[kw].detach().double().numpy()
            bias = None if kb is None else state[kb].detach().double().numpy()
            self.set_layer(layer, params_to_design(weight, bias))
