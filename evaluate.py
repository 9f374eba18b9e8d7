"""How a release is measured: FID, and the accuracy of a classifier trained on it.

FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local
Nash equilibrium") is the Frechet distance between two Gaussians fitted to Inception-v3 pool3
features (2048-d) of two image sets:

    FID = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

This module goes images -> features -> statistics -> distance, and `fid` is the one entry
point that both its command line and train.py call. The numbers are only comparable with the
field's if the network and preprocessing are the standard ones, so the network is pytorch-fid's
port of the TensorFlow 2015-12-05 Inception-v3 (inception.py) and images are preprocessed as
pytorch-fid does: uint8 -> [0, 1], grayscale repeated to 3 channels, bilinear resize to
299x299, scaled to [-1, 1]. (Such FIDs compare with pytorch-fid's and DPImageBench's, not with
TF-FID or clean-fid figures, which resize differently.)

Accuracy (the paper's section 4): a small CNN is trained *only* on synthetic images; the epoch
whose accuracy on a held-out part of the synthetic set is best is kept (never chosen on the
test set), and that model is tested once on the real test set. A generator that has learnt the
classes gets a high number; one that draws the right label only by chance, or draws every class
alike, gets ~1/classes.

The command line reads a samples file (harness/files.py: the .npz that train.py and sample.py
write, images and labels).

CLI: python evaluate.py SAMPLES.npz --dataset mnist [--data-dir D] [--n N] [--inception PATH]
prints both numbers and writes them to SAMPLES.eval.json. Bad input (a corrupt file, labels
that do not fit, an unusable device or output path) is reported in one line, exit status 2,
before any minutes are spent on Inception features or the classifier.
"""
from harness import cli  # first: a Ctrl-C while torch loads is one line
from harness import flags
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import data
from harness import files
from harness import runs
from inception import WeightsError, load_inception


