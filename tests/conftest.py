"""Shared test set-up: the repository root on sys.path, where real MNIST lies, and the helpers
that more than one test module uses (imported as `from conftest import ...`: a test module
never imports another test module).

Tests never download. Real MNIST is read from $MNIST_DIR, else from ../shared/data/mnist beside
the checkout (where this project's machines and CI keep it), else from ./data/mnist; tests that
need it are skipped, with the reason, when none holds it.
"""
import os
import signal
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dpsgd  # noqa: E402  (after the root is on sys.path)
from diffusion import UNet  # noqa: E402

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


def tiny_unet(channels=1, size=16, num_classes=10):
    """The UNet's every kind of layer (attention included) at a few thousand parameters."""
    return UNet(channels, size, num_classes, base_width=8, channel_mults=(1, 2), num_res_blocks=1,
                attn_resolutions=(size // 2,))


def randomise_output_layer(model, seed=0):
    """The output conv starts at zero (eps = 0 everywhere); give it weights so outputs depend on
    the inputs and gradients reach every layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.conv_out.weight.copy_(0.1 * torch.randn(model.conv_out.weight.shape, generator=g))
    return model


class StopAfter:
    """Stands in for Ctrl-C (runs.install_ctrl_c): `requested` is False for n reads, then True
    (train.py's loops read it once per step, per sample batch and per evaluation progress
    call)."""

    def __init__(self, n):
        self.reads_left = n

    @property
    def requested(self):
        self.reads_left -= 1
        return self.reads_left < 0


@pytest.fixture
def quiet_signals():
    """Put the test process's signal handlers back after a test in which runs.install_ctrl_c
    installs its own; until it does, SIGINT, SIGTERM and SIGHUP do nothing (not end pytest)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for s in saved:
        signal.signal(s, lambda signum, frame: None)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def per_sample_grads(model, per_example_loss, *batch_tensors, chunk_size=None, autocast=False):
    """The tests' reference: per-example gradients {parameter name: [B, *param.shape]} of
    per_example_loss, from the very function dpsgd.clipped_sum uses (which clips and drops
    them chunk by chunk, never keeping them), with dp_step's checks.

    per_example_loss(model_callable, *tensors) -> [B]; every tensor in batch_tensors has the
    examples along dim 0. Gradients are computed chunk_size examples at a time (None: all),
    with the forward pass under bfloat16 autocast if asked (as in clipped_sum).
    """
    dpsgd.check_per_example_independence(model)
    if autocast:
        dpsgd.check_autocast_support(model)
    params = {n: p.detach() for n, p in dpsgd._trainable_params(model).items()}
    grad_fn = dpsgd._per_example_grad_fn(model, per_example_loss, len(batch_tensors), autocast)
    pieces = [grad_fn(params, *(t[s:e] for t in batch_tensors))[0]
              for s, e in dpsgd._chunks(len(batch_tensors[0]), chunk_size)]
    return {n: torch.cat([piece[n] for piece in pieces]) for n in params}
