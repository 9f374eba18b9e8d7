"""Tests for diffusion.py: UNet shapes and size, schedule, forward noising, the per-example loss,
per-example gradients under vmap, pixel range and the EMA (the samplers: test_samplers.py)."""
import math

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

import diffusion
from conftest import randomise_output_layer, tiny_unet
from diffusion import DDPM, EMA, UNet, count_parameters, make_unet


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


# ------------------------------------------------------------------------------ UNet

@pytest.mark.parametrize("size_name", ["paper", "small"])
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_unet_output_shape(size_name, channels, size):
    model = randomise_output_layer(make_unet(size_name, channels, size, 10))
    x = torch.randn(3, channels, size, size)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 9, 10]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_paper_size_has_about_1_5_million_parameters():
    # The official DP-FETA code's NCSN++ for 28x28 images has 1,485,217 parameters.
    n = count_parameters(make_unet("paper", 1, 28, 10))
    print(f"paper UNet: {n} parameters")
    assert abs(n - 1.5e6) <= 0.1 * 1.5e6


def test_output_layer_is_zero_initialised():
    model = make_unet("small", 1, 28, 10)
    out = model(torch.randn(2, 1, 28, 28), torch.tensor([3, 700]), torch.tensor([1, 10]))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("size_name", ["paper", "small"])
def test_no_layer_mixes_examples(size_name):
    model = make_unet(size_name, 1, 16, 10)
    for name, module in model.named_modules():
        assert not isinstance(module, (nn.modules.batchnorm._BatchNorm,
                                       nn.modules.instancenorm._InstanceNorm)), name
    # And functionally: changing the other examples of a batch leaves example 0's output alone.
    randomise_output_layer(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 16, 16, generator=g)
    t, y = torch.tensor([10, 200, 400, 900]), torch.tensor([1, 2, 3, 10])
    x_other = x.clone()
    x_other[1:] = torch.randn(3, 1, 16, 16, generator=g)
    with torch.no_grad():
        assert torch.allclose(model(x, t, y)[0], model(x_other, t, y)[0], atol=1e-6)


def test_unknown_size_and_bad_image_size_raise():
    with pytest.raises(ValueError, match="size"):
        make_unet("huge", 1, 28, 10)
    with pytest.raises(ValueError, match="image_size"):
        UNet(1, 30, 10, channel_mults=(1, 2, 2))


def test_class_label_changes_the_output():
    model = randomise_output_layer(tiny_unet())
    x, t = torch.randn(1, 1, 16, 16).repeat(2, 1, 1, 1), torch.tensor([100, 100])
    with torch.no_grad():
        out = model(x, t, torch.tensor([3, 10]))
    assert not torch.allclose(out[0], out[1])


# ------------------------------------------------------------------------------ schedule, noising

@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("num_steps", [1000, 50, 10])
def test_alpha_bar_strictly_decreasing_in_open_unit_interval(schedule, num_steps):
    ddpm = DDPM(num_steps, schedule)
    abar = ddpm.alphas_bar
    assert abar.dtype == torch.float64 and abar.shape == (num_steps,)
    assert (abar > 0).all() and (abar < 1).all()
    assert (abar[1:] < abar[:-1]).all()


def test_linear_schedule_matches_ho_et_al():
    # Ho et al. 2020, section 4: beta_1 = 1e-4 ... beta_T = 0.02, T = 1000, linear.
    betas = DDPM(1000, "linear").betas
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(betas[1:] - betas[:-1], torch.full((999,), (0.02 - 1e-4) / 999,
                                                             dtype=torch.float64))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("num_steps", [1000, 10])
