"""Drawing images from a trained diffusion model: three samplers with classifier-free guidance.

* ancestral: Ho et al. 2020, Algorithm 2 (T network calls, a fresh noise draw per step);
* ddim: Song, Meng & Ermon 2021, eq. 12 with eta = 0 (deterministic, any number of steps);
* dpm2m: DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 (the same ODE as DDIM, second order).
Guidance (Ho & Salimans 2022): eps = (1 + w) eps(x, y) - w eps(x, null), where null is the label
the model was trained to read as "no label" (DDPM.num_classes).

`sample` draws images for given labels; `sample_uniform` is the one sampling loop of a release
(train.py's synthesis and sample.py): uniformly random labels, one batch at a time. The samplers
work on float64 x with a Python int t, so table[t] of a DDPM's float64 schedule is a 0-dim CPU
tensor, which torch applies to x on any device as a scalar.
Sampling reads only the trained model: it is post-processing and costs no privacy.
"""
import math

import torch
from torch import nn

from diffusion import EDM, to_uint8

SOLVERS = ("ddim", "dpm2m", "heun")
# Images per network pass, the one batch size of sampling: on a 2-core CPU, 50 to 100 ran twice
# as fast per image as 500, whose activations no longer fit in the caches
# (bench/sampling_speed.py); a GPU wants large batches.
CPU_BATCH, GPU_BATCH = 100, 500
MAX_STEPS = 1000  # EDM's sampler steps at most (the official code's number)


def settings_of(cfg):
    """The sampler's arguments from a run's settings (settings.Config), where 0 steps means the
    ancestral sampler."""
    return dict(steps=cfg.sample_steps or None, guidance=cfg.guidance, autocast=cfg.autocast,
                solver=cfg.solver, churn=cfg.churn)


def sample_uniform(ddpm, model, n, generator, batch_size=None, **how):
    """Yield (images, labels): n images with uniformly random labels, one batch of batch_size
    (default: CPU_BATCH on a CPU, else GPU_BATCH) at a time, as uint8 [b, C, H, W] and int64
    [b] on the CPU. `how`: `sample`'s other arguments.

    A batch's labels are drawn only when it is asked for, just before its images, all from
    `generator`. So a caller that keeps the batches and the generator's state between two
    batches can stop, and continue later with sample_uniform(..., n - done, ...) from that
    state: it gets what one uninterrupted loop yields (train.py's synthesis resumes so)."""
    batch_size = batch_size or _default_batch_size(_device(model, generator.device))
    for start in range(0, n, batch_size):
        labels = torch.randint(ddpm.num_classes, (min(batch_size, n - start),),
                               generator=generator, device=generator.device)
        yield sample(ddpm, model, labels, generator, batch_size=batch_size, **how), labels.cpu()


