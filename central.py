"""The easy stage of DP-FETA: central images, and the augmentation used to warm up on them.

Central images (DP-FETA, "From Easy to Hard", S&P 2025: the easy stage) are noisy
per-class means of Poisson-sampled subsets of the sensitive set. Each of the T queries is ONE
Gaussian mechanism on the vector of all K class sums of half-resolution images:

    S_k = sum_{i in sample, y_i = k} down(x_i),     release  (S_k + N(0, (sigma_c sqrt(d'))^2 I)) / (q N / K)

Pixels lie in [0, 1], so adding or removing one image moves the whole vector (S_1..S_K) by at
most sqrt(d') in L2 (d' = values per downsampled image; classes are disjoint, so one image only
touches one S_k). The privacy cost is therefore T compositions of a Poisson-subsampled Gaussian
with noise multiplier sigma_c and rate q: the triple (q, sigma_c, T) handed to the accountant.
Everything after the noisy sums (divide by a public number, clamp, upsample, median filter,
sharpen) is post-processing and free.

Data flow (how the privacy argument maps to code): the sensitive `images` and `labels` are read
in exactly one place, `poisson_class_sums`, which returns the clean sums of a Poisson sample;
its only caller is `noisy_class_means`, which adds the noise before anything else happens.
`central_images` only sees noisy means. The tests check this behaviourally as well.

`augment` is the RandAugment-style warm-up augmentation of the official code: 2 random ops per
image, magnitude drawn from 1..M (3 for grayscale, 9 for colour), re-drawn on every call. It
only ever touches released images.
"""
from harness import cli  # noqa: F401  (first: a Ctrl-C while torch loads is one line)
import math
import sys

import torch
import torch.nn.functional as F

import randomness


# ---------------------------------------------------------------------------------------------
# The mechanism
# ---------------------------------------------------------------------------------------------

def central_images(images, labels, num_classes, q=0.1, sigma=5.0, queries=5, generator=None,
                   postprocess=True):
    """DP-FETA's central images: T = `queries` Gaussian-mechanism releases of noisy class means.

    images: the sensitive set, uint8 [N,C,H,W] (or float in [0,1]: other values are clamped,
    NaN counts as 0); labels: int64 [N] in 0..K-1.
    generator: the secret generator (randomness.secret_generator) for the samples and noise.
    Returns (central float32 [T*K,C,H,W] in [0,1], central_labels int64 [T*K],
    mechanism (q', sigma, T) for the accountant, q' = randomness.sampling_rate(q), the exact
    inclusion probability). Output i is query i // K, class i % K."""
    _check_arguments(images, labels, num_classes, q, sigma, queries, generator)
    size = images.shape[-2:]
    releases = []
    for _ in range(int(queries)):
        means = noisy_class_means(images, labels, num_classes, q, sigma, generator)
        # From here on only noisy (released) values are used.
        means = F.interpolate(means.clamp(0.0, 1.0).float(), size=size, mode="bilinear",
                              align_corners=False)
        releases.append(median_and_sharpen(means) if postprocess else means)
    central = torch.cat(releases).clamp(0.0, 1.0)
    central_labels = torch.arange(num_classes, device=central.device).repeat(int(queries))
    return central, central_labels, (randomness.sampling_rate(q), sigma, int(queries))


def noisy_class_means(images, labels, num_classes, q, sigma, generator):
    """One query of the Gaussian mechanism: noisy per-class means [K,C,h,w], before clamping.

    Noise std sigma * sqrt(d') on every coordinate of every class sum, d' = C*h*w (the L2
    sensitivity of the vector of all class sums). We divide by the EXPECTED per-class count
    q*N/K, a public number. Dividing by the realised count would make the divisor depend on the
    data; the output would then no longer be the Gaussian mechanism the accountant analyses
    (a pitfall of published code). N (the dataset size) is treated as public, as for DP-SGD's
    rate q. The noise is drawn and added in float64, as in DP-SGD (dpsgd.add_noise says why:
    torch's float32 normal is Box-Muller on 24-bit uniforms; Mironov 2012); the float32 cast
    comes later, after the clamp, as post-processing."""
    sums = poisson_class_sums(images, labels, num_classes, q, generator)
    d_prime = sums[0].numel()
    noise = torch.randn(sums.shape, generator=generator, dtype=torch.float64, device=generator.device)
    noisy_sums = sums + sigma * math.sqrt(d_prime) * noise.to(sums.device)
    expected_count = q * images.shape[0] / num_classes
    return noisy_sums / expected_count


