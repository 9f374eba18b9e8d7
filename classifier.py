"""Synthetic-to-real classification accuracy (paper section 4).

A small CNN is trained *only* on synthetic images; the epoch whose accuracy on a held-out part
of the synthetic set is best is kept (never chosen on the test set), and that model is tested
once on the real test set. A generator that has learnt the classes gets a high number; one that
draws the right label only by chance, or draws every class alike, gets ~1/classes.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import data


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
        torch.manual_seed(seed)
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