def sample(ddpm, model, labels, generator, steps=None, guidance=0.0, batch_size=None,
           image_shape=None, autocast=False, solver="ddim", churn=0.0):
    """Generate images for the given labels -> uint8 [n, C, H, W] on the CPU.

    ddpm: the diffusion.DDPM the model was trained with (its schedule and null label).
    labels: int64 [n]. steps: None for the full ancestral sampler (T model calls), else the
    number of deterministic steps (network calls) of `solver`: "ddim" or "dpm2m"
    (DPM-Solver++(2M)). guidance: w >= 0, finite. image_shape (C, H, W) defaults to the
    UNet's. Memory is bounded by batch_size, the images per network pass (default: CPU_BATCH
    on a CPU, else GPU_BATCH).
    autocast: the network runs under bfloat16 autocast (fast on CPUs with bf16 units and on
    GPUs); the sampler's own arithmetic stays float64 either way."""
    most = getattr(ddpm, "num_steps", MAX_STEPS)  # a DDPM's chain is its longest
    if steps is not None and not 1 <= steps <= most:
        raise ValueError(f"steps: must be in 1..{most} or None, got {steps}")
    if not (math.isfinite(guidance) and guidance >= 0):  # NaN would give black images
        raise ValueError(f"guidance: must be a finite number >= 0, got {guidance}")
    if solver not in SOLVERS:
        raise ValueError(f"solver: must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if isinstance(ddpm, EDM) and steps is None:
        raise ValueError("steps: EDM has no ancestral sampler; give a number of steps")
    if solver == "heun" and not isinstance(ddpm, EDM):
        raise ValueError("solver: heun is EDM's sampler")
    if image_shape is None:
        if not hasattr(model, "image_size"):
            raise ValueError("image_shape: required when the model is not a UNet")
        image_shape = (model.in_channels, model.image_size, model.image_size)
    device = _device(model, labels.device)
    batch_size = batch_size or _default_batch_size(device)

    # The schedule is float64; keep the arithmetic in float64 and feed the model float32.
    def float_model(x, t, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return model(x.float(), t.float() if t.is_floating_point() else t, y).double()

    out = []
    with torch.inference_mode():
        for y in labels.to(device).split(batch_size):
            x = noise_like(torch.empty(len(y), *image_shape, dtype=torch.float64, device=device),
                           generator)
            if isinstance(ddpm, EDM):
                if solver == "heun":
                    x = heun(ddpm, float_model, x, y, guidance, steps, churn, generator)
                else:
                    solve = euler if solver == "ddim" else dpm_solver_2m_edm
                    x = solve(ddpm, float_model, x, y, guidance, steps)
            elif steps is None:
                x = ancestral(ddpm, float_model, x, y, guidance, generator)
            else:
                solve = ddim if solver == "ddim" else dpm_solver_2m
                x = solve(ddpm, float_model, x, y, guidance, steps)
            out.append(to_uint8(x).cpu())
    return torch.cat(out)


def _device(model, otherwise):
    """Where the model's parameters are (a plain function has none: `otherwise`)."""
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    return params[0].device if params else torch.device(otherwise)


def _default_batch_size(device):
    return CPU_BATCH if device.type == "cpu" else GPU_BATCH


def guided_eps(ddpm, model, x, t, y, guidance):
    """Classifier-free guidance: (1 + w) eps(x, y) - w eps(x, null); w = 0 is one pass."""
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    if guidance == 0:
        return model(x, tt, y)
    null = torch.full_like(y, ddpm.num_classes)
    eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([tt, tt]),
                                 torch.cat([y, null])).chunk(2)
    return (1 + guidance) * eps_cond - guidance * eps_uncond


def predict_x0(ddpm, x, t, eps):
    """x0_hat: Ho et al.'s eq. 4 solved for x_0, clipped to the data range [-1, 1] (as their
    code does)."""
    x0 = (x - ddpm.sqrt_one_minus_alphas_bar[t] * eps) / ddpm.sqrt_alphas_bar[t]
    return x0.clamp(-1, 1)


def ancestral(ddpm, model, x, y, guidance, generator):
    """Algorithm 2: x_{t-1} ~ N(mu(x_t, x0_hat), beta_tilde_t I), t = T..1.

    The mean is the posterior mean of eq. 7 with x0_hat in place of x_0 (the same as line 4
    of Algorithm 2 while x0_hat needs no clipping); no noise is added at the last step."""
    for t in reversed(range(ddpm.num_steps)):
        x0 = predict_x0(ddpm, x, t, guided_eps(ddpm, model, x, t, y, guidance))
        x = ddpm.posterior_coef_x0[t] * x0 + ddpm.posterior_coef_xt[t] * x
        if t > 0:
            x = x + ddpm.posterior_std[t] * noise_like(x, generator)
    return x


def timesteps(ddpm, steps):
    """Evenly spaced timesteps from T-1 down to 0 (Song et al.'s "linear" selection)."""
    ts = torch.linspace(ddpm.num_steps - 1, 0, steps).round().long().unique_consecutive()
    return ts.tolist()


def ddim(ddpm, model, x, y, guidance, steps):
    """DDIM, Song et al. eq. 12 with eta = 0 (deterministic) on a subsequence of timesteps:
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps."""
    alpha, sigma = ddpm.sqrt_alphas_bar, ddpm.sqrt_one_minus_alphas_bar
    ts = timesteps(ddpm, steps)
    for i, t in enumerate(ts):
        x0 = predict_x0(ddpm, x, t, guided_eps(ddpm, model, x, t, y, guidance))
        if i == len(ts) - 1:
            return x0
        # the eps that the clipped x0_hat implies, so that the step stays on eq. 4
        eps = (x - alpha[t] * x0) / sigma[t]
        t_prev = ts[i + 1]
        x = alpha[t_prev] * x0 + sigma[t_prev] * eps
    return x


def dpm_solver_2m(ddpm, model, x, y, guidance, steps):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): a second-order multistep solver of the
    same ODE as DDIM, on the same timesteps and with one network call per step.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma) and
    h = lambda_next - lambda, a step is
        x_next = (sigma_next / sigma) x + alpha_next (1 - e^-h) D.
    D = x0_hat is exactly DDIM's step (eq. 12 rewritten); 2M instead extrapolates from the
    previous step's x0_hat along lambda, D = (1 + 1/2r) x0_hat - (1/2r) x0_hat_prev with
    r = h_prev / h. The first step has no previous x0_hat, and the last one stays first
    order too (Lu et al.'s advice for few steps: with timesteps evenly spaced in t, the
    last step covers a long stretch of lambda, where extrapolating was measured unstable)."""
    alpha, sigma = ddpm.sqrt_alphas_bar, ddpm.sqrt_one_minus_alphas_bar
    lam = (alpha / sigma).log()
    ts = timesteps(ddpm, steps)
    x0_prev = h_prev = None
    for i, t in enumerate(ts):
        x0 = predict_x0(ddpm, x, t, guided_eps(ddpm, model, x, t, y, guidance))
        if i == len(ts) - 1:
            return x0
        t_next = ts[i + 1]
        h = lam[t_next] - lam[t]
        d = x0
        if x0_prev is not None and i < len(ts) - 2:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = sigma[t_next] / sigma[t] * x + alpha[t_next] * (1 - torch.exp(-h)) * d
        x0_prev, h_prev = x0, h
    return x


# ------------------------------------------------------------------------------ EDM samplers
# They integrate the probability-flow ODE of diffusion.EDM, dx/dsigma = (x - D(x; sigma)) / sigma,
# from sigma_max to 0 on Karras et al.'s noise levels (eq. 5); x starts as sigma_max n.
RHO = 7.0                          # eq. 5: spacing of the noise levels (Karras et al.'s choice)
CHURN_RANGE = (0.1, 50.0)          # Algorithm 2's S_min, S_max: where churn adds noise (official)


def noise_levels(edm, steps, rho=RHO):
    """Karras et al. eq. 5: `steps` levels from sigma_max down to sigma_min, evenly spaced in
    sigma^(1/rho), then 0 (the last step lands on D)."""
    i = torch.arange(steps, dtype=torch.float64)
    first, last = edm.sigma_max ** (1 / rho), edm.sigma_min ** (1 / rho)
    sigmas = (first + i / max(steps - 1, 1) * (last - first)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).tolist()


def guided_denoise(edm, model, x, sigma, y, guidance):
    """D(x; sigma) with classifier-free guidance: (1 + w) D(x; sigma, y) - w D(x; sigma, null)."""
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
    min(S_churn / steps, sqrt(2) - 1), at levels within CHURN_RANGE (the official code samples
    so, 1,000 steps at S_churn 10)."""
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


def euler(edm, model, x, y, guidance, steps):
    """Euler steps of the ODE, one network call each: DDIM for EDM (the official code's "ddim")."""
    sigmas = noise_levels(edm, steps)
    x = x * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * (x - guided_denoise(edm, model, x, s, y, guidance)) / s
    return x


def dpm_solver_2m_edm(edm, model, x, y, guidance, steps):
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


def noise_like(x, generator):
    """Standard normal noise shaped like x, drawn on the generator's device, so that a seed
    gives the same images on a CPU and a GPU."""
    return torch.randn(x.shape, generator=generator, device=generator.device).to(x)
