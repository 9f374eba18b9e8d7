"""Tests for samplers.py: each sampler against a model that knows the answer (through EDM's
preconditioning), on Gaussian data whose ODE has a closed-form solution (order of convergence,
churn's law), guidance, batching, determinism for a seed, the uniform-label loop (its labels,
its batches, stopping and continuing it), a run's settings, and bad arguments."""
import dataclasses
import math

import pytest
import torch

import samplers
import settings
from conftest import randomise_output_layer, tiny_unet
from diffusion import EDM

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def expected_uint8(v):
    return round((v + 1) * 127.5)


def constant_images(edm, level):
    """OracleD whose D is the constant image of brightness level[y], for each label y."""
    return OracleD(edm, lambda x, sigma, y: level.to(x)[y].reshape(-1, 1, 1, 1).expand_as(x))


class OracleD:
    """An EDM network that knows the answer: through EDM's preconditioning its output makes
    D(x; sigma, y) = denoised(x, sigma, y) exactly (it reads sigma back from c_noise and x from
    c_in x)."""

    def __init__(self, edm, denoised):
        self.edm, self.denoised, self.calls = edm, denoised, []

    def __call__(self, scaled_x, c_noise, y):
        self.calls.append(len(scaled_x))
        sigma = (4 * c_noise).exp().to(scaled_x).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = self.edm.preconditioning(sigma)
        x = scaled_x / c_in
        return (self.denoised(x, sigma, y) - c_skip * x) / c_out


SOLVERS = [("ddim", samplers.euler), ("heun", samplers.heun), ("dpm2m", samplers.dpm_solver_2m)]


def test_noise_levels_are_eq_5():
    edm = EDM()
    levels = samplers.noise_levels(edm, 18)
    assert len(levels) == 19 and levels[-1] == 0
    assert math.isclose(levels[0], 80.0) and math.isclose(levels[-2], 0.002)
    steps = torch.tensor(levels[:-1], dtype=torch.float64) ** (1 / 7)
    assert torch.allclose(steps.diff(), steps.diff()[0].expand(17), rtol=1e-9)  # even in sigma^(1/7)


@pytest.mark.parametrize("solver", [name for name, _ in SOLVERS])
@pytest.mark.parametrize("guidance", [0.0, 0.5])
def test_samplers_return_the_oracle_image_for_each_label(solver, guidance):
    edm = EDM(num_classes=3)
    level = torch.tensor([-0.4, 0.0, 0.6, 0.2])  # labels 0, 1, 2 and null
    model = constant_images(edm, level)
    labels = torch.tensor([2, 0, 1, 1, 0])
    out = samplers.sample(edm, model, labels, torch.Generator().manual_seed(0), steps=6,
                          image_shape=(1, 4, 4), solver=solver, guidance=guidance)
    want = (1 + guidance) * level[labels] - guidance * level[3]
    for image, v in zip(out, want):
        assert (image.int() - expected_uint8(v.item())).abs().max() <= 1
    # network calls: one per step (two per Heun step but the last), twice with guidance
    passes = 2 * 6 - 1 if solver == "heun" else 6
    assert len(model.calls) == passes and set(model.calls) == {5 * (2 if guidance else 1)}


