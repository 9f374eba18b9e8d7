"""Tests for central.py: the central-image Gaussian mechanism and the warm-up augmentation.

How we check that nothing reads the sensitive data except through the noisy Poisson sums:
  1. Review: in central.py the sensitive `images`/`labels` are indexed only in
     `poisson_class_sums`; `noisy_class_means` adds noise to its result before anything else;
     `central_images` only reads their shapes (N is public) and checks the label range.
  2. test_sensitive_data_only_used_via_noisy_means pins that structure with the AST, so a
     later edit such as `images.float().mean()` in central_images fails the suite.
  3. Behaviour: changing images outside the Poisson sample, or changing sampled images while
     keeping every class sum, leaves the output unchanged (same seed).
"""
import ast
import inspect
import math
import os

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import torch

import central
from harness import commands
import randomness


def fake_data(n=400, channels=1, size=28, classes=10, seed=0, weights=None):
    """Random uint8 images and (deliberately unbalanced) labels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    weights = torch.arange(1, classes + 1, dtype=torch.float) if weights is None else weights
    labels = torch.multinomial(weights, n, replacement=True, generator=g)
    return images, labels


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- the mechanism -------------------------------------------------------------------------

def test_sigma0_q1_means_are_exact_class_means_times_realised_over_expected():
    images, labels = fake_data(n=300, classes=5)
    means = central.noisy_class_means(images, labels, 5, q=1.0, sigma=0.0, generator=gen())
    small = images[:, :, ::2, ::2].double() / 255  # nearest half-resolution, written independently
    expected_count = 300 / 5
    for k in range(5):
        of_k = small[labels == k]
        want = of_k.mean(0) * len(of_k) / expected_count
        torch.testing.assert_close(means[k], want, rtol=1e-12, atol=1e-12)
    assert means.shape == (5, 1, 14, 14)


def test_constant_classes_come_out_exactly_end_to_end():
    # Each class is one constant grey level and classes are balanced: with sigma=0, q=1 every
    # step (mean, clamp, bilinear upsample, median, sharpen) must keep that constant image.
    levels = torch.tensor([0, 60, 128, 200, 255], dtype=torch.uint8)
    labels = torch.arange(5).repeat(20)
    images = levels[labels].view(-1, 1, 1, 1).expand(-1, 1, 28, 28).contiguous()
    out, out_labels, mech = central.central_images(images, labels, 5, q=1.0, sigma=0.0,
                                                   queries=2, generator=gen())
    want = (levels.float() / 255).view(5, 1, 1, 1).expand(5, 1, 28, 28).repeat(2, 1, 1, 1)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    assert out_labels.tolist() == list(range(5)) * 2 and mech == (1.0, 0.0, 2)


def test_divides_by_expected_not_realised_count():
    # All-ones images, sigma=0: output = realised/expected count. Dividing by the realised count
    # would give exactly 1 every time; the expected count gives values scattered around 1.
    n, q, classes = 2000, 0.3, 2
    images = torch.full((n, 1, 4, 4), 255, dtype=torch.uint8)
    labels = torch.arange(classes).repeat(n // classes)
    g = gen(3)
    ratios = torch.stack([central.noisy_class_means(images, labels, classes, q, 0.0, g)[:, 0, 0, 0]
                          for _ in range(200)])
    expected_count = q * n / classes
    sd_ratio = math.sqrt(expected_count * (1 - q)) / expected_count  # binomial count sd / mean
    assert ratios.std() > 0.5 * sd_ratio
    # mean of 400 ratios: 5 standard errors of tolerance
    assert abs(ratios.mean() - 1) < 5 * sd_ratio / math.sqrt(ratios.numel())


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_sensitivity_of_all_class_sums_is_sqrt_d(channels, size):
    images, labels = fake_data(n=200, channels=channels, size=size, classes=10)
    d_prime = channels * (size // 2) ** 2

    def sums(imgs, labs):  # q = 1: every image is in the sample
        return central.poisson_class_sums(imgs, labs, 10, 1.0, gen())

    base = sums(images, labels)
    worst = torch.full((1, channels, size, size), 255, dtype=torch.uint8)  # adversarial all-ones
    for extra, extra_label in [(worst, 3), (images[:1], 7)]:
        added = sums(torch.cat([images, extra]), torch.cat([labels, torch.tensor([extra_label])]))
        assert (added - base).norm() <= math.sqrt(d_prime) * (1 + 1e-12)
    added = sums(torch.cat([images, worst]), torch.cat([labels, torch.tensor([3])]))
    assert (added - base).norm() == pytest.approx(math.sqrt(d_prime), rel=1e-12)  # bound is tight
    for i in [0, 57, 199]:  # removals
        keep = torch.arange(200) != i
        assert (sums(images[keep], labels[keep]) - base).norm() <= math.sqrt(d_prime) * (1 + 1e-12)
    # float input outside [0, 1] is clamped, so even a malformed image cannot exceed the bound
    floats = images.float() / 255
    bad = torch.full((1, channels, size, size), 7.0)
    diff = sums(torch.cat([floats, bad]), torch.cat([labels, torch.tensor([0])])) - sums(floats, labels)
    assert diff.norm() <= math.sqrt(d_prime) * (1 + 1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_pixel_keeps_the_bound_and_the_release_finite(bad):
    """A direct caller's float images may hold anything: one image with a NaN or inf pixel moves
    the class sums by at most sqrt(d') like any other, and the release stays finite. (Clamping
    alone kept the NaN: its class's sums, and its whole released image, were NaN.)"""
    images, labels = fake_data(n=200)
    floats = images.float() / 255
    poisoned = floats[:1].clone()
    poisoned[0, 0, 4, 6] = bad                           # an even row and column: downsampled
    with_it, its_labels = torch.cat([floats, poisoned]), torch.cat([labels, labels[:1]])
    sums = lambda imgs, labs: central.poisson_class_sums(imgs, labs, 10, 1.0, gen())
    assert (sums(with_it, its_labels) - sums(floats, labels)).norm() <= 14 * (1 + 1e-12)  # sqrt(d')
    out, _, _ = central.central_images(with_it, its_labels, 10, q=1.0, sigma=1.0, queries=1,
                                       generator=gen())
    assert out.isfinite().all()


def test_noise_has_std_sigma_sqrt_d():
    # q = 1 makes the sample deterministic, so noise = noisy sums - clean sums exactly.
    images, labels = fake_data(n=200, channels=3, size=32, classes=10)
    sigma, n = 2.0, 200
    expected_count = n / 10
    noisy = central.noisy_class_means(images, labels, 10, 1.0, sigma, gen(11)) * expected_count
    noise = (noisy - central.poisson_class_sums(images, labels, 10, 1.0, gen())).flatten()
    std = sigma * math.sqrt(3 * 16 * 16)                  # d' = 768
    m = noise.numel()                                     # 7680 values
    # sum (z/std)^2 ~ chi2(m). Accept within the central 1 - 2e-6 of that law: a correct
    # implementation fails for at most 2 in a million seeds; the band is about +-8% in variance
    # (+-4% in std), so a missing sqrt(d') (factor 27.7) or sigma^2 instead of sigma are caught.
    stat = float(((noise / std) ** 2).sum())
    assert scipy.stats.chi2.ppf(1e-6, m) < stat < scipy.stats.chi2.isf(1e-6, m)
    assert abs(float(noise.mean())) < 5 * std / math.sqrt(m)   # centred (5 standard errors)
    assert scipy.stats.kstest(noise.numpy() / std, "norm").pvalue > 1e-6  # and Gaussian


def test_noise_is_float64_not_on_the_float32_grid():
    """The noise is drawn in float64 (see dpsgd.add_noise for why): recovered from a q = 1 query
    it is not a float32 number times sigma sqrt(d'). float32 noise would be, up to the float64
    rounding of recovering it (about 1e-16); a float64 normal sits about 1e-8 off that grid,
    within 1e-12 for some 1e-5 of the values."""
    images, labels = fake_data(n=200, channels=3, size=32, classes=10)
    scale = 2.0 * math.sqrt(3 * 16 * 16)
    means = central.noisy_class_means(images, labels, 10, 1.0, 2.0, gen(11))
    assert means.dtype == torch.float64
    clean = central.poisson_class_sums(images, labels, 10, 1.0, gen())
    z = ((means * 20 - clean) / scale).flatten()                # 20 = q N / K
    off_grid = (z - z.float().double()).abs() > 1e-12 * z.abs()
    assert off_grid.double().mean() > 0.99


def test_each_query_draws_fresh_sample_and_noise():
    images, labels = fake_data()
    out, _, _ = central.central_images(images, labels, 10, q=0.5, sigma=1.0, queries=3,
                                       generator=gen(), postprocess=False)
    assert not torch.equal(out[:10], out[10:20]) and not torch.equal(out[10:20], out[20:])


def test_output_contract_and_determinism():
    images, labels = fake_data(channels=3, size=32)
    out, out_labels, mech = central.central_images(images, labels, 10, generator=gen(1))
    assert out.shape == (50, 3, 32, 32) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    assert out_labels.dtype == torch.int64 and out_labels.tolist() == list(range(10)) * 5
    assert mech == (randomness.sampling_rate(0.1), 5.0, 5)  # the exact inclusion probability
    again, _, _ = central.central_images(images, labels, 10, generator=gen(1))
    assert torch.equal(out, again)


@pytest.mark.parametrize("kwargs", [dict(q=0.0), dict(q=1.5), dict(sigma=-1.0), dict(queries=0),
                                    dict(num_classes=3), dict(generator=None)])
def test_bad_arguments_raise_value_error(kwargs):
    images, labels = fake_data(n=50)
    args = dict(num_classes=10, generator=gen())
    args.update(kwargs)
    with pytest.raises(ValueError):
        central.central_images(images, labels, **args)


def test_median_and_sharpen_match_scipy():
    x = torch.rand(3, 1, 11, 13, generator=gen(2))
    want = scipy.ndimage.median_filter(x.numpy(), size=(1, 1, 3, 3), mode="nearest")
    torch.testing.assert_close(central.median3x3(x), torch.from_numpy(want))
    kernel = np.array([[0, -1, 0], [-1, 5, -1], [0, -1, 0]], dtype=np.float32)[None, None]
    want = np.clip(scipy.ndimage.correlate(x.numpy(), kernel, mode="nearest"), 0, 1)
    torch.testing.assert_close(central.sharpen(x), torch.from_numpy(want))


# --- the sensitive data reaches the output only through the noisy sums -----------------------

def test_sensitive_data_only_used_via_noisy_means():
    # Inside the public functions the sensitive arrays may only be (a) asked for their shape,
    # (b) range-checked (labels: an argument check that raises, releasing nothing), or (c)
    # handed on to the next function of the chain.
    allowed = {"central_images": ({"shape"}, {"noisy_class_means", "_check_arguments"}),
               "_check_arguments": ({"shape", "dim", "numel", "min", "max"}, set()),
               "noisy_class_means": ({"shape"}, {"poisson_class_sums"})}
    for name, (attrs, callees) in allowed.items():
        tree = ast.parse(inspect.getsource(getattr(central, name)))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in ("images", "labels"):
                parent = parents[node]
                ok = (isinstance(parent, ast.Attribute) and parent.attr in attrs) or (
                    isinstance(parent, ast.Call) and getattr(parent.func, "id", None) in callees)
                assert ok, "%s uses %s at line %d" % (name, node.id, node.lineno)


def test_images_outside_the_sample_or_with_equal_sums_do_not_matter():
    images, labels = fake_data(n=400)
    q, seed = 0.5, 21
    mask = randomness.poisson_sample(400, q, gen(seed))  # the first draw of the first query
    ref, _, _ = central.central_images(images, labels, 10, q=q, sigma=1.0, queries=1,
                                       generator=gen(seed))
    changed = images.clone()
    changed[~mask] = 255 - changed[~mask]              # not sampled: anything goes
    changed[:, :, 1::2, :] = 0                         # dropped by the downsampling
    # swap the top halves of two sampled images of one class: new images, the same class sums
    pair = torch.nonzero(mask & (labels == 9)).flatten()[:2]
    changed[pair, :, :14] = changed[pair.flip(0), :, :14]
    i = int(pair[0])
    out, _, _ = central.central_images(changed, labels, 10, q=q, sigma=1.0, queries=1,
                                       generator=gen(seed))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    changed[i] = 255 - changed[i]                      # a real change must show
    out, _, _ = central.central_images(changed, labels, 10, q=q, sigma=1.0, queries=1,
                                       generator=gen(seed))
    assert not torch.allclose(out, ref, atol=1e-3)


# --- augmentation ----------------------------------------------------------------------------

def test_augment_shape_range_and_determinism():
    images, _ = fake_data(n=64, channels=3, size=32)
    a = central.augment(images, gen(4), max_magnitude=9)
    assert a.shape == images.shape and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, central.augment(images, gen(4), max_magnitude=9))  # same seed
    g = gen(4)
    first, second = central.augment(images, g), central.augment(images, g)
    assert not torch.equal(first, second)                                   # re-drawn per call
    torch.testing.assert_close(central.augment(images.float() / 255, gen(4), max_magnitude=9), a)
    torch.testing.assert_close(central.augment(images, gen(4), num_ops=0), images.float() / 255)


