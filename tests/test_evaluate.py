"""Tests of evaluate.py and inception.py: FID network layout and loading, Frechet distance,
the reference-statistics cache, accuracy, and the command line with its bad-input checks.

Reference values come from outside this code base: the state_dict layout, the pinned features
and the 500-vs-500 MNIST FID were produced by pytorch-fid 0.3.0 itself (in a separate venv, see
fid_inception_keys.txt, PINNED_FEATURES and the FID test). Tests needing the real weights skip
when the file is absent from the torch hub cache.
"""
import json
import os
import urllib.error

import numpy as np
from scipy import linalg
import pytest
import torch

from harness import data
from harness import files
import evaluate
import inception
from evaluate import classifier_accuracy

HERE = os.path.dirname(os.path.abspath(__file__))
REAL_WEIGHTS = os.path.join(torch.hub.get_dir(), "checkpoints", inception.FID_WEIGHTS_FILE)
needs_real_weights = pytest.mark.skipif(
    not os.path.isfile(REAL_WEIGHTS),
    reason=f"no FID Inception weights at {REAL_WEIGHTS} (get-inception-weights puts them there)")


def pytorch_fid_layout():
    """[(key, shape, dtype)] of pytorch-fid's fid_inception_v3().state_dict(), in order."""
    rows = []
    with open(os.path.join(HERE, "fid_inception_keys.txt")) as f:
        for line in f:
            if not line.startswith("#"):
                key, shape, dtype = line.split()
                shape = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
                rows.append((key, shape, dtype))
    return rows


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A weight file in pytorch-fid's layout, built from the fixture alone, random values
    scaled so activations stay O(1) through the 94 conv+BN layers."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape, dtype in pytorch_fid_layout():
        if dtype == "int64":
            state[key] = torch.zeros(shape, dtype=torch.int64)
        elif key.endswith("running_var") or key.endswith("bn.weight"):
            state[key] = torch.ones(shape)
        elif len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:
            state[key] = torch.zeros(shape)
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(state, path)
    return str(path), state


# ---- network layout and loading -------------------------------------------------------------

def test_state_dict_layout_is_pytorch_fids():
    ours = [(k, tuple(v.shape), str(v.dtype).replace("torch.", ""))
            for k, v in inception.FIDInception().state_dict().items()]
    theirs = pytorch_fid_layout()
    assert len(theirs) == 566
    assert ours == theirs


def test_loads_random_weights_in_pytorch_fid_layout(random_weights):
    path, state = random_weights
    model = inception.load_inception(path, "cpu")
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key in state:
        assert torch.equal(loaded[key], state[key]), key
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    features = evaluate.inception_features(images, model=model, progress=None)
    assert features.shape == (3, 2048) and np.isfinite(features).all()
    assert (features >= 0).all()  # pool3 averages ReLU outputs


def one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message and all(n in message for n in needles), message


def test_missing_weights_file_gives_one_clear_line(tmp_path):
    path = str(tmp_path / "nowhere.pth")
    with pytest.raises(inception.WeightsError) as e:
        inception.load_inception(path)
    one_line_error(e, path, "not found")


