"""Bad input (issue 6): malformed client replies, bad configuration, ill-conditioned systems.

The fuzz test runs the real :class:`FedACnnL` strategy and client app in-process with 6 honest
SuperNodes on digits and 110 hostile ones that, every round, answer with a mutated copy of an honest
reply (seeded: kind and template). Every hostile reply must be rejected with a reason that names its
defect, and the solved weights must equal, bit for bit, those of a run with the honest nodes alone
(the sum runs in partition-id order, so it does not depend on node ids or arrival order).
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import re
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import Error

from flwr_analytic.analytic import (
    AnalyticNetwork,
    IllConditionedWarning,
    LayerStatistics,
    Regularization,
    StatisticsError,
    fit_centralized,
    personalized_solve,
    ridge_solve,
)
from flwr_analytic.analytic.privacy import DPConfig
from flwr_analytic.analytic.privacy.release import DPRelease
from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
from flwr_analytic.config_checks import ConfigError, check_keys, closest_key
from flwr_analytic.data import ArrayDataset, federated_split
from flwr_analytic.fedacnnl import LocalGrid
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.models import cnn, get_architecture, mlp
from flwr_analytic.strategies.fedacnnl import FedACnnL
from flwr_analytic.strategies.wrapper import StrategyWrapper

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
pytestmark = pytest.mark.faults

NUM_HONEST = 6
NUM_HOSTILE = 110  # per round; 3 layer rounds -> 330 malformed replies
ARCH_CHANNELS = (4, 8)  # conv 4 (D=10, m=4 label channels), conv 8 (D=37, m=8), output (D=33, m=10)


def _loader(data: ArrayDataset, split):
    def load(context):
        return split.client(data, int(context.node_config["partition-id"]))

    return load


# ------------------------------------------------------------------------------------ mutations
Packed = dict[str, np.ndarray]
Metrics = dict[str, Any]


def _gram(p: Packed) -> np.ndarray:
    tri = p["gram-triu"]
    dim = int(round((np.sqrt(8 * tri.size + 1) - 1) / 2))
    g = np.zeros((dim, dim))
    g[np.triu_indices(dim)] = tri
    g.T[np.triu_indices(dim)] = tri
    return g


def _set_gram(p: Packed, g: np.ndarray) -> None:
    p["gram-triu"] = np.ascontiguousarray(g[np.triu_indices(g.shape[0])])


def _features(p: Packed, rng: np.random.Generator, k: int) -> np.ndarray:
    """``k`` distinct non-bias inputs with a positive diagonal."""
    diag = np.diag(_gram(p))[:-1]
    return rng.choice(np.flatnonzero(diag > 0), k, replace=False)


def _raw_array(value: np.ndarray, **override: Any) -> Array:
    """An ``Array`` with hand-set fields (what a hostile client can put on the wire)."""
    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=True)
    fields = {
        "dtype": str(value.dtype),
        "shape": tuple(int(n) for n in value.shape),
        "stype": "numpy.ndarray",
        "data": buf.getvalue(),
    }
    fields.update(override)
    return Array(**fields)


def m_gram_short(p, m, rng):
    p["gram-triu"] = p["gram-triu"][:-1].copy()


def m_gram_long(p, m, rng):
    p["gram-triu"] = np.append(p["gram-triu"], 0.0)


def m_gram_2d(p, m, rng):
    p["gram-triu"] = p["gram-triu"].reshape(1, -1).copy()


def m_gram_huge(p, m, rng):
    dim = 4 * int(round((np.sqrt(8 * p["gram-triu"].size + 1) - 1) / 2))
    p["gram-triu"] = np.zeros(dim * (dim + 1) // 2)


def _astype(key: str, dtype: Any) -> Callable:
    def mutate(p, m, rng):
        with np.errstate(over="ignore"):
            p[key] = p[key].astype(dtype)

    return mutate


def m_gram_object(p, m, rng):
    return {"gram-triu": _raw_array(p["gram-triu"].astype(object))}


def m_gram_garbage(p, m, rng):
    return {"gram-triu": _raw_array(p["gram-triu"], data=b"\x93NUMPY garbage \x00\xff" * 3)}


def m_gram_stype(p, m, rng):
    return {"gram-triu": _raw_array(p["gram-triu"], stype="torch.Tensor")}


def m_cross_drop_column(p, m, rng):
    p["cross"] = p["cross"][:, :-1].copy()


def m_cross_transposed(p, m, rng):
    p["cross"] = p["cross"].T.copy()


def m_cross_1d(p, m, rng):
    p["cross"] = p["cross"].ravel().copy()


def _poison(key: str, value: float) -> Callable:
    def mutate(p, m, rng):
        flat = p[key].reshape(-1)
        flat[rng.integers(flat.size)] = value

    return mutate


def m_full_gram_asymmetric(p, m, rng):
    g = _gram(p)
    i, j = _features(p, rng, 2)
    g[i, j] += 0.5 * (1.0 + abs(g[i, j]))
    del p["gram-triu"]
    p["gram"] = g


def m_full_and_triu(p, m, rng):
    p["gram"] = _gram(p)


def m_full_gram_wrong_shape(p, m, rng):
    p["gram"] = _gram(p)[:-1, :-1].copy()
    del p["gram-triu"]


def m_negative_diagonal(p, m, rng):
    g = _gram(p)
    (i,) = _features(p, rng, 1)
    g[i, i] = -g[i, i]
    _set_gram(p, g)


def m_cauchy_schwarz(p, m, rng):
    g = _gram(p)
    i, j = _features(p, rng, 2)
    g[i, j] = g[j, i] = 2.0 * np.sqrt(g[i, i] * g[j, j]) + 1.0
    _set_gram(p, g)


def m_indefinite_minor(p, m, rng):
    """Pairwise correlations −0.9 between three inputs: every 2x2 minor is fine, the 3x3 is not."""
    g = _gram(p)
    idx = _features(p, rng, 3)
    for a in idx:
        for b in idx:
            if a != b:
                g[a, b] = -0.9 * np.sqrt(g[a, a] * g[b, b])
    _set_gram(p, g)


def m_negative_eigenvalue(p, m, rng):
    g = _gram(p)
    evals, evecs = np.linalg.eigh(g)
    v = evecs[:, -1]
    _set_gram(p, g - 1.5 * evals[-1] * np.outer(v, v))


def m_negated_gram(p, m, rng):
    p["gram-triu"] = -p["gram-triu"]


def _bias(op: Callable[[float], float]) -> Callable:
    def mutate(p, m, rng):
        g = _gram(p)
        g[-1, -1] = op(g[-1, -1])
        _set_gram(p, g)

    return mutate


def m_count_negative(p, m, rng):
    p["count"] = -p["count"]
    m["num-examples"] = -int(m["num-examples"])


def m_count_zero(p, m, rng):
    p["count"] = np.zeros(1, dtype=np.int64)
    m["num-examples"] = 0


def m_count_mismatch(p, m, rng):
    m["num-examples"] = int(m["num-examples"]) + 1 + int(rng.integers(5))


def m_count_double(p, m, rng):
    """Count and num-examples agree but the Gram holds half the rows."""
    p["count"] = 2 * p["count"]
    m["num-examples"] = 2 * int(m["num-examples"])


def m_count_float(p, m, rng):
    p["count"] = p["count"].astype(np.float64)


def m_count_bool(p, m, rng):
    p["count"] = np.array([True])


def m_count_two(p, m, rng):
    p["count"] = np.repeat(p["count"], 2)


def _metric(key: str, value: Callable[[Metrics], Any] | None) -> Callable:
    def mutate(p, m, rng):
        if value is None:
            del m[key]
        else:
            m[key] = value(m)

    return mutate


def _drop(key: str) -> Callable:
    def mutate(p, m, rng):
        del p[key]

    return mutate


def m_extra_array_key(p, m, rng):
    p["backdoor"] = np.zeros(3)


def _hist(op: Callable[[np.ndarray, np.ndarray], None]) -> Callable:
    def mutate(p, m, rng):
        cross = p["cross"]
        op(cross, _gram(p))

    return mutate


def _hist_add_rows(cross: np.ndarray, g: np.ndarray) -> None:
    cross[-1, 0] += g[-1, -1]


def _hist_negative(cross: np.ndarray, g: np.ndarray) -> None:
    cross[-1, 0] = -1.0


def _hist_fraction(cross: np.ndarray, g: np.ndarray) -> None:
    cross[-1, 0] += 0.5


def m_cross_scaled(p, m, rng):
    p["cross"][:-1] *= 1e4


# kind -> (mutation, regex the rejection reason must match); a mutation returns None (the packed
# record and metrics were changed in place), a dict of raw Arrays to put in the record, or a
# RecordDict / Error for the whole reply.
MUTATIONS: dict[str, tuple[Callable, str]] = {
    "gram-triu too short": (m_gram_short, "entries"),
    "gram-triu too long": (m_gram_long, "entries"),
    "gram-triu 2-D": (m_gram_2d, "1-D"),
    "gram-triu for a 4x wider layer": (m_gram_huge, "entries"),
    "gram int64": (_astype("gram-triu", np.int64), "float64"),
    "gram float32": (_astype("gram-triu", np.float32), "float64"),
    "gram float16": (_astype("gram-triu", np.float16), "float64"),
    "gram complex128": (_astype("gram-triu", np.complex128), "float64"),
    "gram big-endian float64": (_astype("gram-triu", ">f8"), "float64"),
    "gram strings": (_astype("gram-triu", str), "float64"),
    "gram object (pickled)": (m_gram_object, "cannot be decoded"),
    "gram garbage bytes": (m_gram_garbage, "cannot be decoded"),
    "gram non-numpy stype": (m_gram_stype, "cannot be decoded"),
    "cross column dropped": (m_cross_drop_column, "shape"),
    "cross transposed": (m_cross_transposed, "shape"),
    "cross 1-D": (m_cross_1d, "2-D"),
    "cross int64": (_astype("cross", np.int64), "float64"),
    "cross float16": (_astype("cross", np.float16), "float64"),
    "cross strings": (_astype("cross", str), "float64"),
    "gram NaN": (_poison("gram-triu", np.nan), "non-finite"),
    "gram +Inf": (_poison("gram-triu", np.inf), "non-finite"),
    "cross NaN": (_poison("cross", np.nan), "non-finite"),
    "cross -Inf": (_poison("cross", -np.inf), "non-finite"),
    "full gram asymmetric": (m_full_gram_asymmetric, "not symmetric"),
    "full gram and gram-triu": (m_full_and_triu, "both"),
    "full gram wrong shape": (m_full_gram_wrong_shape, "expected D"),
    "negative diagonal": (m_negative_diagonal, "negative diagonal"),
    "|G_ij| > sqrt(G_ii G_jj)": (m_cauchy_schwarz, "Cauchy"),
    "indefinite 3x3 minor": (m_indefinite_minor, "semi-definite"),
    "negative eigenvalue": (m_negative_eigenvalue, "negative diagonal|semi-definite|G\\[-1,-1\\]"),
    "gram negated": (m_negated_gram, "negative diagonal"),
    "bias entry + 1": (_bias(lambda r: r + 1), "G\\[-1,-1\\]"),
    "bias entry x 2": (_bias(lambda r: 2 * r), "G\\[-1,-1\\]"),
    "bias entry + 0.5": (_bias(lambda r: r + 0.5), "design rows"),
    "bias entry negative": (_bias(lambda r: -r), "negative diagonal"),
    "count negative": (m_count_negative, "non-negative"),
    "count zero": (m_count_zero, "count is 0"),
    "num-examples != count": (m_count_mismatch, "but count="),
    "count and num-examples doubled": (m_count_double, "G\\[-1,-1\\]"),
    "count float": (m_count_float, "one integer"),
    "count bool": (m_count_bool, "one integer"),
    "count two values": (m_count_two, "one integer"),
    "num-examples missing": (_metric("num-examples", None), "lacks 'num-examples'"),
    "num-examples float": (_metric("num-examples", lambda m: m["num-examples"] + 0.5), "integer"),
    "num-examples list": (_metric("num-examples", lambda m: [m["num-examples"]]), "integer"),
    "layer of another round": (_metric("layer", lambda m: m["layer"] + 1), "expected"),
    "layer missing": (_metric("layer", None), "lacks 'layer'"),
    "layer list": (_metric("layer", lambda m: [m["layer"]]), "integer"),
    "layer float": (_metric("layer", lambda m: m["layer"] + 0.5), "integer"),
    "partition-id float": (_metric("partition-id", lambda m: 0.5), "partition-id"),
    "partition-id list": (_metric("partition-id", lambda m: [m["partition-id"]]), "partition-id"),
    "gram-triu missing": (_drop("gram-triu"), "miss"),
    "cross missing": (_drop("cross"), "miss"),
    "count missing": (_drop("count"), "miss"),
    "extra array key": (m_extra_array_key, "unknown keys"),
    "label histogram + G[-1,-1]": (_hist(_hist_add_rows), "sums to"),
    "label histogram negative": (_hist(_hist_negative), "histogram"),
    "label histogram fractional": (_hist(_hist_fraction), "histogram"),
    "cross x 1e4": (m_cross_scaled, "Cauchy"),
    "no ArrayRecord": ("no-arrays", "ArrayRecord"),
    "no MetricRecord": ("no-metrics", "MetricRecord"),
    "two ArrayRecords": ("two-arrays", "ArrayRecord"),
    "two MetricRecords": ("two-metrics", "MetricRecord"),
    "extra ConfigRecord": ("extra-config", "ConfigRecord"),
    "empty reply": ("empty", "ArrayRecord"),
    "error reply": ("error", "client error"),
}


def forge(kind: str, template: Message, request: Message, rng: np.random.Generator) -> Message:
    """A hostile reply to ``request``: ``template`` (an honest reply) mutated as ``kind`` says."""
    mutate = MUTATIONS[kind][0]
    packed = {k: v.numpy().copy() for k, v in template.content[P.STATISTICS_KEY].items()}
    metrics = dict(template.content[P.METRICS_KEY])
    stats = ArrayRecord({k: Array(v) for k, v in packed.items()})
    mets = MetricRecord(metrics)
    if mutate == "error":
        return Message(Error(code=0, reason="fuzz: the client crashed"), reply_to=request)
    if isinstance(mutate, str):
        content = {
            "no-arrays": {"metrics": mets},
            "no-metrics": {"statistics": stats},
            "two-arrays": {"statistics": stats, "statistics-2": stats, "metrics": mets},
            "two-metrics": {"statistics": stats, "metrics": mets, "metrics-2": mets},
            "extra-config": {"statistics": stats, "metrics": mets, "cfg": ConfigRecord({"a": 1})},
            "empty": {},
        }[mutate]
        return Message(content=RecordDict(content), reply_to=request)
    raw = mutate(packed, metrics, rng) or {}
    record = ArrayRecord(
        {k: Array(np.ascontiguousarray(v)) for k, v in packed.items() if k not in raw}
    )
    for key, array in raw.items():
        record[key] = array
    content = RecordDict({P.STATISTICS_KEY: record, P.METRICS_KEY: MetricRecord(metrics)})
    return Message(content=content, reply_to=request)


class FuzzGrid(LocalGrid):
    """A :class:`LocalGrid` with extra hostile nodes that answer with mutated honest replies.

    Every round, each hostile node gets a kind of :data:`MUTATIONS` (a seeded shuffle of the kinds,
    cycled, so all kinds occur) and the honest reply it mutates (seeded choice); replies of all
    nodes are shuffled (with ``honest_in_order``: the honest ones stay in partition order, the
    hostile ones go to random places, so the streaming strategy's arrival-order sum of the honest
    replies is the sorted one). ``sent`` records ``(round, node id, kind)``.
    """

    def __init__(
        self,
        client_app,
        num_honest: int,
        num_hostile: int,
        seed: int,
        honest_in_order=False,
        run_config=None,
    ) -> None:
        super().__init__(client_app, num_honest, run_config, seed=seed)
        self.honest_in_order = honest_in_order
        self.hostile = random.Random(seed + 1).sample(range(1, 2**63), num_hostile)
        assert not set(self.hostile) & set(self.contexts)
        self.fuzz = np.random.default_rng(seed)
        self.kinds = list(MUTATIONS)
        self.queue: list[str] = []
        self.sent: list[tuple[int, int, str]] = []
        self.round = 0

    def get_node_ids(self):  # noqa: D102
        return [*self.contexts, *self.hostile]

    def _next_kind(self) -> str:
        if not self.queue:
            self.queue = [self.kinds[i] for i in self.fuzz.permutation(len(self.kinds))]
        return self.queue.pop()

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102
        self.round += 1
        messages = list(messages)
        replies = [self._call(m) for m in messages if m.metadata.dst_node_id in self.contexts]
        honest = [r for r in replies if not r.has_error()]
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.contexts:
                continue
            kind = self._next_kind()
            template = honest[int(self.fuzz.integers(len(honest)))]
            replies.append(forge(kind, template, msg, self.fuzz))
            self.sent.append((self.round, node, kind))
        if not self.honest_in_order:
            self._rng.shuffle(replies)
            return replies
        honest_ids = set(self.contexts)
        ordered = sorted(
            (r for r in replies if r.metadata.src_node_id in honest_ids),
            key=lambda r: int(self.contexts[r.metadata.src_node_id].node_config["partition-id"]),
        )
        for r in (r for r in replies if r.metadata.src_node_id not in honest_ids):
            ordered.insert(int(self._rng.randrange(len(ordered) + 1)), r)
        return ordered


#: Mutations of values that honest Gaussian-noised statistics can also show (noise makes ``G``
#: indefinite with negative diagonal entries, the label histogram fractional or negative, ``B``
#: anything): the DP release cannot tell them from honest replies and accepts them. Every other
#: kind (layout, types, sizes, non-finite values, asymmetry, counts, the bias entry ``G[-1,-1]``,
#: which is released exactly, metrics) is rejected as without DP.
DP_BLIND = {
    "negative diagonal",
    "|G_ij| > sqrt(G_ii G_jj)",
    "indefinite 3x3 minor",
    "label histogram + G[-1,-1]",
    "label histogram negative",
    "label histogram fractional",
    "cross x 1e4",
}
#: Kinds the DP release rejects for another reason than the exact checks give (it skips the sign
#: checks, so the count / bias-entry check catches them first).
DP_REASONS = {"bias entry negative": "design rows", "gram negated": "design rows"}
DP_RUN_CONFIG = {"dp-noise-multiplier": 1.0, "dp-clip-norm": 3.0, "dp-seed": 3}


def _strategy(arch, aggregation="sorted", release=None, **kwargs):
    return FedACnnL(
        arch,
        "label-pca",
        seed=2,
        fraction_evaluate=0.0,
        aggregation=aggregation,
        release=release,
        **kwargs,
    )


class DirectReplies(StrategyWrapper):
    """The fuzz grid's own ``send_and_receive`` replies, also for streaming aggregation.

    (The push/pull reply stream would bypass it; it is tested in ``test_fedacnnl_streaming.py``.)
    """

    def reply_grid(self, grid):
        return grid


@pytest.mark.parametrize("release", ["exact", "dp"])
@pytest.mark.parametrize("aggregation", ["sorted", "streaming"])
def test_fuzzed_replies_are_rejected_and_weights_equal_honest_only(
    digits, caplog, aggregation, release
):
    """The 66 kinds of malformed replies against every aggregation x release combination."""
    split = federated_split(digits, NUM_HONEST, "dirichlet", alpha=0.5, seed=4)
    arch = cnn(digits.input_shape, 10, channels=ARCH_CHANNELS)
    dp = release == "dp"
    run_config = DP_RUN_CONFIG if dp else None
    policy = DPRelease(DPConfig(1.0, clip_norm=3.0)) if dp else None
    app = make_fedacnnl_client_app(_loader(digits, split), cache=False)

    honest = _strategy(arch, release=policy, min_train_nodes=NUM_HONEST)
    honest.start(LocalGrid(app, NUM_HONEST, run_config, seed=11))

    streaming = aggregation == "streaming"
    grid = FuzzGrid(
        app, NUM_HONEST, NUM_HOSTILE, seed=7, honest_in_order=streaming, run_config=run_config
    )
    fuzzed = _strategy(arch, aggregation, policy, min_train_nodes=NUM_HONEST + NUM_HOSTILE)
    result = DirectReplies(fuzzed).start(grid)

    rounds = [e for e in fuzzed.history if e["kind"] == "train"]
    assert len(rounds) == arch.num_layers == 3
    assert len(grid.sent) == 3 * NUM_HOSTILE >= 300
    kinds = Counter(kind for _, _, kind in grid.sent)
    assert set(kinds) == set(MUTATIONS)  # every kind was sent
    passed_checks = set()  # kinds whose replies passed every check of the release
    for r, entry in enumerate(rounds, start=1):
        reasons = {item["node-id"]: item["reason"] for item in entry.get("rejected", [])}
        sent = [(node, kind) for rr, node, kind in grid.sent if rr == r]
        hostile = {node for node, _ in sent}
        for node, kind in sent:
            reason = reasons.get(node, "duplicate partition-id (kept)")
            if reason.startswith("duplicate partition-id"):
                passed_checks.add(kind)  # then only the partition it claims stops it
                continue
            expected = (DP_REASONS if dp else {}).get(kind, MUTATIONS[kind][1])
            assert re.search(expected, reason), (kind, reason)
        # a hostile reply that passed the checks claims an honest partition: in the first round
        # one of the two is kept (the smaller node id) and the partition is bound to it, later
        # claims of the other are rejected (issue 13); each partition is summed at most once
        displaced = [n for n in reasons if n not in hostile]
        assert all(reasons[n].startswith("duplicate partition-id") for n in displaced)
        assert entry["num-valid"] == len(set(entry["partitions"]))
        expected_valid = NUM_HONEST if not dp else entry["num-valid"]
        assert NUM_HONEST - len(displaced) <= entry["num-valid"] == expected_valid <= NUM_HONEST
        assert result.train_metrics_clientapp[r]["num-clients"] == entry["num-valid"]
    assert caplog.text.count("Rejected reply from node") >= 3 * NUM_HOSTILE  # logged, with reason
    if dp:  # exactly the value mutations that noisy statistics can show pass the DP checks
        assert passed_checks == DP_BLIND
        return
    assert not passed_checks
    # the model is the honest nodes' model, bit for bit
    assert len(fuzzed.net.weights) == len(honest.net.weights)
    for w_fuzzed, w_honest in zip(fuzzed.net.weights, honest.net.weights, strict=True):
        np.testing.assert_array_equal(w_fuzzed, w_honest)


def test_honest_float32_replies_pass_every_check(digits):
    """The strict checks (PSD, label histogram, rows per sample) accept float32 client products."""
    split = federated_split(digits, 8, "dirichlet", alpha=0.1, seed=0)
    for arch in (cnn(digits.input_shape, 10, channels=(8, 16)), mlp(digits.input_shape, 10, 32)):
        for scheme in ("label-pca", "label-encoding", "pca"):
            grid = LocalGrid(
                make_fedacnnl_client_app(_loader(digits, split), cache=False), 8, seed=1
            )
            strategy = FedACnnL(
                arch, scheme, dtype="float32", min_train_nodes=8, fraction_evaluate=0.0
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", IllConditionedWarning)
                strategy.start(grid)
            assert all(not e.get("rejected") for e in strategy.history), (arch.name, scheme)


# ------------------------------------------------------------------------ statistics checks
def _stats(rng, rows=40, dim=6, classes=4, positions=1):
    a = np.hstack([rng.random((rows * positions, dim - 1)), np.ones((rows * positions, 1))])
    y = np.repeat(rng.integers(0, classes, rows), positions)
    t = np.eye(classes)[y]
    return LayerStatistics(a.T @ a, a.T @ t, rows)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda g, b: g.__setitem__((0, 0), -1.0), "negative diagonal"),
        (lambda g, b: (g.__setitem__((0, 1), 1e3), g.__setitem__((1, 0), 1e3)), "Cauchy"),
        (lambda g, b: b.__setitem__((-1, 0), b[-1, 0] + 1), "sums to"),
        (lambda g, b: b.__setitem__((-1, 0), -b[-1, 0]), "histogram"),
        (lambda g, b: b.__setitem__((0, 0), 1e4), "Cauchy"),
        (lambda g, b: g.__setitem__((-1, -1), 2 * g[-1, -1]), "G\\[-1,-1\\]"),
    ],
)
def test_validate_strict_checks(mutate, message):
    rng = np.random.default_rng(0)
    stats = _stats(rng)
    stats.validate(6, 4, rows_per_sample=1, label_classes=4, check_psd=True)
    mutate(stats.gram, stats.cross)
    with pytest.raises(StatisticsError, match=message):
        stats.validate(6, 4, rows_per_sample=1, label_classes=4, check_psd=True)


def test_validate_rejects_indefinite_gram_with_valid_minors():
    rng = np.random.default_rng(1)
    stats = _stats(rng, rows=200)
    g = stats.gram
    for a, b in ((0, 1), (0, 2), (1, 2)):
        g[a, b] = g[b, a] = -0.9 * np.sqrt(g[a, a] * g[b, b])
    assert np.linalg.eigvalsh(g)[0] < 0
    with pytest.raises(StatisticsError, match="semi-definite"):
        stats.validate(check_psd=True)


def test_unpack_full_matrix_and_size_check_before_allocation():
    rng = np.random.default_rng(2)
    stats = _stats(rng)
    packed = stats.pack()
    full = {"gram": stats.gram.copy(), "cross": packed["cross"], "count": packed["count"]}
    back = LayerStatistics.unpack(full, dim=6, targets=4, strict=True)
    np.testing.assert_array_equal(back.gram, stats.gram)
    full["gram"][0, 1] += 1.0
    with pytest.raises(StatisticsError, match="not symmetric"):
        LayerStatistics.unpack(full).validate()
    huge = {**packed, "gram-triu": np.zeros(5000 * 5001 // 2)}
    with pytest.raises(StatisticsError, match="expected D\\(D\\+1\\)/2 = 21"):
        LayerStatistics.unpack(huge, dim=6)
    with pytest.raises(StatisticsError, match="unknown keys"):
        LayerStatistics.unpack({**packed, "x": np.zeros(1)}, strict=True)


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"gamma": -1e-3}, "gamma"),
        ({"hidden-gamma": -0.1}, "hidden-gamma"),
        ({"lam": 0.0}, "lam"),
        ({"lam": -1}, "lam"),
        ({"gamma": float("nan")}, "gamma"),
        ({"gamma-rule": "relatve"}, "gamma-rule"),
        ({"lam-rule": "fixed"}, "lam-rule"),
        ({"dataset": "imagenet"}, "dataset"),
        ({"scheme": "pcaa"}, "scheme"),
        ({"model": "resnet50"}, "model"),
        ({"partitioner": "shards"}, "partitioner"),
        ({"dtype": "float16"}, "dtype"),
        ({"personalize-layers": "first"}, "personalize-layers"),
        ({"fraction-train": 0.0}, "fraction-train"),
        ({"fraction-train": 1.5}, "fraction-train"),
        ({"fraction-evaluate": -0.1}, "fraction-evaluate"),
        ({"dirichlet-alpha": 0}, "dirichlet-alpha"),
        ({"test-fraction": 1.0}, "test-fraction"),
        ({"batch-size": 0}, "batch-size"),
        ({"min-nodes": 0}, "min-nodes"),
        ({"num-groups": -2}, "num-groups"),
        ({"cnn-channels": "32,x"}, "cnn-channels"),
        ({"round-timeout": 0}, "round-timeout"),
    ],
)
def test_fedacnnl_run_config_rejects_bad_values(override, key):
    from flwr_analytic.fedacnnl import resolve_run_config

    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: .*(allowed|must be)"):
        resolve_run_config(override)


def test_run_config_typos_name_the_closest_key():
    from flwr_analytic.fedacnnl import resolve_run_config
    from flwr_analytic.meta.config import resolve_run_config as resolve_meta

    with pytest.raises(KeyError, match="'gama'; did you mean 'gamma'"):
        resolve_run_config({"gama": 1.0})
    with pytest.raises(KeyError, match="did you mean 'hidden-gamma'"):
        resolve_run_config({"hiden-gamma": 1.0})
    with pytest.raises(KeyError, match="'nuu'; did you mean 'nu'"):
        resolve_meta({"nuu": 3})
    assert closest_key("lamda", ["lam", "gamma", "seed"]) == "lam"
    assert closest_key("zzz", ["lam", "gamma"]) is None
    with pytest.raises(ConfigError, match="did you mean 'batch-size'"):
        check_keys({"batch_size": 1}, ["batch-size", "seed"], "test")


def test_more_clients_than_samples_fails_naming_num_partitions(digits):
    from flwr_analytic.fedacnnl.config import split_from_config

    with pytest.raises(ConfigError, match=f"num-partitions: 5000 .* allowed: 1..{len(digits)}"):
        split_from_config({"partitioner": "iid"}, 5000)
    with pytest.raises(ConfigError, match="num-partitions"):
        split_from_config({"partitioner": "iid"}, 0)


def test_unreachable_min_partition_size_names_the_keys(digits):
    """The meta app's min-partition-size 20 cannot hold for 20 Dirichlet(0.1) partitions of digits."""
    from flwr_analytic.data import federated_split

    with pytest.raises(ValueError, match=r"min-partition-size=20 .*dirichlet-alpha") as exc:
        federated_split(digits, 20, "dirichlet", alpha=0.1, min_partition_size=20, seed=0)
    assert "20 partitions" in str(exc.value) and f"{len(digits)} rows" in str(exc.value)
    split = federated_split(digits, 10, "dirichlet", alpha=0.1, min_partition_size=20, seed=0)
    assert min(len(tr) + len(te) for tr, te in zip(split.train, split.test)) >= 20


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"gamma": -1.0}, "gamma"),
        ({"hidden_gamma": -1e-2}, "hidden_gamma"),
        ({"lam": 0.0}, "lam"),
        ({"gamma_rule": "log"}, "gamma_rule"),
        ({"lam_rule": "log"}, "lam_rule"),
        ({"dtype": "float16"}, "dtype"),
        ({"fraction_train": 0.0}, "fraction_train"),
        ({"fraction_evaluate": 2.0}, "fraction_evaluate"),
        ({"batch_size": 0}, "batch_size"),
        ({"personalize_layers": "none"}, "personalize_layers"),
        ({"num_groups": -1}, "num_groups"),
        ({"seed": -3}, "seed"),
    ],
)
def test_fedacnnl_constructor_rejects_bad_values(digits, kwargs, key):
    arch = mlp(digits.input_shape, 10, hidden=8)
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: "):
        FedACnnL(arch, **kwargs)


