"""Evaluation of synthetic images: FID and synthetic-to-real classification accuracy.

FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local
Nash equilibrium") is the Frechet distance between two Gaussians fitted to Inception-v3 pool3
features (2048-d) of two image sets:

    FID = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

The numbers are only comparable with the field's if the network and preprocessing are the
standard ones, so the network is pytorch-fid's port of the TensorFlow 2015-12-05 Inception-v3
(inception.py) and images are preprocessed as pytorch-fid does: uint8 -> [0, 1], grayscale
repeated to 3 channels, bilinear resize to 299x299, scaled to [-1, 1]. (Such FIDs compare with
pytorch-fid's and DPImageBench's, not with TF-FID or clean-fid figures, which resize
differently.)

Accuracy (paper section 4): a small CNN trained *only* on synthetic images, its epoch chosen
on a held-out part of the synthetic set (never on the test set), tested on the real test set.

CLI: python evaluate.py SAMPLES.npz --dataset mnist [--data-dir D] [--n N] [--inception PATH]
prints both numbers and writes them to SAMPLES.eval.json.
"""
import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

import data
from inception import WeightsError, load_inception


def _stderr(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Images -> features -> statistics -> distance

def as_uint8_images(images):
    """uint8 torch [N, C, H, W] from: numpy uint8 [N, H, W] or [N, H, W, C], or torch uint8
    [N, C, H, W]. Float torch images in [0, 1] are quantised to uint8 first, exactly as saving
    them to a PNG would (data.save_grid), so FID sees what a user would see."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"images: numpy arrays must be uint8, got {images.dtype}")
        x = torch.from_numpy(images)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2) if x.ndim == 4 else x
    else:
        x = torch.as_tensor(images).detach().cpu()
        if x.is_floating_point():
            x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images: expected uint8 N x H x W or N x H x W x C (numpy) or "
                         f"N x C x H x W (torch) with C in (1, 3), got {x.dtype} "
                         f"{tuple(images.shape)}")
    return x.contiguous()


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def inception_features(images, batch_size=50, device=None, weights=None, model=None,
                       progress=_stderr):
    """Pool3 features, float32 np.ndarray [N, 2048], embedding `batch_size` images at a time
    (memory stays bounded: only one batch is ever upsampled to 299x299)."""
    device = device or _default_device()
    if model is None:
        model = load_inception(weights, device)
    images = as_uint8_images(images)
    n = len(images)
    features = np.empty((n, 2048), dtype=np.float32)
    start = last_report = time.time()
    for i in range(0, n, batch_size):
        x = images[i:i + batch_size].to(device).float() / 255.0
        x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB by repetition
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = (2 * x - 1).contiguous(memory_format=torch.channels_last)
        features[i:i + len(x)] = model(x).cpu().numpy()
        done = i + len(x)
        if progress and (time.time() - last_report > 30 or done == n):
            last_report = time.time()
            rate = done / max(last_report - start, 1e-9)
            progress(f"inception features: {done}/{n} images, {rate:.1f} images/s")
    return features


def feature_statistics(features):
    """Mean and unbiased covariance (float64) of [N, D] features, in chunks to bound memory."""
    n = len(features)
    if n < 2:
        raise ValueError(f"images: FID needs at least 2 images, got {n}")
    mu = features.mean(axis=0, dtype=np.float64)
    sigma = np.zeros((features.shape[1],) * 2)
    for i in range(0, n, 4096):
        centred = features[i:i + 4096].astype(np.float64) - mu
        sigma += centred.T @ centred
    return mu, sigma / (n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) between N(mu1, S1) and N(mu2, S2)."""
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # With fewer images than dimensions (2048) the product is always singular and scipy
        # warns; the result is still accurate unless non-finite, which is checked for.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            # The standard fix: a tiny ridge on both covariances makes the root well defined.
            offset = eps * np.eye(len(sigma1))
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # sqrt of a product of PSD matrices has a real spectrum; rounding can leave small
        # imaginary parts, which we drop. Large ones mean the statistics are broken.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: matrix square root has a large imaginary component "
                             f"({np.abs(covmean.imag).max():.3g}); are the statistics valid?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(images_a, images_b, batch_size=50, device=None, weights=None, progress=_stderr):
    """FID between two image sets (uint8 arrays as in `as_uint8_images`)."""
    device = device or _default_device()
    model = load_inception(weights, device)
    stats = [feature_statistics(inception_features(images, batch_size, device, model=model,
                                                   progress=progress))
             for images in (images_a, images_b)]
    return frechet_distance(*stats[0], *stats[1])


def reference_stats(dataset, images, cache_dir, data_dir=None, batch_size=50, device=None,
                    weights=None, model=None, progress=_stderr):
    """(mu, sigma) of the first `images` training images of `dataset` (None: all), cached in
    cache_dir/fid_stats_<dataset>_train_<count>.npz so the real side is embedded only once.
    The cache assumes the standard weights: use another cache_dir for any other file."""
    train_images, _ = data.load(dataset, "train", data_dir)
    count = len(train_images) if images is None else images
    if not 2 <= count <= len(train_images):
        raise ValueError(f"images: need 2..{len(train_images)} {dataset} training images, "
                         f"got {count}")
    path = os.path.join(cache_dir, f"fid_stats_{dataset}_train_{count}.npz")
    if os.path.exists(path):
        with np.load(path) as cached:
            return cached["mu"], cached["sigma"]
    features = inception_features(train_images[:count], batch_size, device, weights, model,
                                  progress)
    mu, sigma = feature_statistics(features)
    os.makedirs(cache_dir, exist_ok=True)
    np.savez(path + ".part.npz", mu=mu, sigma=sigma)
    os.replace(path + ".part.npz", path)  # atomic: an interrupted run leaves no bad cache
    return mu, sigma


# ---------------------------------------------------------------------------------------------
# Classification accuracy: train on synthetic, choose the epoch on held-out synthetic, test real

class SmallCNN(nn.Module):
    """Three 3x3 conv layers (32-64-128, each ReLU + 2x2 max pool), FC 128, FC classes."""

    def __init__(self, channels, size, num_classes):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(128 * (size // 8) ** 2, 128),
                                  nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


@torch.no_grad()
def _accuracy(model, images, labels, device, batch_size=1000):
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float() / 255.0
        correct += (model(x).argmax(1).cpu() == labels[i:i + batch_size]).sum().item()
    return correct / len(images)


def classifier_accuracy(train_images, train_labels, test_images, test_labels, num_classes=10,
                        epochs=10, batch_size=64, lr=1e-3, val_fraction=0.1, seed=0,
                        device=None, progress=_stderr):
    """Train SmallCNN on (synthetic) train images, keep the epoch with the best accuracy on a
    held-out `val_fraction` of them, and return its accuracy on the (real) test set.

    The official code trains 50 epochs with Adam at lr 3e-4; the defaults here (10 epochs at
    1e-3) keep a few thousand images to about a minute on a CPU. Returns a dict with
    test_accuracy, val_accuracy, best_epoch, epochs, n_train, n_val, n_test."""
    device = device or _default_device()
    train_images, test_images = as_uint8_images(train_images), as_uint8_images(test_images)
    train_labels = torch.as_tensor(train_labels).long()
    test_labels = torch.as_tensor(test_labels).long()
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(f"train_images: shape {tuple(train_images.shape[1:])} differs from the "
                         f"test images' {tuple(test_images.shape[1:])}")
    for name, labels, images in (("train_labels", train_labels, train_images),
                                 ("test_labels", test_labels, test_images)):
        if (len(labels) != len(images) or len(labels) < 2
                or not 0 <= labels.min() <= labels.max() < num_classes):
            raise ValueError(f"{name}: need one label in 0..{num_classes - 1} per image "
                             f"(and at least 2 images)")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_images), generator=generator)
    n_val = max(1, int(round(val_fraction * len(train_images))))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    # Initialise from a forked global RNG so the weights depend on `seed` only and the
    # caller's random state is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(train_images.shape[1], train_images.shape[2], num_classes)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    best = (-1.0, 0, None)  # (validation accuracy, epoch, weights)
    for epoch in range(1, epochs + 1):
        model.train()
        shuffled = fit_idx[torch.randperm(len(fit_idx), generator=generator)]
        total_loss = 0.0
        for i in range(0, len(shuffled), batch_size):
            idx = shuffled[i:i + batch_size]
            x = train_images[idx].to(device).float() / 255.0
            loss = F.cross_entropy(model(x), train_labels[idx].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(idx)
        val_acc = _accuracy(model, train_images[val_idx], train_labels[val_idx], device)
        if progress:
            progress(f"classifier epoch {epoch}/{epochs}: mean loss "
                     f"{total_loss / len(shuffled):.4f}, held-out synthetic accuracy {val_acc:.4f}")
        if val_acc > best[0]:  # strict: ties keep the earlier epoch
            best = (val_acc, epoch, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    # The test set is used exactly once, after the epoch has been chosen.
    return dict(test_accuracy=_accuracy(model, test_images, test_labels, device),
                val_accuracy=best[0], best_epoch=best[1], epochs=epochs,
                n_train=len(fit_idx), n_val=n_val, n_test=len(test_images))


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="FID and accuracy of synthetic images.")
    parser.add_argument("samples", help=".npz with 'images' (uint8 NxHxW or NxHxWxC), 'labels'")
    parser.add_argument("--dataset", required=True, choices=sorted(data.INFO))
    parser.add_argument("--data-dir", default=None, help="folder with the dataset's files")
    parser.add_argument("--n", type=int, default=None,
                        help="images per side for FID: the first N samples against the first "
                             "N training images (default: all samples)")
    parser.add_argument("--inception", default=None, help="FID Inception weights file "
                        "(default: torch hub cache, pytorch-fid's file)")
    parser.add_argument("--cache-dir", default=os.path.join("data", "fid_stats"),
                        help="where reference statistics are cached")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    try:
        with np.load(args.samples) as npz:
            if "images" not in npz or "labels" not in npz:
                raise ValueError(f"samples: {args.samples} needs arrays 'images' and 'labels'")
            images, labels = as_uint8_images(npz["images"]), torch.from_numpy(npz["labels"])
        info = data.INFO[args.dataset]
        if tuple(images.shape[1:]) != (info["channels"], info["size"], info["size"]):
            raise ValueError(f"samples: images of shape {tuple(images.shape[1:])} (C, H, W) do "
                             f"not match {args.dataset}")
        n = len(images) if args.n is None else args.n
        if not 2 <= n <= len(images):
            raise ValueError(f"--n: need 2..{len(images)} (the number of samples), got {n}")
        model = load_inception(args.inception, args.device or _default_device())
        mu_ref, sigma_ref = reference_stats(args.dataset, n, args.cache_dir, args.data_dir,
                                            device=args.device, model=model)
        mu, sigma = feature_statistics(inception_features(images[:n], device=args.device,
                                                          model=model))
        fid_value = frechet_distance(mu, sigma, mu_ref, sigma_ref)
        test_images, test_labels = data.load(args.dataset, "test", args.data_dir)
        accuracy = classifier_accuracy(images, labels, test_images, test_labels,
                                       info["classes"], epochs=args.epochs, seed=args.seed,
                                       device=args.device)
    except (WeightsError, ValueError, data.DataError, OSError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    result = dict(samples=args.samples, dataset=args.dataset, fid=fid_value, fid_images=n,
                  accuracy=accuracy["test_accuracy"], classifier=accuracy)
    out = os.path.splitext(args.samples)[0] + ".eval.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"FID {fid_value:.4f} ({n} samples vs {n} {args.dataset} training images); "
          f"accuracy {accuracy['test_accuracy']:.4f} (epoch {accuracy['best_epoch']}); "
          f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