def test_default_source_offline_gives_one_clear_line(tmp_path, monkeypatch):
    # The default source is pytorch-fid's release URL through torch.hub's cache; simulate
    # "not cached, no internet" without touching the network.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    asked = []

    def offline(url, **kwargs):
        asked.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(inception.WeightsError) as e:
        inception.load_inception()
    assert asked == ["https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                     "pt_inception-2015-12-05-6726825d.pth"]  # pytorch-fid's FID_WEIGHTS_URL
    hub_file = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    one_line_error(e, str(hub_file), "name resolution", "copy", str(hub_file.parent),
                   "--inception")


def test_truncated_weights_file_gives_one_clear_line(random_weights, tmp_path):
    blob = open(random_weights[0], "rb").read()
    path = tmp_path / "truncated.pth"
    path.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(inception.WeightsError) as e:
        inception.load_inception(str(path))
    one_line_error(e, str(path), inception.FID_WEIGHTS_FILE)
    path.write_text("not a torch file\n")
    with pytest.raises(inception.WeightsError) as e:
        inception.load_inception(str(path))
    one_line_error(e, str(path))


def test_wrong_state_dict_gives_one_clear_line(random_weights, tmp_path):
    state = dict(random_weights[1])
    del state["Mixed_7c.branch_pool.conv.weight"]  # e.g. a torchvision or other checkpoint
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    path = str(tmp_path / "wrong.pth")
    torch.save(state, path)
    with pytest.raises(inception.WeightsError) as e:
        inception.load_inception(path)
    one_line_error(e, path, "2 key problem(s)", "missing Mixed_7c.branch_pool.conv.weight")
    state = dict(random_weights[1], **{"fc.weight": torch.zeros(1000, 2048)})
    torch.save(state, path)
    with pytest.raises(inception.WeightsError) as e:
        inception.load_inception(path)
    one_line_error(e, path, "1 key problem(s)", "wrong shape fc.weight")


def test_cli_prints_weights_error_and_exits_2(tmp_path, capsys):
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=np.zeros((4, 28, 28), np.uint8), labels=np.arange(4))
    bad = str(tmp_path / "missing.pth")
    assert evaluate.main([str(samples), "--dataset", "mnist", "--inception", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and bad in err


# ---- statistics and Frechet distance --------------------------------------------------------

def closed_form_fid(mu1, s1, mu2, s2):
    """FID of two Gaussians via symmetric eigendecompositions: Tr sqrt(S1 S2) equals
    Tr sqrt(S1^1/2 S2 S1^1/2), the square root of a symmetric PSD matrix."""
    def psd_sqrt(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    r1 = psd_sqrt(s1)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def random_gaussian(rng, dim):
    a = rng.normal(size=(dim, dim))
    return rng.normal(size=dim), a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_matches_closed_form():
    rng = np.random.default_rng(1)
    (mu1, s1), (mu2, s2) = random_gaussian(rng, 16), random_gaussian(rng, 16)
    expected = closed_form_fid(mu1, s1, mu2, s2)
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2, by hand.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu = np.array([3.0, 0.0, 0.0])
    assert evaluate.frechet_distance(mu, np.diag(a), 0 * mu, np.diag(b)) == pytest.approx(
        9.0 + 1.0 + 0.0 + 4.0, abs=1e-9)


def test_statistics_of_gaussian_samples_give_closed_form_fid():
    rng = np.random.default_rng(2)
    (mu1, s1), (mu2, s2) = random_gaussian(rng, 4), random_gaussian(rng, 4)
    n = 50_000  # > one 4096-row chunk, so the chunked covariance is exercised
    x1 = rng.multivariate_normal(mu1, s1, n).astype(np.float32)
    x2 = rng.multivariate_normal(mu2, s2, n).astype(np.float32)
    m1, c1 = evaluate.feature_statistics(x1)
    np.testing.assert_allclose(m1, x1.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(c1, np.cov(x1.astype(np.float64), rowvar=False), atol=1e-10)
    estimate = evaluate.frechet_distance(m1, c1, *evaluate.feature_statistics(x2))
    # Sampling error of FID with 4 dims and 5e4 samples per side: sd 0.03 over 20 seeds.
    assert estimate == pytest.approx(closed_form_fid(mu1, s1, mu2, s2), abs=0.1)


def test_frechet_distance_of_a_set_with_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 64))  # 10 samples in 64 dims: covariance of rank 9
    mu, sigma = evaluate.feature_statistics(x)
    assert abs(evaluate.frechet_distance(mu, sigma, mu, sigma)) < 1e-4  # trace(sigma) ~ 64
    y = rng.normal(size=(10, 64)) + 1.0
    value = evaluate.frechet_distance(mu, sigma, *evaluate.feature_statistics(y))
    assert np.isfinite(value) and value > 64 * 0.9  # mean shift alone contributes ~64


def test_frechet_distance_refuses_statistics_that_are_not_covariances():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="positive semi-definite"):
        evaluate.frechet_distance(np.zeros(3), -eye, np.zeros(3), eye)  # sqrt(-I) = i I
    with pytest.raises(ValueError, match="positive semi-definite"):
        evaluate.frechet_distance(np.zeros(3), eye, np.zeros(3), -eye)


@pytest.mark.parametrize("n", [2, 40, 95, 96, 200])
def test_frechet_distance_to_features_equals_the_distance_of_their_statistics(n):
    """The n x n route (n < D) gives the number the D x D one gives, at and around n = D. They
    differ by round-off only: the D x D route takes square roots of the D - n eigenvalues of a
    singular product that are 0 up to round-off (each about sqrt(1e-16 x the largest)), which
    the n x n route never sees; measured, 3e-8 of the value."""
    rng = np.random.default_rng(n)
    features = rng.normal(size=(n, 96)) * rng.uniform(0.5, 2.0, size=96)
    mu2, s2 = evaluate.feature_statistics(rng.normal(size=(300, 96)) + 0.3)
    expected = evaluate.frechet_distance(*evaluate.feature_statistics(features), mu2, s2)
    assert evaluate.frechet_distance_to(features, mu2, s2) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        evaluate.frechet_distance_to(features[:1], mu2, s2)


def test_frechet_distance_agrees_with_the_matrix_square_root_on_singular_statistics():
    """pytorch-fid's formula, Tr(sqrtm(S1 S2)), on rank-deficient covariances (fewer samples
    than dimensions, as FID with 1,000 images in 2,048 dimensions)."""
    rng = np.random.default_rng(4)
    (mu1, s1), (mu2, s2) = (evaluate.feature_statistics(rng.normal(size=(40, 96)) * scale)
                            for scale in (1.0, 1.5))
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean))
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)