def test_fedacnnl_constructor_rejects_unknown_scheme(digits):
    with pytest.raises(ConfigError, match="scheme: unknown target scheme 'pcaa'; allowed: "):
        FedACnnL(mlp(digits.input_shape, 10, hidden=8), "pcaa")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"nu": -1}, "nu"),
        ({"alpha": -0.01}, "alpha"),
        ({"beta": 0.0}, "beta"),
        ({"pfedme-lr": -1.0}, "pfedme-lr"),
        ({"pfedme-personal-lr": 0}, "pfedme-personal-lr"),
        ({"pfedme-lambda": -15.0}, "pfedme-lambda"),
        ({"proximal-mu": -0.01}, "proximal-mu"),
        ({"hf-delta": 0.0}, "hf-delta"),
        ({"mode": "second-order"}, "mode"),
        ({"algorithm": "scaffold"}, "algorithm"),
        ({"dataset": "imagenet"}, "dataset"),
        ({"model": "vit"}, "model"),
        ({"partitioner": "shards"}, "partitioner"),
        ({"fraction-train": 0.0}, "fraction-train"),
        ({"local-steps": 0}, "local-steps"),
        ({"hessian-batches": "some"}, "hessian-batches"),
    ],
)
def test_meta_run_config_rejects_bad_values(override, key):
    from flwr_analytic.meta.config import resolve_run_config

    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: .*(allowed|must be)"):
        resolve_run_config(override)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"nu": -1}, "nu"),
        ({"alpha": -1.0}, "alpha"),
        ({"beta": 0.0}, "beta"),
        ({"mode": "exactly"}, "mode"),
        ({"hessian_batches": "all"}, "hessian_batches"),
        ({"delta": -1e-3}, "delta"),
        ({"local_steps": 0}, "local_steps"),
        ({"fraction_train": 2.0}, "fraction_train"),
    ],
)
def test_nu_step_meta_constructor_rejects_bad_values(kwargs, key):
    from flwr_analytic.strategies import NuStepMetaFedAvg

    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: "):
        NuStepMetaFedAvg(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"lr": -0.005}, "lr"),
        ({"personal_lr": 0.0}, "personal_lr"),
        ({"beta": -1.0}, "beta"),
        ({"lam": -15.0}, "lam"),
        ({"inner_steps": 0}, "inner_steps"),
    ],
)
def test_pfedme_constructor_rejects_bad_values(kwargs, key):
    from flwr_analytic.strategies.pfedme import PFedMe

    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: "):
        PFedMe(**kwargs)


