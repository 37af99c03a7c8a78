"""The layer-wise analytic server: the state of a FedACnnL run and its operations, without Flower.

FedACnnL (Gu et al., "Analytic Personalized Federated Meta-Learning", arXiv 2502.06915) trains one
layer per round. In the round of layer ``l`` every client ``k`` sends ``(G_k, B_k, n_k)`` computed
with the solved layers ``< l``; the server checks each contribution, sums them and solves

    W_l = (ΣG_k + γI)⁻¹ ΣB_k        (output layer; hidden layers: the target scheme's rule)

from the sum alone, equal to centralized training on the pooled data for any partition. This module
holds that state so that any transport (Message API, legacy, SecAgg+, tests) drives one code:

* the *aggregation policy* (:mod:`flwr_analytic.analytic.aggregation`): hold every contribution and
  sum in :class:`ClientKey` order (bit-reproducible whatever the arrival order), or add each one on
  arrival into one float64 accumulator (memory ``O(D²)`` for any number of clients);
* :class:`LayerwiseServer` — the network being solved, the open sum of the current layer (kept
  across retries), ``solve`` through a *release policy* (:mod:`.privacy.release`: exact or DP
  statistics), group-wise output layers, adding/removing clients, fingerprint and checkpoint.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np

from flwr_analytic.analytic.aggregation import (
    AGGREGATIONS,
    ClientKey,
    LayerSum,
    SortedSum,
    StreamingSum,
)
from flwr_analytic.analytic.groups import cluster_by_labels
from flwr_analytic.analytic.network import AnalyticNetwork
from flwr_analytic.analytic.ownership import PartitionOwners
from flwr_analytic.analytic.personal_lambda import global_leverage
from flwr_analytic.analytic.privacy.release import ExactRelease, ReleasePolicy
from flwr_analytic.analytic.solvers import Regularization
from flwr_analytic.analytic.statistics import LayerStatistics, StatisticsError, merge
from flwr_analytic.analytic.targets import TargetScheme
from flwr_analytic.analytic.updates import (
    add_client_statistics,
    remove_client_statistics,
    solve_output_layer,
)
from flwr_analytic.analytic.whitening import kmeans_restore, kmeans_state
from flwr_analytic.models import Architecture


class AnalyticOptions(TypedDict, total=False):
    """Keyword options of :class:`LayerwiseServer` (also taken by ``FedACnnL``)."""

    gamma: float
    hidden_gamma: float
    gamma_rule: str
    seed: int
    dtype: str
    mirror: bool
    aggregation: str
    release: Any
    num_groups: int
    min_valid_replies: int


#: Defaults of :class:`AnalyticOptions` (those of :class:`LayerwiseServer`).
ANALYTIC_DEFAULTS: dict[str, Any] = {
    "gamma": 1e-6,
    "hidden_gamma": 1e-2,
    "gamma_rule": "relative",
    "seed": 0,
    "dtype": "float64",
    "mirror": False,
    "aggregation": "sorted",
    "release": None,
    "num_groups": 0,
    "min_valid_replies": 1,
}


@dataclass
class LayerOutcome:
    """What closing a layer's sum did: solved or not, from whom, and what was rejected."""

    layer: int
    solved: bool
    num_valid: int
    partitions: list[int]
    duplicates: list[tuple[ClientKey, str]]
    num_examples: int = 0
    groups: list[list[int]] | None = None