# ---- fid() and the reference-statistics cache -----------------------------------------------

def counting(model):
    """`model` as a function that also counts, in .images, the images it has embedded."""
    def embed(x):
        embed.images += len(x)
        return model(x)
    embed.images = 0
    return embed


def refusing(*args, **kwargs):
    raise AssertionError("Inception was run: the cache should have been used or refused first")


def random_images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def random_model(random_weights):
    return inception.load_inception(random_weights[0])


def test_reference_stats_are_cached_for_the_images_they_describe_only(random_model, tmp_path):
    model = counting(random_model)
    images = random_images(3, seed=0)
    cache = str(tmp_path / "stats" / "reference.npz")  # its folder does not exist yet
    mu, sigma = evaluate.reference_stats(images, cache, "cpu", model=model, progress=None)
    direct = evaluate.feature_statistics(evaluate.inception_features(images, device="cpu",
                                                                     model=model, progress=None))
    np.testing.assert_allclose(mu, direct[0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma, direct[1], rtol=1e-6, atol=1e-9)
    assert os.listdir(tmp_path / "stats") == ["reference.npz"]  # no partial file left behind
    with np.load(cache) as cached:
        assert int(cached["count"]) == 3

    # The same images: read back, without running Inception.
    again = evaluate.reference_stats(images, cache, "cpu", model=refusing, progress=None)
    assert np.array_equal(again[0], mu) and np.array_equal(again[1], sigma)
    # Other images: refused in one line, again before running Inception.
    for others, needles in ((images[:2], ["describes 3 images, not 2"]),
                            (255 - images, ["other images", "sha256"])):
        with pytest.raises(ValueError) as e:
            evaluate.reference_stats(others, cache, "cpu", model=refusing, progress=None)
        one_line_error(e, cache, *needles)


def test_unreadable_reference_cache_gives_one_clear_line(tmp_path):
    images = random_images(4, seed=0)
    cache = tmp_path / "reference.npz"
    np.savez(cache, mu=np.zeros(2048), sigma=np.eye(2048))  # records no count: which images?
    with pytest.raises(ValueError) as e:
        evaluate.reference_stats(images, str(cache), "cpu", model=refusing, progress=None)
    one_line_error(e, str(cache), "'count'", "delete it")
    blob = bytearray(cache.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # inside sigma's data: the zip member's CRC no longer matches
    cache.write_bytes(bytes(blob))
    with pytest.raises(ValueError) as e:
        evaluate.reference_stats(images, str(cache), "cpu", model=refusing, progress=None)
    one_line_error(e, str(cache), "cannot read", "delete it")


def test_fid_hands_generated_and_cached_reference_statistics_to_the_distance(
        random_model, tmp_path, monkeypatch):
    model = counting(random_model)
    generated, reference = random_images(2, seed=1), random_images(3, seed=2)
    expected = [evaluate.inception_features(generated, device="cpu", model=model,
                                            progress=None),
                *evaluate.feature_statistics(evaluate.inception_features(
                    reference, device="cpu", model=model, progress=None))]
    # The distance has its own tests above: here only what fid() hands it matters.
    handed = []
    monkeypatch.setattr(evaluate, "frechet_distance_to",
                        lambda *stats: handed.append(stats) or 1.5)
    cache = str(tmp_path / "reference.npz")
    for embedded in (2 + 3, 2):  # the second call reads the reference side from the cache
        before = model.images
        assert evaluate.fid(generated, reference, "cpu", model=model, reference_cache=cache,
                            progress=None) == 1.5
        assert model.images - before == embedded
        for got, want in zip(handed[-1], expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    with np.load(cache) as cached:
        assert int(cached["count"]) == len(reference)


# ---- the samples file -----------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_samples_file_holds_the_documented_layout_and_reads_back(dataset, tmp_path):
    # Random pixels: a transposed, flipped or channel-mixed round trip cannot pass.
    info = data.INFO[dataset]
    images = torch.randint(0, 256, (5, info["channels"], info["size"], info["size"]),
                           dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 0, 9, 9, 1])
    path = str(tmp_path / "samples.npz")
    files.save_samples(path, images, labels)
    assert os.listdir(tmp_path) == ["samples.npz"]  # no partial file left behind
    with np.load(path) as saved:  # what other tools see: N x H x W, or N x H x W x C
        hwc = images.permute(0, 2, 3, 1).numpy()
        assert np.array_equal(saved["images"], hwc[..., 0] if info["channels"] == 1 else hwc)
        assert saved["labels"].dtype == np.int64
        assert np.array_equal(saved["labels"], labels.numpy())
    read_images, read_labels = files.load_samples(path, dataset)
    assert torch.equal(read_images, images) and torch.equal(read_labels, labels)
    other = "cifar10" if dataset == "mnist" else "mnist"
    with pytest.raises(ValueError, match=f"do not match {other}"):
        files.load_samples(path, other)
    with pytest.raises(ValueError, match="one per image"):
        files.save_samples(path, images, labels[:4])


# ---- command line ---------------------------------------------------------------------------

def test_cli_fid_of_a_set_with_itself_is_zero_and_json_is_written(mnist_dir, random_weights,
                                                                  tmp_path, capsys, monkeypatch):
    # "Samples" that are the first training images: their FID against the first n training
    # images (the cached reference statistics) must be ~0. End to end, with random weights:
    # each FID costs a 2048 x 2048 sqrtm (~15 s here), so this is the only such call.
    images, labels = data.load("mnist", "train", mnist_dir)
    samples = tmp_path / "samples.npz"
    files.save_samples(str(samples), images[:200], labels[:200])
    argv = [str(samples), "--dataset", "mnist", "--data-dir", mnist_dir, "--n", "5",
            "--inception", random_weights[0], "--cache-dir", str(tmp_path / "cache"),
            "--epochs", "1", "--device", "cpu"]
    load = data.load  # the classifier is tested on the first 1,000 test images: time, not logic
    monkeypatch.setattr(data, "load", lambda name, split, data_dir, trust_files=False: tuple(
        a[:1000] if split == "test" else a for a in load(name, split, data_dir, trust_files)))
    assert evaluate.main(argv) == 0
    result = json.loads((tmp_path / "samples.eval.json").read_text())
    assert result["fid_images"] == 5 and abs(result["fid"]) < 1e-3
    # The accuracy is the classifier's on these samples and labels (its own tests are in
    # test_evaluate_accuracy.py): the same call, made here, gives the same numbers.
    test_images, test_labels = data.load("mnist", "test", mnist_dir)
    direct = classifier_accuracy(images[:200], labels[:200], test_images, test_labels, 10,
                                 epochs=1, seed=0, device="cpu", progress=None)
    assert result["classifier"] == direct and result["accuracy"] == direct["test_accuracy"]
    assert direct["n_test"] == 1000
    with np.load(tmp_path / "cache" / "fid_stats_mnist_train_5.npz") as cached:
        assert cached["mu"].shape == (2048,) and cached["sigma"].shape == (2048, 2048)
        assert int(cached["count"]) == 5
    assert "FID" in capsys.readouterr().out


def write_samples(path, labels=None, save=np.savez):
    """A samples file in the layout save_samples writes (written here without it, so that bad
    labels stay as they are): 6 random MNIST-sized images, labels 0..5. (Random pixels do not
    compress, so the middle of the file is image data with either `save`.)"""
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    save(path, images=images, labels=np.arange(6) if labels is None else labels)


def run_cli(argv, capsys):
    """evaluate.main's exit status and its one stderr line (asserting there is only one, and
    no traceback)."""
    try:
        code = evaluate.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return code, err


@pytest.fixture
def no_slow_work(monkeypatch):
    """Every slow step (and the dataset) raises: bad input must be refused before them all."""
    def reached(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"{name} ran: the bad input should have been refused first")
        return fail
    for name in ("load_inception", "inception_features", "classifier_accuracy"):
        monkeypatch.setattr(evaluate, name, reached(name))
    monkeypatch.setattr(data, "load", reached("data.load"))


def flip_middle_byte(path):
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


BIG = str(10 ** 12)  # a typo's count: the classifier would train for years
BAD_INPUTS = {  # name: (extra arguments, what to do to the samples file, words the line holds)
    "truncated npz": ([], truncate, ["samples.npz", "cannot read"]),
    "flipped byte in npz": ([], flip_middle_byte, ["samples.npz", "cannot read"]),
    "flipped byte in compressed npz": (
        [], lambda p: (write_samples(p, save=np.savez_compressed), flip_middle_byte(p)),
        ["samples.npz", "cannot read"]),
    "epochs 0": (["--epochs", "0"], None, ["--epochs", "0"]),
    "epochs negative": (["--epochs", "-3"], None, ["--epochs", "-3"]),
    "epochs of years": (["--epochs", BIG], None, ["--epochs", "1..10000", BIG]),
    "epochs not whole": (["--epochs", "1.5"], None, ["--epochs", "1.5"]),
    "n not a number": (["--n", "abc"], None, ["--n", "abc"]),
    "n 1": (["--n", "1"], None, ["--n", "2..6"]),
    "n above the samples": (["--n", BIG], None, ["--n", "2..6", BIG]),
    "seed 2**64": (["--seed", str(2 ** 64)], None, ["--seed", "2**64 - 1"]),
    "unknown device": (["--device", "gpu0"], None, ["--device", "gpu0"]),
    "cuda without a GPU": (["--device", "cuda"], None, ["--device cuda", "no CUDA GPU"]),
    "mps": (["--device", "mps"], None, ["--device mps", "untested"]),
    "empty data dir": (["--data-dir", ""], None, ["--data-dir", "empty"]),  # not ./data
    "empty cache dir": (["--cache-dir", ""], None, ["--cache-dir", "empty"]),
    "empty weights path": (["--inception", ""], None, ["--inception", "empty"]),
    "label 10": ([], lambda p: write_samples(p, labels=np.array([0, 1, 2, 3, 10, 5])),
                 ["labels", "0..9"]),
    "label -1": ([], lambda p: write_samples(p, labels=np.array([0, 1, -1, 3, 4, 5])),
                 ["labels", "0..9"]),
    "float labels": ([], lambda p: write_samples(p, labels=np.arange(6.0)),
                     ["labels", "integers", "float64"]),
    "5 labels for 6 images": ([], lambda p: write_samples(p, labels=np.arange(5)),
                              ["6 images", "5 labels"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_cli_refuses_bad_input_in_one_line_before_any_slow_work(case, tmp_path, capsys,
                                                               monkeypatch, no_slow_work):
    extra, spoil, needles = BAD_INPUTS[case]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also where there is one
    monkeypatch.chdir(tmp_path)  # default folders (./data) would appear here
    samples = tmp_path / "samples.npz"
    write_samples(samples)
    if spoil:
        spoil(samples)
    before = samples.read_bytes()
    code, err = run_cli([str(samples), "--dataset", "mnist", "--device", "cpu", *extra], capsys)
    assert code == 2 and err.startswith("error:")
    assert all(needle in err for needle in needles), err
    assert os.listdir(tmp_path) == ["samples.npz"] and samples.read_bytes() == before


def test_cli_checks_its_output_file_first_and_leaves_no_stray_file(tmp_path, capsys,
                                                                  monkeypatch, no_slow_work):
    samples, out = tmp_path / "samples.npz", tmp_path / "samples.eval.json"
    write_samples(samples)
    argv = [str(samples), "--dataset", "mnist", "--device", "cpu"]
    out.mkdir()  # a folder where the results should go: unwritable, even for root
    code, err = run_cli(argv, capsys)
    assert code == 2 and str(out) in err and "cannot write" in err
    out.rmdir()

    # Writable: the check neither leaves a file nor changes one; the run goes on to load the
    # weights (the first slow step), stopped here by a WeightsError.
    def stop(*args, **kwargs):
        raise inception.WeightsError("stopped at the weights")
    monkeypatch.setattr(evaluate, "load_inception", stop)
    assert run_cli(argv, capsys) == (2, "error: stopped at the weights")
    assert not out.exists()
    out.write_text("earlier results")
    assert run_cli(argv, capsys)[0] == 2 and out.read_text() == "earlier results"


def test_cli_reports_a_damaged_dataset_file_in_one_line(mnist_dir, tmp_path, capsys,
                                                        monkeypatch):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in os.listdir(mnist_dir):
        os.symlink(os.path.join(mnist_dir, name), folder / name)
    damaged = folder / "train-labels-idx1-ubyte.gz"
    blob = bytearray(damaged.read_bytes())
    os.remove(damaged)
    # The compressed stream starts after the 10-byte header and the zero-terminated file name;
    # its first byte (block type, Huffman tables) flipped breaks the stream: zlib.error.
    blob[blob.index(b"\0", 10) + 1] ^= 0xFF
    damaged.write_bytes(bytes(blob))
    monkeypatch.setattr(evaluate, "load_inception", lambda *args, **kwargs: refusing)
    samples = tmp_path / "samples.npz"
    write_samples(samples)
    code, err = run_cli([str(samples), "--dataset", "mnist", "--data-dir", str(folder),
                         "--device", "cpu"], capsys)
    assert code == 2 and str(damaged) in err


# ---- the real FID network (skipped without the weight file) ---------------------------------

# Pool3 features of MNIST train[0], train[1], test[0], test[1], computed with pytorch-fid 0.3.0
# (InceptionV3([3]), its own preprocessing, torch 2.13 CPU, float32, NCHW) in a separate venv.
PINNED_DIMS = [0, 1, 7, 100, 512, 1000, 1500, 2047, 1722, 456, 88]
PINNED_FEATURES = [
    [0.1578905, 0.07852904, 0.4354827, 0.007879136, 0.02232188, 0.1125351, 0.01273363,
     1.227506, 4.212039, 2.62209, 3.395578],
    [0.1107216, 0.1946775, 0.103889, 0.000993109, 0.1856802, 0.007287309, 0.4229016,
     1.096907, 2.707726, 3.811267, 2.945068],
    [0.22384, 0.1785973, 0.2281661, 0.0008184547, 0.01095743, 0.2816646, 0.1171228,
     0.8315494, 2.871248, 1.047413, 3.222153],
    [0.2367071, 0.1043499, 0.2109648, 0.009847333, 0.4102954, 0.03909332, 0.1105239,
     1.137989, 3.121211, 2.212475, 3.067265]]
PINNED_SUMS = [545.680407, 621.408905, 537.280141, 592.572450]  # over all 2048 features


@needs_real_weights
def test_real_features_match_pytorch_fid(mnist_dir):
    train_images, _ = data.load("mnist", "train", mnist_dir)
    test_images, _ = data.load("mnist", "test", mnist_dir)
    images = torch.cat([train_images[:2], test_images[:2]])
    features = evaluate.inception_features(images, device="cpu", progress=None)
    np.testing.assert_allclose(features[:, PINNED_DIMS], PINNED_FEATURES, rtol=0, atol=1e-4)
    np.testing.assert_allclose(features.sum(1, dtype=np.float64), PINNED_SUMS, rtol=0, atol=1e-2)


@pytest.mark.slow
@needs_real_weights
def test_real_fid_mnist_500_train_vs_500_test(mnist_dir, tmp_path):
    # About 1000 images through Inception: 5 to 10 minutes on 2 CPU cores, so `-m slow` only;
    # test_real_features_match_pytorch_fid checks the same network on every run.
    train_images, _ = data.load("mnist", "train", mnist_dir)
    test_images, _ = data.load("mnist", "test", mnist_dir)
    cache = tmp_path / "reference.npz"
    value = evaluate.fid(train_images[:500], test_images[:500], reference_cache=str(cache),
                         progress=None)
    assert value == pytest.approx(21.5247, abs=2e-3)  # pytorch-fid 0.3.0 on the same images
    with np.load(cache) as cached:
        assert int(cached["count"]) == 500