def test_coefficient_tables_agree_with_eq4_and_bayes_rule(schedule, num_steps):
    ddpm = DDPM(num_steps, schedule)
    tables = {name: getattr(ddpm, name) for name in (
        "sqrt_alphas_bar", "sqrt_one_minus_alphas_bar", "posterior_coef_x0", "posterior_coef_xt",
        "posterior_std")}
    for name, table in tables.items():
        assert table.dtype == torch.float64 and table.device.type == "cpu", name
        assert table.shape == (num_steps,) and torch.isfinite(table).all(), name
    abar, beta = ddpm.alphas_bar, ddpm.betas
    abar_prev, alpha = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]]), 1 - beta
    close = lambda a, b: torch.allclose(a, b, rtol=1e-12, atol=1e-15)  # noqa: E731
    # eq. 4: the two coefficients are the square roots of abar_t and of 1 - abar_t
    assert close(ddpm.sqrt_alphas_bar ** 2, abar)
    assert close(ddpm.sqrt_one_minus_alphas_bar ** 2, 1 - abar)
    # Bayes' rule for x_{t-1} ~ N(sqrt(abar_{t-1}) x_0, (1 - abar_{t-1}) I) observed through
    # x_t = sqrt(alpha_t) x_{t-1} + N(0, beta_t I): precisions add up, and the mean weighs each
    # source by its precision. Derived here, not copied from eq. 7 (t >= 1; at t = 0, x_{t-1} is
    # x_0 itself).
    precision = 1 / (1 - abar_prev[1:]) + alpha[1:] / beta[1:]
    assert close(ddpm.posterior_std[1:] ** 2, 1 / precision)
    assert close(ddpm.posterior_coef_xt[1:], alpha[1:].sqrt() / beta[1:] / precision)
    assert close(ddpm.posterior_coef_x0[1:], abar_prev[1:].sqrt() / (1 - abar_prev[1:]) / precision)
    assert torch.allclose(ddpm.posterior_coef_x0[0], torch.tensor(1.0, dtype=torch.float64))
    assert ddpm.posterior_coef_xt[0] == 0 and ddpm.posterior_std[0] == 0
    # and averaging the posterior over x_t ~ q(x_t | x_0) gives back q(x_{t-1} | x_0)
    assert close(ddpm.posterior_coef_x0 + ddpm.posterior_coef_xt * abar.sqrt(), abar_prev.sqrt())
    assert close(ddpm.posterior_coef_xt ** 2 * (1 - abar) + ddpm.posterior_std ** 2, 1 - abar_prev)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_float32_noising_coefficients_are_rounded_once_from_float64(schedule):
    # sqrt(1 - abar_t) for abar_t near 1: computing 1 - abar_t in float32 loses digits (up to
    # 3e-4 relative at t = 0 for the cosine schedule); each coefficient must be its float64 value
    # rounded once to float32, which is within 2^-24 = 5.96e-8 relative.
    ddpm, t = DDPM(1000, schedule), torch.arange(1000)
    zeros, ones = torch.zeros(1000, 1, 1, 1), torch.ones(1000, 1, 1, 1)
    noise_coef = ddpm.q_sample(zeros, t, ones).flatten()
    mean_coef = ddpm.q_sample(ones, t, zeros).flatten()
    assert noise_coef.dtype == torch.float32
    torch.testing.assert_close(noise_coef.double(), (1 - ddpm.alphas_bar).sqrt(), rtol=6e-8, atol=0)
    torch.testing.assert_close(mean_coef.double(), ddpm.alphas_bar.sqrt(), rtol=6e-8, atol=0)


def test_forward_noising_mean_and_variance():
    # eq. 4: q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I). 20,000 draws per pixel; the
    # tolerances are 5 standard errors of the sample mean and of the sample variance.
    ddpm, n = DDPM(1000, "linear"), 20000
    g = torch.Generator().manual_seed(0)
    x0 = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4).expand(n, 1, 4, 4)
    for step in (0, 250, 999):
        t = torch.full((n,), step)
        xt = ddpm.q_sample(x0, t, torch.randn(n, 1, 4, 4, generator=g)).double()
        abar = ddpm.alphas_bar[step]
        mean_err = (xt.mean(0) - abar.sqrt() * x0[0].double()).abs().max()
        assert mean_err < 5 * math.sqrt((1 - abar) / n)
        rel_var_err = (xt.var(0) / (1 - abar) - 1).abs().max()
        assert rel_var_err < 5 * math.sqrt(2 / n)


