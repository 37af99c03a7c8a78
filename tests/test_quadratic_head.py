"""The second stage on an AnalyticNetwork (``analytic.quadratic_head``) and its wire format.

Client statistics of ``[h, q, 1]`` summed over parts equal the pooled ones (float64) and the explicit
rows' Gram; a mirrored network counts every image twice and scores the mean of the pair; scores
equal the explicit products; mismatched stages and arrays are refused by name.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from flwr_analytic.analytic import AnalyticNetwork, QuadraticStage
from flwr_analytic.analytic.mirror import mirror_images
from flwr_analytic.analytic.quadratic_head import head_scores, stage_dim, stage_statistics
from flwr_analytic.analytic.statistics import merge
from flwr_analytic.analytic.targets import one_hot
from flwr_analytic.analytic.training import fit_centralized
from flwr_analytic.fedacnnl import stage_protocol as S
from flwr_analytic.models import mlp


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "mirror"])
def setup(request):
    digits = load_digits()
    x = (digits.images[:600] / 16.0)[:, None].astype(np.float64)
    y = digits.target[:600]
    net = AnalyticNetwork(mlp((1, 8, 8), 10, 40), "random", seed=1, mirror=request.param)
    fit_centralized(net, x, y)
    last = net.num_layers - 1
    stage = QuadraticStage.from_gram(net.statistics(last, x, y).gram, 6)
    return net, stage, x, y


def _h(net, x):
    return torch.flatten(net.layer_input(net.num_layers - 1, x), 1).double().numpy()


def test_statistics_sum_over_parts_and_equal_the_explicit_rows(setup):
    net, stage, x, y = setup
    whole = stage_statistics(net, stage, x, y, batch_size=64)
    parts = merge(stage_statistics(net, stage, x[i::3], y[i::3], batch_size=50) for i in range(3))
    assert whole.gram.shape == (stage_dim(net, stage),) * 2 == (41 + 21, 41 + 21)
    rel = np.abs(parts.gram - whole.gram).max() / np.abs(whole.gram).max()
    assert rel <= 1e-12
    both = np.concatenate([x, mirror_images(x)]) if net.mirror else x
    labels = np.concatenate([y, y]) if net.mirror else y
    rows = stage.rows(_h(net, both))
    assert whole.count == whole.gram[-1, -1] == len(labels)  # as net.statistics counts
    assert np.allclose(whole.gram, rows.T @ rows, rtol=1e-12, atol=1e-9)
    assert np.allclose(whole.cross, rows.T @ one_hot(labels, 10), rtol=1e-12, atol=1e-9)


def test_scores_equal_the_explicit_products(setup):
    net, stage, x, y = setup
    rng = np.random.default_rng(0)
    w2, w = rng.normal(size=(stage_dim(net, stage), 10)), rng.normal(size=(41, 10))
    f, heads, labels = head_scores(net, stage, w2, {"personal": w}, x[:70], y[:70], batch_size=32)

    def explicit(xb):
        h = _h(net, xb)
        return stage.rows(h) @ w2, np.hstack([h, np.ones((len(h), 1))]) @ w

    f_ref, s_ref = explicit(x[:70])
    if net.mirror:  # the mean of an image's and its mirror's scores
        f_m, s_m = explicit(mirror_images(x[:70]))
        f_ref, s_ref = 0.5 * (f_ref + f_m), 0.5 * (s_ref + s_m)
    assert np.allclose(f, f_ref, rtol=1e-12, atol=1e-10)
    assert np.allclose(heads["personal"], s_ref, rtol=1e-12, atol=1e-10)
    assert np.array_equal(labels, y[:70])


def test_mismatches_are_refused(setup):
    net, stage, x, y = setup
    other = QuadraticStage(np.zeros(7), np.zeros((7, 2)))
    with pytest.raises(ValueError, match="7 head features, the network has 40"):
        stage_statistics(net, other, x, y)
    with pytest.raises(ValueError, match="second-stage head has shape"):
        head_scores(net, stage, np.zeros((3, 10)), {}, x, y)


def test_wire_format_round_trip_and_errors(setup):
    _, stage, _, _ = setup
    arrays = {k: v.numpy() for k, v in S.stage_arrays(stage, np.ones((5, 10)), np.ones(10)).items()}
    back = S.stage_from_arrays(arrays)
    assert np.array_equal(back.mean, stage.mean) and np.array_equal(
        back.projection, stage.projection
    )
    assert set(arrays) == {S.MEAN, S.PROJECTION, S.WEIGHTS, S.POOLED_COUNTS}
    with pytest.raises(KeyError, match="second-stage.projection"):
        S.stage_from_arrays({S.MEAN: stage.mean})
    with pytest.raises(ValueError, match="do not fit"):
        S.stage_from_arrays({S.MEAN: stage.mean[:-1], S.PROJECTION: stage.projection})
    with pytest.raises(ValueError, match="scoring-temperature"):
        S.scoring_settings(float("inf"), 0.5)
    with pytest.raises(ValueError, match="scoring-weight"):
        S.scoring_settings(7.0, -0.1)
