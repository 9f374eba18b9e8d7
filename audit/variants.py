"""The three mechanisms as the audit runs them, and broken copies of them.

Each mechanism is a small class whose methods call the production functions the way the
training code calls them: DP-SGD samples a batch (randomness.poisson_sample) and takes a step
(dpsgd.dp_step); the central images make queries (central.noisy_class_means); the frequency
stage makes one release (frequency.noisy_feature_table). Each has `calibrate`, the noise
multiplier a run is given for a claim (accountant.calibrate_sigma, as train.privacy_plan calls
it), and `runs_as`, what the accountant should have been told about what really runs.

A broken variant overrides one method with one change: the noise too small, the clipping too
loose, the wrong sampling rate or divisor, noise reused, the accountant fed the wrong delta. The
trials audit (trials.py) runs each variant and must catch it; that is how its power is measured
(docs/audit.md). The trials make a fresh instance for each run (or each dataset), so a variant
may keep state between the steps of a run: the noise of its first step, or an epoch's order.
"""
import math

import torch

import accountant
import central
import dpsgd
import frequency
import randomness


class Mechanism:
    def calibrate(self, eps, delta, q, steps):
        """The noise multiplier a run is given to claim (eps, delta) for `steps` steps at rate q."""
        return accountant.calibrate_sigma(eps, delta, q, steps)

    def runs_as(self, q, sigma):
        """(q, sigma) of the subsampled Gaussian that really runs, for its true eps; None: no
        finite eps (the worst case over datasets is unbounded)."""
        return q, sigma


class WrongDelta:
    """Mix-in: the accountant fed delta = 1e-3 when calibrating, while the claim is made at the
    run's delta. The mechanism is exactly the one it is told about; only sigma is too small."""
    def calibrate(self, eps, delta, q, steps):
        return accountant.calibrate_sigma(eps, 1e-3, q, steps)


# ------------------------------------------------------------------------------------- DP-SGD
class DPSGD(Mechanism):
    """DP-SGD as train.train_dpsgd runs it: each step a Poisson sample, then one dp_step."""
    def sample(self, n, q, generator):
        return randomness.poisson_sample(n, q, generator)

    def step(self, **arguments):  # dp_step's arguments, by keyword
        dpsgd.dp_step(**arguments)


class DpsgdNoiseTimes(DPSGD):
    """The noise multiplied by `factor` inside the step (0: no noise)."""
    def __init__(self, factor):
        self.factor = factor

    def step(self, sigma, **rest):
        dpsgd.dp_step(sigma=self.factor * sigma, **rest)

    def runs_as(self, q, sigma):
        return (q, self.factor * sigma) if self.factor else None


class DpsgdClipTimes(DPSGD):
    """Clipping at factor * C while the noise stays sigma C (dp_step's noise is sigma' C')."""
    def __init__(self, factor):
        self.factor = factor

    def step(self, clip_norm, sigma, **rest):
        dpsgd.dp_step(clip_norm=self.factor * clip_norm, sigma=sigma / self.factor, **rest)

    def runs_as(self, q, sigma):
        return q, sigma / self.factor


class DpsgdNoClipping(DpsgdClipTimes):
    """Clipping at 1000 C: the audit's gradients (10 C) pass whole."""
    def __init__(self):
        super().__init__(1e3)

    def runs_as(self, q, sigma):
        return None


class DpsgdSamplingAt(DPSGD):
    """Each example sampled with rate min(1, factor * q) instead of q."""
    def __init__(self, factor):
        self.factor = factor

    def sample(self, n, q, generator):
        return randomness.poisson_sample(n, min(1.0, self.factor * q), generator)

    def runs_as(self, q, sigma):
        return min(1.0, self.factor * q), sigma


class DpsgdRealisedBatchSize(DPSGD):
    """The pitfall dpsgd.scale_grad avoids: divide by the realised batch size (at least 1)."""
    def step(self, batch_tensors, expected_batch_size, **rest):
        dpsgd.dp_step(batch_tensors=batch_tensors,
                      expected_batch_size=max(len(batch_tensors[0]), 1), **rest)

    def runs_as(self, q, sigma):
        return None


class DpsgdWrongDelta(WrongDelta, DPSGD):
    pass


class DpsgdSameNoiseTwice(DPSGD):
    """The noise of a run's first step drawn again in its second: the noise generator put back
    to the state it had before the first step (a reseeded generator, say)."""
    def __init__(self):
        self.first_state = None

    def step(self, noise_generator, **rest):
        if self.first_state is None:
            self.first_state = noise_generator.get_state()
        else:
            noise_generator = torch.Generator().set_state(self.first_state)
        dpsgd.dp_step(noise_generator=noise_generator, **rest)

    def runs_as(self, q, sigma):
        return None  # two updates differ by the data alone


