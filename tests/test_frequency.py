"""Tests for frequency.py, FETA-Pro's frequency stage: the features' norm, the release's
sensitivity (as an attacker would choose the added image), its noise and public divisor, and the
generator fitted to a release."""
import math

import pytest
import torch

import frequency

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors (conftest.py)


def test_every_feature_vector_has_norm_one():
    W = frequency.frequencies(64, seed=0)
    x = torch.cat([torch.rand(100, 64, dtype=torch.float64), torch.zeros(1, 64),
                   torch.ones(1, 64), torch.full((1, 64), 1e6, dtype=torch.float64)])
    norms = frequency.features(x, W).norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), rtol=0, atol=1e-12)
    assert W.shape == (frequency.NUM_FREQUENCIES, 64)
    assert abs(W.var().item() * frequency.BANDWIDTH - 1) < 0.02  # entries N(0, 1/BANDWIDTH)


@pytest.mark.parametrize("added", ["white", "black", "nan", "huge", "random"])
def test_adding_any_image_moves_the_clean_sums_by_at_most_one(added):
    # The sensitivity of the release is 1: one more image adds one term of norm <= 1, in its
    # class's column only, whatever its pixels (a float image is mapped into [0, 1] first).
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (30,), generator=g)
    W = frequency.frequencies(64, seed=1, num_frequencies=200)
    extra = dict(white=torch.ones(1, 1, 8, 8), black=torch.zeros(1, 1, 8, 8),
                 nan=torch.full((1, 1, 8, 8), math.nan), huge=torch.full((1, 1, 8, 8), 1e30),
                 random=torch.rand(1, 1, 8, 8, generator=g))[added]
    base = frequency.feature_sums(images.float() / 255, labels, 3, W)
    more = frequency.feature_sums(torch.cat([images.float() / 255, extra]),
                                  torch.cat([labels, torch.tensor([2])]), 3, W)
    change = more - base
    assert change.norm().item() <= 1.0
    assert change[:, :2].abs().max().item() < 1e-12  # the other classes' columns: untouched
    assert torch.isfinite(more).all()


def test_an_image_that_shifts_the_feature_batches_still_moves_the_sums_by_at_most_one():
    # The features are computed 1,000 images at a time: removing the first of 1,001 images
    # moves every other image into another batch (and the last out of a batch of one), which
    # may round the shared terms otherwise; MARGIN covers it (frequency.py).
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (1001, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 4, (1001,), generator=g)
    W = frequency.frequencies(64, seed=2, num_frequencies=300)
    change = (frequency.feature_sums(images, labels, 4, W)
              - frequency.feature_sums(images[1:], labels[1:], 4, W))
    assert change.norm().item() <= 1.0


def test_uint8_and_float_images_give_the_same_sums():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 1, 4, 4), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 2, (20,), generator=g)
    W = frequency.frequencies(16, seed=0, num_frequencies=50)
    torch.testing.assert_close(frequency.feature_sums(images, labels, 2, W),
                               frequency.feature_sums(images.double() / 255, labels, 2, W))


def test_the_release_adds_noise_of_std_sigma_and_divides_by_the_public_n():
    # Many releases of the same data: their mean is the clean sums / N (the divisor is the
    # number of images, public, never a class count), their spread sigma / N per entry, drawn
    # from the generator handed in (the secret one).
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 4, 4), generator=g, dtype=torch.uint8)
    labels = torch.cat([torch.zeros(35, dtype=torch.long), torch.ones(5, dtype=torch.long)])
    W = frequency.frequencies(16, seed=3, num_frequencies=20)
    clean = frequency.feature_sums(images, labels, 2, W) / 40
    sigma, secret = 2.0, torch.Generator().manual_seed(7)
    releases = torch.stack([frequency.noisy_feature_table(images, labels, 2, W, sigma, secret)
                            for _ in range(2000)])
    assert releases.dtype == torch.float64
    error = (releases.mean(0) - clean).abs().max().item()
    assert error < 5 * sigma / 40 / math.sqrt(2000)
    spread = (releases - clean).std().item()
    assert abs(spread / (sigma / 40) - 1) < 0.02
    again = frequency.noisy_feature_table(images, labels, 2, W, sigma,
                                          torch.Generator().manual_seed(7))
    assert torch.equal(again, releases[0])  # the noise is the generator's, nothing else


def test_release_is_one_gaussian_mechanism_on_the_whole_set_and_refuses_bad_input():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 1, 4, 4), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 2, (10,), generator=g)
    table, mechanism = frequency.release(images, labels, 2, 26.6, seed=5, generator=g)
    assert mechanism == (1.0, 26.6, 1)
    assert table.shape == (2 * frequency.NUM_FREQUENCIES, 2)
    for sigma in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="sigma"):
            frequency.release(images, labels, 2, sigma, seed=5, generator=g)
    with pytest.raises(ValueError, match="images"):
        frequency.release(images[:0], labels[:0], 2, 1.0, seed=5, generator=g)


def test_the_fitted_generator_draws_each_class_like_its_images():
    # Two classes of 16x16 images, a bright left half against a bright right half, released
    # without noise: the generator fitted to the table must draw class 0 brighter on the left
    # and class 1 on the right; the same table and seed give the same generator.
    images = torch.zeros(200, 1, 16, 16)
    images[:100, :, :, :8] = 1.0
    images[100:, :, :, 8:] = 1.0
    labels = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(100, dtype=torch.long)])
    W = frequency.frequencies(256, seed=11, num_frequencies=500)
    table = frequency.feature_sums(images, labels, 2, W) / 200
    fitted = frequency.fit_generator(table, 2, (1, 16, 16), seed=11, steps=150)
    drawn, drawn_labels = fitted.draw(200, torch.Generator().manual_seed(0),
                                      labels=torch.arange(2).repeat(100))
    left, right = drawn[..., :8].mean(dim=(1, 2, 3)), drawn[..., 8:].mean(dim=(1, 2, 3))
    assert (left[drawn_labels == 0] - right[drawn_labels == 0]).mean() > 0.3
    assert (right[drawn_labels == 1] - left[drawn_labels == 1]).mean() > 0.3
    again = frequency.fit_generator(table, 2, (1, 16, 16), seed=11, steps=150)
    for a, b in zip(fitted.parameters(), again.parameters()):
        assert torch.equal(a, b)
