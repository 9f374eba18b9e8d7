"""Tests for audit/trials.py, the many-trial audit, in both directions: each mechanism as it is
stays below its claim of eps = 1 in every test (and near it: the audit is sharp), and each bug
is caught. The bugs are written here by hand, each as a small change of one production function,
never read off the audit's own table (audit/variants.py); the table's own instruments are tested
at the end for doing what their names say. Every run is seeded, so each test gives the same
answer every time; each audit is a 95 % statement.
"""
import math

import pytest
import torch

import accountant
import central
import dpsgd
import frequency
import randomness
from audit import trials, variants

DELTA = 1e-5
MECHANISMS = {key: designs for key, _, _, designs in trials.MECHANISMS}

pytestmark = pytest.mark.usefixtures("one_thread")  # the audits' tensors are tiny (conftest.py)


def audit(key, make, names=None, seed=0):
    """The verdict of mechanism `key`'s designs called `names` (None: all), each at the level it
    has in the whole audit (0.05 / its number of designs), so that power is not flattered."""
    designs = [design for design in MECHANISMS[key] if names is None or design.name in names]
    results = trials.audit(designs, make, DELTA, randomness.secret_generator(seed),
                           level=0.05 * len(designs) / len(MECHANISMS[key]))
    return trials.verdict(results, designs, DELTA)


def test_log_likelihood_ratio_by_hand():
    # in: (1 - q) N(0, s^2) + q N(1, s^2), out: N(0, s^2); the ratio of densities is
    # 1 - q + q exp((2y - 1) / (2 s^2)): 1 at y = 1/2, 1 - q far below.
    y = torch.tensor([-1e3, 0.5, 3.0], dtype=torch.float64)
    got = trials.log_likelihood_ratio(y, 0.25, 2.0)
    want = [math.log(0.75), 0.0, math.log(0.75 + 0.25 * math.exp(2.5 / 4))]
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    got = trials.log_likelihood_ratio(y, 1.0, 2.0)  # q = 1, the Gaussian mechanism
    assert got.tolist() == pytest.approx([(v - 0.5) / 4 for v in y.tolist()], rel=1e-12)


# ------------------------------------------------------------------------------ as they are
@pytest.mark.parametrize("key, mechanism", [("dpsgd", variants.DPSGD),
                                            ("central", variants.Central),
                                            ("frequency", variants.Frequency)])
def test_each_mechanism_as_it_is_stays_below_its_claim_in_every_test(key, mechanism):
    # A valid 95 % audit: no test objects. Sharp: the noise it measures (the claim's sigma is
    # 1) lies within 15 % of the truth, so a 15 % error is near what it can see (docs/audit.md).
    row = audit(key, mechanism)
    assert row.caught_by == "" and row.eps_lower < 1.0 and row.eps_run <= 1.0
    assert 1.0 < row.noise_share < 1.15


# ------------------------------------------------------------------------------ DP-SGD bugs
class DpsgdNoiseX07(variants.DPSGD):
    def step(self, sigma, **rest):
        dpsgd.dp_step(sigma=0.7 * sigma, **rest)


class DpsgdClip12(variants.DPSGD):  # clipping at 1.2 C, the noise still sigma C
    def step(self, clip_norm, sigma, **rest):
        dpsgd.dp_step(clip_norm=1.2 * clip_norm, sigma=sigma / 1.2, **rest)


class DpsgdSampling15q(variants.DPSGD):
    def sample(self, n, q, generator):
        return randomness.poisson_sample(n, 1.5 * q, generator)


class DpsgdDelta1e3(variants.DPSGD):  # sigma calibrated at delta 1e-3, claimed at 1e-5
    def calibrate(self, eps, delta, q, steps):
        return accountant.calibrate_sigma(eps, 1e-3, q, steps)


class DpsgdSameNoiseTwice(variants.DPSGD):  # the noise generator reseeded before each step
    def step(self, noise_generator, **rest):
        dpsgd.dp_step(noise_generator=torch.Generator().manual_seed(7), **rest)


class DpsgdFixedSizeBatch(variants.DPSGD):  # the first round(q n) of a random permutation
    def sample(self, n, q, generator):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=generator)[:max(1, round(q * n))]] = True
        return mask


class DpsgdRealisedBatchSize(variants.DPSGD):
    def step(self, batch_tensors, expected_batch_size, **rest):
        dpsgd.dp_step(batch_tensors=batch_tensors,
                      expected_batch_size=max(1, len(batch_tensors[0])), **rest)


