"""Tests of data.py's checks: a damaged or foreign dataset file gives one DataError line that
names the file, never a traceback and never silently wrong images; and a dataset is read only
from its official files, unless trust_files (--trust-data-files).

The damaged files are copies of the real MNIST test split with one change each; where a byte
is flipped, the offset is found by trying (the first one from the middle of the compressed data
at which gzip itself fails in the way under test), not hard-coded. CIFAR-10 is not on this
machine, so its tests build small archives in the official layout.
"""
import gzip
import io
import os
import pickle
import shutil
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch

from harness import data

IMAGES, LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


def copy_test_split(mnist_dir, folder):
    """A copy of the MNIST test split in `folder` that loads like the original (a control:
    whatever fails after a change to it, fails because of that change)."""
    for name in (IMAGES, LABELS):
        shutil.copy(os.path.join(mnist_dir, name), folder / name)
    images, labels = data.load("mnist", "test", str(folder))
    assert images.shape == (10_000, 1, 28, 28) and labels.shape == (10_000,)
    return folder


def one_line_data_error(load, *needles):
    with pytest.raises(data.DataError) as e:
        load()
    message = str(e.value)
    assert "\n" not in message and all(n in message for n in needles), message


def flip_byte(blob, raises, start):
    """`blob` (a gzip file) with one byte flipped, at the first offset from `start` at which
    gzip.decompress of the result raises `raises`."""
    for offset in range(start, len(blob) - 8):  # the last 8 bytes: CRC and length
        damaged = bytearray(blob)
        damaged[offset] ^= 0xFF
        try:
            gzip.decompress(bytes(damaged))
        except raises:
            return bytes(damaged)
        except Exception:
            continue
    pytest.fail(f"no single flipped byte from {start} makes gzip raise {raises.__name__}")


def deflate_start(blob):
    """Offset of the compressed stream in a gzip file: after the 10-byte header and, when the
    FNAME flag is set (gzip and tarfile set it), the zero-terminated file name."""
    assert blob[3] & ~0x08 == 0, "a header with fields other than FNAME"
    return blob.index(b"\0", 10) + 1 if blob[3] & 0x08 else 10


