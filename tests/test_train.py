"""End-to-end tests of train.py on a small real MNIST subset with the tiny preset.

They run the command line as a user would (train.main) and check what a user and an attacker
can see: the files, the report, the progress lines, what a resume accepts, and that bad input
is one line with exit status 2 and leaves the run folder byte for byte as it was.
"""
import ast
import contextlib
import dataclasses
import errno
import gzip
import hashlib
import inspect
import io
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from harness import data
from harness import files
import diffusion
import inception
import randomness
from harness import runs
import sample
import samplers
import settings
import train
from harness import launch
from conftest import StopAfter

TINY = settings.TINY  # what tiny_args runs: the numbers below are read from it

WEIGHTS = os.path.join(torch.hub.get_dir(), "checkpoints", inception.FID_WEIGHTS_FILE)


@pytest.fixture(autouse=True, scope="module")
def short_test_set():
    """train.py tests its classifier on the real test set; here on its first 1,000 images: the
    same code in a tenth of the time (the test set's size is not what these tests check)."""
    load = data.load

    def load_short_test_set(name, split="train", data_dir=None, trust_files=False):
        images, labels = load(name, split, data_dir, trust_files)
        return (images[:1000], labels[:1000]) if split == "test" else (images, labels)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "load", load_short_test_set)
        yield


def tiny_args(mnist_dir, out, *extra):
    return ["--dataset", "mnist", "--eps", "1", "--preset", "tiny", "--seed", "0",
            "--data-dir", mnist_dir, "--out", str(out), "--device", "cpu", *extra]


def stop_after(monkeypatch, n):
    monkeypatch.setattr(runs, "install_ctrl_c", lambda: StopAfter(n))


def read_report(out):
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def folder_digest(folder):
    """{file name: sha256} of everything in a folder: 'byte-identical' made checkable."""
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


def one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


# ------------------------------------------------------------------------- whole runs
FID = [] if os.path.exists(WEIGHTS) else ["--fid-n", "0"]  # FID needs the real weights
SAMPLE_BATCH = 40  # TINY's 100 samples in three batches (40, 40, 20): stops between them
# The whole run and its resumed pieces skip FID (seconds of Inception at every start); the
# stopped run below measures it when it is finished (test_resume_accepts_...).
NO_FID = ["--fid-n", "0"]
# 25 DP-SGD steps instead of TINY's 12: DP-SGD writes and stops only at the ends of blocks of
# runs.DPSGD_BLOCK steps (10 and 25 here), and the resume test stops and resumes inside it.
DP_STEPS_25 = ["--epochs", "1.25"]


def block_ends(total):
    """The steps after which DP-SGD may show or write anything (runs.Progress): ends of blocks
    of DPSGD_BLOCK steps counted from 0, the short last block joined to the one before."""
    block = runs.DPSGD_BLOCK
    return [s for s in range(block, total, block) if total - s >= block] + [total]


@pytest.fixture(scope="module")
def finished_run(mnist_dir, tmp_path_factory):
    """One uninterrupted tiny run through every stage (FID: see NO_FID) and what it printed.
    The stage tests read it; the resume test must reproduce it."""
    out = tmp_path_factory.mktemp("whole") / "run"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(samplers, "CPU_BATCH", SAMPLE_BATCH)
        assert train.main(tiny_args(mnist_dir, out, *NO_FID, *DP_STEPS_25)) == 0
    return out, printed.getvalue()