def test_draw_inputs_shapes_and_label_dropout_rate():
    ddpm, g = DDPM(), torch.Generator().manual_seed(0)
    y = torch.randint(10, (20000,), generator=g)
    y_in, t, noise = ddpm.draw_inputs(y, 1, (1, 2, 2), g, p_uncond=0.1)
    assert y_in.shape == (20000,) and t.shape == (20000, 1) and noise.shape == (20000, 1, 1, 2, 2)
    dropped = y_in == 10
    assert torch.equal(y_in[~dropped], y[~dropped])
    assert abs(dropped.float().mean().item() - 0.1) < 5 * math.sqrt(0.1 * 0.9 / 20000)
    y_in, t, noise = ddpm.draw_inputs(y[:5], 3, (3, 8, 8), g, p_uncond=0.0)
    assert torch.equal(y_in, y[:5]) and t.shape == (5, 3) and noise.shape == (5, 3, 3, 8, 8)
    assert (ddpm.draw_inputs(y[:5], 2, (1, 4, 4), g, p_uncond=1.0)[0] == 10).all()
    for kwargs, word in [(dict(num_draws=0), "num_draws"), (dict(p_uncond=1.5), "p_uncond")]:
        with pytest.raises(ValueError, match=word):
            ddpm.draw_inputs(**{**dict(y=y[:5], num_draws=1, image_shape=(1, 4, 4),
                                       generator=g), **kwargs})


@pytest.mark.parametrize("dist", ["uniform", "noisy", "lognormal"])
def test_a_cpu_generator_serves_data_on_another_device(dist):
    # How train.py calls it: a CPU generator, the labels and the model elsewhere. "meta" stands in
    # for a GPU here (tensors without values): everything comes back on the data's device, the
    # generator advances exactly as for CPU data, and the schedule tables stay float64 on the CPU.
    ddpm = DDPM(timestep_dist=dist, num_classes=3)
    g_meta, g_cpu = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1, 2])
    y_in, t, noise = ddpm.draw_inputs(y.to("meta"), 2, (1, 16, 16), g_meta)
    ddpm.draw_inputs(y, 2, (1, 16, 16), g_cpu)
    assert {y_in.device.type, t.device.type, noise.device.type} == {"meta"}
    assert torch.equal(g_meta.get_state(), g_cpu.get_state())
    model = tiny_unet(num_classes=3).to("meta")
    loss = ddpm.loss(model, torch.empty(3, 1, 16, 16, device="meta"), y_in, t, noise)
    assert loss.device.type == "meta" and loss.shape == (3,) and loss.dtype == torch.float32
    assert ddpm.sqrt_alphas_bar.device.type == "cpu" and ddpm.alphas_bar.dtype == torch.float64


@pytest.mark.parametrize("dist", ["uniform", "noisy"])
def test_timestep_distribution_mean(dist):
    # uniform on 0..T-1: mean (T-1)/2. "noisy": P(t) proportional to t+1, so
    # E[t+1] = sum k^2 / sum k = (2T+1)/3. Tolerance: 5 standard errors.
    T, n = 1000, 50000
    ddpm = DDPM(T, timestep_dist=dist)
    t = ddpm.draw_inputs(torch.zeros(n, dtype=torch.long), 1, (1, 1, 1),
                         torch.Generator().manual_seed(0))[1].double()
    assert t.min() >= 0 and t.max() <= T - 1
    expected = (T - 1) / 2 if dist == "uniform" else (2 * T + 1) / 3 - 1
    assert abs(t.mean().item() - expected) < 5 * t.std().item() / math.sqrt(n)


