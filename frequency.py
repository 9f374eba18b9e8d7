"""FETA-Pro's frequency stage, an option beyond DP-FETA (`--frequency`): a third mechanism, one
Gaussian release of the sensitive set's random Fourier features, a small generator fitted to it,
and a second warm-up of the diffusion model on that generator's images before DP-SGD.

FETA-Pro (the DP-FETA authors' successor, USENIX Security 2026) borrows the features of DP-MERF
(Harder, Adamczewski & Park, "DP-MERF: Differentially Private Mean Embeddings with Random
Features", AISTATS 2021). With x the flattened image in [0, 1]^d and W a D x d matrix of
independent N(0, 1/BANDWIDTH) entries, drawn from a public seed (W does not depend on the data):

    features   phi(x) = [cos(W x), sin(W x)] / sqrt(D)                ||phi(x)|| = 1 exactly
    release    T = (sum_i phi(x_i) e_{y_i}^T + N(0, sigma_f^2 I)) / N     a 2D x K table
    fit        min_G || T - (1/B) sum_j phi(G(z_j, y_j)) e_{y_j}^T ||^2   uniform labels y_j

phi(x) . phi(x') approximates the Gaussian kernel exp(-BANDWIDTH^-1 ||x - x'||^2 / 2), so matching
T matches every class's mean embedding, weighted by the class's share of the data against the
generator's uniform labels (as DP-MERF: exact for balanced classes): the maximum mean
discrepancy (MMD) of the generator's images to the class's images. Privacy: adding or removing one example adds or removes one term
phi(x) e_y^T, of norm 1 (e_y is one-hot), to the sum: sensitivity 1, so the release is ONE
Gaussian mechanism on the whole set (q = 1) with noise multiplier sigma_f, the entry
(1, sigma_f, 1) of the ledger. Dividing by N, the public dataset size, is post-processing. The
sensitive images are read in one function, `feature_sums`; its only caller, `noisy_feature_table`,
adds the noise at once. Fitting the generator and warming up on its images read only the release:
post-processing, free.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_FREQUENCIES = 5000  # D: FETA-Pro's 10,000 features are 5,000 cosines and 5,000 sines
BANDWIDTH = 105.0       # W's entries have variance 1/BANDWIDTH (FETA-Pro's rff_sigma for MNIST)
# Each term of the release is scaled to norm 1 - MARGIN so that the computed sum's sensitivity
# stays <= 1, rounding included, for fewer than MAX_IMAGES terms (MNIST has 60,000). Two
# roundings share the margin. The float64 sum (as dpsgd.clip_margin: Higham, Sec. 3.1) moves two
# neighbouring sums apart by under 2^-18 more than the one term. And a term shared by the two
# datasets may come out of the float64 features in other bits when the other images shift the
# batches of the matrix product: each feature's angle is within d u sum_k |W_jk| of its exact
# value (d = 784, u = 2^-53: about 6e-12 for these W), so each term is within about 1e-11 of the
# exact one in either computation, and 2^17 shared terms move the sum by under 2^-18.
MARGIN = 2.0 ** -17
MAX_IMAGES = 2 ** 17


def frequencies(dim, seed, num_frequencies=NUM_FREQUENCIES):
    """W [D, dim] in float64, entries N(0, 1/BANDWIDTH), from a public seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_frequencies, dim, generator=g, dtype=torch.float64) / math.sqrt(BANDWIDTH)


def features(x, W):
    """phi(x) [n, 2D] for flat images x [n, d] in [0, 1]: [cos(W x), sin(W x)] / sqrt(D), in x's
    dtype."""
    projected = x @ W.to(x).T
    return torch.cat([projected.cos(), projected.sin()], dim=1) / math.sqrt(W.shape[0])


def feature_sums(images, labels, num_classes, W):
    """CLEAN per-class sums of phi [2D, K] of the sensitive images: sum_i phi(x_i) e_{y_i}^T.

    This is the only function of the stage that reads the sensitive data; its result must get
    noise before it leaves (noisy_feature_table). Images are uint8 (or float, mapped into [0, 1]:
    NaN counts as 0, anything else clamped), so the sensitivity holds for any input. Features,
    norms and sums are float64; each term is scaled to norm 1 - MARGIN (see MARGIN)."""
    sums = torch.zeros(2 * W.shape[0], num_classes, dtype=torch.float64)
    for chunk, y in zip(images.split(1000), labels.split(1000)):
        x = chunk.flatten(1).double()
        x = x / 255 if chunk.dtype == torch.uint8 else x.nan_to_num(0.0).clamp(0.0, 1.0)
        phi = features(x, W.double())
        phi = phi * ((1 - MARGIN) / phi.norm(dim=1, keepdim=True))  # 1 up to rounding: now <= 1
        sums.index_add_(1, y, phi.T)
    return sums


