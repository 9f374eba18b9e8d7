"""Shared test set-up: the repository root on sys.path and where real MNIST lies.

Tests never download. Real MNIST is read from $MNIST_DIR, else from ../shared/data/mnist beside
the checkout (where this project's machines and CI keep it), else from ./data/mnist; tests that
need it are skipped, with the reason, when none holds it.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_CANDIDATES = [os.environ.get("MNIST_DIR"), os.path.join(ROOT, "..", "shared", "data", "mnist"),
               os.path.join(ROOT, "data", "mnist")]
MNIST_DIR = next((os.path.abspath(d) for d in _CANDIDATES  # absolute: tests link to its files
                  if d and os.path.exists(os.path.join(d, "train-images-idx3-ubyte.gz"))), None)


@pytest.fixture(scope="session")
def mnist_dir():
    if MNIST_DIR is None:
        pytest.skip("real MNIST not found (set MNIST_DIR)")
    return MNIST_DIR
