"""Privacy: FedACnnL statistics through Flower's SecAgg+ (real protocol), and Gaussian DP.

SecAgg+ runs Flower's own ``secaggplus_mod`` + ``SecAggPlusWorkflow`` (``DefaultWorkflow`` on a
``LegacyContext``) on an in-process grid that serializes messages (deep copies, as a SuperLink
would: the workflow shares one setup record between nodes and the mod mutates it), and under Ray
(slow). The solved weights must match the plain solve within the quantization bound derived in
:mod:`flwr_analytic.analytic.privacy`, and the server must never hold an individual client's
statistics.
"""

from __future__ import annotations

import copy
import math
import types

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from flwr_analytic.analytic import (
    AnalyticNetwork,
    LayerStatistics,
    StatisticsError,
    merge,
    ridge_solve,
)
from flwr_analytic.analytic.privacy import (
    DPConfig,
    SecAggEncoding,
    SecAggRangeError,
    add_gaussian_noise,
    clipped_statistics,
    gaussian_delta,
    gaussian_epsilon,
    gdp_mu,
    noise_multiplier_for,
    noise_rng,
    privacy_report,
    solve_noisy_layer,
    solve_perturbation_bound,
    validate_released,
)
from flwr_analytic.analytic.privacy.release import DPRelease
from flwr_analytic.analytic.server import ClientKey, LayerwiseServer
from flwr_analytic.clients.fedacnnl_client import make_fedacnnl_client_app
from flwr_analytic.clients.fedacnnl_secagg import make_secagg_client_app
from flwr_analytic.data import federated_split
from flwr_analytic.fedacnnl import LocalGrid
from flwr_analytic.fedacnnl import protocol as P
from flwr_analytic.models import get_architecture
from flwr_analytic.strategies.fedacnnl import FedACnnL
from flwr_analytic.strategies.fedacnnl_secagg import FedACnnLSecAgg, run_secagg

pytestmark = pytest.mark.faults


class SerializingGrid(LocalGrid):
    """LocalGrid whose nodes get (and return) copies of messages, like a real transport."""

    def _call(self, msg):  # noqa: ANN001, ANN202
        return copy.deepcopy(super()._call(copy.deepcopy(msg)))


def _split(digits, n=5):
    return federated_split(digits, n, "dirichlet", alpha=0.5, seed=0)


def _loader(digits, split):
    def load(context):  # noqa: ANN001, ANN202
        return split.client(digits, int(context.node_config["partition-id"]))

    return load


def _scale(digits, split, arch, scheme, seed):
    """A public bound s on every client's |G|, |B| of every layer (a power of two)."""
    ref = AnalyticNetwork(arch, scheme, seed=seed)
    peak = 1.0
    for layer in range(ref.num_layers):
        stats = [ref.statistics(layer, digits.x[i], digits.y[i]) for i in split.train]
        if ref.needs_statistics(layer):
            peak = max(peak, *(np.abs(np.r_[s.gram.ravel(), s.cross.ravel()]).max() for s in stats))
            ref.solve(layer, merge(stats))
        else:
            ref.solve(layer, None)
    return 2.0 ** math.ceil(math.log2(peak))


def _secagg_run(digits, split, arch, scheme, encoding, grid_seed=0, capture=None, gamma=1e-6):
    strategy = FedACnnLSecAgg(
        arch,
        scheme,
        gamma=gamma,
        seed=1,
        min_train_nodes=split.num_clients,
        min_available_nodes=split.num_clients,
        encoding=encoding,
    )
    grid = SerializingGrid(
        make_secagg_client_app(_loader(digits, split)), split.num_clients, seed=grid_seed
    )
    grid.set_run(types.SimpleNamespace(run_id=1))
    if capture is not None:
        send = grid.send_and_receive

        def spy(messages, *, timeout=None):  # noqa: ANN001, ANN202
            replies = list(send(messages, timeout=timeout))
            capture.extend(replies)
            return replies

        grid.send_and_receive = spy
    run_secagg(grid, Context(1, 0, {}, RecordDict(), {}), strategy)
    return strategy