@pytest.mark.parametrize("channels, magnitude", [(1, 3), (3, 9)])
def test_augment_takes_the_official_magnitude_from_the_channels(channels, magnitude):
    images, _ = fake_data(n=64, channels=channels, size=16)
    default = central.augment(images, gen(5))
    assert torch.equal(default, central.augment(images, gen(5), max_magnitude=magnitude))
    assert not torch.equal(default, central.augment(images, gen(5), max_magnitude=6))


def test_augment_changes_most_images_and_keeps_them_in_place():
    images, _ = fake_data(n=128)
    a = central.augment(images, gen(6))
    changed = (a - images.float() / 255).abs().flatten(1).amax(1) > 1e-3
    assert changed.float().mean() > 0.8
    # Output i depends only on input i (so labels stay aligned): perturb other images.
    other = images.clone()
    other[1:] = 255 - other[1:]
    torch.testing.assert_close(central.augment(other, gen(6))[0], a[0])


def test_geometric_conventions_against_exact_transforms():
    x = torch.rand(1, 1, 28, 28, generator=gen(8))
    op = lambda name: torch.tensor([central.OPS.index(name)])
    # rotation by 90 degrees of a square image is an exact pixel permutation
    level = torch.tensor([90.0 / central.MAX_ROTATE_DEG])
    rotated = central._geometric(x, op("rotate"), level)
    assert any(torch.allclose(rotated, torch.rot90(x, k, dims=(2, 3)), atol=1e-5) for k in (1, 3))
    # translation by exactly 2 pixels (a level of 2/28 of the side)
    level = torch.tensor([2 / 28 / central.MAX_TRANSLATE])
    shifted = central._geometric(x, op("translate_x"), level)
    inner = slice(3, -3)
    assert any(torch.allclose(shifted[..., inner], torch.roll(x, s, dims=3)[..., inner], atol=1e-5)
               for s in (2, -2))
    # photometric ops leave the geometry alone
    assert torch.equal(central._geometric(x, op("brightness"), level), x)


