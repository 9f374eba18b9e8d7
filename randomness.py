"""The randomness of the two DP mechanisms: the secret generator and Poisson sampling.

Both mechanisms of DP-FETA, the central images (central.py) and DP-SGD (dpsgd.py), are
*Poisson-subsampled Gaussian mechanisms*. Their guarantee holds only if two things are true:

1. **Nobody can reproduce the random numbers.** Whoever knows the generator's state can
   recompute every Poisson mask and every noise vector, subtract the noise from the release,
   and nothing private is left. So the mechanisms draw from a *secret generator* whose whole
   state comes from the operating system's cryptographic random source (`secrets`).
   Why not `torch.Generator().manual_seed(secrets.randbits(128))`? torch's CPU generator is a
   Mersenne twister (mt19937) and `manual_seed` keeps only the low 32 bits of the seed: seeds
   that differ above bit 32 give identical streams. 2^32 guesses, each checked against the
   published central images, is an afternoon on a laptop. `secret_generator` instead fills
   all 624 32-bit words of the twister's state (19,937 bits) with OS entropy.
   The twister is not a cryptographic generator: its state could be solved from 624
   consecutive raw outputs. The release never shows raw outputs (only data plus noise, then
   clamped, filtered and averaged), which is the usual standard of DP research code; a
   cryptographic generator would be the next step up. The generator lives on the CPU on every
   device, so a seed gives the same mechanism on a CPU and a GPU.
2. **The sampling rate is exactly the one the accountant is given.** Each example joins a
   sample independently with probability q (Poisson sampling; shuffled fixed-size batches are
   another mechanism with another epsilon). `poisson_sample` compares a float64 uniform, which
   takes the values k / 2^53, with q: an example is included with probability
   ceil(q 2^53) / 2^53 = `sampling_rate(q)`, which is what callers hand to the accountant.
   (float32 uniforms would include it with ceil(fp32(q) 2^24) / 2^24, slightly above q.)

The number of examples N is treated as public (as in the paper and in Opacus): q = B / N and
the divisors q N of both mechanisms are computed from it.
"""
import math
import secrets

import numpy as np
import torch

_MT_WORDS = 624            # 32-bit words of the mt19937 state
_MT_STATE_OFFSET = 24      # in torch's CPU generator state: seed (8), left (4), seeded (4), next (8)


def secret_generator(seed=None):
    """A CPU torch.Generator for the mechanisms: 19,937 bits of OS entropy (`seed=None`).

    seed: an int in 0..2^64 - 1 for tests and debugging only; it goes through `manual_seed` and
    is therefore NOT secret (32 bits on the CPU; and a known seed removes the noise)."""
    generator = torch.Generator()
    if seed is not None:
        if not 0 <= seed < 2 ** 64:  # what manual_seed takes (it fails with a traceback)
            raise ValueError(f"--seed: must be in 0..2**64 - 1, got {seed}")
        return generator.manual_seed(seed)
    # Start from a freshly seeded state (valid bookkeeping fields: the next draw re-twists the
    # whole state) and overwrite the 624 state words, stored as uint64 each, with OS entropy.
    state = generator.manual_seed(0).get_state().numpy().copy()
    words = np.frombuffer(secrets.token_bytes(4 * _MT_WORDS), dtype=np.uint32)
    end = _MT_STATE_OFFSET + 8 * _MT_WORDS
    state[_MT_STATE_OFFSET:end] = words.astype(np.uint64).view(np.uint8)
    generator.set_state(torch.from_numpy(state))
    return generator


def sampling_rate(q):
    """The probability with which `poisson_sample(n, q, g)` includes an example: q rounded up
    to a multiple of 2^-53 (a float64 uniform takes the values k / 2^53, and exactly
    ceil(q 2^53) of them lie below q). Hand this value, not q, to the accountant."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q: sampling rate must be in (0, 1], got {q}")
    return math.ceil(q * 2.0 ** 53) / 2.0 ** 53  # exact: scaling by powers of two is exact


def poisson_sample(n, q, generator):
    """Bool mask [n] on the CPU: each of n examples included independently with probability
    sampling_rate(q). The draw depends only on n (public) and the generator, never on data."""
    if n < 1:
        raise ValueError(f"n: must be a positive number of examples, got {n}")
    sampling_rate(q)  # checks q
    return torch.rand(n, dtype=torch.float64, generator=generator) < q