def _check_against_plain(strategy, digits, train, arch, scheme):
    """Each layer's decoded SecAgg+ sum vs the plain sum of the clients ``train`` (computed with
    the lower layers the SecAgg run solved): entrywise within ε_G, count exact; the output layer's
    weights within :func:`solve_perturbation_bound` of the plain solve."""
    net = strategy.net
    probe = AnalyticNetwork(arch, scheme, seed=1)
    for layer in range(net.num_layers):
        if layer in strategy.aggregates:
            plain = merge(probe.statistics(layer, digits.x[i], digits.y[i]) for i in train)
            agg = strategy.aggregates[layer]
            got, eps_g = agg["statistics"], agg["entry-tolerance"]
            assert agg["num-clients"] == len(train)
            assert eps_g == strategy.encoding.entry_tolerance(len(train))[0]
            assert got.count == plain.count
            assert np.abs(got.gram - plain.gram).max() <= eps_g
            assert np.all(np.abs(got.cross - plain.cross) <= eps_g)
            if net.is_output(layer):
                assert np.abs(got.gram - plain.gram).max() > 0  # really quantized
                w_plain = ridge_solve(plain.gram, plain.cross, net.output_reg)
                bound = solve_perturbation_bound(
                    got.gram, net.weights[layer], net.output_reg, eps_g
                )
                diff = float(np.linalg.norm(net.weights[layer] - w_plain))
                assert diff <= bound, (diff, bound)
                assert bound < 1e-3 * float(np.linalg.norm(w_plain))  # the bound is meaningful
        probe.set_layer(layer, net.weights[layer])


@pytest.mark.parametrize(
    ("model", "scheme", "gamma", "stretch"),
    # digits pixels are multiples of 1/16: a scale off the powers of two makes the grid miss them
    [("linear", "label-pca", 1e-2, 1.5), ("mlp", "random-standardized", 1e-6, 1.0)],
)
def test_secagg_plus_matches_plain_within_quantization_bound(digits, model, scheme, gamma, stretch):
    torch.set_num_threads(1)
    split = _split(digits)
    kwargs = {"hidden": 64} if model == "mlp" else {}
    arch = get_architecture(model, digits.input_shape, 10, **kwargs)
    enc = SecAggEncoding(scale=stretch * _scale(digits, split, arch, scheme, seed=1))
    replies = []
    strategy = _secagg_run(digits, split, arch, scheme, enc, capture=replies, gamma=gamma)
    net = strategy.net
    assert net.solved_layers == net.num_layers
    k = split.num_clients
    eps_g, _ = enc.entry_tolerance(k)
    assert eps_g == pytest.approx(
        1.001 * k * enc.scale * enc.clipping_range / enc.quantization_range
    )
    _check_against_plain(strategy, digits, split.train, arch, scheme)
    # the server never held one client's statistics: train replies carry no arrays, and the
    # strategy received only the (identical) aggregate
    train_replies = [m for m in replies if m.metadata.message_type == "train"]
    assert train_replies
    assert all(len(a) == 0 for m in train_replies for a in m.content.array_records.values())
    rounds = [h for h in strategy.core.history if h["kind"] == "train"]
    assert all(h["num-valid"] == k and "partitions" not in h for h in rounds)
    assert strategy.evaluation["personal-accuracy"] > 0.8


def test_secagg_plus_is_deterministic_across_node_ids_and_reply_order(digits):
    """Values are pre-rounded to the grid: the mod's stochastic rounding and the masks cancel."""
    split = _split(digits, 4)
    arch = get_architecture("mlp", digits.input_shape, 10, hidden=32)
    enc = SecAggEncoding(scale=_scale(digits, split, arch, "random-standardized", seed=1))
    a = _secagg_run(digits, split, arch, "random-standardized", enc, grid_seed=0)
    b = _secagg_run(digits, split, arch, "random-standardized", enc, grid_seed=7)
    for wa, wb in zip(a.net.weights, b.net.weights, strict=True):
        assert np.array_equal(wa, wb)