def noisy_feature_table(images, labels, num_classes, W, sigma, generator):
    """The release T [2D, K]: the class sums of phi plus N(0, sigma^2) on every entry (the
    sensitivity is 1), divided by the public N. Noise drawn and added in float64 from the secret
    generator, as in the other two mechanisms (dpsgd.add_noise says why)."""
    sums = feature_sums(images, labels, num_classes, W)
    noise = torch.randn(sums.shape, generator=generator, dtype=torch.float64)
    return (sums + sigma * noise) / images.shape[0]


def release(images, labels, num_classes, sigma, seed, generator):
    """The stage's mechanism: (table T float64 [2D, K], mechanism (q, sigma, steps) for the
    accountant). seed: the public seed of W; generator: the secret generator."""
    if not 0 < images.shape[0] < MAX_IMAGES:
        raise ValueError(f"images: the release's rounding margin covers 1 to {MAX_IMAGES - 1} "
                         f"images, got {images.shape[0]}")
    if not sigma > 0:
        raise ValueError(f"sigma: the noise multiplier must be > 0, got {sigma}")
    W = frequencies(images[0].numel(), seed)
    return noisy_feature_table(images, labels, num_classes, W, sigma, generator), (1.0, sigma, 1)


# ------------------------------------------------------------------------------ the generator

class ImageGenerator(nn.Module):
    """G(z, y): a small class-conditional convolutional generator, images in [0, 1].

    Noise and a label embedding -> a 7x7 map -> two nearest-neighbour upsamplings with 3x3
    convolutions -> the image through a sigmoid. FETA-Pro's is a 1,549,226-parameter BigGAN, far
    too slow for a CPU; this one has about 0.1 M parameters."""

    def __init__(self, channels, size, num_classes, z_dim=32, width=32):
        super().__init__()
        self.z_dim, self.width, self.start = z_dim, width, size // 4
        self.embed = nn.Embedding(num_classes, z_dim)
        self.fc = nn.Linear(2 * z_dim, width * self.start ** 2)
        self.conv1 = nn.Conv2d(width, width // 2, 3, padding=1)
        self.conv2 = nn.Conv2d(width // 2, width // 4, 3, padding=1)
        self.out = nn.Conv2d(width // 4, channels, 3, padding=1)
        self.size = size

    def forward(self, z, y):
        h = F.relu(self.fc(torch.cat([z, self.embed(y)], dim=1)))
        h = h.view(-1, self.width, self.start, self.start)
        h = F.relu(self.conv1(F.interpolate(h, scale_factor=2.0, mode="nearest")))
        h = F.relu(self.conv2(F.interpolate(h, size=self.size, mode="nearest")))
        return torch.sigmoid(self.out(h))

    def draw(self, n, generator, labels=None):
        """n images [n, C, H, W] in [0, 1] and their labels (uniform unless given)."""
        device = next(self.parameters()).device
        if labels is None:
            labels = torch.randint(self.embed.num_embeddings, (n,), generator=generator,
                                   device=generator.device)
        z = torch.randn(n, self.z_dim, generator=generator, device=generator.device)
        return self(z.to(device), labels.to(device)), labels.to(device)


def fit_generator(table, num_classes, image_shape, seed, steps, batch=100, lr=0.01,
                  decay_every=600, progress=None):
    """An ImageGenerator fitted to the released table by the MMD loss above: Adam at lr, times 0.9
    every `decay_every` steps (FETA-Pro: 5 x 600 steps of batch 100 from lr 0.01). Reads only the
    release; every draw comes from a generator seeded with `seed` (public), so the same table
    and seed give the same generator on the same machine."""
    W = frequencies(math.prod(image_shape), seed, table.shape[0] // 2).float()  # the release's
    draws = torch.Generator().manual_seed(seed + 1)  # its own stream, not W's
    target = table.float()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed + 2)  # the initial weights (CPU)
        fitted = ImageGenerator(image_shape[0], image_shape[1], num_classes)
    optimizer = torch.optim.Adam(fitted.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=decay_every, gamma=0.9)
    for step in range(steps):
        images, labels = fitted.draw(batch, draws)
        embedding = features(images.flatten(1), W).T @ F.one_hot(labels, num_classes).float()
        loss = ((target - embedding / batch) ** 2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress:
            progress(step + 1, f" | MMD^2 {loss.item():.5f}")
    return fitted.requires_grad_(False).eval()