def test_every_stage_end_to_end(finished_run, mnist_dir):
    out, printed = finished_run
    for name in ("central_images.png", "warmup_samples.png", "samples.png", "stages.png",
                 "samples.npz", "checkpoint.pt", "report.json"):
        assert (out / name).exists(), name
    # stages.png: the three pictures side by side, top-aligned, each one unchanged inside it.
    panels = [Image.open(out / name).convert("RGB")
              for name in ("central_images.png", "warmup_samples.png", "samples.png")]
    stages = Image.open(out / "stages.png")
    left = 12
    for panel in panels:
        box = (left, 14, left + panel.width, 14 + panel.height)
        assert np.array_equal(np.asarray(stages.crop(box)), np.asarray(panel))
        left += panel.width + 12
    assert stages.width == left
    report = read_report(out)
    plan, spent = report["privacy_plan"], report["privacy_spent"]
    # The ledger holds what really ran: both mechanisms, with the planned DP-SGD steps, at the
    # exact inclusion probabilities of the sampler.
    history = train.accountant.PrivacyLedger.from_dict(report["privacy_ledger"]).history
    assert history == [tuple(plan["central"]), (plan["dpsgd"]["q"], plan["dpsgd"]["sigma"],
                                                plan["dpsgd"]["steps"])]
    assert plan["dpsgd"]["q"] == randomness.sampling_rate(TINY.batch / TINY.train_subset)
    assert plan["central"][0] == randomness.sampling_rate(0.1)
    assert 0.9 < spent["eps"] <= 1.0  # the calibration spends the budget, not far less
    assert report["seed"] == "fixed by --seed" and report["stage"] == "done"
    samples = np.load(out / "samples.npz")
    assert samples["images"].dtype == np.uint8
    assert samples["images"].shape == (TINY.n_samples, 28, 28)
    # The samples file holds the synthesized batches (the checkpoint's), in the samples file's layout (harness/files.py).
    pieces = runs.load_checkpoint(out)["samples"]
    images, labels = files.load_samples(str(out / "samples.npz"), "mnist")
    assert torch.equal(images, torch.cat([p[0] for p in pieces]))
    assert torch.equal(labels, torch.cat([p[1] for p in pieces]))
    # The tiny run learned something, if little (its samples still look like noise): at the
    # middle noise level sigma = 1, where a digit's shape is decided, the released (EMA) model
    # denoises real training images it may never have seen far better than the initial
    # weights, on the same noise draws (measured: 0.48 of the initial loss; seeded).
    state = runs.load_checkpoint(out)
    edm = diffusion.EDM(10)
    real_images, real_labels = data.load("mnist", "train", mnist_dir)
    x0 = diffusion.to_model_range(real_images[-256:])  # outside the run's 500-image subset
    y_in, sigma, noise = edm.draw_inputs(real_labels[-256:], 1, x0.shape[1:],
                                         torch.Generator().manual_seed(0))
    losses = {}
    for name, weights in (("initial", None), ("released", state["ema"]["model"])):
        torch.manual_seed(0)  # train.new_run's initial weights
        model = diffusion.make_unet(TINY.model, 1, 28, 10)
        if weights is not None:
            model.load_state_dict(weights)
        with torch.no_grad():
            losses[name] = edm.loss(model, x0, y_in, torch.ones_like(sigma), noise).mean().item()
    print(f"denoising loss on real images at sigma = 1: {losses}")
    assert losses["released"] < 0.6 * losses["initial"]
    # The evaluation read them all, and the short real test set (short_test_set).
    accuracy = report["metrics"]["accuracy"]
    assert (accuracy["n_train"] + accuracy["n_val"], accuracy["n_test"]) == (TINY.n_samples, 1000)
    assert abs(accuracy["test_accuracy"] * 1000 - round(accuracy["test_accuracy"] * 1000)) < 1e-6
    # The digest of the training data stays in the private checkpoint.
    digest = runs.load_checkpoint(out)["data_sha256"]
    assert len(digest) == 64 and digest not in (out / "report.json").read_text()
    # Each stage's time is its own (the last checkpoint follows the evaluation at once).
    timings = report["timings_s"]
    assert list(timings) == list(runs.STAGES)
    assert timings["done"] < timings["evaluate_release"]
    # Timing side channel: no rate from individual DP-SGD steps, and DP-SGD progress lines only
    # at the ends of blocks of 10 steps (a step's time grows with its secret batch size).
    assert "images/s" not in printed
    dpsgd_lines = [line for line in printed.splitlines() if line.startswith("[train_dpsgd]")]
    steps = [int(line.split()[2].split("/")[0]) for line in dpsgd_lines]
    assert steps and set(steps) <= set(block_ends(plan["dpsgd"]["steps"]))
    assert all("loss" not in line for line in dpsgd_lines)  # unprivatised statistic
    assert all(" | eps spent " in line for line in dpsgd_lines)  # accounted, shown
    assert dpsgd_lines[-1].split(" | eps spent ")[1].startswith(f"{spent['eps']:.3f}/1")


def test_no_dpsgd_releases_the_warmed_up_model_at_the_central_images_own_epsilon(
        mnist_dir, tmp_path, monkeypatch):
    """The easy stage alone (--no-dpsgd): the central images are the only mechanism, their
    epsilon is the run's, DP-SGD never runs, and the released samples come from the warmed-up
    weights."""
    def no_dp_step(*args, **kwargs):
        raise AssertionError("DP-SGD ran under --no-dpsgd")

    monkeypatch.setattr(train.dpsgd, "dp_step", no_dp_step)
    out = tmp_path / "run"
    assert train.main(tiny_args(mnist_dir, out, "--no-dpsgd", *NO_FID)) == 0
    report = read_report(out)
    plan, spent = report["privacy_plan"], report["privacy_spent"]
    history = train.accountant.PrivacyLedger.from_dict(report["privacy_ledger"]).history
    assert plan["dpsgd"] is None and history == [tuple(plan["central"])]
    own = train.accountant.epsilon([tuple(plan["central"])], TINY.delta)[0]
    assert spent["eps"] == plan["eps"] == own < 1  # not the --eps budget: nothing calibrated
    state = runs.load_checkpoint(out)
    assert state["stage"] == "done"
    for name, weights in state["model"].items():  # the sampled EMA is the warmed-up model
        assert torch.equal(weights, state["ema"]["model"][name]), name
    assert np.load(out / "samples.npz")["images"].shape == (TINY.n_samples, 28, 28)
    assert (out / "stages.png").exists()


def test_resume_ends_bit_for_bit_where_an_uninterrupted_run_ends(finished_run, mnist_dir,
                                                                  tmp_path, monkeypatch):
    whole, pieces = finished_run[0], tmp_path / "pieces"
    monkeypatch.setattr(samplers, "CPU_BATCH", SAMPLE_BATCH)
    # The loops read the stop flag once per warm-up step, DP-SGD step and sampler call (and
    # per evaluation progress call); StopAfter(n) lets n reads pass, and each piece counts
    # from zero. Stop at warm-up step 8, DP-SGD step 5 (which stops at the end of its block,
    # step 10), the second sampler call and the evaluation's first progress call; resume each.
    warmup, dp_steps = TINY.warmup_steps, read_report(whole)["privacy_plan"]["dpsgd"]["steps"]
    assert warmup > 8 and block_ends(dp_steps)[0] == 10 < dp_steps
    pieces_and_stages = [(7, "warm_up"), (warmup - 8 + 4, "train_dpsgd"),
                         (dp_steps - 10 + 1, "synthesize"), (1, "evaluate_release"),
                         (10 ** 9, "done")]
    for stop_at, stage in pieces_and_stages:
        stop_after(monkeypatch, stop_at)
        if (pieces / "checkpoint.pt").exists():  # the run's own settings and random state
            rc = train.main(["--resume", str(pieces)])
        else:
            rc = train.main(tiny_args(mnist_dir, pieces, *NO_FID, *DP_STEPS_25))
        assert rc == (130 if stage != "done" else 0)
        report, state = read_report(pieces), runs.load_checkpoint(pieces)
        assert state["stage"] == stage
        if stage == "train_dpsgd":
            assert state["step"] == 10
        # report.json always describes the checkpoint, Ctrl-C included
        assert report["stage"] == state["stage"] and report["privacy_ledger"] == state["ledger"]
    a, b = runs.load_checkpoint(whole), runs.load_checkpoint(pieces)
    for weights_a, weights_b in ((a["model"], b["model"]), (a["ema"]["model"], b["ema"]["model"])):
        assert weights_a.keys() == weights_b.keys()
        for name, tensor in weights_a.items():
            assert torch.equal(tensor, weights_b[name]), name
    assert torch.equal(a["secret_rng"], b["secret_rng"])
    assert torch.equal(a["public_rng"], b["public_rng"])
    assert a["ledger"] == b["ledger"] and a["metrics"] == b["metrics"]
    assert np.array_equal(np.load(whole / "samples.npz")["images"],
                          np.load(pieces / "samples.npz")["images"])


