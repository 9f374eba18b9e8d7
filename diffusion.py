"""The diffusion model: a class-conditional UNet and EDM, the formulation of the official code.

EDM (Karras, Aittala, Aila & Laine, "Elucidating the Design Space of Diffusion-Based Generative
Models", NeurIPS 2022), as DPDM and the official DP-FETA code train it:

  noising         x = x0 + sigma n,  n ~ N(0, I)                        (eq. 1, variance exploding)
  denoiser        D(x; sigma, y) = c_skip x + c_out F(c_in x, c_noise, y)                  (eq. 7)
                  c_skip = sd^2 / (sigma^2 + sd^2),   c_out = sigma sd / sqrt(sigma^2 + sd^2),
                  c_in = 1 / sqrt(sigma^2 + sd^2),    c_noise = log(sigma) / 4           (Table 1)
  training sigma  log sigma ~ N(P_mean, P_std^2) = N(-1.2, 1.2^2)                        (Table 1)
  loss            lambda(sigma) ||D(x0 + sigma n; sigma, y) - x0||^2,  lambda = 1 / c_out^2
                                                                                   (eqs. 2 and 8)
F is the UNet below; sd = sigma_data is sqrt(1/3), the official code's value (the standard
deviation of pixels spread uniformly over [-1, 1]; Karras et al. use 0.5). Since
lambda c_out^2 = 1, the loss is the plain squared error of F against the unit-variance target
(x0 - c_skip x) / c_out (eq. 8): every noise level contributes on the same scale, which suits
DP-SGD's clipping. The samplers (samplers.py) integrate the probability-flow ODE
dx/dsigma = (x - D(x; sigma)) / sigma from sigma_max = 80 down to 0.
Class conditioning uses classifier-free guidance (Ho & Salimans 2022): during training the label
is replaced by a "null" label K with probability p_uncond; samplers.py combines the two
predictions.

Everything is written for DP-SGD: the loss is per example (shape [B]) and the model never mixes
examples of a batch (GroupNorm, not BatchNorm), so torch.func.vmap(grad(...)) over single examples
works. Images live in [-1, 1] here: to_model_range and to_uint8 convert to and from stored uint8
images.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# EDM
# --------------------------------------------------------------------------------------------

class EDM:
    """The noise levels, the preconditioned denoiser D and the per-example loss of the module
    docstring. num_classes is the number of real labels K; label K is the null label."""

    def __init__(self, num_classes=10, sigma_data=math.sqrt(1 / 3), p_mean=-1.2, p_std=1.2,
                 sigma_min=0.002, sigma_max=80.0):
        self.num_classes, self.sigma_data = num_classes, sigma_data
        self.p_mean, self.p_std = p_mean, p_std
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def preconditioning(self, sigma):
        """(c_skip, c_out, c_in, c_noise) of Table 1 for noise levels sigma (any shape)."""
        sd2 = self.sigma_data ** 2
        root = (sigma ** 2 + sd2).sqrt()
        return sd2 / root ** 2, sigma * self.sigma_data / root, 1 / root, sigma.log() / 4

    def denoise(self, model, x, sigma, y):
        """D(x; sigma, y) (eq. 7) for x [N, C, H, W], sigma [N] and labels y [N]."""
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in self.preconditioning(sigma))
        return c_skip * x + c_out * model(c_in * x, c_noise.reshape(-1), y)

    def draw_inputs(self, y, num_draws, image_shape, generator, p_uncond=0.1):
        """All the randomness of one training step, drawn outside vmap: y_in [B] (each label
        replaced by the null label with probability p_uncond), sigma [B, K] (log-normal) and
        noise [B, K, *image_shape], for K = num_draws draws, drawn on the generator's device
        (one seed, the same draws anywhere) and moved to y's."""
        if num_draws < 1:
            raise ValueError(f"num_draws: must be >= 1, got {num_draws}")
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond: must be a probability in [0, 1], got {p_uncond}")
        b, g_dev = y.shape[0], generator.device
        drop = torch.rand(b, generator=generator, device=g_dev) < p_uncond
        y_in = torch.where(drop.to(y.device), torch.full_like(y, self.num_classes), y)
        log_sigma = torch.randn(b, num_draws, generator=generator, device=g_dev)
        sigma = (self.p_mean + self.p_std * log_sigma).exp()
        noise = torch.randn(b, num_draws, *image_shape, generator=generator, device=g_dev)
        return y_in, sigma.to(y.device), noise.to(y.device)

    def loss(self, model, x0, y_in, sigma, noise):
        """Per-example loss (eq. 2 with eq. 8's weight), averaged over the K noise draws -> [B].

        The K draws of an example are averaged before any clipping (DP-FETA's noise
        multiplicity: they cost the privacy of one) and go through the model as one batch."""
        b, k = sigma.shape
        shape = x0.shape[1:]
        sigma = sigma.reshape(b * k)
        x0 = x0.unsqueeze(1).expand(b, k, *shape).reshape(b * k, *shape)
        x = x0 + sigma.reshape(-1, 1, 1, 1) * noise.reshape(b * k, *shape)
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in self.preconditioning(sigma))
        out = model(c_in * x, c_noise.reshape(-1), y_in.unsqueeze(1).expand(b, k).reshape(b * k))
        target = (x0 - c_skip * x) / c_out  # lambda ||D - x0||^2 = ||F - target||^2
        per_draw = ((out - target) ** 2).mean(dim=(1, 2, 3))
        return per_draw.reshape(b, k).mean(dim=1)


# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------

