"""Tests for randomness.py: the secret generator's entropy and the exact Poisson sampling rate.

The attacks these guard against: a secret generator whose state can be guessed (then the noise
of both mechanisms can be recomputed and removed), and a sampler whose inclusion probability is
not the rate the accountant was given (then the reported epsilon is wrong).
"""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import randomness


def entropy_words(seed):
    return np.random.default_rng(seed).integers(0, 2 ** 32, 624, dtype=np.uint64).astype(np.uint32)


def generator_from(words, monkeypatch):
    """A secret generator built from the given OS entropy (624 32-bit words)."""
    monkeypatch.setattr(randomness.secrets, "token_bytes", lambda n: words.tobytes()[:n])
    return randomness.secret_generator()


@pytest.mark.parametrize("word", [1, 311, 623])
def test_entropy_that_agrees_in_the_low_32_bits_gives_different_noise(word, monkeypatch):
    """Two runs whose OS entropy agrees in its first 32 bits (all that torch's manual_seed keeps
    of a seed on the CPU) and differs in one other word must draw different noise."""
    a = entropy_words(0)
    b = a.copy()
    b[word] ^= 1  # one bit, far above bit 32
    noise_a = torch.randn(1000, generator=generator_from(a, monkeypatch))
    noise_b = torch.randn(1000, generator=generator_from(b, monkeypatch))
    assert not torch.equal(noise_a, noise_b)


def test_the_same_entropy_gives_the_same_stream_and_the_state_holds_it(monkeypatch):
    a = entropy_words(1)
    g1, g2 = generator_from(a, monkeypatch), generator_from(a, monkeypatch)
    assert torch.equal(torch.rand(100, generator=g1), torch.rand(100, generator=g2))
    state = generator_from(a, monkeypatch).get_state().numpy()
    stored = state[24:24 + 8 * 624].view(np.uint64)  # mt19937's 624 words, as torch stores them
    assert np.array_equal(stored, a.astype(np.uint64))


def test_default_secret_generators_differ_and_their_output_is_uniform():
    u1 = torch.rand(200_000, generator=randomness.secret_generator())
    u2 = torch.rand(200_000, generator=randomness.secret_generator())
    assert not torch.equal(u1, u2)
    # Uniform on [0, 1): mean 1/2 with standard error 1/sqrt(12 n) = 6.5e-4 (allow 5 SE), and
    # variance 1/12 with standard error ~ 1/sqrt(180 n) = 1.7e-4 (allow 5 SE).
    assert abs(float(u1.mean()) - 0.5) < 5 / math.sqrt(12 * len(u1))
    assert abs(float(u1.var()) - 1 / 12) < 5 / math.sqrt(180 * len(u1))


@pytest.mark.parametrize("seed", [0, 7])
def test_a_given_seed_gives_manual_seeds_stream_and_no_seed_another(seed):
    """The documented test-only path, seed 0 included (an `if seed:` would quietly make seed 0
    secret, and the run irreproducible); and no seed must not end in a fixed seed's stream (a
    state that failed to take the OS entropy would be manual_seed(0)'s)."""
    draw = lambda generator: torch.rand(100, dtype=torch.float64, generator=generator)
    seeded = draw(randomness.secret_generator(seed))
    assert torch.equal(seeded, draw(torch.Generator().manual_seed(seed)))
    assert not torch.equal(draw(randomness.secret_generator()), seeded)


@pytest.mark.parametrize("q", [1e-9, 1 / 15, 0.1, 1024 / 60000, 0.5, 1.0])
def test_sampling_rate_is_q_rounded_up_to_the_float64_grid(q):
    rate = randomness.sampling_rate(q)
    assert 0 <= Fraction(rate) - Fraction(q) < Fraction(1, 2 ** 53)  # exact arithmetic
    assert (rate * 2.0 ** 53).is_integer()


def test_inclusion_is_a_float64_uniform_below_q():
    """The mask is u < q for float64 uniforms u on the grid k / 2^53: then the inclusion
    probability is exactly ceil(q 2^53) / 2^53 = sampling_rate(q). (A float32 uniform has the
    grid k / 2^24: for q = 1e-9 it would include an example with probability 6e-8, 60 times q.)"""
    q, n = 0.3, 100_000
    mask = randomness.poisson_sample(n, q, torch.Generator().manual_seed(3))
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mask, u < q)
    assert bool(((u * 2.0 ** 53) == torch.floor(u * 2.0 ** 53)).all())


def test_poisson_inclusion_frequencies_match_q():
    n, q, steps = 5000, 0.05, 400
    g = torch.Generator().manual_seed(0)
    masks = torch.stack([randomness.poisson_sample(n, q, g) for _ in range(steps)])
    counts = masks.sum(0).double()
    # Overall rate: standard error sqrt(q(1-q)/(n*steps)) = 1.5e-4; allow 5 SE (a 2 % bias in q
    # is 6.5 SE).
    se = math.sqrt(q * (1 - q) / (n * steps))
    assert float(counts.sum()) / (n * steps) == pytest.approx(q, abs=5 * se)
    # Each example independently: counts ~ Binomial(steps, q); the dispersion ratio has
    # standard error ~sqrt(2/n) = 0.02; allow 0.9..1.1.
    assert 0.9 <= float(counts.var()) / (steps * q * (1 - q)) <= 1.1
    # Batch sizes vary like Binomial(n, q) (a shuffled fixed-size sampler would have variance 0);
    # the variance ratio over 400 steps has standard error ~0.07; allow 0.7..1.3.
    sizes = masks.sum(1).double()
    assert 0.7 <= float(sizes.var()) / (n * q * (1 - q)) <= 1.3


def test_poisson_samples_can_be_empty():
    # P(empty) = (1 - 0.2)^3 = 0.512; over 2000 draws its standard error is 0.011; allow 0.05.
    g = torch.Generator().manual_seed(1)
    empty = sum(not randomness.poisson_sample(3, 0.2, g).any() for _ in range(2000))
    assert empty / 2000 == pytest.approx(0.512, abs=0.05)


@pytest.mark.parametrize("n, q", [(0, 0.1), (10, 0.0), (10, 1.5), (10, float("nan"))])
def test_poisson_bad_arguments(n, q):
    with pytest.raises(ValueError):
        randomness.poisson_sample(n, q, torch.Generator())