def poisson_class_sums(images, labels, num_classes, q, generator):
    """CLEAN per-class sums [K,C,h,w] of the downsampled images of one Poisson sample.

    This is the only function that reads the sensitive data. Its result must go through
    noise before it leaves the module (see noisy_class_means)."""
    mask = randomness.poisson_sample(images.shape[0], q, generator).to(images.device)
    sampled = downsample(images[mask])
    sums = torch.zeros((num_classes,) + sampled.shape[1:], dtype=torch.float64, device=sampled.device)
    return sums.index_add_(0, labels[mask], sampled)


def downsample(images):
    """[N,C,H,W] uint8 or float -> float64 [N,C,H//2,W//2] in [0,1], nearest neighbour.

    Float inputs are mapped into [0, 1] (not checked): NaN counts as 0 (clamping keeps a NaN,
    which would make its class's whole release NaN) and everything else is clamped, so the
    sensitivity bound sqrt(d') holds for ANY input, without a data-dependent error message.
    float64 keeps sums of thousands exact enough."""
    h, w = images.shape[-2] // 2, images.shape[-1] // 2
    small = F.interpolate(images.float(), size=(h, w), mode="nearest").double()
    return small / 255.0 if images.dtype == torch.uint8 else small.nan_to_num(0.0).clamp(0.0, 1.0)


# Post-processing of the official code (free in privacy)
def median_and_sharpen(x):
    """Post-processing of the official code (free in privacy): median blur; sharpen if grayscale."""
    x = median3x3(x)
    return sharpen(x) if x.shape[1] == 1 else x


def median3x3(x):
    """3x3 median filter per channel, borders replicated (like OpenCV's medianBlur)."""
    n, c, h, w = x.shape
    patches = F.unfold(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel_size=3)  # [N, C*9, H*W]
    return patches.view(n, c, 9, h * w).median(dim=2).values.view(n, c, h, w)


def sharpen(x):
    """Classic 3x3 sharpening (centre 5, 4-neighbours -1), clamped back to [0, 1]."""
    kernel = torch.tensor([[0., -1., 0.], [-1., 5., -1.], [0., -1., 0.]], dtype=x.dtype, device=x.device)
    kernel = kernel.expand(x.shape[1], 1, 3, 3)
    out = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1])
    return out.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Warm-up augmentation (RandAugment-style, vectorised over the batch)
# ---------------------------------------------------------------------------------------------

# Each op's strength is level = sign * magnitude / 10 (RandAugment's 0..10 scale), so M = 3
# (grayscale) gives gentle changes and M = 9 (colour) strong ones. Parameters at level 1:
OPS = ("rotate", "translate_x", "translate_y", "shear_x", "shear_y", "scale",
       "brightness", "contrast", "sharpness", "autocontrast")
MAX_ROTATE_DEG = 30.0   # M=3: up to 9 deg; M=9: up to 27 deg
MAX_TRANSLATE = 0.15    # fraction of the side: M=3 -> ~1.3 px on 28x28, M=9 -> ~4 px on 32x32
MAX_SHEAR = 0.3         # shear factor
MAX_SCALE = 0.3         # zoom factor 1 +- 0.3*level
MAX_ENHANCE = 0.9       # brightness/contrast/sharpness factor 1 +- 0.9*level (as PIL enhancers)


def _op_mask(op, name):
    return op == OPS.index(name)