def test_samplers_solve_the_ode_of_gaussian_data_to_their_order():
    # For data x0 ~ N(mu, s^2) per pixel the optimal denoiser is D(x; sigma) = mu + s^2 (x - mu)
    # / (s^2 + sigma^2), and the ODE dx/dsigma = (x - D) / sigma has the exact solution
    # x(0) = mu + s (x_T - mu) / sqrt(s^2 + sigma_max^2). Doubling the steps must halve Euler's
    # error (first order) and quarter Heun's and DPM-Solver++(2M)'s (second order).
    edm, mu, s = EDM(num_classes=1), 0.2, 0.3
    model = OracleD(edm, lambda x, sigma, y: mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu))
    n = torch.randn(500, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.zeros(500, dtype=torch.long)
    exact = mu + s * (edm.sigma_max * n - mu) / math.sqrt(s ** 2 + edm.sigma_max ** 2)
    for name, solve in SOLVERS:
        error = [(solve(edm, model, n, y, 0.0, steps) - exact).abs().max().item()
                 for steps in (32, 64)]
        ratio = error[1] / error[0]
        print(f"{name}: error {error[0]:.2e} -> {error[1]:.2e} (ratio {ratio:.2f})")
        assert (0.4 < ratio < 0.6) if name == "ddim" else (ratio < 0.3), name


def test_heun_with_churn_draws_from_the_data_distribution_and_its_generator():
    # Algorithm 2 re-noises x along the way (fresh draws from the generator): still the data's
    # law N(mu, s^2) for the exact denoiser, and the same draws for the same seed.
    edm, mu, s = EDM(num_classes=1), 0.2, 0.3
    model = OracleD(edm, lambda x, sigma, y: mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu))
    labels = torch.zeros(4000, dtype=torch.long)

    def draw(seed, churn):
        g = torch.Generator().manual_seed(seed)
        x = samplers.noise_like(torch.empty(4000, 1, 1, 1, dtype=torch.float64), g)
        return samplers.heun(edm, model, x, labels, 0.0, 64, churn, g)

    a, b, c, plain = draw(1, 40.0), draw(1, 40.0), draw(2, 40.0), draw(1, 0.0)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
    assert abs(a.mean().item() - mu) < 0.03 and abs(a.std().item() - s) < 0.03


def test_sampling_is_batched_with_bounded_memory():
    edm = EDM(num_classes=2)
    model = constant_images(edm, torch.tensor([-0.5, 0.5, 0.0]))
    labels = torch.tensor([0, 1] * 5)
    out = samplers.sample(edm, model, labels, torch.Generator().manual_seed(0), steps=4,
                          guidance=1.0, batch_size=3, image_shape=(1, 2, 2))
    assert out.shape == (10, 1, 2, 2) and max(model.calls) <= 2 * 3
    out_one_batch = samplers.sample(edm, model, labels, torch.Generator().manual_seed(0),
                                    steps=4, guidance=1.0, image_shape=(1, 2, 2))
    assert torch.equal(out, out_one_batch)  # the oracle's answer does not depend on the noise