def test_secagg_plus_survives_a_dropout_after_key_sharing(digits):
    """A client that dies in the masked-vector stage (after sharing its keys): SecAgg+ rebuilds
    its pairwise masks from the others' Shamir shares; the layer is the sum over the survivors."""
    split = _split(digits, 5)
    arch = get_architecture("mlp", digits.input_shape, 10, hidden=32)
    enc = SecAggEncoding(scale=_scale(digits, split, arch, "random-standardized", seed=1))
    load = _loader(digits, split)

    def flaky(context):  # noqa: ANN001, ANN202 - called only when the client computes statistics
        if int(context.node_config["partition-id"]) == 2:
            raise ConnectionError("node 2 went away")
        return load(context)

    strategy = FedACnnLSecAgg(
        arch,
        "random-standardized",
        seed=1,
        min_train_nodes=5,
        min_available_nodes=5,
        encoding=enc,
    )
    grid = SerializingGrid(make_secagg_client_app(flaky), 5)
    grid.set_run(types.SimpleNamespace(run_id=1))
    run_secagg(grid, Context(1, 0, {}, RecordDict(), {}), strategy)
    assert strategy.net.solved_layers == strategy.net.num_layers
    survivors = [split.train[k] for k in (0, 1, 3, 4)]
    _check_against_plain(strategy, digits, survivors, arch, "random-standardized")
    rounds = [h for h in strategy.core.history if h["kind"] == "train"]
    assert all(h["num-valid"] == 4 and len(h["rejected"]) == 1 for h in rounds)


