"""Tests for dpsgd.py: per-example gradients, clipping, noise, Poisson sampling, refusals.

Reference values come from independent computations (a one-example-at-a-time autograd loop,
clipping recomputed by hand), never from dpsgd itself. Statistical tests use fixed seeds and
tolerances of several standard errors, stated next to each.
"""
import math

import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

import diffusion
import dpsgd
from conftest import per_sample_grads


class SmallConvNet(nn.Module):
    """A small classifier with GroupNorm (per-example, so allowed; in float32 under autocast)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = diffusion.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        h = F.silu(self.norm(self.conv1(x)))
        return self.head(F.silu(self.conv2(h)).flatten(1))


def classification_loss(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")  # [B]


def small_batch(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def make_net(seed=0):
    torch.manual_seed(seed)
    return SmallConvNet()


def loop_grads(model, per_example_loss, *tensors, autocast=False):
    """Reference: plain autograd on one example at a time -> {name: [B, ...]}."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rows = []
    for i in range(len(tensors[0])):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = per_example_loss(model, *(t[i:i + 1] for t in tensors))
        loss.float().sum().backward()
        rows.append({n: p.grad.clone() for n, p in model.named_parameters() if n in names})
    return {n: torch.stack([r[n] for r in rows]) for n in names}


def assert_rel_close(got, want, rtol):
    """Per example and parameter: ||got - want|| <= rtol * ||want|| (floored by the example's
    whole-gradient norm, so exactly-zero gradients such as unused embedding rows compare too)."""
    assert got.keys() == want.keys()
    for i in range(len(next(iter(want.values())))):
        total = math.sqrt(sum(float(w[i].norm()) ** 2 for w in want.values()))
        assert total > 0
        for n in want:
            err = float((got[n][i] - want[n][i]).norm())
            assert err <= rtol * max(float(want[n][i].norm()), 1e-3 * total), (n, i, err)


def clipped_sum_by_hand(grads, clip_norm):
    """sum_i min(1, C' / ||g_i||) g_i, C' = C (1 - margin), from per-example gradients: summed in
    float64 (a float32 sum of a few cancelling terms is off by more than the tolerances below),
    then cast to float32 like the gradients dp_step sets."""
    norms = torch.sqrt(sum(g.double().flatten(1).pow(2).sum(1) for g in grads.values()))
    margin = dpsgd.clip_margin([g[0].numel() for g in grads.values()])
    factors = torch.clamp(clip_norm * (1 - margin) / norms, max=1.0)
    return {n: torch.einsum("b,b...->...", factors, g.double()).float()
            for n, g in grads.items()}, norms


