"""Shared fixtures: the embedded digits data and a slice of MNIST from ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from flwr_analytic.data import ArrayDataset, load_digits, load_mnist

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def digits() -> ArrayDataset:
    return load_digits()


@pytest.fixture(scope="session")
def mnist_all() -> ArrayDataset:
    if not (SHARED_DATA / "mnist70k.npz").is_file():
        pytest.skip(f"{SHARED_DATA / 'mnist70k.npz'} not present")
    return load_mnist(SHARED_DATA, split="all")


@pytest.fixture(scope="session")
def mnist_slice(mnist_all: ArrayDataset) -> ArrayDataset:
    """2,000 seeded MNIST training images."""
    train = np.flatnonzero(~mnist_all.extras["official_test"])
    rng = np.random.default_rng(0)
    return mnist_all.subset(np.sort(rng.choice(train, 2000, replace=False)))