class LayerwiseServer:
    """State and operations of a layer-wise analytic (FedACnnL) run, independent of transport.

    Parameters
    ----------
    architecture : Architecture
        The network (``flwr_analytic.models.get_architecture``).
    scheme : str, TargetScheme or a sequence of them (default: "label-pca")
        Hidden-layer target scheme(s).
    gamma, hidden_gamma : float (default: 1e-6, 1e-2)
        Ridge of the output layer and of hidden layers that regress onto targets.
    gamma_rule : {"relative", "absolute"} (default: "relative")
        ``relative``: the ridge is ``gamma · trace(G)/D``; ``absolute``: ``gamma``.
    seed : int (default: 0)
        Seed of label encodings and random filters.
    dtype : {"float64", "float32"} (default: "float64")
        Precision of the clients' forward pass (sums are float64).
    mirror : bool (default: False)
        Statistics of every image and its mirror; scores: their mean (:mod:`.mirror`).
    aggregation : {"sorted", "streaming"} (default: "sorted")
        The aggregation policy (:class:`SortedSum` / :class:`StreamingSum`).
    release : ReleasePolicy, optional
        What clients release: ``ExactRelease`` (default) or ``DPRelease`` (:mod:`.privacy.release`).
    num_groups : int (default: 0)
        ``>= 2``: one output layer per group of clients clustered by label distribution.
    min_valid_replies : int (default: 1)
        A layer is solved only from at least this many valid contributions.

    """

    def __init__(
        self,
        architecture: Architecture,
        scheme: str | TargetScheme | Sequence[str | TargetScheme] = "label-pca",
        *,
        gamma: float = 1e-6,
        hidden_gamma: float = 1e-2,
        gamma_rule: str = "relative",
        seed: int = 0,
        dtype: str = "float64",
        mirror: bool = False,
        aggregation: str = "sorted",
        release: ReleasePolicy | None = None,
        num_groups: int = 0,
        min_valid_replies: int = 1,
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(
                f"aggregation: {aggregation!r} is not allowed; allowed values: sorted, streaming"
            )
        self.architecture, self.scheme = architecture, scheme
        self.gamma, self.hidden_gamma, self.gamma_rule = gamma, hidden_gamma, gamma_rule
        self.seed, self.dtype, self.mirror = seed, dtype, bool(mirror)
        self.aggregation = aggregation
        self.release: ReleasePolicy = release if release is not None else ExactRelease()
        self.num_groups = int(num_groups)
        self.min_valid_replies = max(1, int(min_valid_replies))
        self.reset()
        several = [i for i in range(self.net.num_layers) if self.net.rounds(i) > 1]
        if several and self.release.name != "exact":
            raise ValueError(
                f"layer {several[0] + 1}/{self.net.num_layers}: zca-kmeans takes several rounds "
                f"of centroid sums, which the {self.release.name!r} release does not cover; use "
                "zca-random or zca-pca with it"
            )

    # ------------------------------------------------------------------------------- state
    def reset(self) -> None:
        """A fresh network (no layer solved), no statistics, no open sum."""
        self.net = AnalyticNetwork(
            self.architecture,
            self.scheme,
            hidden_reg=Regularization(self.hidden_gamma, self.gamma_rule),
            output_reg=Regularization(self.gamma, self.gamma_rule),
            seed=self.seed,
            dtype=self.dtype,
            mirror=self.mirror,
        )
        #: summed statistics of every solved layer (the output layer's serve add/remove clients)
        self.layer_statistics: dict[int, LayerStatistics] = {}
        #: group-wise output layers: node id -> group, group -> ``W``
        self.group_of_node: dict[int, int] = {}
        self.group_weights: dict[int, np.ndarray] = {}
        #: node id -> partition id, learned from contributions (to name absent clients)
        self.node_partitions: dict[int, int] = {}
        #: partition id -> node on first contact, and the agreed num-partitions (issue 13)
        self.owners = PartitionOwners()
        self.open_sum: LayerSum | None = None
        self._open_layer = -1
        self.advance_free_layers()

    def advance_free_layers(self) -> None:
        """Solve the layers that need no statistics (``random`` filters) after the solved ones."""
        net = self.net
        while net.solved_layers < net.num_layers and not net.needs_statistics(net.solved_layers):
            net.solve(net.solved_layers, None)

    @property
    def layer(self) -> int:
        """The next layer to solve."""
        return self.net.solved_layers

    @property
    def finished(self) -> bool:
        """Whether every layer is solved."""
        return self.net.solved_layers == self.net.num_layers

    @property
    def num_rounds(self) -> int:
        """Rounds needed: one per layer fitted from statistics (``1 + iterations`` for k-means)."""
        net = self.net
        return sum(net.rounds(i) for i in range(net.num_layers) if net.needs_statistics(i))

    # ------------------------------------------------------------------ contributions, solve
    def check(
        self,
        packed: Mapping[str, np.ndarray],
        num_examples: Any,
        claimed_layer: Any = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> LayerStatistics:
        """Unpack and check one client's statistics of the current layer (``StatisticsError``).

        In order: the claimed layer, an integer ``num_examples``, the strict unpack (keys, ``D``,
        ``m`` before any ``D x D`` allocation), the release policy's checks (exact: float64, finite,
        symmetric, ``G[-1,-1] = n·L``, PSD, labels; DP: the noise) and ``count == num_examples``.
        """
        layer = self.layer
        if claimed_layer is not None:
            if isinstance(claimed_layer, bool) or not isinstance(claimed_layer, int | np.integer):
                raise StatisticsError(f"metric 'layer' must be an integer, got {claimed_layer!r}")
            if int(claimed_layer) != layer:
                n = self.net.num_layers  # named 1-based, "layer k/L", as in the log
                raise StatisticsError(
                    f"statistics of layer {int(claimed_layer) + 1}/{n}, expected layer {layer + 1}/{n}"
                )
        stage = (metrics or {}).get("stage", 0)
        if stage != self.net.stage:
            raise StatisticsError(
                f"statistics of round {stage} of the layer, expected {self.net.stage}"
            )
        if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer):
            raise StatisticsError(f"num-examples must be an integer, got {num_examples!r}")
        dim, targets = self.net.design_dim(layer), self.net.num_targets(layer)
        stats = LayerStatistics.unpack(packed, dim=dim, targets=targets, strict=True)
        self.release.check(stats, self.net, layer, dict(metrics or {}))
        if int(num_examples) != stats.count:
            raise StatisticsError(f"num-examples={num_examples} but count={stats.count}")
        return stats

    def open_layer(self) -> LayerSum:
        """The sum of the current layer: a new one, or the one of an unsolved earlier attempt."""
        layer = self.layer
        if self.open_sum is None or self._open_layer != layer:
            dim, targets = self.net.design_dim(layer), self.net.num_targets(layer)
            if self.aggregation == "sorted":
                self.open_sum = SortedSum(dim, targets)
            else:
                keep = self.num_groups >= 2 and self.net.is_output(layer)
                self.open_sum = StreamingSum(dim, targets, keep_members=keep)
            self._open_layer = layer
        return self.open_sum

    @property
    def carried(self) -> int:
        """Valid contributions kept from an unsolved earlier attempt at the current layer."""
        if self.open_sum is None or self._open_layer != self.layer:
            return 0
        return len(self.open_sum.keys)

    def contribute(
        self,
        key: ClientKey,
        stats: LayerStatistics,
        num_partitions: int | None = None,
        connected: Collection[int] | None = None,
    ) -> str | None:
        """Add a checked contribution to the current layer's sum.

        The claim is checked against the partition's owner and the run's ``num-partitions``
        (:class:`~flwr_analytic.analytic.ownership.PartitionOwners`; ``connected``: the node ids
        connected now, so that a partition may move from a node that is gone). Returns a note when
        it moves; raises ``StatisticsError`` naming both nodes for a conflicting claim.
        """
        note = self.owners.check(key, num_partitions, self.layer, connected)
        open_sum = self.open_layer()
        first = next((k for k in open_sum.keys if k.known and key.known
                      and k.partition == key.partition), None)  # fmt: skip
        if first is not None and isinstance(open_sum, StreamingSum):
            raise StatisticsError(self.owners.same_round(first, key, self.layer, "arrived first"))
        open_sum.add(key, stats)
        if key.known:
            self.node_partitions[key.node] = key.partition
        return note

    def close_layer(self) -> LayerOutcome:
        """Solve the current layer from its sum when it has ``min_valid_replies`` contributions.

        Otherwise the sum stays open: a retry adds to it.
        """
        layer, open_sum = self.layer, self.open_layer()
        duplicates = []
        for dropped, _ in open_sum.close():  # SortedSum: same-round claims of a partition
            kept = next(k for k in open_sum.keys if k.partition == dropped.partition)
            why = self.owners.same_round(kept, dropped, layer, "the smaller node id")
            duplicates.append((dropped, why))
        keys = open_sum.keys
        self.owners.bind(keys, layer)
        outcome = LayerOutcome(
            layer, False, len(keys), [k.partition for k in keys if k.known], duplicates
        )
        if len(keys) < self.min_valid_replies:
            return outcome
        total = open_sum.total()
        self.solve(total, len(keys))
        outcome.solved, outcome.num_examples = True, int(total.count)
        if self.num_groups >= 2 and self.net.is_output(layer):
            outcome.groups = self.solve_groups(open_sum.members())
        self.open_sum = None
        return outcome

    def solve(self, total: LayerStatistics, num_contributors: int) -> np.ndarray:
        """Solve the current layer from the summed statistics of ``num_contributors`` clients.

        A ``zca-kmeans`` layer returns ``None`` until its last round (:attr:`AnalyticNetwork.stage`).
        """
        layer = self.layer
        w = self.release.solve(self.net, layer, total, num_contributors)
        if w is not None:
            self.layer_statistics[layer] = total
            self.advance_free_layers()
        return w

    def output_leverage(self) -> float:
        """The output layer's mean leverage ``h̄ = df/N`` (``personal_lambda.global_leverage``)."""
        last = self.net.num_layers - 1
        total, bias = self.layer_statistics.get(last), self.net.arch.has_bias(last)
        return 0.0 if total is None else global_leverage(total, self.net.output_reg, bias)

    def solve_groups(self, members: list[tuple[ClientKey, LayerStatistics]]) -> list[list[int]]:
        """Solve one output layer per group of contributors clustered by label distribution.

        :func:`~flwr_analytic.analytic.groups.cluster_by_labels`; returns each group's partition ids
        (node ids when unknown).
        """
        self.group_of_node, weights, groups = {}, {}, []
        for g, group in cluster_by_labels(members, self.num_groups, self.seed).items():
            total = merge(stats for _, stats in group)
            weights[g] = self.release.group_weights(self.net, total, len(group))
            self.group_of_node.update({key.node: g for key, _ in group})
            groups.append([key.partition for key, _ in group])
        self.group_weights = weights
        return groups

    # ---------------------------------------------------------------- add / remove clients
    def update_output(
        self, statistics: Iterable[LayerStatistics | Mapping[str, np.ndarray]], *, remove: bool
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Re-solve the output layer with clients added (``(G + ΣG_j, B + ΣB_j)``) or removed.

        Removal is checked (count stays >= 0, Gram stays PSD: ``StatisticsError``). Exact for the
        whole model only with data-independent hidden layers (``linear``/``random``); otherwise
        exact for the output layer given the hidden layers
        (:mod:`flwr_analytic.analytic.updates`); group-wise output layers are not updated. Returns
        the new ``W`` and what changed (``layer``, ``num-clients``, ``num-examples-changed``,
        ``num-examples``).
        """
        layer = self.net.num_layers - 1
        if not self.finished or layer not in self.layer_statistics:
            raise RuntimeError(
                "adding or removing clients needs a trained model and its output-layer statistics "
                "(train it or restore a checkpoint first)"
            )
        changed = [
            s if isinstance(s, LayerStatistics) else LayerStatistics.unpack(dict(s))
            for s in statistics
        ]
        update = remove_client_statistics if remove else add_client_statistics
        total = update(self.layer_statistics[layer], changed)
        w = solve_output_layer(self.net, total)
        self.layer_statistics[layer] = total
        return w, {
            "layer": layer,
            "num-clients": len(changed),
            "num-examples-changed": int(sum(s.count for s in changed)),
            "num-examples": int(total.count),
        }

    # ------------------------------------------------------------------ fingerprint, state
    def fingerprint(self) -> dict[str, Any]:
        """The configuration that determines the solved layers (compared when resuming)."""
        return {
            "architecture": self.net.arch.describe(),
            "schemes": [list(s.describe().values()) for s in self.net.schemes],
            "gamma": float(self.gamma),
            "hidden-gamma": float(self.hidden_gamma),
            "gamma-rule": self.gamma_rule,
            "seed": int(self.seed),
            "dtype": self.dtype,
            **({"mirror": True} if self.mirror else {}),  # older checkpoints stay valid
            "num-groups": int(self.num_groups),
            "aggregation": self.aggregation,
            **self.release.fingerprint(),
        }

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The solved layers, their summed statistics and the groups as ``(arrays, meta)``."""
        arrays: dict[str, np.ndarray] = {}
        for layer in range(self.net.solved_layers):
            arrays[f"weight-{layer}"] = np.asarray(self.net.weights[layer], dtype=np.float64)
        for layer, stats in self.layer_statistics.items():
            arrays[f"gram-{layer}"] = stats.gram
            arrays[f"cross-{layer}"] = stats.cross
            arrays[f"count-{layer}"] = np.asarray([stats.count], dtype=np.int64)
        for group, w in self.group_weights.items():
            arrays[f"group-weight-{group}"] = w
        arrays.update(kmeans_state(self.net))
        meta = {
            "solved-layers": self.net.solved_layers,
            "statistics-layers": sorted(self.layer_statistics),
            "node-partitions": {str(k): v for k, v in self.node_partitions.items()},
            "owners": self.owners.state(),
            "group-of-node": {str(k): v for k, v in self.group_of_node.items()},
        }
        return arrays, meta

    def restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state` (on a server of the same configuration)."""
        self.reset()
        for layer in range(int(meta["solved-layers"])):
            self.net.set_layer(layer, arrays[f"weight-{layer}"])
        for layer in meta["statistics-layers"]:
            count = int(arrays[f"count-{layer}"][0])
            self.layer_statistics[int(layer)] = LayerStatistics(
                arrays[f"gram-{layer}"], arrays[f"cross-{layer}"], count
            )
        groups = {int(k.rsplit("-", 1)[1]): v for k, v in arrays.items() if "group-weight-" in k}
        self.group_weights = {g: groups[g] for g in sorted(groups)}
        self.group_of_node = {int(k): int(v) for k, v in meta["group-of-node"].items()}
        self.node_partitions = {int(k): int(v) for k, v in meta["node-partitions"].items()}
        self.owners = PartitionOwners.restore(meta.get("owners"))
        self.net.kmeans = kmeans_restore(arrays)
        self.advance_free_layers()


__all__ = [
    "AGGREGATIONS",
    "ANALYTIC_DEFAULTS",
    "AnalyticOptions",
    "ClientKey",
    "LayerOutcome",
    "LayerSum",
    "LayerwiseServer",
    "SortedSum",
    "StreamingSum",
]  # the aggregation names are re-exported for the strategies' convenience