# FETA-Pro's frequency stage in the tiny preset: a 10-step generator fit, 6 warm-up steps on it.
FREQUENCY = ["--frequency", "--n-samples", "20", "--classifier-epochs", "1", *NO_FID]


def test_frequency_stage_is_a_third_ledger_entry_and_resumes_bit_for_bit(mnist_dir, tmp_path,
                                                                        monkeypatch):
    """--frequency: the plan and the ledger compose the central images, ONE release of the
    features (q = 1) and DP-SGD, in that order, within the budget; the generator's picture is
    written; and a run stopped inside the warm-up on the generator's images (whose generator is
    fitted again on resume) ends bit for bit where an uninterrupted run ends."""
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    assert train.main(tiny_args(mnist_dir, whole, *FREQUENCY)) == 0
    report = read_report(whole)
    plan = report["privacy_plan"]
    history = train.accountant.PrivacyLedger.from_dict(report["privacy_ledger"]).history
    assert plan["frequency"] == [1.0, TINY.frequency_sigma, 1]
    steps = plan["dpsgd"]["steps"]
    assert history == [tuple(plan["central"]), (1.0, TINY.frequency_sigma, 1),
                       (plan["dpsgd"]["q"], plan["dpsgd"]["sigma"], steps)]
    assert report["privacy_spent"]["eps"] <= 1.0
    without = train.privacy_plan(dataclasses.replace(TINY, eps=1.0), plan["n"])
    assert plan["dpsgd"]["sigma"] > without["dpsgd"]["sigma"]  # the release costs DP-SGD noise
    assert (whole / "feature_samples.png").exists()
    # stop at the 3rd step on the generator's images: after the warm-up's steps and the fit's
    stop_after(monkeypatch, TINY.warmup_steps + TINY.generator_steps + 2)
    assert train.main(tiny_args(mnist_dir, pieces, *FREQUENCY)) == 130
    state = runs.load_checkpoint(pieces)
    assert (state["stage"], state["step"]) == ("warm_up_on_features", 3)
    stop_after(monkeypatch, 10 ** 9)
    assert train.main(["--resume", str(pieces)]) == 0
    a, b = runs.load_checkpoint(whole), runs.load_checkpoint(pieces)
    for name, tensor in a["ema"]["model"].items():
        assert torch.equal(tensor, b["ema"]["model"][name]), name
    assert a["ledger"] == b["ledger"]
    assert np.array_equal(np.load(whole / "samples.npz")["images"],
                          np.load(pieces / "samples.npz")["images"])


def test_secret_entropy_that_agrees_in_the_low_32_bits_gives_different_central_images(
        mnist_dir, tmp_path, monkeypatch):
    """torch's CPU generator keeps only the low 32 bits of a manual seed. Two runs whose OS
    entropy agrees there (and differs above) must release different central images."""
    stop_after(monkeypatch, 0)  # stop at the first warm-up step: the central images are out
    releases = []
    for run, high in (("a", 1), ("b", 2)):
        words = np.full(624, 0x9E3779B9, dtype=np.uint32)
        words[1:] ^= np.uint32(high)
        monkeypatch.setattr(randomness.secrets, "token_bytes", lambda n, w=words: w.tobytes()[:n])
        monkeypatch.setattr(train.secrets, "randbits", lambda k, h=high: 0x9E3779B9 + (h << 40))
        args = tiny_args(mnist_dir, tmp_path / run)
        args[args.index("--seed"):args.index("--seed") + 2] = []  # the default: secret
        assert train.main(args) == 130
        releases.append(runs.load_checkpoint(tmp_path / run)["central"][0])
    assert not torch.equal(releases[0], releases[1])


# ------------------------------------------------------------------------- bad input
NO_RUN = "a folder that holds files but no run"  # replaced by one, made by the test
BIG = str(10 ** 12)  # a typo's count: a run with an ETA of years