def test_grid_values_pass_flowers_stochastic_quantization_unchanged(request):
    """Flower's ``quantize`` (unseeded stochastic rounding) maps encoded values to exact integers."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    rng = np.random.default_rng(0)
    g = rng.standard_normal((40, 40))
    stats = LayerStatistics(g @ g.T, rng.standard_normal((40, 3)), 9)
    enc = SecAggEncoding(scale=256.0)
    arrays = enc.encode(stats)
    expected = [np.rint((a + 1.0) * enc.quantization_range / 2).astype(np.int64) for a in arrays]
    saved = np.random.get_state()
    request.addfinalizer(lambda: np.random.set_state(saved))
    for seed in range(5):
        np.random.seed(seed)  # the mod's generator: the result must not depend on it
        got = quantize(arrays, enc.clipping_range, enc.quantization_range)
        assert all(np.array_equal(x, y) for x, y in zip(got, expected, strict=True))
    back = dequantize(expected, enc.clipping_range, enc.quantization_range)
    assert all(np.array_equal(x, y) for x, y in zip(back, arrays, strict=True))
    # unencoded values would be rounded at random
    np.random.seed(0)
    a = quantize([arrays[0] + enc.step / 3], 1.0, enc.quantization_range)[0]
    np.random.seed(1)
    b = quantize([arrays[0] + enc.step / 3], 1.0, enc.quantization_range)[0]
    assert not np.array_equal(a, b)


def test_secagg_encoding_refuses_values_secagg_would_clip():
    stats = LayerStatistics(np.diag([3.0, 5.0, 2.0]), np.ones((3, 2)), 2)
    with pytest.raises(SecAggRangeError, match="secagg-scale"):
        SecAggEncoding(scale=4.0).encode(stats)
    with pytest.raises(SecAggRangeError, match="secagg-count-scale"):
        SecAggEncoding(scale=8.0, count_scale=1.0).encode(stats)
    enc = SecAggEncoding(scale=8.0)
    decoded = enc.decode(enc.encode(stats), 1)
    assert (
        decoded.count == 2 and np.abs(decoded.gram - stats.gram).max() <= enc.entry_tolerance(1)[0]
    )
    with pytest.raises(ValueError, match="quantization_range"):
        SecAggEncoding(scale=1.0, quantization_range=2**31)
    with pytest.raises(ValueError, match="quantization_range"):
        SecAggEncoding(scale=1.0, quantization_range=3 * 2**20)
    with pytest.raises(ValueError, match="clipping_range"):
        SecAggEncoding(scale=1.0, clipping_range=3.0)


def test_secagg_strategy_rejects_weighted_or_mixed_results(digits):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    arch = get_architecture("linear", digits.input_shape, 10)
    strategy = FedACnnLSecAgg(arch, encoding=SecAggEncoding(scale=1024.0))
    enc = strategy.encoding
    stats = strategy.net.statistics(0, digits.x[:50], digits.y[:50])
    params = ndarrays_to_parameters(enc.encode(stats))
    ok = FitRes(Status(Code.OK, ""), params, 1, {P.LAYER: 0})
    weighted = FitRes(Status(Code.OK, ""), params, 50, {P.LAYER: 0})
    proxy = types.SimpleNamespace(cid="x", node_id=1)
    with pytest.raises(StatisticsError, match="num_examples=1"):
        strategy.decode([(proxy, ok), (proxy, weighted)], 0)
    assert strategy.decode([(proxy, ok)], 0).count == 50
    params_none, metrics = strategy.aggregate_fit(1, [(proxy, weighted)], [])
    assert params_none is None and metrics["num-rejected"] == 1


# ------------------------------------------------------------------------------------------- DP
def test_dp_sensitivity_bounds_replace_one_sample(digits):
    """‖Δ(triu G, B)‖ over neighbouring data sets never exceeds Δ = 2C√(C² + τ²)."""
    arch = get_architecture("mlp", digits.input_shape, 10, hidden=32)
    net = AnalyticNetwork(arch, "random", seed=0)
    net.solve(0, None)
    dp = DPConfig(1.0, clip_norm=2.5)
    rng = np.random.default_rng(0)
    x, y = digits.x[:40].copy(), digits.y[:40].copy()
    delta = dp.sensitivity(1, 10)
    iu = np.triu_indices(net.design_dim(1))
    base = clipped_statistics(net, 1, x, y, dp)
    worst = 0.0
    for _ in range(30):
        x2, y2 = x.copy(), y.copy()
        j = int(rng.integers(len(y)))
        x2[j] = rng.uniform(0, 50, size=x2[j].shape).astype(x2.dtype)  # an outlier sample
        y2[j] = (y2[j] + 1 + int(rng.integers(9))) % 10
        other = clipped_statistics(net, 1, x2, y2, dp)
        change = np.concatenate([(other.gram - base.gram)[iu], (other.cross - base.cross).ravel()])
        worst = max(worst, float(np.linalg.norm(change)))
    assert 0 < worst <= delta


def test_dp_noise_symmetric_count_exact_seeded_and_of_the_right_size():
    d, m, sigma = 60, 4, 3.0
    stats = LayerStatistics(np.eye(d) * 10, np.zeros((d, m)), 7)
    stats.gram[-1, -1] = 7
    a = add_gaussian_noise(stats, sigma, noise_rng(5, 2, 1))
    b = add_gaussian_noise(stats, sigma, noise_rng(5, 2, 1))
    c = add_gaussian_noise(stats, sigma, noise_rng(5, 3, 1))
    assert np.array_equal(a.gram, b.gram) and np.array_equal(a.cross, b.cross)
    assert not np.array_equal(a.gram, c.gram)
    assert np.array_equal(a.gram, a.gram.T)
    assert a.count == 7 and a.gram[-1, -1] == 7
    iu = np.triu_indices(d)
    noise = np.concatenate([(a.gram - stats.gram)[iu][:-1], a.cross.ravel()])
    # sample std within 6 standard errors (σ/√(2N)) of σ
    assert abs(noise.std() - sigma) <= 6 * sigma / math.sqrt(2 * noise.size)
    validate_released(a, d, m)
    with pytest.raises(StatisticsError, match="negative diagonal"):
        LayerStatistics(a.gram - np.eye(d) * 20 * (np.arange(d) < d - 1), a.cross, 7).validate()


def test_dp_accounting_matches_the_analytic_gaussian_mechanism():
    for mu in (0.3, 1.0, 2.5):
        eps = gaussian_epsilon(mu, 1e-5)
        assert gaussian_delta(eps, mu) == pytest.approx(1e-5, rel=1e-6)
    # L layers with multiplier z compose to one with z/√L (GDP composition is exact)
    assert gdp_mu([2.0] * 4) == pytest.approx(gdp_mu([1.0]))
    for eps in (0.5, 1.0, 4.0):
        z = noise_multiplier_for(eps, 1e-5, num_layers=3)
        assert privacy_report([z] * 3, 1e-5)["epsilon"] == pytest.approx(eps, rel=1e-6)
        # tighter than the classical σ = Δ√(2 ln(1.25/δ))/ε (Dwork & Roth Thm A.1, ε < 1)
        if eps < 1:
            assert noise_multiplier_for(eps, 1e-5) < math.sqrt(2 * math.log(1.25e5)) / eps
    report = privacy_report([2.0, 2.0], 1e-5)
    assert report["epsilon"] < report["epsilon-zcdp"]  # zCDP conversion is looser
    assert report["per-layer-epsilon"][0] < report["epsilon"] < 2 * report["per-layer-epsilon"][0]


def test_dp_config_errors_name_the_key():
    with pytest.raises(ValueError, match="dp-clip-norm"):
        DPConfig(1.0, clip_norm=1.0)
    with pytest.raises(ValueError, match="dp-noise-multiplier"):
        DPConfig(-1.0, clip_norm=3.0)
    assert not DPConfig(0.0, 0.0).enabled


def _dp_grid(digits, split, run_config, odd=None):
    grid = LocalGrid(
        make_fedacnnl_client_app(_loader(digits, split)), split.num_clients, run_config
    )
    if odd is not None:  # one node with another run config (e.g. no DP)
        node = sorted(grid.contexts)[0]
        ctx = grid.contexts[node]
        grid.contexts[node] = Context(ctx.run_id, ctx.node_id, ctx.node_config, ctx.state, odd)
    return grid


def test_dp_clients_and_dp_strategy_end_to_end(digits):
    torch.set_num_threads(1)
    split = _split(digits, 4)
    arch = get_architecture("mlp", digits.input_shape, 10, hidden=32)
    dp = DPConfig(1.0, clip_norm=3.0)
    rc = {"dp-noise-multiplier": 1.0, "dp-clip-norm": 3.0, "dp-seed": 11}

    def run(odd=None):  # noqa: ANN001, ANN202
        strategy = FedACnnL(
            arch,
            "random-standardized",
            seed=1,
            min_train_nodes=4,
            min_available_nodes=4,
            release=DPRelease(dp),
        )
        result = strategy.start(_dp_grid(digits, split, rc, odd))
        return strategy, result

    a, _ = run()
    b, _ = run()
    for wa, wb in zip(a.net.weights, b.net.weights, strict=True):  # seeded noise: reproducible
        assert np.array_equal(wa, wb)
    train = [h for h in a.history if h["kind"] == "train"]
    assert [h["num-valid"] for h in train] == [4, 4] and not any(h.get("rejected") for h in train)
    for h in train:
        sigma = dp.sigma(1, a.net.num_targets(h["layer"]))
        assert h["dp-ridge"] > 0 and h["dp-sigma"] == pytest.approx(sigma)
    assert all(np.all(np.isfinite(w)) for w in a.net.weights)
    report = a.privacy()
    assert report["released-layers"] == 2
    assert report["epsilon"] == pytest.approx(gaussian_epsilon(math.sqrt(2), 1e-5))
    # the noisy model differs from the non-private one
    plain = FedACnnL(arch, "random-standardized", seed=1, min_train_nodes=4, min_available_nodes=4)
    plain.start(LocalGrid(make_fedacnnl_client_app(_loader(digits, split)), 4))
    assert not np.allclose(plain.net.weights[-1], a.net.weights[-1])
    # a client without DP (or another noise level) is rejected by name, the rest are used
    c, _ = run(odd={"dp-seed": 11})
    train = [h for h in c.history if h["kind"] == "train"]
    assert [h["num-valid"] for h in train] == [3, 3]
    assert all("dp-noise-multiplier" in r["reason"] for h in train for r in h["rejected"])


def test_dp_statistics_are_rejected_by_the_exact_checks_but_accepted_by_the_dp_strategy(digits):
    arch = get_architecture("linear", digits.input_shape, 10)
    net = AnalyticNetwork(arch, seed=0)
    dp = DPConfig(2.0, clip_norm=3.0)
    clipped = clipped_statistics(net, 0, digits.x[:30], digits.y[:30], dp)
    noisy = add_gaussian_noise(clipped, dp.sigma(1, 10), noise_rng(0, 0, 0))
    assert np.diag(noisy.gram).min() < 0  # constant-zero pixels + noise
    packed = noisy.pack()
    with pytest.raises(StatisticsError):
        FedACnnL(arch).server.check(packed, 30, 0)
    strategy = FedACnnL(arch, release=DPRelease(dp))
    announced = {"dp-noise-multiplier": 2.0, "dp-clip-norm": 3.0}
    assert strategy.server.check(packed, 30, 0, announced).count == 30
    with pytest.raises(StatisticsError, match="dp-clip-norm"):  # another clip norm: refused
        strategy.server.check(packed, 30, 0, {**announced, "dp-clip-norm": 2.0})


def test_benchmark_solve_path_equals_the_dp_strategy(digits):
    """``solve_noisy_layer`` (used by benchmarks/dp_accuracy.py) is the DP release's solve."""
    split = _split(digits, 4)
    arch = get_architecture("linear", digits.input_shape, 10)
    dp = DPConfig(1.5, clip_norm=3.0)
    server = LayerwiseServer(arch, gamma=1e-4, release=DPRelease(dp))
    net = AnalyticNetwork(arch, seed=0, output_reg=server.net.output_reg)
    released = [
        add_gaussian_noise(
            clipped_statistics(net, 0, digits.x[i], digits.y[i], dp),
            dp.sigma(1, 10),
            noise_rng(3, k, 0),
        )
        for k, i in enumerate(split.train)
    ]
    for k, stats in enumerate(released):
        server.contribute(ClientKey.of(k, k), stats)
    outcome = server.close_layer()
    assert outcome.solved and outcome.num_valid == 4
    assert server.release.details(server.net, 0, 4)["dp-sigma"] == dp.sigma(1, 10)
    w = solve_noisy_layer(net, 0, released, dp.sigma(1, 10))
    assert np.array_equal(w, server.net.weights[0])
    assert net.output_reg == server.net.output_reg  # the ridge is an argument, never swapped