# In the middle of a long compressed stream almost any byte still decodes (to other bytes, which
# the CRC at the end catches); the stream's first bytes (block type and Huffman tables) are
# where a flipped byte breaks the stream itself.
DAMAGE = {  # what gzip raises -> the damaged file
    "zlib.error": lambda blob: flip_byte(blob, zlib.error, deflate_start(blob)),
    "BadGzipFile (CRC)": lambda blob: flip_byte(blob, gzip.BadGzipFile, len(blob) // 2),
    "EOFError": lambda blob: blob[:len(blob) // 2],  # truncated
}


@pytest.mark.parametrize("damaged_file", [IMAGES, LABELS])
def test_damaged_gzip_gives_one_data_error_line(mnist_dir, tmp_path, damaged_file):
    folder = copy_test_split(mnist_dir, tmp_path)
    original = (folder / damaged_file).read_bytes()
    for damage in DAMAGE.values():
        (folder / damaged_file).write_bytes(damage(original))
        one_line_data_error(lambda: data.load("mnist", "test", str(folder)),
                            str(folder / damaged_file), "corrupt or truncated")


def rewrite_idx(path, change):
    """Decompress an IDX .gz, let change(bytearray) edit it, compress it back."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    change(raw)
    path.write_bytes(gzip.compress(bytes(raw)))


def test_labels_outside_0_to_9_are_refused(mnist_dir, tmp_path):
    folder = copy_test_split(mnist_dir, tmp_path)
    labels = folder / LABELS
    sixth_label = 8 + 5  # after the IDX header: magic and count, 4 bytes each

    rewrite_idx(labels, lambda raw: raw.__setitem__(sixth_label, 9))  # the largest class
    assert data.load("mnist", "test", str(folder), trust_files=True)[1][5] == 9
    rewrite_idx(labels, lambda raw: raw.__setitem__(sixth_label, 10))  # one past it
    one_line_data_error(lambda: data.load("mnist", "test", str(folder)), str(labels), "0..9")


def test_images_of_another_shape_are_refused(mnist_dir, tmp_path):
    # The same 784 bytes per image, declared as 56 x 14: a valid IDX file, not MNIST digits.
    folder = copy_test_split(mnist_dir, tmp_path)
    images = folder / IMAGES
    rewrite_idx(images, lambda raw: raw.__setitem__(slice(8, 16), struct.pack(">II", 56, 14)))
    one_line_data_error(lambda: data.load("mnist", "test", str(folder)), str(images),
                        "(1, 56, 14)", "(1, 28, 28)")


# ---- CIFAR-10: small archives in the official layout ----------------------------------------

def write_cifar(folder, pixels, labels):
    """cifar-10-python.tar.gz holding only cifar-10-batches-py/test_batch, a pickle of
    {b"data": uint8 rows of 3072 (R, G, B planes of 32 x 32), b"labels": list of int}."""
    payload = pickle.dumps({b"data": pixels, b"labels": list(labels)})
    path = folder / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        member = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    return path


def test_cifar10_loads_and_refuses_foreign_contents(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
    labels = np.arange(20) % 10
    archive = write_cifar(tmp_path, pixels, labels)
    images, loaded_labels = data.load("cifar10", "test", str(tmp_path), trust_files=True)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert images[3, 1, 0, 5] == pixels[3, 1024 + 5]  # green plane, row 0, column 5
    assert loaded_labels.tolist() == labels.tolist()
    load = lambda: data.load("cifar10", "test", str(tmp_path), trust_files=True)

    write_cifar(tmp_path, pixels, np.where(labels == 3, 10, labels))
    one_line_data_error(load, str(archive), "test_batch", "0..9")
    write_cifar(tmp_path, pixels, labels[:19])
    one_line_data_error(load, str(archive), "20 images", "19 labels")
    # 60 rows of 1024: as many bytes as 20 images, which reshape(-1, 3, 32, 32) would accept.
    write_cifar(tmp_path, pixels.reshape(60, 1024), labels)
    one_line_data_error(load, str(archive), "test_batch", "(1024,)")


def test_cifar10_damaged_archive_gives_one_data_error_line(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
    archive = write_cifar(tmp_path, pixels, np.arange(20) % 10)
    original = archive.read_bytes()
    for damage in DAMAGE.values():
        archive.write_bytes(damage(original))
        one_line_data_error(lambda: data.load("cifar10", "test", str(tmp_path)), str(archive),
                            "corrupt or truncated")


# ---- official files ---------------------------------------------------------------------------

def test_another_datasets_or_splits_files_are_refused_unless_trusted(mnist_dir, tmp_path):
    """Files of the right format and shape that are not the dataset's own: MNIST's given as
    FashionMNIST's (the same size), test files named as training files."""
    folder = copy_test_split(mnist_dir, tmp_path)  # the official MNIST test files load
    one_line_data_error(lambda: data.load("fashionmnist", "test", str(folder)),
                        str(folder / IMAGES), "official", "--trust-data-files")
    assert data.load("fashionmnist", "test", str(folder), trust_files=True)[0].shape[0] == 10_000
    for name in (IMAGES, LABELS):
        os.rename(folder / name, folder / name.replace("t10k", "train"))
    one_line_data_error(lambda: data.load("mnist", "train", str(folder)),
                        str(folder / "train-images-idx3-ubyte.gz"), "10000", "60000")
    assert data.load("mnist", "train", str(folder), trust_files=True)[1].shape == (10_000,)


def test_a_changed_official_file_is_refused_and_a_recompressed_one_is_not(mnist_dir, tmp_path):
    """The copies here are recompressed (not the publisher's MD5): their contents' SHA-256
    identifies them. One label moved to another class (still in 0..9) is other data."""
    folder = copy_test_split(mnist_dir, tmp_path)
    labels = folder / LABELS
    rewrite_idx(labels, lambda raw: None)  # the same contents, compressed again
    assert data.load("mnist", "test", str(folder))[1].shape == (10_000,)
    rewrite_idx(labels, lambda raw: raw.__setitem__(8, (raw[8] + 1) % 10))
    one_line_data_error(lambda: data.load("mnist", "test", str(folder)), str(labels), "official")


def test_a_cifar10_archive_that_is_not_the_official_one_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    archive = write_cifar(tmp_path, rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                          np.arange(20) % 10)
    one_line_data_error(lambda: data.load("cifar10", "test", str(tmp_path)), str(archive),
                        "20 images", "10000", "--trust-data-files")


def test_the_digest_of_a_data_set_changes_with_any_image_or_label(mnist_dir):
    images, labels = data.load("mnist", "test", mnist_dir)
    digest = data.digest(images, labels)
    assert data.digest(images.clone(), labels.clone()) == digest
    changed = labels.clone()
    changed[0] = (changed[0] + 1) % 10
    assert data.digest(images, changed) != digest
    assert data.digest(images[:-1], labels[:-1]) != digest


# ---- image layouts --------------------------------------------------------------------------

def test_image_layouts_become_uint8_nchw():
    g = np.random.default_rng(0)
    gray = g.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    rgb = g.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    assert torch.equal(data.as_uint8_images(gray), torch.from_numpy(gray)[:, None])
    assert torch.equal(data.as_uint8_images(rgb), torch.from_numpy(rgb).permute(0, 3, 1, 2))
    nchw = torch.from_numpy(rgb).permute(0, 3, 1, 2)
    assert torch.equal(data.as_uint8_images(nchw), nchw)
    # Float images are quantised like a saved PNG: round(255 x), clamped to [0, 1] first.
    floats = torch.tensor([0.0, 0.5, 1.0, 1.5, -1.0, 0.2]).view(6, 1, 1, 1)
    expected = torch.tensor([0, 128, 255, 255, 0, 51], dtype=torch.uint8).view(6, 1, 1, 1)
    assert torch.equal(data.as_uint8_images(floats), expected)
    with pytest.raises(ValueError, match="images"):
        data.as_uint8_images(gray[:, None])  # numpy N x 1 x H x W is not a listed layout
    with pytest.raises(ValueError, match="uint8"):
        data.as_uint8_images(gray.astype(np.float32))