def grads_after_step(model, *step_args, **step_kwargs):
    """Run dp_step with an SGD(lr=0) optimizer, so parameters stay and .grad holds the result."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    assert dpsgd.dp_step(model, optimizer, *step_args, **step_kwargs) is None  # no statistics
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def norm64(grads):
    """The flat L2 norm of a gradient dict, in float64."""
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


# ---------------------------------------------------------------- per-example gradients

def test_per_sample_grads_match_loop_on_groupnorm_convnet():
    model, (x, y) = make_net(), small_batch()
    got = per_sample_grads(model, classification_loss, x, y, chunk_size=2)
    want = loop_grads(model, classification_loss, x, y)
    assert all(got[n].shape == (5, *p.shape) for n, p in model.named_parameters())
    assert_rel_close(got, want, rtol=1e-5)


# bfloat16 autocast: the loop and vmap run the same bf16 operations on the same inputs, but
# oneDNN picks other kernels (other summation orders) for a batch of one and a vmapped batch,
# and each bf16 rounding is ~4e-3 relative (8-bit mantissa). Measured on the UNet: whole
# per-example gradients differ by 0.6-0.7 % (as much as the bf16 loop differs from float32),
# single small tensors (GroupNorm scales, biases) by up to 6 %. The bounds below are about 3x
# those; a real error (a missing term, another example's gradient) is off by O(1).
BF16_WHOLE_RTOL, BF16_TENSOR_RTOL = 2e-2, 0.15


def assert_whole_rel_close(got, want, rtol):
    """Per example: the norm of the difference over all parameters <= rtol * the norm."""
    for i in range(len(next(iter(want.values())))):
        err = math.sqrt(sum(float((got[n][i] - want[n][i]).norm()) ** 2 for n in want))
        total = math.sqrt(sum(float(want[n][i].norm()) ** 2 for n in want))
        assert err <= rtol * total, (i, err, total)


@pytest.mark.parametrize("autocast, rtol", [(False, 1e-5), (True, BF16_TENSOR_RTOL)])
def test_per_sample_grads_match_loop_on_project_unet(autocast, rtol):
    torch.manual_seed(0)
    model = diffusion.make_unet("small", 1, 28, 10)
    # The output layer is zero-initialised, which would make every other gradient zero and
    # the comparison empty; give it weights.
    nn.init.normal_(model.conv_out.weight, std=0.05)
    edm = diffusion.EDM()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 1, 28, 28, generator=g) * 2 - 1
    y_in, sigma, noise = edm.draw_inputs(torch.tensor([1, 4, 7]), 2, (1, 28, 28), g)
    got = per_sample_grads(model, edm.loss, x0, y_in, sigma, noise, chunk_size=2,
                           autocast=autocast)
    want = loop_grads(model, edm.loss, x0, y_in, sigma, noise, autocast=autocast)
    assert all(v.dtype == torch.float32 for v in got.values())
    assert_rel_close(got, want, rtol=rtol)
    if autocast:
        assert_whole_rel_close(got, want, BF16_WHOLE_RTOL)


def test_per_sample_grads_match_loop_on_groupnorm_convnet_under_autocast():
    model, (x, y) = make_net(), small_batch()
    got = per_sample_grads(model, classification_loss, x, y, chunk_size=2, autocast=True)
    want = loop_grads(model, classification_loss, x, y, autocast=True)
    assert_rel_close(got, want, rtol=BF16_TENSOR_RTOL)
    assert_whole_rel_close(got, want, BF16_WHOLE_RTOL)


def test_noise_multiplicity_gives_one_gradient_per_example_clipped_once():
    """DPDM: K draws averaged inside the per-example loss -> one gradient per example, equal to
    the mean of the K single-draw gradients, and clipped once (not K times)."""
    model, (x, y) = make_net(), small_batch(4)
    k = 3
    noise = torch.randn(4, k, 1, 8, 8, generator=torch.Generator().manual_seed(2))

    def k_draw_loss(m, x, y, noise):  # [B]; the K draws go through the model as one batch
        b = x.shape[0]
        logits = m((x.unsqueeze(1) + noise).reshape(b * k, 1, 8, 8))
        return F.cross_entropy(logits, y.repeat_interleave(k), reduction="none").reshape(b, k).mean(1)

    got = per_sample_grads(model, k_draw_loss, x, y, noise)
    assert all(g.shape[0] == 4 for g in got.values())  # one gradient per example, not per draw
    per_draw = [loop_grads(model, classification_loss, x + noise[:, j], y) for j in range(k)]
    mean_of_draws = {n: sum(d[n] for d in per_draw) / k for n in got}
    assert_rel_close(got, mean_of_draws, rtol=1e-5)

    clip = 0.5 * float(torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in got.values())).min())
    step_grads = grads_after_step(model, k_draw_loss, (x, y, noise), clip, 0.0, 1.0,
                                  torch.Generator().manual_seed(0), chunk_size=3)
    clipped_once, _ = clipped_sum_by_hand(mean_of_draws, clip)
    per_draw_clipped = [clipped_sum_by_hand(d, clip)[0] for d in per_draw]
    clipped_per_draw = {n: sum(c[n] for c in per_draw_clipped) / k for n in got}
    for n in got:
        torch.testing.assert_close(step_grads[n], clipped_once[n], rtol=1e-5, atol=1e-7)
    # The alternative (clip each draw, then average) is measurably different, so the check above
    # can tell them apart.
    diff = sum(float((clipped_once[n] - clipped_per_draw[n]).norm()) for n in got)
    assert diff > 1e-3


# ---------------------------------------------------------------- clipping and summation

def test_chunk_size_does_not_change_clipped_sum():
    model, (x, y) = make_net(), small_batch(7)
    results = [grads_after_step(model, classification_loss, (x, y), 0.1, 0.0, 1.0,
                                torch.Generator().manual_seed(0), chunk_size=c)
               for c in (1, 3, None)]
    for other in results[1:]:
        for n in results[0]:
            torch.testing.assert_close(other[n], results[0][n], rtol=1e-5, atol=1e-7)


def test_clipped_sum_matches_hand_computation_and_norms_are_at_most_c():
    model, (x, y) = make_net(), small_batch(6)
    raw = loop_grads(model, classification_loss, x, y)
    _, raw_norms = clipped_sum_by_hand(raw, 1.0)
    ordered = raw_norms.sort().values
    clip = float(ordered[2] + ordered[3]) / 2  # three examples clipped, three not
    # Clipping and summing are checked on the step's own per-example gradients (the tests above
    # check those against the loop): the loop's differ from vmap's by a few float32 ulps, which
    # cancellation in the sum turns into up to 2.7e-7 (measured), more than a tolerance tight
    # enough to check the clipping. Both sums are float64, cast to float32: 2 ulps apart at most.
    want, _ = clipped_sum_by_hand(
        per_sample_grads(model, classification_loss, x, y, chunk_size=4), clip)
    got = grads_after_step(model, classification_loss, (x, y), clip, 0.0, 1.0,
                           torch.Generator().manual_seed(0), chunk_size=4)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=2 * 2.0 ** -23, atol=0)
    # Each example alone: its contribution has norm min(||g_i||, C), along g_i, never above C.
    for i in range(6):
        one = grads_after_step(model, classification_loss, (x[i:i + 1], y[i:i + 1]), clip,
                               0.0, 1.0, torch.Generator().manual_seed(0))
        assert norm64(one) <= clip
        assert norm64(one) == pytest.approx(min(float(raw_norms[i]), clip), rel=1e-4)


def test_step_divides_by_expected_batch_size_not_realised_size():
    model, (x, y) = make_net(), small_batch(3)
    raw = loop_grads(model, classification_loss, x, y)
    got = grads_after_step(model, classification_loss, (x, y), 1e6, 0.0, 10.0,
                           torch.Generator().manual_seed(0))
    for n in raw:  # C huge: nothing clipped; the sum of 3 gradients divided by qN = 10, not 3
        torch.testing.assert_close(got[n], raw[n].sum(0) / 10.0, rtol=1e-5, atol=1e-8)


def test_autocast_path_keeps_clipping_exact_and_is_close_to_float32():
    model, (x, y) = make_net(), small_batch(4)
    step = lambda tensors, ac: grads_after_step(model, classification_loss, tensors, 0.05, 0.0,
                                                1.0, torch.Generator().manual_seed(0),
                                                chunk_size=2, autocast=ac)
    exact, bf16 = step((x, y), False), step((x, y), True)
    assert all(g.dtype == torch.float32 for g in bf16.values())
    flat = lambda g: torch.cat([v.flatten() for v in g.values()])
    # bfloat16 has an 8-bit mantissa (relative rounding ~4e-3 per op): a looser tolerance here.
    assert float((flat(bf16) - flat(exact)).norm()) <= 0.05 * float(flat(exact).norm())
    for i in range(4):  # clipping keeps its margin under autocast: the bound C holds exactly
        assert norm64(step((x[i:i + 1], y[i:i + 1]), True)) <= 0.05


def test_no_contribution_exceeds_c_by_rounding():
    """Large gradients clipped to C = 1, one example at a time, float32 and bf16 autocast: the
    contribution's norm, measured in float64, is never above C. (Clipping to C / (||g|| + 1e-6)
    without a margin gave up to 1.0000003 C on exactly this set-up.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 10))
    g = torch.Generator().manual_seed(0)
    norms = []
    for _ in range(40):
        x = torch.randn(1, 64, generator=g) * 50
        y = torch.randint(0, 10, (1,), generator=g)
        for autocast in (False, True):
            norms.append(norm64(grads_after_step(model, classification_loss, (x, y), 1.0, 0.0,
                                                 1.0, torch.Generator().manual_seed(0),
                                                 autocast=autocast)))
    assert max(norms) <= 1.0
    assert sum(n > 0.99 for n in norms) >= 40  # most were clipped: the bound was exercised