class DpsgdShuffledBatches(DPSGD):
    """Fixed-size batches of a shuffled dataset instead of Poisson samples (a data loader with
    shuffle=True, drop_last=True): each epoch a random permutation, cut into batches of
    max(1, round(q n)). Adding an example then displaces another from its batch: on the trials'
    companions (trials.dpsgd_companion_trials: four examples with the canary's gradient
    reversed, one of the five in the batch) the batch sum moves by 2 C with probability 1/5."""
    def __init__(self):
        self.order, self.position = None, 0

    def sample(self, n, q, generator):
        size = max(1, round(q * n))
        if self.order is None or self.position + size > n:  # a new epoch
            self.order, self.position = torch.randperm(n, generator=generator), 0
        mask = torch.zeros(n, dtype=torch.bool)
        mask[self.order[self.position:self.position + size]] = True
        self.position += size
        return mask

    def runs_as(self, q, sigma):
        return 0.2, sigma / 2  # on the companions: rate 1/5, sensitivity 2 C


# ---------------------------------------------------------------------------- central images
class Central(Mechanism):
    """The central images as central.central_images runs them: each query one noisy_class_means."""
    def query(self, images, labels, num_classes, q, sigma, generator):
        return central.noisy_class_means(images, labels, num_classes, q, sigma, generator)


class CentralNoiseTimes(Central):
    def __init__(self, factor):
        self.factor = factor

    def query(self, images, labels, num_classes, q, sigma, generator):
        return central.noisy_class_means(images, labels, num_classes, q, self.factor * sigma,
                                         generator)

    def runs_as(self, q, sigma):
        return (q, self.factor * sigma) if self.factor else None


class CentralNoisePerPixel(Central):
    """Noise std sigma per pixel instead of sigma sqrt(d') (the L2 sensitivity of an image)."""
    def query(self, images, labels, num_classes, q, sigma, generator):
        d_prime = images[0].numel() // 4  # values per half-resolution image
        return central.noisy_class_means(images, labels, num_classes, q,
                                         sigma / math.sqrt(d_prime), generator)

    def runs_as(self, q, sigma):
        return q, sigma / 4  # on the trials' 8 x 8 canaries (d' = 16); on 28 x 28, sigma / 14


class CentralSamplingAt(Central):
    def __init__(self, factor):
        self.factor = factor

    def query(self, images, labels, num_classes, q, sigma, generator):
        return central.noisy_class_means(images, labels, num_classes, min(1.0, self.factor * q),
                                         sigma, generator)

    def runs_as(self, q, sigma):
        return min(1.0, self.factor * q), sigma


class CentralRealisedCount(Central):
    """The pitfall noisy_class_means avoids: each class's noisy sum divided by the class's
    realised count (at least 1) instead of the public q N / K. The production function runs,
    then its output is rescaled; the realised counts come from replaying the generator (the
    Poisson mask is noisy_class_means' first draw, as tests/audit/test_audit_trials.py checks)."""
    def query(self, images, labels, num_classes, q, sigma, generator):
        replay = torch.Generator().set_state(generator.get_state())
        mask = randomness.poisson_sample(len(images), q, replay)
        counts = torch.bincount(labels[mask], minlength=num_classes).clamp(min=1)
        means = central.noisy_class_means(images, labels, num_classes, q, sigma, generator)
        expected_count = q * len(images) / num_classes
        return means * expected_count / counts.view(-1, 1, 1, 1)

    def runs_as(self, q, sigma):
        return None


class CentralWrongDelta(WrongDelta, Central):
    pass


class CentralSameNoiseEveryQuery(Central):
    """Every query of a run adds the noise of its first: the production query with its noise
    turned off (sigma = 0), plus one noise draw kept for the whole run."""
    def __init__(self):
        self.noise = None

    def query(self, images, labels, num_classes, q, sigma, generator):
        means = central.noisy_class_means(images, labels, num_classes, q, 0.0, generator)
        if self.noise is None:
            self.noise = torch.randn(means.shape, generator=generator, dtype=torch.float64)
        expected_count = q * len(images) / num_classes
        return means + sigma * math.sqrt(means[0].numel()) * self.noise / expected_count

    def runs_as(self, q, sigma):
        return None  # two queries differ by the data alone


