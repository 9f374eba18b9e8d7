"""Tests for diffusion.py: EDM's preconditioning, noise levels and per-example loss, per-example
gradients under vmap, the UNet's shapes and size, the pixel range and the EMA (the samplers:
test_samplers.py)."""
import math
import os

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

import diffusion
from conftest import randomise_output_layer, tiny_unet
from diffusion import EDM, EMA, UNet, count_parameters, make_unet


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


# ------------------------------------------------------------------------------ UNet

@pytest.mark.parametrize("size_name", sorted(diffusion.MODEL_SIZES))
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_unet_output_shape(size_name, channels, size):
    model = randomise_output_layer(make_unet(size_name, channels, size, 10))
    x = torch.randn(3, channels, size, size)
    out = model(x, torch.tensor([-1.5, 0.0, 1.1]), torch.tensor([0, 9, 10]))  # c_noise, labels
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_paper_size_has_about_1_5_million_parameters():
    # The official DP-FETA code's NCSN++ for 28x28 images has 1,485,217 parameters.
    n = count_parameters(make_unet("paper", 1, 28, 10))
    print(f"paper UNet: {n} parameters")
    assert abs(n - 1.5e6) <= 0.1 * 1.5e6


def test_the_readme_states_the_unets_sizes_as_counted():
    # One number for each UNet's size, counted rather than written from memory.
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")) as f:
        readme = f.read()
    for size in ("paper", "small"):
        assert f"{count_parameters(make_unet(size, 1, 28, 10)):,} parameters" in readme, size


def test_output_layer_is_zero_initialised():
    model = make_unet("small", 1, 28, 10)
    out = model(torch.randn(2, 1, 28, 28), torch.tensor([-1.0, 0.5]), torch.tensor([1, 10]))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("size_name", sorted(diffusion.MODEL_SIZES))
def test_no_layer_mixes_examples(size_name):
    model = make_unet(size_name, 1, 16, 10)
    for name, module in model.named_modules():
        assert not isinstance(module, (nn.modules.batchnorm._BatchNorm,
                                       nn.modules.instancenorm._InstanceNorm)), name
    # And functionally: changing the other examples of a batch leaves example 0's output alone.
    randomise_output_layer(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 16, 16, generator=g)
    t, y = torch.tensor([-1.4, -0.5, 0.2, 1.0]), torch.tensor([1, 2, 3, 10])
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
    x, t = torch.randn(1, 1, 16, 16).repeat(2, 1, 1, 1), torch.tensor([-0.3, -0.3])
    with torch.no_grad():
        out = model(x, t, torch.tensor([3, 10]))
    assert not torch.allclose(out[0], out[1])


# ------------------------------------------------------------------------------ EDM

def test_edm_preconditioning_is_table_1_and_gives_unit_variance_inputs_and_targets():
    edm = EDM()
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
    edm, g = EDM(), torch.Generator().manual_seed(0)
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
    edm, g = EDM(num_classes=10), torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat(2000)
    y_in, sigma, noise = edm.draw_inputs(y, 2, (1, 2, 2), g, p_uncond=0.1)
    assert sigma.shape == (20000, 2) and noise.shape == (20000, 2, 1, 2, 2)
    log_sigma = sigma.log()
    assert abs(log_sigma.mean().item() + 1.2) < 0.03 and abs(log_sigma.std().item() - 1.2) < 0.03
    dropped = y_in == 10
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert torch.equal(y_in[~dropped], y[~dropped])


def test_per_example_gradients_with_vmap_equal_a_loop():
    # How DP-SGD calls the loss: vmap over examples, each given back a batch dim of 1.
    model = randomise_output_layer(tiny_unet())
    process = EDM()
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


def test_edm_draw_inputs_checks_its_arguments_and_serves_data_on_another_device():
    # How train.py calls it: a CPU generator, the labels and the model elsewhere. "meta" stands in
    # for a GPU here (tensors without values): everything comes back on the data's device and the
    # generator advances exactly as for CPU data.
    edm = EDM(num_classes=3)
    g_meta, g_cpu = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1, 2])
    y_in, sigma, noise = edm.draw_inputs(y.to("meta"), 2, (1, 16, 16), g_meta)
    edm.draw_inputs(y, 2, (1, 16, 16), g_cpu)
    assert {y_in.device.type, sigma.device.type, noise.device.type} == {"meta"}
    assert torch.equal(g_meta.get_state(), g_cpu.get_state())
    model = tiny_unet(num_classes=3).to("meta")
    loss = edm.loss(model, torch.empty(3, 1, 16, 16, device="meta"), y_in, sigma, noise)
    assert loss.device.type == "meta" and loss.shape == (3,) and loss.dtype == torch.float32
    assert (edm.draw_inputs(y, 2, (1, 4, 4), g_cpu, p_uncond=1.0)[0] == 3).all()
    for kwargs, word in [(dict(num_draws=0), "num_draws"), (dict(p_uncond=1.5), "p_uncond")]:
        with pytest.raises(ValueError, match=word):
            edm.draw_inputs(**{**dict(y=y, num_draws=1, image_shape=(1, 4, 4),
                                      generator=g_cpu), **kwargs})


def test_overfitting_a_tiny_fixed_batch_drives_the_loss_down():
    torch.manual_seed(0)  # weight initialisation
    model, edm, g = tiny_unet(), EDM(), torch.Generator().manual_seed(0)
    x0 = torch.zeros(4, 1, 16, 16)
    x0[0, :, 4:12, 7:9] = 1.0   # a bar, a square, a cross, a frame
    x0[1, :, 4:12, 4:12] = 1.0
    x0[2, :, 7:9, :] = x0[2, :, :, 7:9] = 1.0
    x0[3, :, 2:14, 2:14], x0[3, :, 4:12, 4:12] = 1.0, 0.0
    x0 = x0 * 2 - 1
    y_in, sigma, noise = edm.draw_inputs(torch.arange(4), 2, (1, 16, 16), g, p_uncond=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = edm.loss(model, x0, y_in, sigma, noise).mean().item()
    for _ in range(100):
        loss = edm.loss(model, x0, y_in, sigma, noise).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last = edm.loss(model, x0, y_in, sigma, noise).mean().item()
    print(f"overfit: loss {first:.3f} -> {last:.3f}")
    assert last < 0.5 * first


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