def linear_model(d):
    """A model whose per-example gradient is the example itself (with gradient_is_input); zero
    weights keep the forward pass finite for any input."""
    model = nn.Linear(d, 1, bias=False)
    nn.init.zeros_(model.weight)
    return model


def gradient_is_input(model, x):
    return model(x)[:, 0]  # d/dw (w . x) = x, exactly


F32 = torch.finfo(torch.float32)


@pytest.mark.parametrize("clip", [F32.tiny, 1e-30, 1.0, 1e30, 1e38, F32.max])
def test_gradients_of_any_scale_are_clipped_to_c_of_any_scale(clip):
    """Every C that dp_step accepts (the normal float32 range, edges included) and gradients from
    subnormal to 1e39: the contribution is g min(1, C / ||g||), up to the margin (about 8e-6),
    and never above C. (With float32 norms, at C = 1e-30 a gradient of norm 10 C had squares
    below float32's range, norm 0, and passed unclipped; one of norm 1e39 had norm inf.)"""
    d = 4096
    direction = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    direction /= direction.norm()
    for norm in (1e-40, clip / 10, clip * 10, 1e39):
        g = (norm * direction).float()
        assert g.isfinite().all()
        want = g.double() * min(1.0, clip / float(g.double().norm()))
        got = dpsgd.clipped_sum(linear_model(d), gradient_is_input, (g[None],), clip)
        assert float(got.norm()) <= clip
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_neighbouring_sums_differ_by_at_most_c_among_many_identical_examples():
    """The attack on a float32 running sum: 59,968 identical examples (each clipped to C) and one
    crafted neighbour, first or last. Rounding the sum of 60,000 contributions moved it by up to
    1.0017 C in float32 (these neighbours); the float64 sum is within 2 (n + 1)^2 2^-53 C = 8e-7 C
    of exact, which the margin covers: the bound is C, with no tolerance."""
    d, n, clip = 16, 59_968, 1.0
    g = torch.Generator().manual_seed(1)
    many = (torch.rand(1, d, generator=g) + 0.5).expand(n, d)  # norm > 2 C: clipped
    step = lambda tensor: dpsgd.clipped_sum(linear_model(d), gradient_is_input, (tensor,), clip,
                                            chunk_size=4096)
    summed = step(many)
    for _ in range(3):
        neighbour = torch.randn(1, d, generator=g)
        for at in (0, n):
            added = step(torch.cat([many[:at], neighbour, many[at:]]))
            assert float((added - summed).norm()) <= clip


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_an_example_with_a_non_finite_gradient_contributes_zero(bad_value):
    """One example whose loss (hence gradient) is NaN or inf must not poison the update: its
    influence would be unbounded. It counts as zero: the step equals the step without it."""
    model, (x, y) = make_net(), small_batch(5)
    poisoned = x.clone()
    poisoned[2, 0, 3, 3] = bad_value
    keep = torch.tensor([0, 1, 3, 4])
    for sigma in (0.0, 1.0):
        got = grads_after_step(model, classification_loss, (poisoned, y), 0.5, sigma, 5.0,
                               torch.Generator().manual_seed(0), chunk_size=2)
        want = grads_after_step(model, classification_loss, (x[keep], y[keep]), 0.5, sigma, 5.0,
                                torch.Generator().manual_seed(0), chunk_size=2)
        for n in want:
            assert torch.isfinite(got[n]).all(), n
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)