def test_lognormal_timesteps_follow_edms_noise_level_law():
    # EDM's law: log sigma ~ N(-1.2, 1.2^2), with sigma_t = sqrt((1 - abar_t) / abar_t). So under
    # the timestep probabilities, the median and the quartiles of log sigma_t are the normal's,
    # up to one step of the schedule (the discretisation), and draws follow the probabilities.
    ddpm = DDPM(timestep_dist="lognormal")
    log_sigma = 0.5 * torch.log((1 - ddpm.alphas_bar) / ddpm.alphas_bar)
    cdf = ddpm.timestep_probs.cumsum(0)
    assert abs(cdf[-1].item() - 1) < 1e-12 and (ddpm.timestep_probs > 0).all()
    step = (log_sigma[1:] - log_sigma[:-1]).abs().max().item()
    for p, z in ((0.25, -0.6745), (0.5, 0.0), (0.75, 0.6745)):
        at = int(torch.searchsorted(cdf, torch.tensor(p, dtype=torch.float64)))
        assert abs(log_sigma[at].item() - (-1.2 + 1.2 * z)) <= step, (p, log_sigma[at])
    t = ddpm.draw_inputs(torch.zeros(50000, dtype=torch.long), 1, (1, 1, 1),
                         torch.Generator().manual_seed(0))[1].flatten()
    expected = (ddpm.timestep_probs * torch.arange(1000)).sum().item()
    assert abs(t.double().mean().item() - expected) < 5 * t.double().std().item() / 50000 ** 0.5


def test_bad_ddpm_arguments_raise():
    for kwargs, word in [(dict(schedule="quadratic"), "schedule"), (dict(num_steps=0), "num_steps"),
                         (dict(timestep_dist="edm"), "timestep_dist")]:
        with pytest.raises(ValueError, match=word):
            DDPM(**kwargs)


# ------------------------------------------------------------------------------ loss

def test_loss_is_per_example_eq14_and_averages_the_draws():
    model = randomise_output_layer(tiny_unet())
    ddpm, g = DDPM(), torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
    y_in, t, noise = ddpm.draw_inputs(torch.tensor([0, 1, 2, 3]), 3, (1, 16, 16), g)
    loss = ddpm.loss(model, x0, y_in, t, noise)
    assert loss.shape == (4,)
    # By hand, one draw at a time, straight from eq. 4 and eq. 14.
    abar = ddpm.alphas_bar.float()
    manual = torch.zeros(4)
    for k in range(3):
        tk, nk = t[:, k], noise[:, k]
        a = abar[tk].reshape(4, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * nk
        manual += ((model(xt, tk, y_in) - nk) ** 2).mean(dim=(1, 2, 3)) / 3
    assert torch.allclose(loss, manual, rtol=1e-5, atol=1e-6)


def test_loss_of_untrained_model_is_noise_power():
    # Zero output -> the loss is the mean of eps^2, close to 1 (here over 4 x 2 x 256 values).
    model, ddpm, g = make_unet("small", 1, 16, 10), DDPM(), torch.Generator().manual_seed(0)
    y_in, t, noise = ddpm.draw_inputs(torch.arange(4), 2, (1, 16, 16), g)
    loss = ddpm.loss(model, torch.zeros(4, 1, 16, 16), y_in, t, noise)
    assert torch.allclose(loss, (noise ** 2).mean(dim=(1, 2, 3, 4)))


def test_per_example_gradients_with_vmap_equal_a_loop():
    # How DP-SGD calls the loss: vmap over examples, each given back a batch dim of 1.
    # The small model on 16x16 images (same layers as for 28x28, a quarter of the work).
    model = randomise_output_layer(make_unet("small", 1, 16, 10))
    ddpm, g = DDPM(), torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    y_in, t, noise = ddpm.draw_inputs(torch.tensor([4, 5, 6]), 2, (1, 16, 16), g, p_uncond=0.5)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_one(params, x, y, tt, n):
        fmodel = lambda *args: functional_call(model, params, args)  # noqa: E731
        return ddpm.loss(fmodel, x[None], y[None], tt[None], n[None]).sum()

    batched = vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0))(params, x0, y_in, t, noise)
    for i in range(3):
        model.zero_grad()
        ddpm.loss(model, x0[i:i + 1], y_in[i:i + 1], t[i:i + 1], noise[i:i + 1]).sum().backward()
        for name, p in model.named_parameters():
            assert torch.allclose(batched[name][i], p.grad, rtol=1e-4, atol=1e-6), name