@pytest.mark.parametrize("solver, churn", [("heun", 0.0), ("heun", 20.0), ("dpm2m", 0.0)])
def test_unet_sampler_is_deterministic_for_a_seed_and_respects_labels(solver, churn):
    model = randomise_output_layer(tiny_unet(num_classes=3), seed=1)
    with torch.no_grad():  # make the labels matter a lot
        model.class_emb.weight.mul_(20)
    edm = EDM(num_classes=3)
    labels = torch.tensor([0, 1, 2, 0])

    def draw(labels, seed):
        return samplers.sample(edm, model, labels, torch.Generator().manual_seed(seed), steps=6,
                               guidance=1.0, solver=solver, churn=churn)

    a, b, c = draw(labels, 7), draw(labels, 7), draw(labels, 8)
    assert a.shape == (4, 1, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Same noise (same seed), other labels -> other images.
    d = draw(torch.tensor([1, 2, 0, 1]), 7)
    assert all(not torch.equal(a[i], d[i]) for i in range(4))


def test_sample_uniform_draws_every_label_equally_often_and_pairs_it_with_its_image():
    # The oracle turns label y into a constant image of brightness level[y], so each image
    # tells which label it was drawn for. 4,000 labels in 4 classes, in batches of 300: a
    # chi-square test of uniformity with 3 degrees of freedom (P(chi2 > 21.1) = 1e-4). Labels
    # drawn from 0..K (the null label included) or from fewer classes fail it by far.
    edm, n, batch = EDM(num_classes=4), 4000, 300
    level = torch.tensor([-0.9, -0.3, 0.3, 0.9, 0.0])  # labels 0..3 and null
    batches = list(samplers.sample_uniform(edm, constant_images(edm, level), n,
                                           torch.Generator().manual_seed(0), batch_size=batch,
                                           steps=2, image_shape=(1, 1, 1)))
    assert [len(labels) for _, labels in batches] == [batch] * (n // batch) + [n % batch]
    images = torch.cat([images for images, _ in batches])
    labels = torch.cat([labels for _, labels in batches])
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    images = images.flatten().int()
    expected = torch.tensor([expected_uint8(v) for v in level.tolist()])[labels]
    assert (images - expected).abs().max() <= 1
    counts = torch.bincount(labels, minlength=5).double()
    assert counts[4] == 0  # never the null label
    chi2 = ((counts[:4] - n / 4) ** 2 / (n / 4)).sum().item()
    assert chi2 < 21.1, counts


@pytest.mark.parametrize("channels, size", [(1, 16), (3, 32)])
def test_sample_uniform_stopped_between_batches_continues_as_one_loop(channels, size):
    # How train.py's synthesis resumes: keep the batches done and the generator's state, then
    # draw the rest from that state. A UNet with a random output layer and Heun's churn make
    # every image depend on its noise, so any draw out of order shows; RGB and grayscale alike.
    model = randomise_output_layer(tiny_unet(channels, size, num_classes=3), seed=2)
    edm = EDM(num_classes=3)

    def loop(n, generator):
        return samplers.sample_uniform(edm, model, n, generator, batch_size=3, steps=3,
                                       churn=20.0)

    whole = list(loop(7, torch.Generator().manual_seed(5)))
    g = torch.Generator().manual_seed(5)
    stopped = loop(7, g)
    first = next(stopped)
    stopped.close()  # stopped after one batch: the rest is never drawn from g
    rest = list(loop(7 - len(first[1]), torch.Generator().set_state(g.get_state())))
    assert len(whole) == 1 + len(rest) == 3
    for (images_a, labels_a), (images_b, labels_b) in zip(whole, [first] + rest, strict=True):
        assert images_a.shape == (len(labels_a), channels, size, size)
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    images = torch.cat([images for images, _ in whole]).float()
    assert images.std() > 10  # images, not a constant
    if channels == 3:  # three channels of their own, not one repeated
        assert not torch.equal(images[:, 0], images[:, 1])
        assert not torch.equal(images[:, 1], images[:, 2])


def test_a_runs_sampler_settings_choose_the_sampler():
    # What train.py and sample.py hand to the sampler (samplers.settings_of): n steps are n
    # network calls of DPM-Solver++(2M) or Euler, 2 n - 1 of Heun; guidance doubles each call's
    # batch; and Heun's churn reaches the sampler (other images from the same seed).
    edm = EDM(num_classes=2)
    for steps, solver, guidance, calls in [(6, "ddim", 0.0, [3] * 6), (6, "dpm2m", 1.0, [6] * 6),
                                           (4, "heun", 0.0, [3] * 7)]:
        model = constant_images(edm, torch.tensor([-0.5, 0.5, 0.0]))
        cfg = dataclasses.replace(settings.TINY, sample_steps=steps, solver=solver,
                                  guidance=guidance, churn=0.0, autocast=False)
        samplers.sample(edm, model, torch.tensor([0, 1, 1]), torch.Generator().manual_seed(0),
                        image_shape=(1, 2, 2), **samplers.settings_of(cfg))
        assert model.calls == calls, (steps, solver)
    model = randomise_output_layer(tiny_unet(num_classes=2), seed=3)
    images = {}
    for churn in (0.0, 30.0):
        cfg = dataclasses.replace(settings.TINY, sample_steps=4, solver="heun", churn=churn,
                                  autocast=False)
        images[churn] = samplers.sample(edm, model, torch.tensor([0, 1]),
                                        torch.Generator().manual_seed(0),
                                        **samplers.settings_of(cfg))
    assert not torch.equal(images[0.0], images[30.0])


def test_bad_sampling_arguments_raise():
    edm, model = EDM(), tiny_unet()
    with pytest.raises(ValueError, match="image_shape"):
        samplers.sample(edm, lambda x, t, y: x, torch.tensor([0]), torch.Generator())
    for kwargs, word in [(dict(steps=0), "steps"), (dict(steps=1001), "steps"),
                         (dict(guidance=-1.0), "guidance"),
                         (dict(guidance=math.nan), "guidance"),
                         (dict(guidance=math.inf), "guidance"),
                         (dict(steps=2, solver="euler"), "solver")]:
        with pytest.raises(ValueError, match=word):
            samplers.sample(edm, model, torch.tensor([0]), torch.Generator(), **kwargs)
