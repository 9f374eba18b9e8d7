"""Tests for samplers.py: each sampler against a model that knows the answer, against Ho et
al.'s Algorithm 2 as printed, on Gaussian data with its exact eps (distribution and order of
convergence), guidance, batching, determinism for a seed, the uniform-label loop (its labels,
its batches, stopping and continuing it), and bad arguments."""
import dataclasses
import math

import pytest
import torch

import diffusion
import samplers
import settings
from conftest import randomise_output_layer, tiny_unet
from diffusion import DDPM

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


class OracleX0:
    """A model that knows the answer: its eps makes the predicted x0 equal to a constant image
    of brightness level[y]. Samplers must then return exactly that image (up to rounding)."""

    def __init__(self, ddpm, level):
        self.ddpm, self.level, self.calls = ddpm, level, []

    def __call__(self, x, t, y):
        self.calls.append(len(x))
        abar = self.ddpm.alphas_bar.to(x)[t].reshape(-1, 1, 1, 1)
        x0 = self.level.to(x)[y].reshape(-1, 1, 1, 1).expand_as(x)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()


def expected_uint8(v):
    return round((v + 1) * 127.5)


@pytest.mark.parametrize("steps, solver", [(None, "ddim"), (10, "ddim"), (10, "dpm2m")])
def test_samplers_return_the_oracle_image_for_each_label(steps, solver):
    ddpm = DDPM(num_steps=50, num_classes=3)
    level = torch.tensor([-0.8, 0.0, 0.6, 0.2])  # labels 0, 1, 2 and null
    labels = torch.tensor([2, 0, 1, 1, 0])
    out = samplers.sample(ddpm, OracleX0(ddpm, level), labels, torch.Generator().manual_seed(0),
                          steps=steps, image_shape=(1, 4, 4), solver=solver)
    assert out.dtype == torch.uint8 and out.shape == (5, 1, 4, 4)
    for image, y in zip(out, labels):
        assert (image.int() - expected_uint8(level[y].item())).abs().max() <= 1


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ancestral_sampler_is_algorithm_2_while_nothing_is_clipped(schedule):
    # Algorithm 2, line 4, as printed: x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps)
    # / sqrt(alpha_t) + sigma_t z, sigma_t^2 = beta_tilde_t (eq. 7), z = 0 at the last step. Our
    # sampler goes through x0_hat and eq. 7; with an eps whose x0_hat = 0.9 tanh(x_t) never needs
    # clipping, the two must agree to float64 round-off, noise draw for noise draw.
    ddpm = DDPM(50, schedule, num_classes=1)
    abar, beta = ddpm.alphas_bar, ddpm.betas

    def eps_model(x, t, y):
        a = abar[t].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * 0.9 * torch.tanh(x)) / (1 - a).sqrt()

    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    ours = samplers.ancestral(ddpm, eps_model, x_T, y, 0.0, torch.Generator().manual_seed(1))
    g, x = torch.Generator().manual_seed(1), x_T
    for t in reversed(range(50)):
        eps = eps_model(x, torch.full((3,), t), y)
        x = (x - beta[t] / (1 - abar[t]).sqrt() * eps) / (1 - beta[t]).sqrt()
        if t > 0:
            beta_tilde = beta[t] * (1 - abar[t - 1]) / (1 - abar[t])
            x = x + beta_tilde.sqrt() * torch.randn(x.shape, generator=g).double()
    assert torch.allclose(ours, x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [None, 1000])