class SharedOffset(nn.Module):
    """w . x + b + offset.sum(): the offset's per-example gradient is 1 in every entry, which
    vmap hands back as an expanded view (entries that share memory)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)
        self.offset = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return self.linear(x)[:, 0] + self.offset.sum()


def test_an_expanded_per_example_gradient_is_clipped_and_a_nan_example_still_dropped():
    """dp_step zeroes non-finite entries in place; on an expanded gradient that failed
    ('more than one element of the written-to tensor refers to a single memory location').
    The step must equal the clipped sum by hand, and a NaN example must still count as zero."""
    torch.manual_seed(0)
    model, loss = SharedOffset(), lambda model_fn, x: model_fn(x)
    params = {n: p.detach() for n, p in model.named_parameters()}
    grads, _ = dpsgd._per_example_grad_fn(model, loss, 1)(params, torch.randn(2, 3))
    assert 0 in grads["offset"].stride()  # the case of this test: an expanded view
    x = 3 * torch.randn(6, 3)
    want, norms = clipped_sum_by_hand(loop_grads(model, loss, x), 1.0)
    assert (norms > 1).any()  # some are clipped
    got = grads_after_step(model, loss, (x,), 1.0, 0.0, 1.0, torch.Generator(), chunk_size=4)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)
    poisoned = torch.cat([x, torch.full((1, 3), float("nan"))])
    got = grads_after_step(model, loss, (poisoned,), 1.0, 0.0, 1.0, torch.Generator(),
                           chunk_size=4)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- noise

def test_noise_has_std_sigma_c_over_expected_size_and_is_seeded():
    """Empty batch: the gradient is pure noise N(0, (sigma C / qN)^2) in every coordinate.
    With P = 20,100 coordinates the sample std has relative standard error 1/sqrt(2P) = 0.5 %;
    we allow 3 % (6 SE). The mean's standard error is std/sqrt(P); we allow 5 SE."""
    torch.manual_seed(0)
    model = nn.Linear(200, 100)
    sigma, clip, expected = 2.0, 0.5, 4.0
    empty = (torch.zeros(0, 200), torch.zeros(0, 100))
    mse = lambda m, x, t: ((m(x) - t) ** 2).mean(1)
    noise = grads_after_step(model, mse, empty, clip, sigma, expected,
                             torch.Generator().manual_seed(5))
    values = torch.cat([g.flatten() for g in noise.values()])
    want_std = sigma * clip / expected
    assert float(values.std()) == pytest.approx(want_std, rel=0.03)
    assert abs(float(values.mean())) <= 5 * want_std / math.sqrt(values.numel())
    assert scipy.stats.kstest(values.numpy() / want_std, "norm").pvalue > 1e-3
    again = grads_after_step(model, mse, empty, clip, sigma, expected,
                             torch.Generator().manual_seed(5))
    other = grads_after_step(model, mse, empty, clip, sigma, expected,
                             torch.Generator().manual_seed(6))
    assert all(torch.equal(again[n], noise[n]) for n in noise)
    assert not any(torch.equal(other[n], noise[n]) for n in noise)


