"""Datasets: MNIST, FashionMNIST and CIFAR-10 from their usual files, and PNG grids.

`load(name, split, data_dir)` returns the images as uint8 [N, C, H, W] and the labels as int64
[N]. The files are read from `data_dir` when given (e.g. ../shared/data/mnist), else from
./data/<name>, downloading them there first when they are missing. Downloads are checked
against the publishers' MD5 sums; every file is checked for its format (magic number, shape,
length, compressed-stream CRC) and its contents (image shape, labels in 0..K-1) when read, so a
corrupt or truncated file gives one clear `DataError` line instead of a traceback or, worse,
silently wrong images.
"""
import gzip
import hashlib
import os
import pickle
import struct
import tarfile
import urllib.request
import zlib

import numpy as np
import torch
from PIL import Image, ImageDraw

INFO = {
    "mnist": dict(channels=1, size=28, classes=10),
    "fashionmnist": dict(channels=1, size=28, classes=10),
    "cifar10": dict(channels=3, size=32, classes=10),
}

# (file name, MD5 of the file as the publisher serves it)
_IDX_FILES = {
    "mnist": {
        "train": [("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
                  ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432")],
        "test": [("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
                 ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")],
    },
    "fashionmnist": {
        "train": [("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
                  ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe")],
        "test": [("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
                 ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310")],
    },
}
_MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
              "http://yann.lecun.com/exdb/mnist/"],
    "fashionmnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
}
_CIFAR_ARCHIVE = ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")


class DataError(Exception):
    """A dataset problem the user can fix (missing, corrupt or unknown); one line."""


def load(name, split="train", data_dir=None):
    """The images (uint8 [N, C, H, W]) and labels (int64 [N]) of a dataset split."""
    if name not in INFO:
        raise DataError(f"unknown dataset '{name}': choose one of {', '.join(INFO)}")
    if split not in ("train", "test"):
        raise DataError(f"unknown split '{split}': choose train or test")
    folder = data_dir or os.path.join("data", name)
    if name == "cifar10":
        return _load_cifar10(folder, split, download=data_dir is None)
    (image_file, image_md5), (label_file, label_md5) = _IDX_FILES[name][split]
    image_path = _find_or_download(name, folder, image_file, image_md5, data_dir is None)
    label_path = _find_or_download(name, folder, label_file, label_md5, data_dir is None)
    images = _read_idx(image_path, magic=2051)[:, None]  # N x H x W -> N x 1 x H x W
    labels = _read_idx(label_path, magic=2049)
    _check_contents(name, images, labels, image_path, label_path)
    return torch.from_numpy(images), torch.from_numpy(labels).long()


def _check_contents(name, images, labels, image_source, label_source):
    """One DataError naming the file unless the images have the dataset's shape (C, H, W) and
    there is one label in 0..K-1 per image: a file of the right format can still hold another
    dataset, or damage that the format checks cannot see."""
    info = INFO[name]
    expected = (info["channels"], info["size"], info["size"])
    if images.shape[1:] != expected:
        raise DataError(f"{image_source} holds images of shape {images.shape[1:]} (C, H, W), "
                        f"expected {expected} for {name}")
    if len(images) != len(labels):
        raise DataError(f"{image_source} has {len(images)} images but {label_source} has "
                        f"{len(labels)} labels")
    if len(labels) and not 0 <= labels.min() <= labels.max() < info["classes"]:
        raise DataError(f"{label_source} has labels in {labels.min()}..{labels.max()}, "
                        f"expected 0..{info['classes'] - 1} for {name}")


def _read_idx(path, magic):
    """One IDX file (LeCun's format: big-endian magic, dimensions, then uint8 data)."""
    try:
        with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
            raw = f.read()
    # gzip raises OSError on a non-gzip file or a CRC mismatch, EOFError on a truncated one and
    # zlib.error on a damaged compressed stream.
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e} (corrupt or truncated file?)") from None
    ndim = magic - 2048
    if len(raw) < 4 + 4 * ndim or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{path} is not an IDX file of the expected kind "
                        f"(magic number {magic} expected)")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated or padded: header says {shape}, "
                        f"found {data.size} values")
    return data.reshape(shape).copy()


def _load_cifar10(folder, split, download):
    archive = _find_or_download("cifar10", folder, *_CIFAR_ARCHIVE, download)
    members = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    try:
        with gzip.open(archive, "rb") as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
            for member in members:
                # The official archive is a set of Python pickles; we only open the file
                # whose MD5 or layout we checked, and only read arrays from it.
                batch = pickle.load(tar.extractfile(f"cifar-10-batches-py/{member}"),
                                    encoding="bytes")
                source = f"{archive} ({member})"
                pixels = np.asarray(batch[b"data"], dtype=np.uint8)
                if pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
                    # reshape(-1, 3, 32, 32) would silently regroup rows of another width
                    raise DataError(f"{source} holds rows of shape {pixels.shape[1:]}, "
                                    f"expected (3072,) for cifar10")
                images.append(pixels.reshape(-1, 3, 32, 32))
                labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
                _check_contents("cifar10", images[-1], labels[-1], source, source)
            # tarfile stops at its end-of-archive marker, before gzip's CRC at the very end:
            # read to the end, so that a damaged archive cannot pass as good data.
            while stream.read(1 << 20):
                pass
    except (OSError, EOFError, KeyError, tarfile.TarError, pickle.UnpicklingError,
            ValueError, zlib.error) as e:
        raise DataError(f"cannot read {archive}: {e} (corrupt or truncated file?)") from None
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _find_or_download(name, folder, filename, md5, download):
    """The path of `filename` in `folder`, downloading (and MD5-checking) it if allowed."""
    path = os.path.join(folder, filename)
    if os.path.exists(path):
        return path
    if not download:
        raise DataError(f"{filename} not found in {folder}: point --data-dir at a folder "
                        f"holding the {name} files")
    os.makedirs(folder, exist_ok=True)
    errors = []
    for mirror in _MIRRORS[name]:
        try:
            with urllib.request.urlopen(mirror + filename, timeout=30) as response:
                payload = response.read()
        except OSError as e:
            errors.append(f"{mirror}: {e}")
            continue
        if hashlib.md5(payload).hexdigest() != md5:
            errors.append(f"{mirror}: MD5 mismatch")
            continue
        with open(path + ".part", "wb") as f:
            f.write(payload)
        os.replace(path + ".part", path)  # atomic: never leave a half-written file
        return path
    raise DataError(f"{filename} not found in {folder} and could not be downloaded "
                    f"({'; '.join(errors)}); without internet, download it elsewhere or "
                    f"point --data-dir at a folder holding it")


def as_uint8_images(images):
    """uint8 torch [N, C, H, W] from: numpy uint8 [N, H, W] or [N, H, W, C], or torch uint8
    [N, C, H, W]. Float torch images in [0, 1] are quantised to uint8 first: the one
    quantisation used for PNG grids, FID and the classifier, so each sees what a user would."""
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


def save_grid(images, path, nrow):
    """Save images (float [N, C, H, W] in [0, 1], or uint8) as one PNG, `nrow` per row."""
    images = as_uint8_images(images)
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    grid = torch.zeros(c, rows * (h + 2) + 2, nrow * (w + 2) + 2, dtype=torch.uint8)
    for i in range(n):  # a 2-pixel black border around every image
        top, left = 2 + (i // nrow) * (h + 2), 2 + (i % nrow) * (w + 2)
        grid[:, top:top + h, left:left + w] = images[i]
    array = grid.permute(1, 2, 0).numpy()
    Image.fromarray(array[:, :, 0] if c == 1 else array).save(path)


def save_side_by_side(panels, path, gap=12):
    """Put PNG pictures side by side in one PNG, each under its title, top-aligned so that the
    rows of grids with one row per class line up. panels: [(title, png path)]; missing files
    are left out (a run without central images has no such picture)."""
    pictures = [(title, Image.open(p).convert("RGB")) for title, p in panels if os.path.exists(p)]
    top = 14  # room for one line of PIL's built-in font
    width = sum(picture.width for _, picture in pictures) + gap * (len(pictures) + 1)
    height = top + max(picture.height for _, picture in pictures) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw, left = ImageDraw.Draw(canvas), gap
    for title, picture in pictures:
        draw.text((left, 1), title, fill="black")
        canvas.paste(picture, (left, top))
        left += picture.width + gap
    canvas.save(path)