@pytest.mark.parametrize("flags, word", [
    (["--eps", "0"], "--eps"), (["--eps", "-1"], "--eps"), (["--eps", "abc"], "--eps"),
    (["--eps", "0.1"], "--eps"),  # below what the central images alone spend
    (["--delta", "1.5"], "--delta"), (["--dataset", "imagenet"], "--dataset"),
    (["--batch", "0"], "--batch"), (["--batch", "5000"], "--batch"),
    (["--fid-n", "1"], "--fid-n"), (["--n-samples", "1"], "--n-samples"),
    (["--checkpoint-minutes", "0"], "--checkpoint-minutes"),
    (["--checkpoint-minutes", "nan"], "--checkpoint-minutes"),
    (["--device", "mps"], "--device"), (["--device", "xpu"], "--device"),
    (["--device", "meta"], "--device"), (["--device", "gpu9"], "--device"),
    (["--ema", "1"], "--ema"), (["--sample-steps", "1001"], "--sample-steps"),
    (["--no-dpsgd", "--no-central"], "--no-dpsgd"),  # nothing would be trained
    (["--no-dpsgd", "--warmup-steps", "0"], "--no-dpsgd"),
    # Settings that ran to NaN weights and black samples, or to an ETA of centuries.
    (["--lr", "1e30"], "--lr"), (["--lr", "2"], "--lr"), (["--clip", "1e38"], "--clip"),
    (["--clip", "1e-30"], "--clip"), (["--n-samples", "1000000000000"], "--n-samples"),
    (["--guidance", "1e30"], "--guidance"), (["--epochs", "1e9"], "--epochs"),
    (["--central-sigma", "1e30"], "--central-sigma"), (["--warmup-steps", BIG], "--warmup-steps"),
    # An eps no noise is needed for: said so, not "cannot be met".
    (["--eps", "1e300"], ("--eps 1e+300", "protects nothing")),
    (["--seed", str(2 ** 64)], ("--seed", "2**64 - 1")), (["--seed", "-1"], "--seed"),
    # An empty path is no folder or file (not ./data/mnist, not a download); a resumed run
    # stays in its own folder; a folder without a run is left as it was (no lock file).
    (["--out", ""], "--out"), (["--resume", ""], "--resume"), (["--resume", "x"], "--out"),
    (["--data-dir", ""], ("--data-dir", "empty")), (["--inception", ""], "--inception"),
    (["--resume", NO_RUN], ("--resume", "no checkpoint.pt")),
])
def test_bad_arguments_give_one_line_and_status_2(mnist_dir, tmp_path, monkeypatch, capsys,
                                                  flags, word):
    monkeypatch.chdir(tmp_path)  # default folders (./data, ./runs) would appear here
    out, no_run = tmp_path / "run", tmp_path / "docs"
    no_run.mkdir()
    (no_run / "notes.md").write_text("not a run")
    argv = (["--resume", str(no_run)] if NO_RUN in flags
            else tiny_args(mnist_dir, out) + flags)
    with pytest.raises(SystemExit) as exit_:  # argparse's own errors exit; ours return 2
        raise SystemExit(train.main(argv))
    printed = capsys.readouterr()
    err = printed.err.strip()
    assert exit_.value.code == 2 and printed.out == "", err  # nothing started, not the plan
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err
    assert all(w in err for w in ((word,) if isinstance(word, str) else word)), err
    assert os.listdir(tmp_path) == ["docs"] and os.listdir(no_run) == ["notes.md"]