def test_dp_off_by_default_leaves_statistics_unchanged(digits):
    split = _split(digits, 3)
    arch = get_architecture("linear", digits.input_shape, 10)
    strategy = FedACnnL(arch, seed=1, min_train_nodes=3, min_available_nodes=3)
    strategy.start(LocalGrid(make_fedacnnl_client_app(_loader(digits, split)), 3))
    ref = AnalyticNetwork(arch, seed=1)
    ref.solve(0, merge(ref.statistics(0, digits.x[i], digits.y[i]) for i in split.train))
    assert (
        np.abs(strategy.net.weights[0] - ref.weights[0]).max()
        <= 1e-9 * np.abs(ref.weights[0]).max()
    )


# --------------------------------------------------------------------------------------- Ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_secagg_plus_under_ray_matches_in_process(tmp_path, monkeypatch, digits):
    from flower_processes import flower_env, stop_owned_processes
    from flwr.simulation import run_simulation

    from flwr_analytic.strategies.fedacnnl_secagg import make_secagg_server_app

    for key, value in flower_env(tmp_path).items():
        if key.startswith(("FLWR_", "RAY_")):
            monkeypatch.setenv(key, value)
    split = _split(digits, 5)
    arch = get_architecture("mlp", digits.input_shape, 10, hidden=64)
    enc = SecAggEncoding(scale=_scale(digits, split, arch, "random-standardized", seed=1))
    strategies = []

    def strategy_fn(context):  # noqa: ANN001, ANN202
        s = FedACnnLSecAgg(
            arch,
            "random-standardized",
            seed=1,
            min_train_nodes=5,
            min_available_nodes=5,
            encoding=enc,
        )
        strategies.append(s)
        return s

    try:
        run_simulation(
            server_app=make_secagg_server_app(strategy_fn),
            client_app=make_secagg_client_app(_loader(digits, split)),
            num_supernodes=5,
            backend_config={"client_resources": {"num_cpus": 2, "num_gpus": 0.0}},
        )
    finally:
        stop_owned_processes(str(tmp_path.resolve()))
    (ray,) = strategies
    local = _secagg_run(digits, split, arch, "random-standardized", enc)
    for wr, wl in zip(ray.net.weights, local.net.weights, strict=True):
        assert np.array_equal(wr, wl)
    assert ray.evaluation["num-clients"] == 5
    assert ray.evaluation["personal-accuracy"] > 0.8


