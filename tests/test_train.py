"""End-to-end tests of train.py on a small real MNIST subset with the tiny preset."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

import train


class StopAfter(dict):
    """Stands in for Ctrl-C: the training loop's stop flag turns True at its n-th check."""

    def __init__(self, n):
        super().__init__(requested=False)
        self.checks_left = n

    def __getitem__(self, key):
        self.checks_left -= 1
        return self.checks_left < 0


def tiny_args(mnist_dir, out, *extra):
    return ["--dataset", "mnist", "--eps", "1", "--preset", "tiny", "--seed", "0",
            "--data-dir", mnist_dir, "--out", str(out), "--device", "cpu", *extra]


def read_report(out):
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def test_every_stage_end_to_end(mnist_dir, tmp_path):
    weights = os.path.join(torch.hub.get_dir(), "checkpoints", train.evaluate.FID_WEIGHTS_FILE)
    fid_n = [] if os.path.exists(weights) else ["--fid-n", "0"]  # FID needs the real weights
    out = tmp_path / "run"
    assert train.main(tiny_args(mnist_dir, out, *fid_n)) == 0
    for name in ("central_images.png", "warmup_samples.png", "samples.png", "samples.npz",
                 "checkpoint.pt", "report.json"):
        assert (out / name).exists(), name
    report = read_report(out)
    plan, spent = report["privacy_plan"], report["privacy_spent"]
    # The ledger holds what really ran: both mechanisms, with the planned DP-SGD steps.
    history = train.accountant.PrivacyLedger.from_dict(report["privacy_ledger"]).history
    assert history == [tuple(plan["central"]), (plan["dpsgd"]["q"], plan["dpsgd"]["sigma"],
                                                plan["dpsgd"]["steps"])]
    assert spent["eps"] <= 1.0
    assert spent["eps"] > 0.9  # the calibration spends the budget, not far less
    assert report["seed"] == "fixed by --seed" and "seed" not in report["args"]
    samples = np.load(out / "samples.npz")
    assert samples["images"].dtype == np.uint8 and samples["images"].shape == (100, 28, 28)
    assert 0.0 <= report["metrics"]["accuracy"]["test_accuracy"] <= 1.0
    if not fid_n:
        assert report["metrics"]["fid"]["n_generated"] == 50
        assert np.isfinite(report["metrics"]["fid"]["value"])


def test_resume_ends_bit_for_bit_where_an_uninterrupted_run_ends(mnist_dir, tmp_path,
                                                                  monkeypatch):
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    assert train.main(tiny_args(mnist_dir, whole, "--fid-n", "0")) == 0
    # Stop in the warm-up, resume, stop in DP-SGD, resume to the end.
    for stop_at, resume in ((7, []), (30, ["--resume", str(pieces)]), (10 ** 9, ["--resume",
                                                                                str(pieces)])):
        monkeypatch.setattr(train, "install_ctrl_c", lambda n=stop_at: StopAfter(n))
        rc = train.main(tiny_args(mnist_dir, pieces, "--fid-n", "0", *resume))
        assert rc == (130 if stop_at < 10 ** 9 else 0)
    a = torch.load(whole / "checkpoint.pt", weights_only=False)
    b = torch.load(pieces / "checkpoint.pt", weights_only=False)
    for weights_a, weights_b in ((a["model"], b["model"]), (a["ema"]["model"], b["ema"]["model"])):
        assert weights_a.keys() == weights_b.keys()
        for name, tensor in weights_a.items():
            assert torch.equal(tensor, weights_b[name]), name
    assert torch.equal(a["secret_rng"], b["secret_rng"])
    assert torch.equal(a["public_rng"], b["public_rng"])
    assert a["ledger"] == b["ledger"]
    assert np.array_equal(np.load(whole / "samples.npz")["images"],
                          np.load(pieces / "samples.npz")["images"])


@pytest.mark.parametrize("flags, word", [
    (["--eps", "0"], "--eps"), (["--eps", "-1"], "--eps"), (["--delta", "1.5"], "--delta"),
    (["--dataset", "imagenet"], "--dataset"), (["--batch", "0"], "--batch"),
])
def test_bad_arguments_give_one_line_and_status_2(mnist_dir, tmp_path, capsys, flags, word):
    out = tmp_path / "run"
    assert train.main(tiny_args(mnist_dir, out) + flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and word in err
    assert not out.exists()  # nothing written


def test_missing_data_and_unwritable_folder(tmp_path, mnist_dir, capsys):
    assert train.main(tiny_args(str(tmp_path / "nowhere"), tmp_path / "run")) == 2
    assert "--data-dir" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert train.main(tiny_args(mnist_dir, blocker / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err


def test_resume_of_another_budget_is_refused_and_nothing_changes(mnist_dir, tmp_path,
                                                                 monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(train, "install_ctrl_c", lambda: StopAfter(3))
    assert train.main(tiny_args(mnist_dir, out, "--fid-n", "0")) == 130
    digest = hashlib.sha256((out / "checkpoint.pt").read_bytes()).hexdigest()
    args = tiny_args(mnist_dir, out, "--resume", str(out))
    args[args.index("--eps") + 1] = "2"
    assert train.main(args) == 2
    assert "eps" in capsys.readouterr().err
    assert hashlib.sha256((out / "checkpoint.pt").read_bytes()).hexdigest() == digest
    # A new run into a folder that holds one is refused too.
    assert train.main(tiny_args(mnist_dir, out)) == 2


def test_a_missing_weights_file_fails_early_and_loses_nothing(mnist_dir, tmp_path, capsys,
                                                              monkeypatch):
    out, bogus = tmp_path / "run", str(tmp_path / "no.pth")
    assert train.main(tiny_args(mnist_dir, out, "--inception", bogus)) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "no.pth" in err and "Traceback" not in err
    assert not out.exists()  # it failed before anything was written
    weights = os.path.join(torch.hub.get_dir(), "checkpoints", train.evaluate.FID_WEIGHTS_FILE)
    if not os.path.exists(weights):
        pytest.skip("real FID weights not in the torch hub cache")
    # Weights that vanish during a run: the resume refuses to start, the run is kept.
    monkeypatch.setattr(train, "install_ctrl_c", lambda: StopAfter(30))
    assert train.main(tiny_args(mnist_dir, out, "--inception", weights)) == 130
    digest = hashlib.sha256((out / "checkpoint.pt").read_bytes()).hexdigest()
    assert train.main(tiny_args(mnist_dir, out, "--resume", str(out), "--inception", bogus)) == 2
    assert "no.pth" in capsys.readouterr().err
    assert hashlib.sha256((out / "checkpoint.pt").read_bytes()).hexdigest() == digest
    monkeypatch.setattr(train, "install_ctrl_c", lambda: StopAfter(10 ** 9))
    assert train.main(tiny_args(mnist_dir, out, "--resume", str(out), "--inception", weights)) == 0
    assert np.isfinite(read_report(out)["metrics"]["fid"]["value"])
