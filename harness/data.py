"""Datasets: MNIST, FashionMNIST and CIFAR-10 from their usual files, and PNG grids.

`load(name, split, data_dir)` returns the images as uint8 [N, C, H, W] and the labels as int64
[N]. The files are read from `data_dir` when given (e.g. ../shared/data/mnist), else from
./data/<name>, downloading them there first when they are missing. Every file is checked for its
format (magic number, shape, length, compressed-stream CRC) and its contents (image shape,
labels in 0..K-1) when read, so a corrupt or truncated file gives one clear `DataError` line
instead of a traceback or, worse, silently wrong images. And it must be the official file of
that dataset and split (its number of images, and the publisher's digest): FashionMNIST files
given for MNIST, or test files named as training files, pass every other check. `trust_files`
(train.py's --trust-data-files) accepts other files knowingly.
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

from harness import runs

# train and test: the number of images of the official splits
INFO = {
    "mnist": dict(channels=1, size=28, classes=10, train=60000, test=10000),
    "fashionmnist": dict(channels=1, size=28, classes=10, train=60000, test=10000),
    "cifar10": dict(channels=3, size=32, classes=10, train=50000, test=10000),
}

# (file name, MD5 of the file as the publisher serves it, SHA-256 of its decompressed contents
# where known). A recompressed copy (such as ../shared/data/mnist) has another MD5 but the same
# contents. The MNIST contents' digests were computed from those copies (their sizes are the
# official ones); for FashionMNIST and CIFAR-10 only the publishers' MD5s are known here.
_IDX_FILES = {
    "mnist": {
        "train": [("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                   "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
                  ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432",
                   "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5")],
        "test": [("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3",
                  "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
                 ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c",
                  "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2")],
    },
    "fashionmnist": {
        "train": [("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", None),
                  ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", None)],
        "test": [("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", None),
                 ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", None)],
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


def load(name, split="train", data_dir=None, trust_files=False):
    """The images (uint8 [N, C, H, W]) and labels (int64 [N]) of a dataset split; unless
    `trust_files`, only from the official files."""
    if name not in INFO:
        raise DataError(f"unknown dataset '{name}': choose one of {', '.join(INFO)}")
    if split not in ("train", "test"):
        raise DataError(f"unknown split '{split}': choose train or test")
    folder = data_dir or os.path.join("data", name)
    if name == "cifar10":
        return _load_cifar10(folder, split, data_dir is None, trust_files)
    (image_file, image_md5, image_sha256), (label_file, label_md5, label_sha256) = \
        _IDX_FILES[name][split]
    image_path = _find_or_download(name, folder, image_file, image_md5, data_dir is None)
    label_path = _find_or_download(name, folder, label_file, label_md5, data_dir is None)
    images, image_contents = _read_idx(image_path, magic=2051)
    labels, label_contents = _read_idx(label_path, magic=2049)
    images = images[:, None]  # N x H x W -> N x 1 x H x W
    _check_contents(name, images, labels, image_path, label_path)
    if not trust_files:
        _check_official(name, split, len(labels), image_path, image_md5,
                        image_sha256 == image_contents)
        _check_official(name, split, len(labels), label_path, label_md5,
                        label_sha256 == label_contents)
    return torch.from_numpy(images), torch.from_numpy(labels).long()


def _check_official(name, split, count, path, md5, same_contents=False):
    """One DataError naming the file unless it is the official one: the split's number of
    images, and the publisher's MD5 of the file or (same_contents) the known SHA-256 of its
    decompressed contents."""
    hint = "pass --trust-data-files to use other files knowingly"
    if count != INFO[name][split]:
        raise DataError(f"{path} holds {count} images, the official {name} {split} split "
                        f"{INFO[name][split]} (another split's file?); {hint}")
    if not same_contents:
        with open(path, "rb") as f:
            if hashlib.md5(f.read()).hexdigest() != md5:
                raise DataError(f"{path} is not the official {name} file (its digest is not "
                                f"the publisher's: another dataset's file?); {hint}")


def digest(images, labels):
    """SHA-256 of a data set as loaded (shapes, images, labels). A run's checkpoint keeps the
    digest of its training data, so that a resume on other data is refused. It identifies the
    sensitive data: it belongs in private files only."""
    h = hashlib.sha256()
    for tensor in (images, labels):
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.contiguous().numpy())
    return h.hexdigest()


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
    """One IDX file (LeCun's format: big-endian magic, dimensions, then uint8 data), and the
    SHA-256 of its decompressed contents."""
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
    return data.reshape(shape).copy(), hashlib.sha256(raw).hexdigest()


def _load_cifar10(folder, split, download, trust_files):
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
    if not trust_files:
        _check_official("cifar10", split, sum(map(len, labels)), archive, _CIFAR_ARCHIVE[1])
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
        runs.atomic_write(path, lambda f: f.write(payload))  # never a half-written file
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
    picture = Image.fromarray(array[:, :, 0] if c == 1 else array)
    runs.atomic_write(path, lambda f: picture.save(f, format="PNG"))  # never half a file


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
    runs.atomic_write(path, lambda f: canvas.save(f, format="PNG"))
