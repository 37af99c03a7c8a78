import numpy as np
import pytest
import torch

from flwr_analytic.analytic import LayerStatistics, StatisticsAccumulator, StatisticsError, merge
from flwr_analytic.analytic.design import conv_rows


def _random_stats(rng, dim=5, m=3, count=4):
    a = np.hstack([rng.standard_normal((count, dim - 1)), np.ones((count, 1))])
    t = rng.standard_normal((count, m))
    return LayerStatistics(a.T @ a, a.T @ t, count)


def test_fc_accumulator_equals_explicit_design_matrix():
    rng = np.random.default_rng(1)
    h = rng.standard_normal((37, 6))
    t = rng.standard_normal((37, 3))
    acc = StatisticsAccumulator(7, 3)
    for sl in (slice(0, 10), slice(10, 11), slice(11, 37)):
        acc.add_rows(torch.from_numpy(h[sl]), t[sl])
    stats = acc.result()
    a = np.hstack([h, np.ones((37, 1))])
    np.testing.assert_allclose(stats.gram, a.T @ a, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(stats.cross, a.T @ t, rtol=1e-13, atol=1e-12)
    assert stats.count == 37 and stats.rows == 37
    assert np.array_equal(stats.gram, stats.gram.T)


def test_conv_accumulator_equals_unfold_design_with_targets_repeated_per_position():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((5, 2, 6, 6)))
    t = rng.standard_normal((5, 4))
    acc = StatisticsAccumulator(2 * 9 + 1, 4)
    acc.add_patches(conv_rows(x[:2], 3, 1), t[:2])
    acc.add_patches(conv_rows(x[2:], 3, 1), t[2:])
    stats = acc.result()
    patches = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).numpy()  # (5, 36, 18)
    a = np.hstack([patches.reshape(-1, 18), np.ones((5 * 36, 1))])
    tt = np.repeat(t, 36, axis=0)
    np.testing.assert_allclose(stats.gram, a.T @ a, rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(stats.cross, a.T @ tt, rtol=1e-12, atol=1e-11)
    assert stats.count == 5 and stats.rows == 180


def test_float32_compute_is_close_but_float64_sums():
    rng = np.random.default_rng(3)
    h = torch.from_numpy(rng.random((200, 30)))
    exact = StatisticsAccumulator(31, 0)
    fast = StatisticsAccumulator(31, 0, compute_dtype="float32")
    exact.add_rows(h, None)
    fast.add_rows(h, None)
    g64, g32 = exact.result().gram, fast.result().gram
    assert g32.dtype == np.float64
    rel = np.abs(g64 - g32).max() / np.abs(g64).max()
    assert 0 < rel < 1e-5


def test_pack_roundtrip_and_size():
    rng = np.random.default_rng(4)
    stats = _random_stats(rng, dim=6, m=2)
    packed = stats.pack()
    assert packed["gram-triu"].size == 6 * 7 // 2
    back = LayerStatistics.unpack(packed)
    np.testing.assert_array_equal(back.gram, stats.gram)
    np.testing.assert_array_equal(back.cross, stats.cross)
    assert back.count == stats.count


def test_merge_is_a_sum_in_order():
    rng = np.random.default_rng(5)
    parts = [_random_stats(rng) for _ in range(4)]
    total = merge(parts)
    np.testing.assert_allclose(total.gram, sum(p.gram for p in parts))
    assert total.count == 16
    with pytest.raises(StatisticsError, match="no statistics"):
        merge([])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: LayerStatistics(s.gram[:-1], s.cross, s.count), "square"),
        (lambda s: LayerStatistics(s.gram, s.cross[:-1], s.count), "cross must have shape"),
        (lambda s: LayerStatistics(s.gram.astype(np.float32), s.cross, s.count), "float64"),
        (
            lambda s: LayerStatistics(np.where(np.eye(5) > 0, np.nan, s.gram), s.cross, s.count),
            "non-finite",
        ),
        (lambda s: LayerStatistics(s.gram, s.cross * np.inf, s.count), "non-finite"),
        (
            lambda s: LayerStatistics(s.gram + np.triu(np.ones((5, 5)), 1), s.cross, s.count),
            "symmetric",
        ),
        (lambda s: LayerStatistics(s.gram, s.cross, -1), "non-negative"),
        (lambda s: LayerStatistics(s.gram, s.cross, 3), "inconsistent"),
        (lambda s: LayerStatistics(s.gram, s.cross, 0), "count is 0"),
    ],
)
def test_validation_rejects_bad_statistics(mutate, message):
    good = _random_stats(np.random.default_rng(6))
    good.validate(5, 3)
    with pytest.raises(StatisticsError, match=message):
        mutate(good).validate()


def test_validation_checks_expected_shape():
    good = _random_stats(np.random.default_rng(7))
    with pytest.raises(StatisticsError, match="expected D=9"):
        good.validate(dim=9)
    with pytest.raises(StatisticsError, match="expected 2"):
        good.validate(targets=2)


def test_unpack_rejects_malformed_records():
    good = _random_stats(np.random.default_rng(8)).pack()
    with pytest.raises(StatisticsError, match="miss"):
        LayerStatistics.unpack({k: v for k, v in good.items() if k != "count"})
    with pytest.raises(StatisticsError, match="triangle"):
        LayerStatistics.unpack({**good, "gram-triu": good["gram-triu"][:-1]})
    with pytest.raises(StatisticsError, match="one integer"):
        LayerStatistics.unpack({**good, "count": np.array([1.5])})
