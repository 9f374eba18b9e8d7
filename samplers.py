"""Drawing images from a trained model: EDM's samplers, with classifier-free guidance.

They integrate the probability-flow ODE of diffusion.EDM, dx/dsigma = (x - D(x; sigma)) / sigma,
from x = sigma_max n down to sigma = 0, on Karras et al.'s noise levels (eq. 5):

* heun: Karras et al. 2022, Algorithm 1 (second order, 2 network calls a step but the last), and
  with churn S_churn > 0 their Algorithm 2, which re-adds noise on the way (the official code
  samples so, 1,000 steps at S_churn 10);
* dpm2m: DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 (second order, one call a step);
* ddim: Euler's steps, one call each (DDIM for EDM, the official code's "ddim").
Guidance (Ho & Salimans 2022): D = (1 + w) D(x; sigma, y) - w D(x; sigma, null), where null is
the label the model was trained to read as "no label" (EDM.num_classes).

`sample` draws images for given labels; `sample_uniform` is the one sampling loop of a release
(train.py's synthesis and sample.py): uniformly random labels, one batch at a time. The samplers'
own arithmetic is float64; the network sees float32. Sampling reads only the trained model: it
is post-processing and costs no privacy.
"""
import math

import torch
from torch import nn

from diffusion import to_uint8

SOLVERS = ("heun", "dpm2m", "ddim")
RHO = 7.0                  # eq. 5: spacing of the noise levels (Karras et al.'s choice)
CHURN_RANGE = (0.1, 50.0)  # Algorithm 2's S_min, S_max: where churn adds noise (the official code's)
MAX_STEPS = 1000           # steps at most (the official code's number)
# Images per network pass, the one batch size of sampling: on a 2-core CPU, 50 to 100 ran twice
# as fast per image as 500, whose activations no longer fit in the caches (measured on the DDPM
# this formulation replaced, the same network); a GPU wants large batches.
CPU_BATCH, GPU_BATCH = 100, 500


def settings_of(cfg):
    """The sampler's arguments from a run's settings (settings.Config)."""
    return dict(steps=cfg.sample_steps, guidance=cfg.guidance, autocast=cfg.autocast,
                solver=cfg.solver, churn=cfg.churn)


def sample_uniform(edm, model, n, generator, batch_size=None, **how):
    """Yield (images, labels): n images with uniformly random labels, one batch of batch_size
    (default: CPU_BATCH on a CPU, else GPU_BATCH) at a time, as uint8 [b, C, H, W] and int64
    [b] on the CPU. `how`: `sample`'s other arguments.

    A batch's labels are drawn only when it is asked for, just before its images, all from
    `generator`. So a caller that keeps the batches and the generator's state between two
    batches can stop, and continue later with sample_uniform(..., n - done, ...) from that
    state: it gets what one uninterrupted loop yields (train.py's synthesis resumes so)."""
    batch_size = batch_size or _default_batch_size(_device(model, generator.device))
    for start in range(0, n, batch_size):
        labels = torch.randint(edm.num_classes, (min(batch_size, n - start),),
                               generator=generator, device=generator.device)
        yield sample(edm, model, labels, generator, batch_size=batch_size, **how), labels.cpu()


