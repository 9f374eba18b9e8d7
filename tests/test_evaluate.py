"""Tests of evaluate.py: FID network layout and loading, Frechet distance, accuracy, CLI.

Reference values come from outside this code base: the state_dict layout and the pinned
features were produced by pytorch-fid 0.3.0 itself (in a separate venv, see
fid_inception_keys.txt and PINNED_FEATURES), and the 500-vs-500 MNIST FID is the figure in
../shared/tools/README.md. Tests needing the real weights skip when the file is absent; fetch
it with `python ../shared/tools/get-inception-weights`.
"""
import json
import os
import urllib.error

import numpy as np
import pytest
import torch

import data
import evaluate
import inception

HERE = os.path.dirname(os.path.abspath(__file__))
REAL_WEIGHTS = os.path.join(torch.hub.get_dir(), "checkpoints", inception.FID_WEIGHTS_FILE)
needs_real_weights = pytest.mark.skipif(
    not os.path.isfile(REAL_WEIGHTS),
    reason=f"no FID Inception weights at {REAL_WEIGHTS} (../shared/tools/get-inception-weights)")


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
    one_line_error(e, str(hub_file), "name resolution", "get-inception-weights", "--inception")


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


# ---- image layouts --------------------------------------------------------------------------

def test_image_layouts_become_uint8_nchw():
    g = np.random.default_rng(0)
    gray = g.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    rgb = g.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    assert torch.equal(evaluate.as_uint8_images(gray), torch.from_numpy(gray)[:, None])
    assert torch.equal(evaluate.as_uint8_images(rgb), torch.from_numpy(rgb).permute(0, 3, 1, 2))
    nchw = torch.from_numpy(rgb).permute(0, 3, 1, 2)
    assert torch.equal(evaluate.as_uint8_images(nchw), nchw)
    # Float images are quantised like a saved PNG: round(255 x), clamped to [0, 1] first.
    floats = torch.tensor([0.0, 0.5, 1.0, 1.5, -1.0, 0.2]).view(6, 1, 1, 1)
    expected = torch.tensor([0, 128, 255, 255, 0, 51], dtype=torch.uint8).view(6, 1, 1, 1)
    assert torch.equal(evaluate.as_uint8_images(floats), expected)
    with pytest.raises(ValueError, match="images"):
        evaluate.as_uint8_images(gray[:, None])  # numpy N x 1 x H x W is not a listed layout
    with pytest.raises(ValueError, match="uint8"):
        evaluate.as_uint8_images(gray.astype(np.float32))


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


def test_frechet_distance_refuses_large_imaginary_parts():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="imaginary"):
        evaluate.frechet_distance(np.zeros(3), -eye, np.zeros(3), eye)  # sqrt(-I) = i I


# ---- classifier -----------------------------------------------------------------------------

def test_classifier_reaches_high_accuracy_on_real_mnist(mnist_dir):
    train_images, train_labels = data.load("mnist", "train", mnist_dir)
    test_images, test_labels = data.load("mnist", "test", mnist_dir)
    result = evaluate.classifier_accuracy(train_images[:3000], train_labels[:3000],
                                          test_images[:2000], test_labels[:2000], epochs=4,
                                          batch_size=32, device="cpu", progress=None)
    assert result["test_accuracy"] > 0.9  # ~0.945 when written; a broken CNN gets ~0.1
    assert result["n_train"] + result["n_val"] == 3000 and result["n_test"] == 2000
    assert 1 <= result["best_epoch"] <= 4


def test_classifier_epoch_choice_ignores_the_test_set_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = (images.float().mean((1, 2, 3)) > 127.5).long()  # learnable: brightness
    test_images = torch.randint(0, 256, (200, 1, 28, 28), dtype=torch.uint8, generator=g)
    test_labels = (test_images.float().mean((1, 2, 3)) > 127.5).long()
    run = lambda labels_for_test: evaluate.classifier_accuracy(
        images, labels, test_images, labels_for_test, num_classes=2, epochs=3, seed=5,
        device="cpu", progress=None)
    honest, flipped = run(test_labels), run(1 - test_labels)
    # Same seed -> same training; the test labels must not change which epoch is chosen.
    assert honest["best_epoch"] == flipped["best_epoch"]
    assert honest["val_accuracy"] == flipped["val_accuracy"]
    assert honest["test_accuracy"] == pytest.approx(1 - flipped["test_accuracy"])


# ---- command line ---------------------------------------------------------------------------

def test_cli_fid_of_a_set_with_itself_is_zero_and_json_is_written(mnist_dir, random_weights,
                                                                  tmp_path, capsys):
    # "Samples" that are the first training images: their FID against the first n training
    # images (the cached reference statistics) must be ~0. End to end, with random weights:
    # each FID costs a 2048 x 2048 sqrtm (~15 s here), so this is the only such call.
    images, labels = data.load("mnist", "train", mnist_dir)
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=images[:200, 0].numpy(), labels=labels[:200].numpy())
    argv = [str(samples), "--dataset", "mnist", "--data-dir", mnist_dir, "--n", "5",
            "--inception", random_weights[0], "--cache-dir", str(tmp_path / "cache"),
            "--epochs", "1", "--device", "cpu"]
    assert evaluate.main(argv) == 0
    result = json.loads((tmp_path / "samples.eval.json").read_text())
    assert result["fid_images"] == 5 and abs(result["fid"]) < 1e-3
    assert 0 <= result["accuracy"] <= 1 and result["classifier"]["n_test"] == 10_000
    with np.load(tmp_path / "cache" / "fid_stats_mnist_train_5.npz") as cached:
        assert cached["mu"].shape == (2048,) and cached["sigma"].shape == (2048, 2048)
    assert "FID" in capsys.readouterr().out


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


@needs_real_weights
def test_real_fid_mnist_500_train_vs_500_test(mnist_dir):
    # About 1000 images through Inception: the slowest test here (minutes on 2 CPU cores).
    train_images, _ = data.load("mnist", "train", mnist_dir)
    test_images, _ = data.load("mnist", "test", mnist_dir)
    value = evaluate.fid(train_images[:500], test_images[:500], progress=None)
    assert value == pytest.approx(21.5247, abs=2e-3)  # ../shared/tools/README.md