@pytest.mark.parametrize("bug, designs, tests", [
    (DpsgdNoiseX07, ["one step"], {"trade-off"}),
    (DpsgdClip12, ["one step"], {"trade-off"}),
    (DpsgdSampling15q, ["one step"], {"trade-off"}),
    (DpsgdDelta1e3, ["one step"], {"trade-off", "ledger"}),
    (DpsgdSameNoiseTwice, ["two steps"], {"eps"}),
    (DpsgdFixedSizeBatch, ["companions"], {"trade-off"}),
    (DpsgdRealisedBatchSize, ["divisor probes"], {"eps", "trade-off"}),
], ids=lambda value: value.__name__ if isinstance(value, type) else None)
def test_dpsgd_audit_catches_each_bug(bug, designs, tests):
    row = audit("dpsgd", bug, designs)
    assert tests <= set(row.caught_by.split(", ")), row


# ---------------------------------------------------------------------- central image bugs
class CentralNoiseX07(variants.Central):
    def query(self, images, labels, num_classes, q, sigma, generator):
        return central.noisy_class_means(images, labels, num_classes, q, 0.7 * sigma, generator)


class CentralNoisePerPixel(variants.Central):  # noise std sigma per pixel, not sigma sqrt(d')
    def query(self, images, labels, num_classes, q, sigma, generator):
        d_prime = images[0].numel() // 4
        return central.noisy_class_means(images, labels, num_classes, q,
                                         sigma / math.sqrt(d_prime), generator)


class CentralDelta1e3(variants.Central):
    def calibrate(self, eps, delta, q, steps):
        return accountant.calibrate_sigma(eps, 1e-3, q, steps)