# -------------------------------------------------------------------------------- frequency
class Frequency(Mechanism):
    """FETA-Pro's frequency release as frequency.release runs it: one noisy_feature_table."""
    def release(self, images, labels, num_classes, W, sigma, generator):
        return frequency.noisy_feature_table(images, labels, num_classes, W, sigma, generator)


class FrequencyNoiseTimes(Frequency):
    def __init__(self, factor):
        self.factor = factor

    def release(self, images, labels, num_classes, W, sigma, generator):
        return frequency.noisy_feature_table(images, labels, num_classes, W, self.factor * sigma,
                                             generator)

    def runs_as(self, q, sigma):
        return (q, self.factor * sigma) if self.factor else None


class FrequencyNoisePerEntry(Frequency):
    """Noise calibrated to one entry's range: |phi_j(x)| <= 1 / sqrt(D), so noise sigma / sqrt(D)
    per entry, where the whole column moves by 1 (the L2 sensitivity)."""
    def release(self, images, labels, num_classes, W, sigma, generator):
        return frequency.noisy_feature_table(images, labels, num_classes, W,
                                             sigma / math.sqrt(W.shape[0]), generator)

    def runs_as(self, q, sigma):
        return q, sigma / 4  # with the trials' D = 16 frequencies


class FrequencyNormTimes(Frequency):
    """Features of norm `factor` accounted as norm 1 (random-phase cosines sqrt(2 / D)
    cos(W x + b), DP-MERF's other form, reach sqrt 2): the production release of terms of norm
    1 with noise sigma / factor, scaled by factor, which is the same thing."""
    def __init__(self, factor):
        self.factor = factor

    def release(self, images, labels, num_classes, W, sigma, generator):
        return self.factor * frequency.noisy_feature_table(images, labels, num_classes, W,
                                                           sigma / self.factor, generator)

    def runs_as(self, q, sigma):
        return q, sigma / self.factor


class FrequencyRealisedCount(Frequency):
    """Each class's column divided by the class's count (at least 1) instead of the public N."""
    def release(self, images, labels, num_classes, W, sigma, generator):
        table = frequency.noisy_feature_table(images, labels, num_classes, W, sigma, generator)
        counts = torch.bincount(labels, minlength=num_classes).clamp(min=1)
        return table * len(images) / counts

    def runs_as(self, q, sigma):
        return None


class FrequencyWrongDelta(WrongDelta, Frequency):
    pass


# ------------------------------------------------------------------------ the tables of rows
# name: a function that makes a fresh instance. Every mechanism's first row is as it is.
DPSGD_VARIANTS = {
    "as-it-is": DPSGD,
    "noise-x0.85": lambda: DpsgdNoiseTimes(0.85),
    "noise-x0.7": lambda: DpsgdNoiseTimes(0.7),
    "no-noise": lambda: DpsgdNoiseTimes(0.0),
    "clip-1.2C": lambda: DpsgdClipTimes(1.2),
    "no-clipping": DpsgdNoClipping,
    "sampling-1.5q": lambda: DpsgdSamplingAt(1.5),
    "delta-1e-3": DpsgdWrongDelta,
    "realised-batch-size": DpsgdRealisedBatchSize,
    "same-noise-2-steps": DpsgdSameNoiseTwice,
    "shuffled-batches": DpsgdShuffledBatches,
}
CENTRAL_VARIANTS = {
    "as-it-is": Central,
    "noise-x0.85": lambda: CentralNoiseTimes(0.85),
    "noise-x0.7": lambda: CentralNoiseTimes(0.7),
    "no-noise": lambda: CentralNoiseTimes(0.0),
    "noise-per-pixel": CentralNoisePerPixel,
    "sampling-1.5q": lambda: CentralSamplingAt(1.5),
    "delta-1e-3": CentralWrongDelta,
    "realised-class-count": CentralRealisedCount,
    "same-noise-5-queries": CentralSameNoiseEveryQuery,
}
FREQUENCY_VARIANTS = {
    "as-it-is": Frequency,
    "noise-x0.85": lambda: FrequencyNoiseTimes(0.85),
    "noise-x0.7": lambda: FrequencyNoiseTimes(0.7),
    "no-noise": lambda: FrequencyNoiseTimes(0.0),
    "noise-per-entry": FrequencyNoisePerEntry,
    "norm-sqrt2": lambda: FrequencyNormTimes(math.sqrt(2)),
    "delta-1e-3": FrequencyWrongDelta,
    "realised-class-count": FrequencyRealisedCount,
}