def test_dp_run_config_keys_select_the_dp_strategy_through_the_app(tmp_path):
    """``dp-*`` run-config keys switch the server app to DPFedACnnL and the clients to DP releases."""
    from flwr_analytic.fedacnnl import resolve_run_config
    from flwr_analytic.strategies.fedacnnl_server import build_fedacnnl_strategy, run_fedacnnl

    torch.set_num_threads(1)
    base = {"partitioner": "iid", "model": "mlp", "mlp-hidden": 32, "scheme": "random-standardized"}
    base |= {"min-nodes": 4, "results-path": str(tmp_path / "r.json")}
    dp = {"dp-noise-multiplier": 1.0, "dp-clip-norm": 3.0, "dp-seed": 5}
    assert type(build_fedacnnl_strategy(base)) is FedACnnL
    cfg = resolve_run_config(base | dp)
    _, summary = run_fedacnnl(LocalGrid(make_fedacnnl_client_app(), 4, cfg), cfg)
    _, plain = run_fedacnnl(LocalGrid(make_fedacnnl_client_app(), 4, base), base)
    train = [h for h in summary["rounds"] if h["kind"] == "train"]
    assert [h["num-valid"] for h in train] == [4, 4]
    assert all(h["dp-ridge"] > 0 for h in train)
    assert summary["privacy"]["epsilon"] == pytest.approx(gaussian_epsilon(math.sqrt(2), 1e-5))
    assert "privacy" not in plain and summary["model-sha256"] != plain["model-sha256"]
    assert 0.1 < summary["global-accuracy"] < plain["global-accuracy"] + 0.05
    # DP and streaming aggregation combine: the same noisy sums, added in arrival order
    streamed_cfg = resolve_run_config(base | dp | {"aggregation": "streaming"})
    grid = LocalGrid(make_fedacnnl_client_app(), 4, streamed_cfg)
    streamed, streamed_summary = run_fedacnnl(grid, streamed_cfg)
    sorted_result, _ = run_fedacnnl(LocalGrid(make_fedacnnl_client_app(), 4, cfg), cfg)
    for key in sorted_result.arrays.keys():
        a, b = streamed.arrays[key].numpy(), sorted_result.arrays[key].numpy()
        assert np.abs(a - b).max() <= 1e-9 * np.abs(b).max(), key
    assert [h["dp-ridge"] > 0 for h in streamed_summary["rounds"] if h["kind"] == "train"] == [
        True,
        True,
    ]
    # a SuperNode's own node config enforces the noise when the clients' run config has none
    grid = LocalGrid(make_fedacnnl_client_app(), 4, resolve_run_config(base))
    for node, ctx in grid.contexts.items():
        node_config = {**dict(ctx.node_config), **dp}
        grid.contexts[node] = Context(ctx.run_id, node, node_config, ctx.state, ctx.run_config)
    _, enforced = run_fedacnnl(grid, cfg)
    assert enforced["model-sha256"] == summary["model-sha256"]