def test_overfitting_a_tiny_fixed_batch_drives_the_loss_down():
    torch.manual_seed(0)  # weight initialisation
    model, ddpm, g = tiny_unet(), DDPM(), torch.Generator().manual_seed(0)
    x0 = torch.zeros(4, 1, 16, 16)
    x0[0, :, 4:12, 7:9] = 1.0   # a bar, a square, a cross, a frame
    x0[1, :, 4:12, 4:12] = 1.0
    x0[2, :, 7:9, :] = x0[2, :, :, 7:9] = 1.0
    x0[3, :, 2:14, 2:14], x0[3, :, 4:12, 4:12] = 1.0, 0.0
    x0 = x0 * 2 - 1
    y_in, t, noise = ddpm.draw_inputs(torch.arange(4), 2, (1, 16, 16), g, p_uncond=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = ddpm.loss(model, x0, y_in, t, noise).mean().item()
    for _ in range(30):
        loss = ddpm.loss(model, x0, y_in, t, noise).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last = ddpm.loss(model, x0, y_in, t, noise).mean().item()
    print(f"overfit: loss {first:.3f} -> {last:.3f}")
    assert last < 0.5 * first


# ------------------------------------------------------------------------------ EDM

def test_edm_preconditioning_is_table_1_and_gives_unit_variance_inputs_and_targets():
    edm = diffusion.EDM()
    sd = math.sqrt(1 / 3)  # the official code's sigma_data
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 5.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.preconditioning(sigma)
    torch.testing.assert_close(c_skip, sd ** 2 / (sigma ** 2 + sd ** 2))
    torch.testing.assert_close(c_out, sigma * sd / (sigma ** 2 + sd ** 2).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma ** 2 + sd ** 2).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # Why these (Karras et al. eqs. 4-8): for data of standard deviation sigma_data, the network
    # input c_in (x0 + sigma n) and the training target (x0 - c_skip x) / c_out have variance 1
    # at every noise level.
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(200000, generator=g, dtype=torch.float64) * 2 - 1)  # uniform: std sd
    n = torch.randn(200000, generator=g, dtype=torch.float64)
    for s, skip, out, inp in zip(sigma, c_skip, c_out, c_in):
        x = x0 + s * n
        assert abs((inp * x).var().item() - 1) < 0.02
        assert abs(((x0 - skip * x) / out).var().item() - 1) < 0.02


def test_edm_loss_is_the_weighted_denoising_loss_averaged_over_draws():
    # eq. 2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2, by hand from denoise (eq. 7).
    model = randomise_output_layer(tiny_unet())
    edm, g = diffusion.EDM(), torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
    y_in, sigma, noise = edm.draw_inputs(torch.tensor([0, 1, 2, 3]), 3, (1, 16, 16), g)
    loss = edm.loss(model, x0, y_in, sigma, noise)
    assert loss.shape == (4,)
    sd2 = edm.sigma_data ** 2
    manual = torch.zeros(4)
    for k in range(3):
        s, nk = sigma[:, k], noise[:, k]
        weight = (s ** 2 + sd2) / (s ** 2 * sd2)
        denoised = edm.denoise(model, x0 + s.reshape(4, 1, 1, 1) * nk, s, y_in)
        manual += weight * ((denoised - x0) ** 2).mean(dim=(1, 2, 3)) / 3
    assert torch.allclose(loss, manual, rtol=1e-4, atol=1e-6)


def test_edm_draws_lognormal_noise_levels_and_drops_labels():
    edm, g = diffusion.EDM(num_classes=10), torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat(2000)
    y_in, sigma, noise = edm.draw_inputs(y, 2, (1, 2, 2), g, p_uncond=0.1)
    assert sigma.shape == (20000, 2) and noise.shape == (20000, 2, 1, 2, 2)
    log_sigma = sigma.log()
    assert abs(log_sigma.mean().item() + 1.2) < 0.03 and abs(log_sigma.std().item() - 1.2) < 0.03
    dropped = y_in == 10
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert torch.equal(y_in[~dropped], y[~dropped])