def test_samplers_draw_gaussian_data_given_its_exact_eps(schedule, steps):
    # For data x0 ~ N(mu, s^2) per pixel the optimal eps is known in closed form:
    # eps*(x_t, t) = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar). Both samplers
    # with T steps must then return that distribution (the noise of the ancestral steps and the
    # coefficients of eq. 7 / DDIM eq. 12 all matter here, unlike for a constant-image oracle).
    # Tolerances: 0.01 on the mean (~6 standard errors) and 5 % on the standard deviation
    # (~9 standard errors; 1000 steps leave a discretisation bias of about 2 %).
    ddpm, mu, s = DDPM(1000, schedule, num_classes=1), 0.2, 0.3

    def exact_eps(x, t, y):
        abar = ddpm.alphas_bar.to(x)[t].reshape(-1, 1, 1, 1)
        return (1 - abar).sqrt() * (x - abar.sqrt() * mu) / (abar * s * s + 1 - abar)

    out = samplers.sample(ddpm, exact_eps, torch.zeros(2000, dtype=torch.long),
                          torch.Generator().manual_seed(0), steps=steps, image_shape=(1, 2, 2))
    x = out.double() / 127.5 - 1
    assert abs(x.mean().item() - mu) < 0.01
    assert abs(x.std().item() / s - 1) < 0.05


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_2m_is_second_order_where_ddim_is_first(schedule):
    # On Gaussian data with its exact eps (as above) both solvers integrate the same ODE from
    # the same x_T; DDIM on 1000 steps is the reference. Doubling the steps from 20 to 40 should
    # halve DDIM's error (first order) and cut 2M's by 4x or more (second order). Measured
    # (max abs error): DDIM 0.19 -> 0.095 (linear), 0.10 -> 0.050 (cosine); 2M 0.13 -> 0.023,
    # 0.026 -> 0.0015. (At 10 steps or fewer the last, first-order step over a long stretch of
    # the schedule dominates both.)
    ddpm, mu, s = DDPM(1000, schedule, num_classes=1), 0.2, 0.3

    def exact_eps(x, t, y):
        abar = ddpm.alphas_bar.to(x)[t].reshape(-1, 1, 1, 1)
        return (1 - abar).sqrt() * (x - abar.sqrt() * mu) / (abar * s * s + 1 - abar)

    x_T = torch.randn(200, 1, 2, 2, generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64)
    y = torch.zeros(200, dtype=torch.long)
    reference = samplers.ddim(ddpm, exact_eps, x_T, y, 0.0, 1000)
    error = {(solver.__name__, steps): (solver(ddpm, exact_eps, x_T, y, 0.0, steps) - reference)
             .abs().max().item()
             for solver in (samplers.ddim, samplers.dpm_solver_2m) for steps in (20, 40)}
    assert 1.6 < error[("ddim", 20)] / error[("ddim", 40)] < 2.5
    assert error[("dpm_solver_2m", 20)] / error[("dpm_solver_2m", 40)] > 3.5
    assert error[("dpm_solver_2m", 20)] < 0.8 * error[("ddim", 20)]
    assert error[("dpm_solver_2m", 40)] < error[("ddim", 40)] / 3


def test_dpm_solver_2m_with_three_steps_is_ddim():
    # Its first and last updates are first order, i.e. DDIM's: with 3 timesteps (2 updates)
    # nothing else is left; with 4, the middle update extrapolates.
    ddpm = DDPM(50, num_classes=1)
    eps_model = lambda x, t, y: 0.5 * torch.tanh(x) + 0.1  # noqa: E731
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    for steps in (2, 3, 4):
        two_m = samplers.dpm_solver_2m(ddpm, eps_model, x_T, y, 0.0, steps)
        ddim = samplers.ddim(ddpm, eps_model, x_T, y, 0.0, steps)
        assert torch.allclose(two_m, ddim, rtol=0, atol=1e-12) == (steps < 4)


def test_guidance_combines_conditional_and_unconditional_eps():
    # eps = (1 + w) eps_cond - w eps_uncond makes x0_hat = (1 + w) x0_cond - w x0_null.
    ddpm, w = DDPM(num_steps=50, num_classes=2), 0.5
    level = torch.tensor([0.4, -0.2, 0.1])
    model = OracleX0(ddpm, level)
    out = samplers.sample(ddpm, model, torch.tensor([0, 1, 1]), torch.Generator().manual_seed(0),
                          steps=5, guidance=w, image_shape=(1, 2, 2))
    for image, y in zip(out, [0, 1, 1]):
        target = (1 + w) * level[y].item() - w * level[2].item()
        assert (image.int() - expected_uint8(target)).abs().max() <= 1
    # w = 0: one conditional pass per step, no unconditional pass.
    model.calls.clear()
    samplers.sample(ddpm, model, torch.tensor([0, 1, 1]), torch.Generator(), steps=5,
                    image_shape=(1, 2, 2))
    assert model.calls == [3] * 5


def test_sampling_is_batched_with_bounded_memory():
    ddpm = DDPM(num_steps=20, num_classes=2)
    model = OracleX0(ddpm, torch.tensor([-0.5, 0.5, 0.0]))
    labels = torch.tensor([0, 1] * 5)
    out = samplers.sample(ddpm, model, labels, torch.Generator().manual_seed(0), steps=4,
                          guidance=1.0, batch_size=3, image_shape=(1, 2, 2))
    assert out.shape == (10, 1, 2, 2) and max(model.calls) <= 2 * 3
    out_one_batch = samplers.sample(ddpm, model, labels, torch.Generator().manual_seed(0),
                                    steps=4, guidance=1.0, image_shape=(1, 2, 2))
    assert torch.equal(out, out_one_batch)  # the oracle's answer does not depend on the noise


