"""Files the command lines write and read back, checked on the way in: the samples file and any
.npz archive, and a test that a path can be written before minutes are spent on what goes there.

The samples file, written by train.py and sample.py and read by evaluate.py and bench/, is an .npz
with `images`, uint8 N x H x W (grayscale) or N x H x W x C (colour), the layout of
keras.datasets and of PIL, and `labels`, int64 N. A file that is missing, corrupt, truncated or
does not fit the dataset is one ValueError line, never a traceback.
"""
import os
import zipfile
import zlib

import numpy as np
import torch

from harness import data
from harness import runs


def save_samples(path, images, labels):
    """Write synthetic images (any layout data.as_uint8_images takes, e.g. the samplers' uint8
    N x C x H x W) and their labels as a samples file (see this module's docstring), atomically:
    an interrupted write leaves no partial file."""
    images = data.as_uint8_images(images).permute(0, 2, 3, 1).numpy()  # N x H x W x C
    labels = torch.as_tensor(labels).long().numpy()
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels: need one per image, got {labels.shape} for {len(images)}")
    runs.atomic_write(path, lambda f: np.savez_compressed(
        f, images=images[..., 0] if images.shape[-1] == 1 else images, labels=labels))


def load_samples(path, dataset):
    """Images (uint8 torch [N, C, H, W]) and labels (int64 [N]) of a samples file, checked to
    fit `dataset`: one ValueError line otherwise."""
    arrays = read_npz(path, ("images", "labels"), "samples", "corrupt or truncated file?")
    images, labels = data.as_uint8_images(arrays["images"]), arrays["labels"]
    info = data.INFO[dataset]
    if tuple(images.shape[1:]) != (info["channels"], info["size"], info["size"]):
        raise ValueError(f"samples: images of shape {tuple(images.shape[1:])} (C, H, W) do "
                         f"not match {dataset}")
    # A float label such as 2.7 would be truncated to a class without a word, so refuse it.
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise ValueError(f"samples: labels must be integers, one per image; got "
                         f"{labels.dtype} of shape {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"samples: {len(images)} images but {len(labels)} labels")
    if len(labels) and not 0 <= labels.min() <= labels.max() < info["classes"]:
        raise ValueError(f"samples: labels must lie in 0..{info['classes'] - 1} for {dataset}, "
                         f"found {labels.min()}..{labels.max()}")
    return images, torch.from_numpy(labels).long()


def read_npz(path, keys, what, hint):
    """The arrays `keys` of the .npz file `path` as a dict; if it is missing, corrupt,
    truncated or lacks one of them, one ValueError line that starts with `what`."""
    if not os.path.isfile(path):
        raise ValueError(f"{what}: {path} not found")
    try:
        archive = np.load(path)  # allow_pickle=False: only plain arrays, never code
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with archive:
            # Members are read lazily, and a damaged one (bad CRC, truncated data) only
            # raises when read: so the reading happens here, inside the try.
            missing = [key for key in keys if key not in archive.files]
            arrays = {key: archive[key] for key in keys if key not in missing}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{what}: cannot read {path}: {first_line(e)} ({hint})") from None
    if missing:
        raise ValueError(f"{what}: {path} has no array {', '.join(map(repr, missing))} "
                         f"({hint})")
    return arrays


def check_writable(path):
    """Raise a one-line OSError now if `path` cannot be written; leave the file system as it
    was (a missing file is created and removed again, an existing one is not changed)."""
    existed = os.path.exists(path)
    try:
        with open(path, "a"):  # append mode creates a missing file and never truncates one
            pass
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or first_line(e)}") from None
    if not existed:
        os.remove(path)


def first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