def test_core_rejects_bad_values(digits):
    with pytest.raises(ValueError, match="regularization value .*-1"):
        Regularization(-1.0)
    with pytest.raises(ValueError, match="regularization rule: 'log' .* relative, absolute"):
        Regularization(0.1, "log")
    with pytest.raises(ValueError, match="unknown target scheme 'pcaa'; allowed: label-encoding"):
        AnalyticNetwork(mlp(digits.input_shape, 10, 8), "pcaa")
    with pytest.raises(ValueError, match="dtype must be one of"):
        AnalyticNetwork(mlp(digits.input_shape, 10, 8), dtype="float16")
    with pytest.raises(ValueError, match="unknown model 'resnet'; allowed: linear, mlp"):
        get_architecture("resnet", digits.input_shape)


# ---------------------------------------------------------------------------- ill-conditioned
def _rank_deficient(rng):
    """Duplicated, constant and zero inputs: ``G`` is singular."""
    x = rng.standard_normal((60, 5))
    x = np.hstack([x, x[:, :2], np.zeros((60, 2)), np.full((60, 1), 3.0)])
    a = np.hstack([x, np.ones((60, 1))])
    t = np.eye(3)[rng.integers(0, 3, 60)]
    return a, a.T @ a, a.T @ t


@pytest.mark.parametrize(
    "reg",
    [
        Regularization(0.0, "absolute"),
        Regularization(1e-30, "absolute"),
        Regularization(0.0),
        Regularization(1e-30),
    ],
    ids=["0-abs", "1e-30-abs", "0-rel", "1e-30-rel"],
)
def test_ridge_on_singular_gram_warns_and_is_finite(reg):
    a, g, b = _rank_deficient(np.random.default_rng(0))
    with pytest.warns(IllConditionedWarning):
        w = ridge_solve(g, b, reg)
    assert np.all(np.isfinite(w))
    # the minimum-norm least-squares solution (the γ -> 0 limit), not amplified rounding noise
    np.testing.assert_allclose(a @ w, a @ np.linalg.pinv(g) @ b, atol=1e-8)
    assert np.abs(w).max() < 1e3