def test_noise_is_box_muller_from_53_bit_uniforms_in_float64():
    """add_noise's docstring says what torch's CPU float64 normal is (Box-Muller on 16-value
    blocks of uniforms u = k / 2^53, pairs (j, j + 8): torch's normal_fill), and that the noisy
    sum is formed in float64. Recomputed here from the same generator's uniforms; if torch ever
    changes its normal, this fails and the docstring must be revisited. float32 noise (24-bit
    uniforms, |z| <= 5.77) would be on the float32 grid: not one value of 4096 here is."""
    n, seed = 4096, 3
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert bool(((u * 2.0 ** 53) % 1 == 0).all())              # the 53-bit grid
    u = u.view(-1, 2, 8)
    radius, angle = torch.sqrt(-2 * torch.log(1 - u[:, 0])), 2 * math.pi * u[:, 1]
    z = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], 1).flatten()
    summed = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    noisy = dpsgd.add_noise(summed, 2.0, 0.25, torch.Generator().manual_seed(seed))
    assert noisy.dtype == torch.float64
    torch.testing.assert_close(noisy, summed + 0.5 * z, rtol=0, atol=1e-14)
    noise = dpsgd.add_noise(torch.zeros(n, dtype=torch.float64), 1.0, 1.0,
                            torch.Generator().manual_seed(seed))
    assert not bool((noise.float().double() == noise).any())


def test_the_update_is_the_float64_noisy_sum_cast_once():
    """Three unclipped examples whose gradients are themselves: the gradient set is
    float32((sum + sigma C z) / qN), z the float64 normal, added before any rounding to float32."""
    d, sigma, clip, expected = 1000, 1.5, 1e3, 4.0
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(0))
    model = linear_model(d)
    got = grads_after_step(model, gradient_is_input, (x,), clip, sigma, expected,
                           torch.Generator().manual_seed(5))["weight"]
    z = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    want = ((x.double().sum(0) + sigma * clip * z) / expected).float()
    torch.testing.assert_close(got, want.view_as(got), rtol=2.0 ** -23, atol=0)