def sample(edm, model, labels, generator, steps=18, guidance=0.0, batch_size=None,
           image_shape=None, autocast=False, solver="heun", churn=0.0):
    """Generate images for the given labels -> uint8 [n, C, H, W] on the CPU.

    edm: the diffusion.EDM the model was trained with (its noise levels and null label).
    labels: int64 [n]. steps: the number of noise levels of `solver` (heun, dpm2m or ddim);
    churn: heun's S_churn (0: deterministic). guidance: w >= 0, finite. image_shape (C, H, W)
    defaults to the UNet's. Memory is bounded by batch_size, the images per network pass
    (default: CPU_BATCH on a CPU, else GPU_BATCH). autocast: the network runs under bfloat16
    autocast (fast on CPUs with bf16 units and on GPUs). The noise comes from `generator`."""
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps: must be in 1..{MAX_STEPS}, got {steps}")
    if not (math.isfinite(guidance) and guidance >= 0):  # NaN would give black images
        raise ValueError(f"guidance: must be a finite number >= 0, got {guidance}")
    if solver not in SOLVERS:
        raise ValueError(f"solver: must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if image_shape is None:
        if not hasattr(model, "image_size"):
            raise ValueError("image_shape: required when the model is not a UNet")
        image_shape = (model.in_channels, model.image_size, model.image_size)
    device = _device(model, labels.device)
    batch_size = batch_size or _default_batch_size(device)

    def float_model(x, c_noise, y):  # float64 in the sampler, float32 (or bf16) in the network
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return model(x.float(), c_noise.float(), y).double()

    out = []
    with torch.inference_mode():
        for y in labels.to(device).split(batch_size):
            x = noise_like(torch.empty(len(y), *image_shape, dtype=torch.float64, device=device),
                           generator)
            if solver == "heun":
                x = heun(edm, float_model, x, y, guidance, steps, churn, generator)
            else:
                solve = euler if solver == "ddim" else dpm_solver_2m
                x = solve(edm, float_model, x, y, guidance, steps)
            out.append(to_uint8(x).cpu())
    return torch.cat(out)


def noise_levels(edm, steps, rho=RHO):
    """Karras et al. eq. 5: `steps` levels from sigma_max down to sigma_min, evenly spaced in
    sigma^(1/rho), then 0 (the last step lands on D)."""
    i = torch.arange(steps, dtype=torch.float64)
    first, last = edm.sigma_max ** (1 / rho), edm.sigma_min ** (1 / rho)
    sigmas = (first + i / max(steps - 1, 1) * (last - first)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).tolist()


def guided_denoise(edm, model, x, sigma, y, guidance):
    """D(x; sigma) with classifier-free guidance: (1 + w) D(x; sigma, y) - w D(x; sigma, null);
    w = 0 is one pass."""
    s = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
    if guidance == 0:
        return edm.denoise(model, x, s, y)
    null = torch.full_like(y, edm.num_classes)
    cond, uncond = edm.denoise(model, torch.cat([x, x]), torch.cat([s, s]),
                               torch.cat([y, null])).chunk(2)
    return (1 + guidance) * cond - guidance * uncond


def heun(edm, model, x, y, guidance, steps, churn=0.0, generator=None):
    """Karras et al. Algorithm 2 (with churn = 0: Algorithm 1, deterministic): Heun's second-order
    steps, 2 network calls each but the last (2 steps - 1 in all). churn S_churn > 0 first raises
    the noise level of x to sigma_hat = (1 + gamma) sigma with fresh noise, gamma =
    min(S_churn / steps, sqrt(2) - 1), at levels within CHURN_RANGE."""
    sigmas = noise_levels(edm, steps)
    x = x * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        gamma = min(churn / steps, math.sqrt(2) - 1) if CHURN_RANGE[0] <= s <= CHURN_RANGE[1] else 0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(s_hat ** 2 - s ** 2) * noise_like(x, generator)
        slope = (x - guided_denoise(edm, model, x, s_hat, y, guidance)) / s_hat
        x_next = x + (s_next - s_hat) * slope
        if s_next > 0:  # the correction; the step to sigma = 0 stays Euler's (it lands on D)
            slope_next = (x_next - guided_denoise(edm, model, x_next, s_next, y, guidance)) / s_next
            x_next = x + (s_next - s_hat) * (slope + slope_next) / 2
        x = x_next
    return x


def dpm_solver_2m(edm, model, x, y, guidance, steps):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) on EDM's noise levels: with alpha = 1 and
    lambda = -log sigma, a step is x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) D',
    D' = D for the first step (Euler's step), else extrapolated from the previous step's D along
    lambda: D' = (1 + 1/2r) D - (1/2r) D_prev, r = h_prev / h. One network call per step; the
    step to sigma = 0 lands on D."""
    sigmas = noise_levels(edm, steps)
    x = x * sigmas[0]
    d_prev = h_prev = None
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = guided_denoise(edm, model, x, s, y, guidance)
        if s_next == 0:
            return d
        h = math.log(s / s_next)
        extrapolated = d
        if d_prev is not None:
            r = h_prev / h
            extrapolated = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * d_prev
        x = s_next / s * x + (1 - s_next / s) * extrapolated
        d_prev, h_prev = d, h
    return x


def euler(edm, model, x, y, guidance, steps):
    """Euler steps of the ODE, one network call each: DDIM for EDM (the official code's "ddim")."""
    sigmas = noise_levels(edm, steps)
    x = x * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * (x - guided_denoise(edm, model, x, s, y, guidance)) / s
    return x


def noise_like(x, generator):
    """Standard normal noise shaped like x, drawn on the generator's device, so that a seed
    gives the same images on a CPU and a GPU."""
    return torch.randn(x.shape, generator=generator, device=generator.device).to(x)


def _device(model, otherwise):
    """Where the model's parameters are (a plain function has none: `otherwise`)."""
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    return params[0].device if params else torch.device(otherwise)


def _default_batch_size(device):
    return CPU_BATCH if device.type == "cpu" else GPU_BATCH
