"""Shared test set-up: the repository root on sys.path and where real MNIST lies.

Tests never download. Real MNIST is read from $MNIST_DIR, else from ../shared/data/mnist beside
the checkout (where this project's machines and CI keep it), else from ./data/mnist; tests that
need it are skipped, with the reason, when none holds it.
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_CANDIDATES = [os.environ.get("MNIST_DIR"), os.path.join(ROOT, "..", "shared", "data", "mnist"),
               os.path.join(ROOT, "data", "mnist")]
MNIST_DIR = next((os.path.abspath(d) for d in _CANDIDATES  # absolute: tests link to its files
                  if d and os.path.exists(os.path.join(d, "train-images-idx3-ubyte.gz"))), None)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors (`pytestmark = pytest.mark.usefixtures("one_thread")`): one
    thread is as fast, and far faster when other processes share the cores (intra-op threads
    then spin-wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mnist_dir():
    if MNIST_DIR is None:
        pytest.skip("real MNIST not found (set MNIST_DIR)")
    return MNIST_DIR