def _geometric(x, op, level):
    """Apply the geometric op of each image (identity matrix for photometric ops) in one warp."""
    zero = torch.zeros_like(level)
    angle = torch.where(_op_mask(op, "rotate"), level * math.radians(MAX_ROTATE_DEG), zero)
    # affine_grid works in [-1, 1] coordinates, so a shift of f*side is 2*f.
    tx = torch.where(_op_mask(op, "translate_x"), 2 * MAX_TRANSLATE * level, zero)
    ty = torch.where(_op_mask(op, "translate_y"), 2 * MAX_TRANSLATE * level, zero)
    shx = torch.where(_op_mask(op, "shear_x"), MAX_SHEAR * level, zero)
    shy = torch.where(_op_mask(op, "shear_y"), MAX_SHEAR * level, zero)
    zoom = torch.where(_op_mask(op, "scale"), 1 + MAX_SCALE * level, zero + 1)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # theta maps output coordinates to input coordinates: rotation/zoom times shear, plus shift.
    theta = torch.stack([torch.stack([cos - sin * shy, cos * shx - sin, tx], dim=1),
                         torch.stack([sin + cos * shy, sin * shx + cos, ty], dim=1)], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    is_geometric = (op < OPS.index("brightness")).view(-1, 1, 1, 1)
    return torch.where(is_geometric, warped, x)


def _smooth(x):
    """PIL's SMOOTH filter (3x3, centre weight 5, others 1, /13) from shifted slices: on CPU this
    is several times faster than a depthwise conv2d."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    total = sum(padded[..., i:i + h, j:j + w] for i in range(3) for j in range(3))
    return (total + 4 * x) / 13


def _photometric(x, op, level):
    """Apply the photometric op of each image (the others pass through unchanged).

    brightness, contrast and sharpness are PIL-style enhancers: blend the image with a
    degenerate version (black, its mean grey level, a smoothed copy) by a factor 1 +- 0.9*level;
    factor 0 gives the degenerate image, 1 the image itself, > 1 extrapolates."""
    per_image = lambda mask: mask.view(-1, 1, 1, 1)
    is_brightness, is_contrast = _op_mask(op, "brightness"), _op_mask(op, "contrast")
    is_sharpness = _op_mask(op, "sharpness")
    degenerate = torch.where(per_image(is_brightness), 0.0, x.mean(dim=(1, 2, 3), keepdim=True))
    degenerate = torch.where(per_image(is_sharpness), _smooth(x), degenerate)
    factor = per_image(1 + MAX_ENHANCE * level)
    enhanced = (degenerate + factor * (x - degenerate)).clamp(0.0, 1.0)
    x_out = torch.where(per_image(is_brightness | is_contrast | is_sharpness), enhanced, x)
    # autocontrast: stretch each channel's range to [0, 1] (a flat channel is left alone)
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    stretched = torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-8), x)
    return torch.where(per_image(_op_mask(op, "autocontrast")), stretched, x_out)


def augment(images, generator, num_ops=2, max_magnitude=None):
    """RandAugment-style augmentation: `num_ops` random ops per image, magnitudes from 1..M.

    images: uint8 or float [B,C,H,W] in [0,1]. Returns float [B,C,H,W] in [0,1]; labels are
    untouched (pass them through). max_magnitude M: None takes the official code's, 3 for
    grayscale and 9 for colour (this is its one home). Every call draws new ops, so each warm-up
    step sees fresh variants of the few central images; the same generator state gives the same
    output."""
    if max_magnitude is None:
        max_magnitude = 3 if images.shape[1] == 1 else 9
    if num_ops < 0 or max_magnitude < 1:
        raise ValueError("num_ops/max_magnitude: need num_ops >= 0 and max_magnitude >= 1")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0.0, 1.0)
    b, dev = x.shape[0], generator.device
    for _ in range(num_ops):
        op = torch.randint(len(OPS), (b,), generator=generator, device=dev).to(x.device)
        magnitude = torch.randint(1, max_magnitude + 1, (b,), generator=generator, device=dev)
        sign = torch.randint(2, (b,), generator=generator, device=dev) * 2 - 1
        level = (sign * magnitude / 10.0).to(x.device, x.dtype)
        x = _photometric(_geometric(x, op, level), op, level)
    return x.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

def _check_arguments(images, labels, num_classes, q, sigma, queries, generator):
    """central_images' arguments, each refused in one line. They raise and release nothing;
    index_add_ would fail on bad labels anyway."""
    if images.dim() != 4 or labels.shape != (images.shape[0],):
        raise ValueError("images: expected [N,C,H,W] with labels [N], got %s and %s"
                         % (tuple(images.shape), tuple(labels.shape)))
    if images.shape[0] == 0:
        raise ValueError("images: the sensitive set is empty")
    if not 0.0 < q <= 1.0:
        raise ValueError("q: sampling rate must be in (0, 1], got %r" % (q,))
    if not sigma >= 0.0:
        raise ValueError("sigma: noise multiplier must be >= 0, got %r" % (sigma,))
    if int(queries) != queries or queries < 1:
        raise ValueError("queries: must be a positive integer, got %r" % (queries,))
    if num_classes < 1:
        raise ValueError("num_classes: must be >= 1, got %r" % (num_classes,))
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise ValueError("labels: must lie in 0..num_classes-1 (num_classes=%d)" % num_classes)
    if generator is None:
        raise ValueError("generator: pass the secret generator (randomness.secret_generator)")


if __name__ == "__main__":  # the command line lives in harness/commands.py
    from harness import commands
    sys.exit(commands.central_command(sys.argv[1:]))