def _groups(channels):
    # About 4 channels per group (at most 32 groups), and always a divisor of the width.
    return math.gcd(channels, min(32, max(1, channels // 4)))


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm computed in float32, also under bfloat16 autocast.

    CUDA's autocast already runs group_norm in float32; the CPU's leaves it in bfloat16, where
    the statistics of a group lose precision and, under vmap, torch 2.13's per-example backward
    of group_norm fails on the mixed input and gradient dtypes. The next convolution casts the
    float32 output back to bfloat16 under autocast; without autocast this is nn.GroupNorm."""

    def forward(self, x):
        return super().forward(x.float())


def noise_embedding(c_noise, dim):
    """Transformer-style sinusoidal embedding of the noise level c_noise [B] -> [B, dim] (the
    official code's "positional" embedding of log(sigma) / 4)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device) / half)
    angles = c_noise.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class SelfAttention(nn.Module):
    """Single-head self-attention over the pixels of each image, with a residual connection."""

    def __init__(self, channels):
        super().__init__()
        self.norm = GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)  # [b, hw, hw]
        out = v @ weights.transpose(1, 2)                                       # [b, c, hw]
        return x + self.proj(out.reshape(b, c, h, w))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding added in between; optional attention after."""

    def __init__(self, in_ch, out_ch, emb_dim, attention=False):
        super().__init__()
        self.norm1 = GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attention = SelfAttention(out_ch) if attention else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.attention(self.skip(x) + h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """F(x, c_noise, y): EDM's network, preconditioned by diffusion.EDM. y == num_classes is the
    null label.

    Levels run at image_size, image_size/2, ...; level i has base_width * channel_mults[i]
    channels and num_res_blocks residual blocks (attention inside those whose resolution is in
    attn_resolutions). The middle block, at the lowest resolution, always has attention.
    """

    def __init__(self, in_channels, image_size, num_classes, base_width=32, channel_mults=(2, 2),
                 num_res_blocks=2, attn_resolutions=(14,)):
        super().__init__()
        if image_size % 2 ** (len(channel_mults) - 1):
            raise ValueError(f"image_size: {image_size} is not divisible by "
                             f"2**{len(channel_mults) - 1} (one halving per extra level)")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.base_width = base_width
        emb_dim = 4 * base_width
        self.time_mlp = nn.Sequential(nn.Linear(base_width, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)  # last row = null label
        self.conv_in = nn.Conv2d(in_channels, base_width, 3, padding=1)

        # Down path; remember the width of every output, each becomes a skip connection.
        self.down = nn.ModuleList()
        skip_widths, ch, res = [base_width], base_width, image_size
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, base_width * mult, emb_dim, res in attn_resolutions))
                ch = base_width * mult
                skip_widths.append(ch)
            if level < len(channel_mults) - 1:
                self.down.append(Downsample(ch))
                skip_widths.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, attention=True),
                                  ResBlock(ch, ch, emb_dim)])
        # Up path mirrors it: one extra block per level so every skip is consumed once.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                out = base_width * mult
                self.up.append(ResBlock(ch + skip_widths.pop(), out, emb_dim,
                                        res in attn_resolutions))
                ch = out
            if level > 0:
                self.up.append(Upsample(ch))
                res *= 2
        self.norm_out = GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        # Zero output: the untrained denoiser is D = c_skip x, a calm start.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, c_noise, y):
        emb = self.time_mlp(noise_embedding(c_noise, self.base_width)) + self.class_emb(y)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


MODEL_SIZES = {
    # The official code's widths and depth: attention in the blocks at 14x14 (28x28 images) or
    # 16x16 (32x32 images), whichever exists, and in the middle block.
    "paper": dict(base_width=32, channel_mults=(2, 2), num_res_blocks=2, attn_resolutions=(14, 16)),
    # Sized for DP-SGD with per-example gradients on a 2-core CPU: thin, three levels
    # (28 -> 14 -> 7), attention only in the middle block at 7x7 where it is cheap.
    "small": dict(base_width=16, channel_mults=(1, 2, 2), num_res_blocks=1, attn_resolutions=()),
}


def make_unet(size, in_channels, image_size, num_classes):
    if size not in MODEL_SIZES:
        raise ValueError(f"size: unknown model size {size!r}, choose from {sorted(MODEL_SIZES)}")
    return UNet(in_channels, image_size, num_classes, **MODEL_SIZES[size])


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Pixel range
# --------------------------------------------------------------------------------------------

def to_model_range(images):
    """uint8 images in [0, 255], or float images in [0, 1] (checked) -> float32 in [-1, 1]."""
    if images.dtype == torch.uint8:
        images = images.float() / 255
    elif not images.is_floating_point():
        raise ValueError(f"images: must be uint8 or float in [0, 1], got {images.dtype}")
    elif images.numel() and not (images.min() >= 0 and images.max() <= 1):  # NaN fails too
        raise ValueError(f"images: float images must lie in [0, 1], got values in "
                         f"[{images.min().item():g}, {images.max().item():g}]")
    return images.float() * 2 - 1


def to_uint8(x):
    """Float images in [-1, 1] -> uint8 in [0, 255], on x's device: clamped first, since samples
    overshoot the range a little, then rounded to the nearest of the 256 levels."""
    if not x.is_floating_point():
        raise ValueError(f"x: must be a float tensor in [-1, 1], got {x.dtype}")
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of a model's weights: ema <- decay * ema + (1 - decay) * w."""

    def __init__(self, model, decay=0.999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay: must be in [0, 1], got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self):
        return {"decay": self.decay, "model": self.model.state_dict()}

    def load_state_dict(self, state):
        self.decay = state["decay"]
        self.model.load_state_dict(state["model"])