@pytest.mark.parametrize("steps", [None, 8])
def test_unet_sampler_is_deterministic_for_a_seed_and_respects_labels(steps):
    model = randomise_output_layer(tiny_unet(num_classes=3), seed=1)
    with torch.no_grad():  # make the labels matter a lot
        model.class_emb.weight.mul_(20)
    ddpm = DDPM(num_steps=30, num_classes=3)
    labels = torch.tensor([0, 1, 2, 0])
    def draw(labels, seed):
        return samplers.sample(ddpm, model, labels, torch.Generator().manual_seed(seed),
                               steps=steps, guidance=1.0)

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
    ddpm, n, batch = DDPM(num_steps=10, num_classes=4), 4000, 300
    level = torch.tensor([-0.9, -0.3, 0.3, 0.9, 0.0])  # labels 0..3 and null
    batches = list(samplers.sample_uniform(ddpm, OracleX0(ddpm, level), n,
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
    # draw the rest from that state. A UNet with a random output layer makes every image depend
    # on its noise, so any draw out of order shows; RGB and grayscale alike.
    model = randomise_output_layer(tiny_unet(channels, size, num_classes=3), seed=2)
    ddpm = DDPM(num_steps=20, num_classes=3)

    def loop(n, generator):
        return samplers.sample_uniform(ddpm, model, n, generator, batch_size=3, steps=2)

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
    # What train.py and sample.py hand to the sampler (samplers.settings_of): for a DDPM, 0
    # steps is the ancestral chain (one call per timestep), n steps n calls of the named solver;
    # guidance doubles the batch of each call.
    ddpm = DDPM(num_steps=20, num_classes=2)
    for steps, solver, guidance, calls in [(0, "ddim", 0.0, [3] * 20), (6, "ddim", 0.0, [3] * 6),
                                           (6, "dpm2m", 1.0, [6] * 6)]:
        model = OracleX0(ddpm, torch.tensor([-0.5, 0.5, 0.0]))
        cfg = dataclasses.replace(settings.TINY, formulation="ddpm", sample_steps=steps,
                                  solver=solver, guidance=guidance, churn=0.0, autocast=False)
        samplers.sample(ddpm, model, torch.tensor([0, 1, 1]), torch.Generator().manual_seed(0),
                        image_shape=(1, 2, 2), **samplers.settings_of(cfg))
        assert model.calls == calls, (steps, solver)
    # For EDM: Heun's 2 n - 1 calls, and its churn reaches the sampler (other images).
    edm = diffusion.EDM(num_classes=2)
    model = randomise_output_layer(tiny_unet(num_classes=2), seed=3)
    images = {}
    for churn in (0.0, 30.0):
        cfg = dataclasses.replace(settings.TINY, formulation="edm", sample_steps=4,
                                  solver="heun", churn=churn, autocast=False)
        images[churn] = samplers.sample(edm, model, torch.tensor([0, 1]),
                                        torch.Generator().manual_seed(0),
                                        **samplers.settings_of(cfg))
    assert not torch.equal(images[0.0], images[30.0])


def test_bad_sampling_arguments_raise():
    ddpm, model = DDPM(num_steps=10), tiny_unet()
    with pytest.raises(ValueError, match="image_shape"):
        samplers.sample(ddpm, lambda x, t, y: x, torch.tensor([0]), torch.Generator())
    for kwargs, word in [(dict(steps=0), "steps"), (dict(steps=11), "steps"),
                         (dict(guidance=-1.0), "guidance"),
                         (dict(guidance=math.nan), "guidance"),
                         (dict(guidance=math.inf), "guidance"),
                         (dict(steps=2, solver="euler"), "solver")]:
        with pytest.raises(ValueError, match=word):
            samplers.sample(ddpm, model, torch.tensor([0]), torch.Generator(), **kwargs)


# ------------------------------------------------------------------------------ EDM samplers

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


EDM_SOLVERS = [("ddim", samplers.euler), ("heun", samplers.heun),
               ("dpm2m", samplers.dpm_solver_2m_edm)]


def test_edm_noise_levels_are_eq_5():
    edm = diffusion.EDM()
    levels = samplers.noise_levels(edm, 18)
    assert len(levels) == 19 and levels[-1] == 0
    assert math.isclose(levels[0], 80.0) and math.isclose(levels[-2], 0.002)
    steps = torch.tensor(levels[:-1], dtype=torch.float64) ** (1 / 7)
    assert torch.allclose(steps.diff(), steps.diff()[0].expand(17), rtol=1e-9)  # even in sigma^(1/7)


@pytest.mark.parametrize("solver", [name for name, _ in EDM_SOLVERS])
@pytest.mark.parametrize("guidance", [0.0, 0.5])
def test_edm_samplers_return_the_oracle_image_for_each_label(solver, guidance):
    edm = diffusion.EDM(num_classes=3)
    level = torch.tensor([-0.4, 0.0, 0.6, 0.2])  # labels 0, 1, 2 and null
    model = OracleD(edm, lambda x, sigma, y: level.to(x)[y].reshape(-1, 1, 1, 1).expand_as(x))
    labels = torch.tensor([2, 0, 1, 1, 0])
    out = samplers.sample(edm, model, labels, torch.Generator().manual_seed(0), steps=6,
                          image_shape=(1, 4, 4), solver=solver, guidance=guidance)
    want = (1 + guidance) * level[labels] - guidance * level[3]
    for image, v in zip(out, want):
        assert (image.int() - expected_uint8(v.item())).abs().max() <= 1
    # network calls: one per step (two per Heun step but the last), twice with guidance
    passes = 2 * 6 - 1 if solver == "heun" else 6
    assert len(model.calls) == passes and set(model.calls) == {5 * (2 if guidance else 1)}


def test_edm_samplers_solve_the_ode_of_gaussian_data_to_their_order():
    # For data x0 ~ N(mu, s^2) per pixel the optimal denoiser is D(x; sigma) = mu + s^2 (x - mu)
    # / (s^2 + sigma^2), and the ODE dx/dsigma = (x - D) / sigma has the exact solution
    # x(0) = mu + s (x_T - mu) / sqrt(s^2 + sigma_max^2). Doubling the steps must halve Euler's
    # error (first order) and quarter Heun's and DPM-Solver++(2M)'s (second order).
    edm, mu, s = diffusion.EDM(num_classes=1), 0.2, 0.3
    model = OracleD(edm, lambda x, sigma, y: mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu))
    n = torch.randn(500, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.zeros(500, dtype=torch.long)
    exact = mu + s * (edm.sigma_max * n - mu) / math.sqrt(s ** 2 + edm.sigma_max ** 2)
    for name, solve in EDM_SOLVERS:
        error = [(solve(edm, model, n, y, 0.0, steps) - exact).abs().max().item()
                 for steps in (32, 64)]
        ratio = error[1] / error[0]
        print(f"{name}: error {error[0]:.2e} -> {error[1]:.2e} (ratio {ratio:.2f})")
        assert (0.4 < ratio < 0.6) if name == "ddim" else (ratio < 0.3), name


def test_edm_heun_with_churn_draws_from_the_data_distribution_and_its_generator():
    # Algorithm 2 re-noises x along the way (fresh draws from the generator): still the data's
    # law N(mu, s^2) for the exact denoiser, and the same draws for the same seed.
    edm, mu, s = diffusion.EDM(num_classes=1), 0.2, 0.3
    model = OracleD(edm, lambda x, sigma, y: mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu))
    labels = torch.zeros(4000, dtype=torch.long)

    def draw(seed, churn):
        g = torch.Generator().manual_seed(seed)
        x = samplers.noise_like(torch.empty(4000, 1, 1, 1, dtype=torch.float64), g)
        return samplers.heun(edm, model, x, labels, 0.0, 64, churn, g)

    a, b, c, plain = draw(1, 40.0), draw(1, 40.0), draw(2, 40.0), draw(1, 0.0)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
    assert abs(a.mean().item() - mu) < 0.03 and abs(a.std().item() - s) < 0.03


def test_edm_refuses_the_ancestral_sampler_and_ddpm_refuses_heun():
    with pytest.raises(ValueError, match="steps"):
        samplers.sample(diffusion.EDM(), tiny_unet(), torch.tensor([0]), torch.Generator())
    with pytest.raises(ValueError, match="heun"):
        samplers.sample(DDPM(num_steps=10), tiny_unet(), torch.tensor([0]), torch.Generator(),
                        steps=2, solver="heun")
