"""Label-shift scoring and the product with the personal head."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_analytic.analytic.label_shift import label_shift, log_softmax, product_of_experts

Z12, Z22 = np.zeros((1, 2)), np.zeros((2, 2))


def test_shift_is_bayes_rule_for_the_new_prior():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 4))
    pooled, local = np.array([100.0, 300, 200, 400]), np.array([5.0, 0, 20, 75])
    t, s = 3.0, 0.5
    post = np.exp(t * scores) / np.exp(t * scores).sum(1, keepdims=True)  # p(y|x) under π
    pi, pi_k = (pooled + s) / (pooled.sum() + 4 * s), (local + s) / (local.sum() + 4 * s)
    want = post * pi_k / pi
    want /= want.sum(1, keepdims=True)
    got = np.exp(label_shift(scores, local, pooled, t, s))
    np.testing.assert_allclose(got / got.sum(1, keepdims=True), want, rtol=1e-12)


def test_the_pooled_prior_leaves_the_scores_alone_and_a_skewed_one_moves_them():
    scores = np.array([[1.0, 0.9, 0.0], [0.0, 0.2, 0.1]])
    counts = np.array([10.0, 10, 10])
    np.testing.assert_allclose(label_shift(scores, counts, counts, 2.0), log_softmax(scores, 2.0))
    moved = label_shift(scores, np.array([0.0, 50, 0]), counts, 2.0)
    assert moved.argmax(1).tolist() == [1, 1] and scores.argmax(1).tolist() == [0, 1]


def test_product_adds_the_weighted_personal_log_posteriors():
    rng = np.random.default_rng(1)
    f, s = rng.normal(size=(8, 3)), rng.normal(size=(8, 3))
    counts, pooled = np.array([3.0, 1, 6]), np.array([5.0, 5, 5])
    base = label_shift(f, counts, pooled, 4.0)
    np.testing.assert_array_equal(product_of_experts(f, s, counts, pooled, 4.0, 0.0), base)
    np.testing.assert_allclose(
        product_of_experts(f, s, counts, pooled, 4.0, 0.5), base + 0.5 * log_softmax(s, 4.0)
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: log_softmax(np.zeros((1, 2)), 0.0), "temperature must be positive"),
        (lambda: label_shift(np.zeros((1, 3)), [1, 2], [1, 2, 3], 1.0), "number of classes"),
        (lambda: label_shift(np.zeros((1, 2)), [1, -2], [1, 2], 1.0), "non-negative class counts"),
        (lambda: label_shift(np.zeros((1, 2)), [0, 0], [1, 2], 1.0, 0.0), "all zero"),
        (
            lambda: product_of_experts(
                np.zeros((2, 2)), np.zeros((1, 2)), [1, 1], [1, 1], 1.0, 1.0
            ),
            "differ in shape",
        ),
        (
            lambda: product_of_experts(
                np.zeros((1, 2)), np.zeros((1, 2)), [1, 1], [1, 1], 1.0, -1.0
            ),
            "non-negative",
        ),
    ],
)
def test_bad_input_names_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()