class CentralSameNoise(variants.Central):  # one noise vector for every query of the audit
    noise = {}

    def query(self, images, labels, num_classes, q, sigma, generator):
        means = central.noisy_class_means(images, labels, num_classes, q, 0.0, generator)
        noise = self.noise.setdefault(means.shape, torch.randn(
            means.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
        return means + sigma * math.sqrt(means[0].numel()) * noise / (q * len(images) / num_classes)


class CentralOverRealisedCount(variants.Central):
    """noisy_class_means, then rescaled from the expected count q N / K to each class's realised
    count (at least 1), read off the production function's own clean sums of white images."""
    def query(self, images, labels, num_classes, q, sigma, generator):
        replay = torch.Generator().set_state(generator.get_state())
        white = torch.full_like(images, 255)
        counts = central.poisson_class_sums(white, labels, num_classes, q, replay).flatten(1)[:, 0]
        means = central.noisy_class_means(images, labels, num_classes, q, sigma, generator)
        return means * (q * len(images) / num_classes) / counts.clamp(min=1).view(-1, 1, 1, 1)


@pytest.mark.parametrize("bug, designs, tests", [
    (CentralNoiseX07, ["one query"], {"trade-off"}),
    (CentralNoisePerPixel, ["one query"], {"eps", "trade-off"}),
    (CentralDelta1e3, ["one query"], {"trade-off", "ledger"}),
    (CentralSameNoise, ["five queries"], {"eps"}),
    (CentralOverRealisedCount, ["one query", "five queries"], {"eps", "trade-off"}),
], ids=lambda value: value.__name__ if isinstance(value, type) else None)
def test_central_audit_catches_each_bug(bug, designs, tests):
    row = audit("central", bug, designs)
    assert tests <= set(row.caught_by.split(", ")), row


# ----------------------------------------------------------------------- frequency bugs
class FrequencyNoise(variants.Frequency):
    factor = 0.7

    def release(self, images, labels, num_classes, W, sigma, generator):
        return frequency.noisy_feature_table(images, labels, num_classes, W, self.factor * sigma,
                                             generator)


class FrequencyNoNoise(FrequencyNoise):
    factor = 0.0


class FrequencyNoisePerEntry(FrequencyNoise):  # an entry's range 1 / sqrt(D) taken as sensitivity
    def release(self, images, labels, num_classes, W, sigma, generator):
        return frequency.noisy_feature_table(images, labels, num_classes, W,
                                             sigma / math.sqrt(W.shape[0]), generator)


class FrequencyNormSqrt2(variants.Frequency):  # terms of norm sqrt 2 accounted as norm 1
    def release(self, images, labels, num_classes, W, sigma, generator):
        term = frequency.features  # (the production features, scaled: norm sqrt 2)
        sums = torch.zeros(2 * W.shape[0], num_classes, dtype=torch.float64)
        sums.index_add_(1, labels, math.sqrt(2) * term(images.flatten(1).double(), W).T)
        noise = torch.randn(sums.shape, generator=generator, dtype=torch.float64)
        return (sums + sigma * noise) / len(images)


class FrequencyOverClassCount(variants.Frequency):
    def release(self, images, labels, num_classes, W, sigma, generator):
        table = frequency.noisy_feature_table(images, labels, num_classes, W, sigma, generator)
        return table * len(images) / torch.bincount(labels, minlength=num_classes).clamp(min=1)


# (Noise per entry, 4 times too small here, is caught by the trade-off test; its eps is read at
# the event that test chose, near the median, where eps stays near 1: seed 0 gives 1.2, seed 1
# gives 0.8.)
@pytest.mark.parametrize("bug, tests", [
    (FrequencyNoise, {"trade-off"}),
    (FrequencyNoNoise, {"eps", "trade-off"}),
    (FrequencyNoisePerEntry, {"trade-off"}),
    (FrequencyNormSqrt2, {"trade-off"}),
    (FrequencyOverClassCount, {"eps", "trade-off"}),
], ids=lambda value: value.__name__ if isinstance(value, type) else None)
def test_frequency_audit_catches_each_bug(bug, tests):
    row = audit("frequency", bug)
    assert tests <= set(row.caught_by.split(", ")), row


# ------------------------------------------------- the table's instruments (audit/variants.py)
def test_realised_count_variant_divides_by_the_realised_count():
    # Without noise: 3 white images in class 0, one in class 1, q = 1/2. Each sampled class's
    # mean of white pixels is exactly 1; an empty class's sum is 0.
    images = torch.full((4, 1, 2, 2), 255, dtype=torch.uint8)
    labels = torch.tensor([0, 0, 0, 1])
    generator = randomness.secret_generator(3)
    replay = torch.Generator().set_state(generator.get_state())
    mask = randomness.poisson_sample(4, 0.5, replay)
    got = variants.CentralRealisedCount().query(images, labels, 2, 0.5, 0.0, generator)
    want = [1.0 if mask[labels == k].any() else 0.0 for k in range(2)]
    assert got.flatten(1).mean(1).tolist() == pytest.approx(want, rel=1e-12)


def test_shuffled_batches_visit_every_example_once_an_epoch_in_batches_of_q_n():
    sampler, generator = variants.DpsgdShuffledBatches(), torch.Generator().manual_seed(0)
    masks = torch.stack([sampler.sample(10, 0.3, generator) for _ in range(6)])  # 2 epochs
    assert masks.sum(1).tolist() == [3] * 6  # round(0.3 * 10); the last example of each waits
    for epoch in (masks[:3], masks[3:]):
        assert epoch.sum(0).max() == 1 and epoch.sum() == 9
    assert not torch.equal(masks[:3], masks[3:])  # a new permutation each epoch


def test_same_noise_variants_repeat_their_noise_exactly():
    # DP-SGD: two steps on an empty batch are the noise alone, and the same twice
    model = torch.nn.Embedding(5, 1)
    torch.nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    step, generator, updates = variants.DpsgdSameNoiseTwice(), torch.Generator().manual_seed(0), []
    for _ in range(2):
        before = model.weight.detach().clone()
        step.step(model=model, optimizer=optimizer, per_example_loss=lambda m, i: m(i)[:, 0],
                  batch_tensors=(torch.zeros(0, dtype=torch.long),), clip_norm=1.0, sigma=1.0,
                  expected_batch_size=1.0, noise_generator=generator)
        updates.append(model.weight.detach() - before)
    assert torch.equal(updates[0], updates[1]) and updates[0].abs().min() > 0
    # central: black images, two queries of one run give one and the same release
    query = variants.CentralSameNoiseEveryQuery()
    images = torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    first, second = (query.query(images, torch.tensor([0, 0, 1, 1]), 2, 0.5, 1.0, generator)
                     for _ in range(2))
    assert torch.equal(first, second) and first.abs().min() > 0


@pytest.mark.slow
def test_every_row_of_the_table_is_caught_and_only_the_bugs():
    # The whole table at --seed 0 (about 4 minutes): what docs/audit.md reports.
    for key, _, variants_of, designs in trials.MECHANISMS:
        for label, make in variants_of.items():
            row = trials.verdict(trials.audit(designs, make, DELTA,
                                              randomness.secret_generator(0)), designs, DELTA)
            assert (row.caught_by == "") == (label == "as-it-is"), (key, label, row)