def test_personalized_solve_with_tiny_lambda_warns_and_is_finite():
    a, g, b = _rank_deficient(np.random.default_rng(1))
    w_global = np.zeros_like(b)
    with pytest.warns(IllConditionedWarning):
        w = personalized_solve(g, b, w_global, Regularization(1e-30, "absolute"))
    assert np.all(np.isfinite(w)) and np.abs(w).max() < 1e3


def test_well_conditioned_default_solve_does_not_warn():
    rng = np.random.default_rng(2)
    a = np.hstack([rng.standard_normal((80, 6)), np.ones((80, 1))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ridge_solve(a.T @ a, a.T @ rng.standard_normal((80, 2)), Regularization(1e-6))


def _degenerate_digits(digits: ArrayDataset) -> ArrayDataset:
    """Digits with duplicated pixels and constant (non-zero) pixels added to the constant corners."""
    x = digits.x.copy().reshape(len(digits.x), -1)
    x[:, 9] = x[:, 10]
    x[:, 17] = x[:, 18]
    x[:, 20] = 5.0
    x[:, 36] = 0.0
    return dataclasses.replace(digits, x=x.reshape(digits.x.shape), name="digits-degenerate")


@pytest.mark.parametrize(
    ("arch_name", "scheme"),
    [("mlp", "pca"), ("mlp", "label-pca"), ("cnn", "pca"), ("cnn", "label-pca")],
)
@pytest.mark.parametrize("gamma", [0.0, 1e-30])
def test_network_on_degenerate_pixels_warns_and_is_finite(digits, arch_name, scheme, gamma):
    data = _degenerate_digits(digits)
    arch = mlp(data.input_shape, 10) if arch_name == "mlp" else cnn(data.input_shape, 10, (8, 16))
    reg = Regularization(gamma, "absolute")
    net = AnalyticNetwork(arch, scheme, hidden_reg=reg, output_reg=reg)
    # The MLP sees the duplicated pixels: singular for any γ this small, the least-squares fallback
    # warns. In the CNN the degenerate columns are dead (all-zero) channels: with γ = 0 nothing can
    # be solved by Cholesky (warning); with γ = 1e-30 the Jacobi-equilibrated Cholesky solves it.
    rescued = arch_name == "cnn" and gamma > 0
    with warnings.catch_warnings() if rescued else pytest.warns(IllConditionedWarning):
        if rescued:
            warnings.simplefilter("error", IllConditionedWarning)
        fit_centralized(net, data.x, data.y)
    assert all(np.all(np.isfinite(w)) for w in net.weights)
    scores = net.predict(data.x)
    assert np.all(np.isfinite(scores))
    assert np.mean(scores.argmax(1) == data.y) > 0.85  # still a working classifier


def test_strategy_with_zero_gamma_on_degenerate_pixels_warns_and_is_finite(digits):
    data = _degenerate_digits(digits)
    split = federated_split(data, 4, "iid", seed=0)
    arch = mlp(data.input_shape, 10)  # 64 PCA pairs > rank of the pixel covariance
    grid = LocalGrid(make_fedacnnl_client_app(_loader(data, split), cache=False), 4, seed=3)
    strategy = FedACnnL(
        arch, "pca", gamma=0.0, hidden_gamma=0.0, gamma_rule="absolute", min_train_nodes=4
    )
    with pytest.warns(IllConditionedWarning):
        result = strategy.start(grid)
    assert all(not e.get("rejected") for e in strategy.history)  # singular G is valid input
    assert all(np.all(np.isfinite(w)) for w in strategy.net.weights)
    (ev,) = result.evaluate_metrics_clientapp.values()
    assert np.isfinite(ev["global-accuracy"]) and ev["global-accuracy"] > 0.85
    assert np.isfinite(ev["personal-accuracy"])