@pytest.mark.parametrize("formulation", diffusion.FORMULATIONS)
def test_per_example_gradients_with_vmap_equal_a_loop_for_each_formulation(formulation):
    model = randomise_output_layer(tiny_unet())
    process = diffusion.make_diffusion(formulation, 10)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    y_in, level, noise = process.draw_inputs(torch.tensor([4, 5, 6]), 2, (1, 16, 16), g,
                                             p_uncond=0.5)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_one(params, x, y, tt, n):
        fmodel = lambda *args: functional_call(model, params, args)  # noqa: E731
        return process.loss(fmodel, x[None], y[None], tt[None], n[None]).sum()

    batched = vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0))(params, x0, y_in, level, noise)
    for i in range(3):
        model.zero_grad()
        process.loss(model, x0[i:i + 1], y_in[i:i + 1], level[i:i + 1],
                     noise[i:i + 1]).sum().backward()
        for name, p in model.named_parameters():
            assert torch.allclose(batched[name][i], p.grad, rtol=1e-4, atol=1e-6), name


def test_unknown_formulation_is_refused():
    with pytest.raises(ValueError, match="formulation"):
        diffusion.make_diffusion("score", 10)


# ------------------------------------------------------------------------------ pixel range

def test_pixel_range_round_trips_all_256_values():
    u = torch.arange(256).to(torch.uint8)
    x = diffusion.to_model_range(u)
    assert x.dtype == torch.float32 and x[0] == -1 and x[255] == 1
    assert (x[1:] > x[:-1]).all()
    assert torch.allclose((x.double() + 1) * 127.5, u.double(), rtol=0, atol=1e-4)  # affine
    assert torch.equal(diffusion.to_uint8(x), u)
    # float images in [0, 1] take the same path, whatever their precision
    assert torch.equal(diffusion.to_model_range(u.float() / 255), x)
    assert torch.allclose(diffusion.to_model_range(u.double() / 255), x, rtol=0, atol=1e-7)
    assert diffusion.to_model_range(u.double() / 255).dtype == torch.float32
    assert diffusion.to_model_range(u.reshape(4, 1, 8, 8)).shape == (4, 1, 8, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_to_uint8_clamps_then_rounds_to_the_nearest_level(dtype):
    x = torch.tensor([-3.0, -1.0, 1.0, 2.5, float("inf"), float("-inf")], dtype=dtype)
    assert torch.equal(diffusion.to_uint8(x), torch.tensor([0, 0, 255, 255, 255, 0],
                                                           dtype=torch.uint8))
    k = torch.arange(255, dtype=torch.float64)
    below = ((k + 0.45) / 127.5 - 1).to(dtype)  # closer to level k
    above = ((k + 0.55) / 127.5 - 1).to(dtype)  # closer to level k + 1
    assert torch.equal(diffusion.to_uint8(below), k.to(torch.uint8))
    assert torch.equal(diffusion.to_uint8(above), (k + 1).to(torch.uint8))


def test_pixel_range_bad_input_is_one_line_naming_it():
    for call, word in [(lambda: diffusion.to_model_range(torch.arange(3)), "images"),
                       (lambda: diffusion.to_model_range(torch.tensor([0.5, 255.0])), "images"),
                       (lambda: diffusion.to_model_range(torch.tensor([-0.1, 0.5])), "images"),
                       (lambda: diffusion.to_model_range(torch.tensor([float("nan")])), "images"),
                       (lambda: diffusion.to_uint8(torch.arange(3).to(torch.uint8)), "x")]:
        with pytest.raises(ValueError) as error:
            call()
        assert str(error.value).startswith(word + ":") and "\n" not in str(error.value)


# ------------------------------------------------------------------------------ EMA

def test_ema_update_and_state_dict():
    model = tiny_unet()
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, p in model.named_parameters():
        expected = 0.9 * before[name] + 0.1 * p.detach()
        assert torch.allclose(ema.model.state_dict()[name], expected, atol=1e-6), name
    assert all(not p.requires_grad for p in ema.model.parameters())
    restored = EMA(tiny_unet(), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9
    for name, v in ema.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[name], v)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)