def test_dp_release_with_group_wise_output_layers(digits):
    """DP and groups combine: each group's head is the DP solve of its members' noisy sum."""
    split = _split(digits, 6)
    arch = get_architecture("mlp", digits.input_shape, 10, hidden=32)
    dp = DPConfig(1.0, clip_norm=3.0)
    rc = {"dp-noise-multiplier": 1.0, "dp-clip-norm": 3.0, "dp-seed": 2}
    strategy = FedACnnL(
        arch,
        "random-standardized",
        seed=1,
        min_train_nodes=6,
        min_available_nodes=6,
        num_groups=2,
        release=DPRelease(dp),
    )
    strategy.start(_dp_grid(digits, split, rc))
    server = strategy.server
    assert len(server.group_weights) == 2 and len(server.group_of_node) == 6
    # recompute each group's head from the clients' own noisy releases of the output layer
    out = arch.num_layers - 1
    released = {}
    for k in range(split.num_clients):
        x, y = digits.x[split.train[k]], digits.y[split.train[k]]
        clipped = clipped_statistics(server.net, out, x, y, dp)
        released[k] = add_gaussian_noise(
            clipped, strategy.release.sigma(server.net, out), noise_rng(2, k, out)
        )
    partition = server.node_partitions
    for g, w in server.group_weights.items():
        members = sorted(partition[n] for n, grp in server.group_of_node.items() if grp == g)
        total = merge(released[k] for k in members)
        expected = strategy.release.group_weights(server.net, total, len(members))
        assert np.abs(w - expected).max() <= 1e-9 * np.abs(expected).max(), g