def test_empty_batch_takes_a_noise_only_step():
    # An empty Poisson batch still gets its noise (skipping it would reveal the batch was
    # empty): the gradient handed to the optimizer is exactly the generator's N(0, (sigma C)^2)
    # draw divided by qN, formed in float64 and cast to float32. (SGD at lr 0 leaves the grads
    # to read; under Adam any nonzero gradient would move the weights, which proves little.)
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = small_batch(0)
    sigma, clip, expected_batch = 1.5, 0.7, 8.0
    dpsgd.dp_step(model, optimizer, classification_loss, (x, y), clip, sigma, expected_batch,
                  torch.Generator().manual_seed(3), chunk_size=4)
    params = [p for p in model.parameters() if p.requires_grad]
    z = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    expected = ((0.0 + sigma * clip * z) / expected_batch).float()
    assert torch.equal(torch.cat([p.grad.flatten() for p in params]), expected)


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("layer", [nn.BatchNorm2d(8), nn.SyncBatchNorm(8),
                                   nn.InstanceNorm2d(8, track_running_stats=True)])
def test_layers_that_mix_examples_are_refused(layer):
    model = make_net()
    model.norm = layer
    x, y = small_batch(2)
    for call in (lambda: per_sample_grads(model, classification_loss, x, y),
                 lambda: dpsgd.dp_step(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                       classification_loss, (x, y), 1.0, 1.0, 2.0,
                                       torch.Generator())):
        with pytest.raises(ValueError, match="model: layer 'norm'") as err:
            call()
        assert "\n" not in str(err.value)


def test_a_bfloat16_groupnorm_under_autocast_is_refused_in_one_line():
    model = make_net()
    model.norm = nn.GroupNorm(2, 8)  # torch's own: bfloat16 under CPU autocast
    x, y = small_batch(2)
    for call in (lambda: per_sample_grads(model, classification_loss, x, y, autocast=True),
                 lambda: dpsgd.dp_step(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                       classification_loss, (x, y), 1.0, 1.0, 2.0,
                                       torch.Generator(), autocast=True)):
        with pytest.raises(ValueError, match="model: layer 'norm' .GroupNorm.") as err:
            call()
        assert "\n" not in str(err.value)
    per_sample_grads(model, classification_loss, x, y)  # without autocast it is fine


def test_per_example_layers_are_accepted_and_frozen_parameters_untouched():
    model = make_net()
    model.norm = nn.InstanceNorm2d(8)  # no running statistics: per example
    model.conv1.requires_grad_(False)
    x, y = small_batch(3)
    grads = per_sample_grads(model, classification_loss, x, y)
    assert "conv1.weight" not in grads and "head.weight" in grads
    grads_after_step(model, classification_loss, (x, y), 1.0, 1.0, 3.0,
                     torch.Generator().manual_seed(0))
    assert model.conv1.weight.grad is None


@pytest.mark.parametrize("kwargs, name", [(dict(clip_norm=0.0), "clip_norm"),
                                          # outside the normal float32 range (CLIP_NORM_RANGE)
                                          (dict(clip_norm=1e-39), "clip_norm"),
                                          (dict(clip_norm=1e39), "clip_norm"),
                                          (dict(clip_norm=math.inf), "clip_norm"),
                                          (dict(sigma=-1.0), "sigma"),
                                          (dict(expected_batch_size=0.0), "expected_batch_size"),
                                          (dict(chunk_size=0), "chunk_size")])
def test_dp_step_bad_arguments(kwargs, name):
    model, (x, y) = make_net(), small_batch(2)
    args = dict(clip_norm=1.0, sigma=1.0, expected_batch_size=2.0, chunk_size=4) | kwargs
    with pytest.raises(ValueError, match=name):
        dpsgd.dp_step(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                      (x, y), noise_generator=torch.Generator(), **args)
    with pytest.raises(ValueError, match="batch_tensors"):
        dpsgd.dp_step(model, torch.optim.SGD(model.parameters(), lr=0.1), classification_loss,
                      (x, y[:1]), 1.0, 1.0, 2.0, torch.Generator())