def test_resuming_a_finished_run_says_so_and_changes_nothing(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    before = folder_digest(out)
    assert train.main(["--resume", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"run folder: {out} (finished: every stage has run)" in lines, lines
    assert lines[-1].startswith("done: (")  # the run's privacy, and where its report is
    assert folder_digest(out) == before  # not even the report's timings


def test_resume_refuses_overwrite(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--resume", str(tmp_path), "--overwrite"])
    assert exit_.value.code == 2
    one_line_error(capsys, "--overwrite")


def test_missing_data_and_unwritable_folder(tmp_path, mnist_dir, capsys):
    assert train.main(tiny_args(str(tmp_path / "nowhere"), tmp_path / "run")) == 2
    one_line_error(capsys, "--data-dir")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert train.main(tiny_args(mnist_dir, blocker / "run")) == 2
    one_line_error(capsys, "--out")


def write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("damage", ["flipped byte", "label 10", "images 27x27"])
def test_damaged_or_wrong_data_gives_one_line(mnist_dir, tmp_path, capsys, damage):
    folder = tmp_path / "data"
    shutil.copytree(mnist_dir, folder)
    if damage == "flipped byte":
        raw = bytearray((folder / "train-images-idx3-ubyte.gz").read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (folder / "train-images-idx3-ubyte.gz").write_bytes(bytes(raw))
    elif damage == "label 10":
        labels = np.zeros(60000, dtype=np.uint8)
        labels[123] = 10
        write_idx(folder / "train-labels-idx1-ubyte.gz", labels, 2049)
    else:
        write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((60000, 27, 27)), 2051)
    out = tmp_path / "run"
    assert train.main(tiny_args(str(folder), out, "--no-central")) == 2
    one_line_error(capsys, "train-")
    assert not out.exists()


@pytest.mark.parametrize("case", ["FashionMNIST given MNIST", "test files named as training"])
def test_files_that_are_not_the_datasets_official_ones_are_refused_unless_trusted(
        mnist_dir, tmp_path, capsys, monkeypatch, case):
    """Files of the right format and shape can still be another dataset's or another split's:
    only their size and digest tell. --trust-data-files takes them knowingly."""
    folder, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(mnist_dir, folder)
    dataset = "fashionmnist" if case == "FashionMNIST given MNIST" else "mnist"
    if case == "test files named as training":
        for kind in ("images-idx3", "labels-idx1"):
            shutil.copy(folder / f"t10k-{kind}-ubyte.gz", folder / f"train-{kind}-ubyte.gz")
    args = tiny_args(str(folder), out, "--dataset", dataset, *NO_FID)
    assert train.main(args) == 2
    one_line_error(capsys, str(folder / "train-images-idx3-ubyte.gz"), "--trust-data-files")
    assert not out.exists()
    stop_after(monkeypatch, 0)  # at the first warm-up step: the data were taken
    assert train.main(args + ["--trust-data-files"]) == 130


# ------------------------------------------------------------------------- resume rules
@pytest.fixture(scope="module")
def stopped_in_dpsgd(mnist_dir, tmp_path_factory):
    """One run stopped by Ctrl-C in DP-SGD (after all warm-up steps and at DP-SGD step 6,
    which stops at the end of its block: here TINY's last step, the stage not yet finished);
    each test works on its own copy."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.MonkeyPatch.context() as patch:
        stop_after(patch, TINY.warmup_steps + 5)
        assert train.main(tiny_args(mnist_dir, out, *FID)) == 130
    return out


def stopped_run(stopped_in_dpsgd, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped_in_dpsgd, out)
    return out, folder_digest(out)


@pytest.mark.parametrize("flag, value", [("--eps", "2"), ("--lr", "0.01"), ("--batch", "20"),
                                         ("--no-central", None), ("--no-dpsgd", None),
                                         ("--seed", "3"),
                                         ("--preset", "cpu"), ("--device", "cuda")])
def test_resume_refuses_other_training_settings_and_changes_nothing(
        stopped_in_dpsgd, tmp_path, capsys, flag, value):
    out, digest = stopped_run(stopped_in_dpsgd, tmp_path)
    args = ["--resume", str(out), flag] + ([value] if value else [])
    assert train.main(args) == 2
    one_line_error(capsys, flag)
    assert folder_digest(out) == digest


def test_resume_accepts_settings_of_stages_not_yet_run(stopped_in_dpsgd, tmp_path, monkeypatch,
                                                       capsys):
    out, _ = stopped_run(stopped_in_dpsgd, tmp_path)
    stop_after(monkeypatch, 10 ** 9)
    assert train.main(["--resume", str(out), "--n-samples", "30", "--guidance", "0.5"]) == 0
    assert np.load(out / "samples.npz")["images"].shape[0] == 30
    assert read_report(out)["settings"]["guidance"] == 0.5
    if not FID:  # the stopped run measures FID: its weights are found again on resume
        fid = read_report(out)["metrics"]["fid"]
        assert fid["n_generated"] == min(TINY.fid_n, 30) and np.isfinite(fid["value"])
    capsys.readouterr()
    digest = folder_digest(out)
    assert train.main(["--resume", str(out), "--n-samples", "40"]) == 2  # already sampled
    one_line_error(capsys, "--n-samples")
    assert folder_digest(out) == digest


def test_resume_refuses_sampling_settings_once_sampling_has_started(
        stopped_in_dpsgd, tmp_path, monkeypatch, capsys):
    """With some samples drawn, other sampling settings would mix two kinds of images in one
    release, or report a number of samples that samples.npz does not hold."""
    out, _ = stopped_run(stopped_in_dpsgd, tmp_path)
    monkeypatch.setattr(samplers, "CPU_BATCH", SAMPLE_BATCH)
    stop_after(monkeypatch, 0)  # read after the first sample batch: stop there
    assert train.main(["--resume", str(out)]) == 130
    state = runs.load_checkpoint(out)
    assert (state["stage"], state["step"]) == ("synthesize", SAMPLE_BATCH)
    digest = folder_digest(out)
    for flag, value in (("--n-samples", "30"), ("--guidance", "3"), ("--sample-steps", "3"),
                        ("--solver", "ddim")):
        assert value != str(getattr(TINY, flag[2:].replace("-", "_")))  # a change
        assert train.main(["--resume", str(out), flag, value]) == 2
        one_line_error(capsys, flag, "not yet started")
        assert folder_digest(out) == digest


def test_resume_on_other_training_data_is_refused(mnist_dir, stopped_in_dpsgd, tmp_path,
                                                  capsys):
    """The same number of images, one label changed: a run must not continue on other data.
    (The changed file is not the official one either; trusted, its digest still differs from
    the one the checkpoint keeps.)"""
    out, digest = stopped_run(stopped_in_dpsgd, tmp_path)
    other = tmp_path / "other"
    shutil.copytree(mnist_dir, other)
    labels = other / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[8] = (raw[8] + 1) % 10  # the first label (after magic and count) moves to another class
    labels.write_bytes(gzip.compress(bytes(raw)))
    assert train.main(["--resume", str(out), "--data-dir", str(other)]) == 2
    one_line_error(capsys, str(labels), "official")
    assert train.main(["--resume", str(out), "--data-dir", str(other), "--trust-data-files"]) == 2
    one_line_error(capsys, "--data-dir", "not the training images")
    assert folder_digest(out) == digest


def test_one_run_per_folder(mnist_dir, stopped_in_dpsgd, tmp_path, capsys):
    """While a run holds its folder (here the test holds the lock, as a live run would), a
    second run into it, an --overwrite of it and a --resume of it are refused in one line,
    before anything in the folder changes. (Two runs started together used to share the
    folder, and both wrote the same temporary checkpoint.)"""
    out, digest = stopped_run(stopped_in_dpsgd, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (out, empty):
        with runs.lock_folder(str(folder), "--out"):
            for args in (tiny_args(mnist_dir, folder, *NO_FID),
                         tiny_args(mnist_dir, folder, *NO_FID, "--overwrite"),
                         ["--resume", str(folder)]):
                assert train.main(args) == 2
                one_line_error(capsys, "in use by another run")
    assert folder_digest(out) == digest
    assert os.listdir(empty) == [runs.LOCK]


def test_a_new_run_never_overwrites_a_run(mnist_dir, stopped_in_dpsgd, tmp_path, monkeypatch,
                                          capsys):
    out, digest = stopped_run(stopped_in_dpsgd, tmp_path)
    assert train.main(tiny_args(mnist_dir, out)) == 2  # it holds a checkpoint
    one_line_error(capsys, "--resume")
    # Files of a run without a checkpoint (e.g. copied results) are not overwritten either.
    os.remove(out / "checkpoint.pt")
    del digest["checkpoint.pt"]
    assert train.main(tiny_args(mnist_dir, out, "--fid-n", "0")) == 2
    one_line_error(capsys, "--overwrite")
    assert folder_digest(out) == digest
    stop_after(monkeypatch, 0)
    assert train.main(tiny_args(mnist_dir, out, "--fid-n", "0", "--overwrite")) == 130
    assert (out / "checkpoint.pt").exists()


def damage_checkpoint(out, how):
    path = out / "checkpoint.pt"
    if how == "flipped bytes":  # 64 bytes in the middle of the weights
        raw = bytearray(path.read_bytes())
        for i in range(64):
            raw[len(raw) // 2 + i] ^= 0x55
        path.write_bytes(bytes(raw))
    elif how in ("empty dict", "a list"):
        torch.save({} if how == "empty dict" else [1, 2], path)
    else:  # well-formed files with contents that do not fit: only a foreign writer makes these
        state = runs.load_checkpoint(out)
        if how == "unknown stage":
            state["stage"] = "finetune"
        elif how == "wrong shape":
            state["model"]["conv_in.weight"] = torch.zeros(3, 3)
        elif how == "wrong optimizer shape":
            first = next(iter(state["optimizer"]["state"].values()))
            first["exp_avg"] = torch.zeros(7)
        elif how == "missing key":
            del state["secret_rng"]
        elif how == "plan without DP-SGD":  # the settings still say DP-SGD
            state["plan"]["dpsgd"] = None
        runs.save_checkpoint(out, state)


@pytest.mark.parametrize("how", ["flipped bytes", "empty dict", "a list", "unknown stage",
                                 "wrong shape", "wrong optimizer shape", "missing key",
                                 "plan without DP-SGD"])
def test_a_damaged_checkpoint_is_refused_and_the_folder_stays_byte_identical(
        mnist_dir, stopped_in_dpsgd, tmp_path, capsys, how):
    out, _ = stopped_run(stopped_in_dpsgd, tmp_path)  # in DP-SGD: optimizer state exists
    damage_checkpoint(out, how)
    digest = folder_digest(out)
    assert train.main(["--resume", str(out), "--data-dir", mnist_dir]) == 2
    one_line_error(capsys, "--resume")
    assert folder_digest(out) == digest


def test_a_missing_weights_file_fails_early_and_loses_nothing(mnist_dir, stopped_in_dpsgd,
                                                              tmp_path, capsys):
    new, bogus = tmp_path / "new", str(tmp_path / "no.pth")
    assert train.main(tiny_args(mnist_dir, new, "--inception", bogus)) == 2
    one_line_error(capsys, "no.pth")
    assert not new.exists()  # it failed before anything was written
    if FID:
        pytest.skip("real FID weights not in the torch hub cache")
    # Weights that vanish during a run: the resume refuses to start and the run is kept (the
    # next test finishes a copy of the same stopped run, FID included).
    out, digest = stopped_run(stopped_in_dpsgd, tmp_path)
    assert train.main(["--resume", str(out), "--inception", bogus]) == 2
    one_line_error(capsys, "no.pth")
    assert folder_digest(out) == digest


# ------------------------------------------------------------------------- what others see
def dpsgd_steps_done(ledger):
    return sum(entry["steps"] for entry in ledger["entries"] if entry["name"] == "DP-SGD")


@pytest.mark.parametrize("ctrl_c_at_step", [None, 1])
def test_an_observer_of_the_run_folder_never_times_fewer_than_a_block_of_dpsgd_steps(
        mnist_dir, tmp_path, monkeypatch, ctrl_c_at_step):
    """report.json is rewritten with every checkpoint. Someone who re-reads it (or looks at the
    files' modification times) after every write, with checkpoints as often as can be asked,
    must see DP-SGD advance only by whole blocks of steps, also when Ctrl-C comes during its
    first step: a step's time grows with its secret batch size (timings of single steps
    correlated with the realised batch sizes at r = 0.97)."""
    seen = []  # (DP-SGD steps in the ledger, the report's DP-SGD time) at each write
    for module, name in ((runs, "write_report"), (runs, "save_checkpoint")):
        def observed(folder, content, write=getattr(module, name), name=name):
            write(folder, content)
            ledger = content["privacy_ledger" if name == "write_report" else "ledger"]
            seen.append((name, dpsgd_steps_done(ledger),
                         content.get("timings_s", content.get("timings")).get("train_dpsgd")))
        monkeypatch.setattr(module, name, observed)
    # --no-central: DP-SGD's steps first; stop at its last step, or at its first one.
    stop_after(monkeypatch, 25 - 1 if ctrl_c_at_step is None else ctrl_c_at_step - 1)
    assert train.main(tiny_args(mnist_dir, tmp_path / "run", "--no-central", "--fid-n", "0",
                                "--checkpoint-minutes", "1e-9", *DP_STEPS_25)) == 130
    ends = block_ends(25)
    assert {steps for _, steps, _ in seen} == {0} | (set(ends) if ctrl_c_at_step is None
                                                      else {ends[0]})
    for (_, steps_a, time_a), (_, steps_b, time_b) in zip(seen, seen[1:]):
        assert steps_b == steps_a or steps_b in ends  # each write after a whole block
        if steps_b != steps_a:
            assert time_b != time_a  # (the timing is in the report, and changed with it)
    assert dpsgd_steps_done(read_report(tmp_path / "run")["privacy_ledger"]) == seen[-1][1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_checkpoint_and_stop_like_ctrl_c(mnist_dir, tmp_path, monkeypatch,
                                                           quiet_signals, signum):
    """Schedulers send SIGTERM a while before they kill a job: a run must checkpoint at the
    next step boundary and exit, as on Ctrl-C, not lose the work since its last checkpoint."""
    augmented, augment = [], train.central.augment

    def augment_and_signal(*args, **kwargs):  # warm-up step 3 gets the signal
        augmented.append(1)
        if len(augmented) == 3:
            os.kill(os.getpid(), signum)
        return augment(*args, **kwargs)

    monkeypatch.setattr(train.central, "augment", augment_and_signal)
    out = tmp_path / "run"
    assert train.main(tiny_args(mnist_dir, out, *NO_FID)) == 130
    state = runs.load_checkpoint(out)
    assert (state["stage"], state["step"]) == ("warm_up", 3)


@pytest.mark.parametrize("stage, nan_after", [("warm_up", 3), ("train_dpsgd", 3)])
def test_weights_that_turn_nan_stop_the_run_and_keep_the_last_good_checkpoint(
        mnist_dir, tmp_path, monkeypatch, capsys, stage, nan_after):
    """--lr 1e30 or --clip 1e38 ended with all-black samples, exit 0 and "done". Whatever makes
    the weights NaN (here one weight, set after an optimizer step of the stage), the run stops
    with one line and exit 2, and its last checkpoint, saved before, stays: with checkpoints
    at every chance, the one after warm-up step 2, or after the warm-up for DP-SGD (whose
    weights are checked at the end of each block of steps)."""
    steps, adam_step = [], torch.optim.Adam.step
    first = 0 if stage == "warm_up" else TINY.warmup_steps

    def step_then_nan(self, *args, **kwargs):
        result = adam_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == first + nan_after:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.Adam, "step", step_then_nan)
    out = tmp_path / "run"
    assert train.main(tiny_args(mnist_dir, out, *NO_FID, "--checkpoint-minutes", "1e-9")) == 2
    one_line_error(capsys, "NaN or inf", stage)
    state, report = runs.load_checkpoint(out), read_report(out)
    assert (state["stage"], state["step"]) == ((stage, nan_after - 1) if stage == "warm_up"
                                               else (stage, 0))
    assert report["stage"] == state["stage"] and report["privacy_ledger"] == state["ledger"]
    assert all(torch.isfinite(w).all() for w in state["model"].values())
    assert not (out / "samples.npz").exists()


def test_a_full_disk_mid_run_is_one_line_and_the_run_resumes_when_there_is_room(
        mnist_dir, tmp_path, monkeypatch, capsys):
    """The disk fills while samples.png is written: one line, the checkpoint as it was, no
    half-written or temporary file; with room again, --resume finishes the run."""
    atomic_write, full = runs.atomic_write, [True]

    def disk_fills_at_samples_png(path, write, mode="wb"):
        def write_then_fail(f):
            write(f)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fails = full[0] and os.path.basename(path) == "samples.png"
        return atomic_write(path, write_then_fail if fails else write, mode)

    monkeypatch.setattr(runs, "atomic_write", disk_fills_at_samples_png)
    out = tmp_path / "run"
    assert train.main(tiny_args(mnist_dir, out, *NO_FID, "--no-central")) == 2
    one_line_error(capsys, "No space left on device", "samples.png", f"--resume {out}")
    assert not (out / "samples.png").exists()
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    assert runs.load_checkpoint(out)["stage"] == "synthesize"
    full[0] = False
    assert train.main(["--resume", str(out)]) == 0
    assert (out / "samples.png").exists() and read_report(out)["stage"] == "done"


@pytest.mark.parametrize("problem", ["read-only disk", "report.json is a folder"])
def test_a_resume_that_cannot_write_is_one_line_and_loses_nothing(
        stopped_in_dpsgd, tmp_path, monkeypatch, capsys, problem):
    out, digest = stopped_run(stopped_in_dpsgd, tmp_path)
    before = runs.load_checkpoint(out)
    if problem == "read-only disk":  # (the tests run as root, whom permissions do not stop)
        def read_only(path, write, mode="wb"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        monkeypatch.setattr(runs, "atomic_write", read_only)
    else:
        os.remove(out / "report.json")
        os.mkdir(out / "report.json")
        digest = None
    assert train.main(["--resume", str(out)]) == 2
    one_line_error(capsys, "report.json" if digest is None else "checkpoint.pt")
    after = runs.load_checkpoint(out)
    assert (after["stage"], after["step"], after["ledger"]) == (
        before["stage"], before["step"], before["ledger"])
    assert digest is None or folder_digest(out) == digest
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


def test_run_folders_of_earlier_versions_resume_or_are_refused_in_one_line(finished_run,
                                                                           tmp_path, capsys):
    """A run trained with the DDPM formulation of earlier versions (its settings lack "churn",
    like every run before EDM came, or name "formulation": "ddpm") is refused in one line that
    says why, by train.py and sample.py alike, and its folder stays byte-identical. A run of the
    versions that had both (its settings name "formulation": "edm" and "timesteps") is read."""
    out, _ = finished_run
    state = runs.load_checkpoint(out)
    current = state["cfg"]
    assert settings.saved_config(dict(current, formulation="edm", timesteps="uniform")) == \
        settings.saved_config(current)
    before_edm = {k: v for k, v in current.items() if k not in ("churn", "frequency")}
    for name, old_cfg in [("before EDM", dict(before_edm, timesteps="uniform")),
                          ("DDPM beside EDM", dict(current, formulation="ddpm"))]:
        old = tmp_path / name.replace(" ", "-")
        shutil.copytree(out, old)
        runs.save_checkpoint(old, dict(state, cfg=old_cfg, stage="train_dpsgd", step=0))
        digest = folder_digest(old)
        assert train.main(["--resume", str(old)]) == 2
        one_line_error(capsys, "--resume", "DDPM", "EDM")
        assert sample.main([str(old), "--n", "10", "--out", str(tmp_path / "more.npz")]) == 2
        one_line_error(capsys, "DDPM")
        assert folder_digest(old) == digest


# ------------------------------------------------------------------------- data flow
def test_only_the_mechanisms_read_the_sensitive_set():
    """The privacy argument in the code's shape. harness/launch.py loads the sensitive arrays
    and uses them only for len() (N, public), data.digest (kept in the private checkpoint only,
    to refuse a resume on other data; test_every_stage_end_to_end checks that the report lacks
    it) and to hand them to train.train. There they go only to release_central_images,
    release_frequency_features (--frequency) and train_dpsgd, apart from their shape (public).
    Nothing else reads them, and the readers are the functions given the secret generator."""
    sensitive = {"sensitive_images", "sensitive_labels"}
    readers = {"release_central_images", "release_frequency_features", "train_dpsgd"}
    allowed = {  # module: (functions that may load them, callees that may be given them)
        launch: ({"main", "load_sensitive_data"},
                 {"len", "data.digest", "train_to_the_end", "train", "load_sensitive_data"}),
        train: (set(), readers)}
    for module, (loaders, callees) in allowed.items():
        tree = ast.parse(inspect.getsource(module))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for function in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
            if module is train and function.name in readers:
                continue
            for node in ast.walk(function):
                if not (isinstance(node, ast.Name) and node.id in sensitive):
                    continue
                where = f"{module.__name__}.{function.name} uses {node.id} at line {node.lineno}"
                parent = parents[node]
                if isinstance(node.ctx, ast.Store) or isinstance(parent, ast.Subscript):
                    assert function.name in loaders, where  # loading, taking the subset
                    continue
                if isinstance(parent, ast.Attribute):
                    assert parent.attr == "shape", where  # the image shape: public
                    continue
                func = getattr(parent, "func", None)
                callee = (getattr(func, "id", None) or ast.unparse(func)) if func else None
                assert isinstance(parent, ast.Call) and callee in callees, where
    for reader in readers:
        assert "secret" in inspect.signature(getattr(train, reader)).parameters
    for stage in (train.warm_up, train.warm_up_on_features, train.synthesize,
                  train.evaluate_release):
        assert not {"secret", "sensitive_images"} & set(inspect.signature(stage).parameters)


# ------------------------------------------------------------------------- sample.py
# sample.py on a real run's checkpoint (its own tests, on run folders built in a second, are in
# test_sample.py).

def test_sample_py_reads_a_real_run_and_leaves_it_untouched(finished_run, tmp_path, capsys):
    out, _ = finished_run
    digest = folder_digest(out)
    more = tmp_path / "more.npz"
    assert sample.main([str(out), "--n", "30", "--out", str(more), "--seed", "1"]) == 0
    assert "no privacy spent" in capsys.readouterr().out
    images, labels = files.load_samples(str(more), "mnist")  # what evaluate.py reads
    assert images.shape == (30, 1, 28, 28) and labels.shape == (30,)
    assert folder_digest(out) == digest  # the run folder is only read


def test_the_dpsgd_chunk_is_halved_until_a_pass_fits_without_touching_the_model(monkeypatch):
    passes, real_clipped_sum, fits = [], train.dpsgd.clipped_sum, 64

    def clipped_sum(model, loss, tensors, clip, chunk_size, autocast):
        passes.append(len(tensors[0]))
        if len(tensors[0]) > fits:  # a GPU's out-of-memory error, faked
            raise torch.OutOfMemoryError("CUDA out of memory (faked)")
        return real_clipped_sum(model, loss, tensors, clip, chunk_size, autocast)

    monkeypatch.setattr(train.dpsgd, "clipped_sum", clipped_sum)
    cfg = dataclasses.replace(TINY, chunk=64, noise_draws=2)
    model, edm = diffusion.make_unet("small", 1, 28, 10), diffusion.EDM()
    weights, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    assert launch.largest_chunk_that_fits(model, edm, cfg, (1, 28, 28)) == 64  # fits: kept
    assert passes == [64]
    fits, passes[:] = 10, []
    # 8 fits, and half of it is taken: room for the rest of a step
    assert launch.largest_chunk_that_fits(model, edm, cfg, (1, 28, 28)) == 4
    assert passes == [64, 32, 16, 8]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    fits = 0
    with pytest.raises(ValueError, match="does not fit"):
        launch.largest_chunk_that_fits(model, edm, cfg, (1, 28, 28))


def test_the_largest_seed_seeds_both_generators(tmp_path):
    # --seed takes 0..2**64 - 1 (randomness.secret_generator); the public generator's seed + 1
    # wraps around instead of overflowing manual_seed.
    run = train.new_run(TINY, train.privacy_plan(TINY, 500), str(tmp_path), "cpu", 2 ** 64 - 1)
    assert run.secret.initial_seed() == 2 ** 64 - 1 and run.public.initial_seed() == 0