def test_command_line_releases_with_a_secret_generator_unless_seeded(mnist_dir, tmp_path):
    """`python central.py` must not fall back to a fixed seed: two default runs release
    different central images; --seed (testing only) makes them equal."""
    def release(name, *seed):
        commands.central_command(["--data-dir", mnist_dir, "--out", str(tmp_path / name), "--queries", "1",
                      *seed])
        return (tmp_path / name / "central.png").read_bytes()

    assert release("a") != release("b")
    assert release("c", "--seed", "3") == release("d", "--seed", "3")


def tree(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


BAD_INPUTS = {  # name: (extra arguments, words the line holds); run in a folder that holds
    # a_file and earlier/central.png, with --out new (the last --out wins)
    "queries of years": (["--queries", "1000000000"], ["--queries", "1..1000"]),
    "queries 0": (["--queries", "0"], ["--queries", "0"]),
    "q 0": (["--q", "0"], ["--q", "(0, 1]"]),
    "q above 1": (["--q", "1.5"], ["--q", "1.5"]),
    "q nan": (["--q", "nan"], ["--q", "nan"]),
    "sigma 0: no noise": (["--sigma", "0"], ["--sigma", "(0, 1e6]"]),
    "sigma inf": (["--sigma", "inf"], ["--sigma", "inf"]),
    "seed 2**64": (["--seed", str(2 ** 64)], ["--seed", "2**64 - 1"]),
    "unknown dataset": (["--dataset", "imagenet"], ["--dataset", "imagenet"]),
    "empty out": (["--out", ""], ["--out", "empty"]),
    "empty data dir": (["--data-dir", ""], ["--data-dir", "empty"]),  # not ./data/mnist
    "no data": (["--data-dir", "nowhere"], ["--data-dir", "nowhere"]),
    "out is a file": (["--out", "a_file"], ["--out", "a_file"]),
    "out cannot be made": (["--out", "/proc/no/such/folder"], ["--out", "/proc/no/such"]),
    "out holds a release": (["--out", "earlier"], ["--out", "earlier", "central.png"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_command_line_refuses_bad_input_in_one_line_before_the_release(
        case, mnist_dir, tmp_path, capsys, monkeypatch):
    extra, words = BAD_INPUTS[case]
    monkeypatch.chdir(tmp_path)  # default folders (./data) would appear here
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "central.png").write_bytes(b"an earlier release")
    before = tree(tmp_path)

    def no_release(*args, **kwargs):
        raise AssertionError("released: the bad input should have been refused first")
    monkeypatch.setattr(central, "central_images", no_release)
    try:  # argparse's refusals exit; the command's own return their status
        status = commands.central_command(["--data-dir", mnist_dir, "--out", "new", "--queries",
                                           "1", *extra])
    except SystemExit as exit_info:
        status = exit_info.code
    printed = capsys.readouterr()
    err = printed.err.strip()
    assert status == 2 and printed.out == "", err
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err
    assert all(word in err for word in words), err
    assert tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["a_file", "earlier"]