def _stderr(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Images -> features -> statistics -> distance

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
    images = data.as_uint8_images(images)
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


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between N(mu1, S1) and N(mu2, S2).

    Only the trace of (S1 S2)^(1/2) is needed: the sum of the square roots of the eigenvalues
    of S1 S2, which are those of the symmetric matrix S1^(1/2) S2 S1^(1/2). Two symmetric
    eigendecompositions give it in seconds for 2048 x 2048, and exactly (the eigenvalues are
    real and >= 0 for covariance matrices), where pytorch-fid's general matrix square root
    (scipy.linalg.sqrtm) is slower, leaves imaginary round-off to drop, and took minutes in
    recent scipy versions. The result agrees with pytorch-fid's to its rounding."""
    diff = mu1 - mu2
    values, vectors = _covariance_eigh(sigma1, "first")
    root1 = (vectors * np.sqrt(values)) @ vectors.T           # S1^(1/2)
    middle, _ = _covariance_eigh(root1 @ sigma2 @ root1, "product of the")
    trace_sqrt = np.sqrt(middle).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def frechet_distance_to(features, mu2, sigma2):
    """frechet_distance between the statistics of `features` [n, D] and N(mu2, S2).

    With fewer images than dimensions (n < D, as for FID of 1,000 images in 2,048 dimensions)
    S1 = C^T C, where C holds the centred features / sqrt(n - 1) (n x D), and the nonzero
    eigenvalues of S1 S2 = C^T (C S2) are those of (C S2) C^T, a symmetric n x n matrix (XY and
    YX share them). So the same number comes from one n x n eigendecomposition instead of two
    D x D ones, and Tr(S1) is the sum of C's squares. Otherwise: feature_statistics and
    frechet_distance."""
    n, d = features.shape
    if n >= d:
        return frechet_distance(*feature_statistics(features), mu2, sigma2)
    if n < 2:
        raise ValueError(f"images: FID needs at least 2 images, got {n}")
    mu1 = features.mean(axis=0, dtype=np.float64)
    centred = (features.astype(np.float64) - mu1) / np.sqrt(n - 1)
    middle, _ = _covariance_eigh(centred @ sigma2 @ centred.T, "product of the")
    diff = mu1 - mu2
    return float(diff @ diff + (centred ** 2).sum() + np.trace(sigma2) - 2 * np.sqrt(middle).sum())


def _covariance_eigh(matrix, which):
    """Eigenvalues (clipped at 0) and eigenvectors of a symmetric PSD matrix; round-off may make
    tiny eigenvalues negative, a clearly negative one means the statistics are broken."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    if values.min() < -1e-6 * max(abs(values).max(), 1e-30):
        raise ValueError(f"FID: the {which} covariance statistics are not positive "
                         f"semi-definite (eigenvalue {values.min():.3g}); are they valid?")
    return values.clip(min=0), vectors


def fid(generated, reference, device=None, weights=None, model=None, reference_cache=None,
        batch_size=50, progress=_stderr):
    """FID between `generated` and `reference` images (any layout data.as_uint8_images takes).

    `model` is a loaded FIDInception (without it, the file `weights` is loaded, by default
    pytorch-fid's). `reference_cache`, an .npz path, keeps the reference side's statistics
    across calls, since the same real images are usually embedded again and again (see
    `reference_stats`). The reference side is done first, so a refused cache costs nothing."""
    device = device or _default_device()
    generated = data.as_uint8_images(generated)  # a bad layout fails now, not later
    if model is None:
        model = load_inception(weights, device)
    mu_ref, sigma_ref = reference_stats(reference, reference_cache, device, model=model,
                                        batch_size=batch_size, progress=progress)
    features = inception_features(generated, batch_size, device, model=model, progress=progress)
    return frechet_distance_to(features, mu_ref, sigma_ref)


def _sha256_of_images(images):
    """Hex sha256 of uint8 [N, C, H, W] images, shape included: which images a cache describes."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy())
    return digest.hexdigest()


def reference_stats(images, cache_path=None, device=None, weights=None, model=None,
                    batch_size=50, progress=_stderr):
    """(mu, sigma) of the Inception features of `images`, kept in the .npz file `cache_path`
    when given: read from it if it exists, else computed and written to it.

    A cache is used only for the very images it describes: it records their count and a
    sha256 of their pixels, and a cache of other images is refused with a ValueError (a wrong
    FID would be silent). It is written atomically, so an interrupted run leaves no bad cache.
    It assumes the standard weights: use another path for any other file. The statistics
    describe the real images, so keep the cache as private as they are."""
    images = data.as_uint8_images(images)
    if cache_path is None:
        return feature_statistics(inception_features(images, batch_size, device, weights,
                                                     model, progress))
    fingerprint = _sha256_of_images(images)
    if os.path.exists(cache_path):
        cached = files.read_npz(cache_path, ("mu", "sigma", "count", "images_sha256"),
                           "FID reference cache", "delete it to recompute it")
        if int(cached["count"]) != len(images):
            raise ValueError(f"FID reference cache {cache_path} describes {int(cached['count'])} "
                             f"images, not {len(images)}: delete it or use another path")
        if str(cached["images_sha256"]) != fingerprint:
            raise ValueError(f"FID reference cache {cache_path} describes other images than "
                             f"these {len(images)} (their sha256 differs): delete it or use "
                             f"another path")
        return cached["mu"], cached["sigma"]
    os.makedirs(os.path.dirname(cache_path) or ".", exist_ok=True)
    files.check_writable(cache_path)  # fail now, not after minutes of features
    mu, sigma = feature_statistics(inception_features(images, batch_size, device, weights,
                                                      model, progress))
    runs.atomic_write(cache_path, lambda f: np.savez(
        f, mu=mu, sigma=sigma, count=len(images), images_sha256=fingerprint))
    return mu, sigma


# --------------------------------------------------------------------------------------------
# Accuracy of a classifier trained on synthetic images only
# --------------------------------------------------------------------------------------------

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


def train_classifier(images, labels, num_classes=10, epochs=10, batch_size=64, lr=1e-3,
                     val_fraction=0.1, seed=0, device=None, progress=None):
    """Train SmallCNN on (synthetic) images and keep the epoch with the best accuracy on a
    held-out `val_fraction` of them. progress, if given, is called with a line after each epoch.
    Returns (model, info): info has val_accuracy, best_epoch, epochs, n_train, n_val."""
    if epochs < 1:
        raise ValueError(f"epochs: need at least 1, got {epochs}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    images, labels = _checked(images, labels, num_classes, "train_labels")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    n_val = max(1, int(round(val_fraction * len(images))))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    # Initialise from a forked global RNG so the weights depend on `seed` only and the
    # caller's random state is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator alone: the one forked
        model = SmallCNN(images.shape[1], images.shape[2], num_classes)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    best = (-1.0, 0, None)  # (validation accuracy, epoch, weights)
    for epoch in range(1, epochs + 1):
        model.train()
        shuffled = fit_idx[torch.randperm(len(fit_idx), generator=generator)]
        total_loss = 0.0
        for i in range(0, len(shuffled), batch_size):
            idx = shuffled[i:i + batch_size]
            x = images[idx].to(device).float() / 255.0
            loss = F.cross_entropy(model(x), labels[idx].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(idx)
        val_acc = accuracy(model, images[val_idx], labels[val_idx])
        if progress:
            progress(f"classifier epoch {epoch}/{epochs}: mean loss "
                     f"{total_loss / len(shuffled):.4f}, held-out synthetic accuracy {val_acc:.4f}")
        if val_acc > best[0]:  # strict: ties keep the earlier epoch
            best = (val_acc, epoch, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    return model, dict(val_accuracy=best[0], best_epoch=best[1], epochs=epochs,
                       n_train=len(fit_idx), n_val=n_val)


@torch.no_grad()
def accuracy(model, images, labels, batch_size=1000):
    """The fraction of images whose predicted class is their label."""
    model.eval()
    device = next(model.parameters()).device
    images, labels = data.as_uint8_images(images), torch.as_tensor(labels).long()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float() / 255.0
        correct += (model(x).argmax(1).cpu() == labels[i:i + batch_size]).sum().item()
    return correct / len(images)


def classifier_accuracy(train_images, train_labels, test_images, test_labels, num_classes=10,
                        epochs=10, batch_size=64, lr=1e-3, val_fraction=0.1, seed=0,
                        device=None, progress=None):
    """Train SmallCNN on (synthetic) train images (`train_classifier`) and return its accuracy
    on the (real) test set.

    The official code trains 50 epochs with Adam at lr 3e-4; the defaults here (10 epochs at
    1e-3) keep a few thousand images to about a minute on a CPU. Returns a dict with
    test_accuracy, val_accuracy, best_epoch, epochs, n_train, n_val, n_test."""
    train_images = data.as_uint8_images(train_images)
    test_images, test_labels = _checked(test_images, test_labels, num_classes, "test_labels")
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(f"train_images: shape {tuple(train_images.shape[1:])} differs from the "
                         f"test images' {tuple(test_images.shape[1:])}")
    model, info = train_classifier(train_images, train_labels, num_classes, epochs, batch_size,
                                   lr, val_fraction, seed, device, progress)
    # The test set is used exactly once, after the epoch has been chosen.
    return dict(test_accuracy=accuracy(model, test_images, test_labels), **info,
                n_test=len(test_images))


def _checked(images, labels, num_classes, name):
    images, labels = data.as_uint8_images(images), torch.as_tensor(labels).long()
    if (len(labels) != len(images) or len(labels) < 2
            or not 0 <= labels.min() <= labels.max() < num_classes):
        raise ValueError(f"{name}: need one label in 0..{num_classes - 1} per image "
                         f"(and at least 2 images)")
    return images, labels


def main(argv=None):
    parser = cli.OneLineParser(prog="evaluate.py",
                            description="FID and accuracy of synthetic images.")
    parser.add_argument("samples", type=cli.path, help="a samples file: .npz with 'images' "
                        "(uint8 NxHxW or NxHxWxC) and 'labels'")
    parser.add_argument("--dataset", required=True, choices=sorted(data.INFO))
    parser.add_argument("--data-dir", type=cli.path, help="folder with the dataset's files")
    parser.add_argument("--trust-data-files", action="store_true",
                        help="accept dataset files that are not the official ones: your own "
                             "data, knowingly")
    parser.add_argument("--n", type=int, default=None,
                        help="images per side for FID: the first N samples against the first "
                             "N training images (default: all samples)")
    parser.add_argument("--inception", type=cli.path, help="FID Inception weights file "
                        "(default: torch hub cache, pytorch-fid's file)")
    parser.add_argument("--cache-dir", type=cli.path, default=os.path.join("data", "fid_stats"),
                        help="where reference statistics are cached")
    # Bounds, like the device check, are train.py's (harness/flags.py): --epochs is its
    # --classifier-epochs.
    parser.add_argument("--epochs", type=flags.bounded("classifier_epochs"), default=10,
                        help="epochs of the accuracy classifier (default 10)")
    parser.add_argument("--seed", type=flags.bounded("seed"), default=0,
                        help="seed of the classifier (default 0)")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    args = parser.parse_args(argv)
    cli.keep_freed_memory()  # speed only: Inception's activations fault millions of pages in
    out = os.path.splitext(args.samples)[0] + ".eval.json"
    try:
        # Everything that can be checked in seconds is checked first: an error should never
        # come after minutes of Inception features or classifier training.
        device = flags.check_device(args.device)
        images, labels = files.load_samples(args.samples, args.dataset)
        n = len(images) if args.n is None else args.n
        if not 2 <= n <= len(images):
            raise ValueError(f"--n: need 2..{len(images)} (the number of samples), got {n}")
        files.check_writable(out)
        model = load_inception(args.inception, device)
        train_images, _ = data.load(args.dataset, "train", args.data_dir, args.trust_data_files)
        test_images, test_labels = data.load(args.dataset, "test", args.data_dir,
                                             args.trust_data_files)
        if n > len(train_images):
            raise ValueError(f"--n: {args.dataset} has {len(train_images)} training images, "
                             f"got {n}")
        cache = os.path.join(args.cache_dir, f"fid_stats_{args.dataset}_train_{n}.npz")
        fid_value = fid(images[:n], train_images[:n], device, model=model,
                        reference_cache=cache)
        accuracy = classifier_accuracy(images, labels, test_images, test_labels,
                                       data.INFO[args.dataset]["classes"], epochs=args.epochs,
                                       seed=args.seed, device=device, progress=_stderr)
        result = dict(samples=args.samples, dataset=args.dataset, fid=fid_value, fid_images=n,
                      accuracy=accuracy["test_accuracy"], classifier=accuracy)
        runs.atomic_write(out, lambda f: json.dump(result, f, indent=2), "w")
    except (WeightsError, ValueError, data.DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"FID {fid_value:.4f} ({n} samples vs {n} {args.dataset} training images); "
          f"accuracy {accuracy['test_accuracy']:.4f} (epoch {accuracy['best_epoch']}); "
          f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
