"""Tests of sample.py: more images from a finished run, drawn by the sampling loop train.py uses,
written as the samples file evaluate.py reads (the chain sample.py -> evaluate.py), without
changing the run; bad input is one line with exit status 2, before any image is drawn.

The run folders here are built in a second: a checkpoint with what sample.py reads of one (the
settings of the tiny preset, the stage reached, EMA weights). Whole runs are test_train.py's.
"""
import dataclasses
import hashlib
import json
import os

import pytest
import torch

from harness import data
from harness import files
from harness import flags
import diffusion
import evaluate
from harness import runs
import sample
import samplers
import settings
from conftest import randomise_output_layer

pytestmark = pytest.mark.usefixtures("one_thread")  # a small UNet on a few images (conftest.py)

TINY = settings.TINY
OVERRIDES = dict(sample_steps=3, solver="ddim", guidance=0.5)  # differ from TINY's


def write_run(folder, stage):
    """A run folder at `stage` as sample.py sees it. The EMA model is a small UNet with a random
    output layer: an untrained one's is zero (eps = 0), which would make its images nearly
    independent of their noise and labels."""
    torch.manual_seed(0)
    model = randomise_output_layer(diffusion.make_unet(TINY.model, 1, 28, 10), seed=1)
    os.makedirs(folder)
    runs.save_checkpoint(folder, dict(cfg=dataclasses.asdict(TINY), stage=stage,
                                      ema=diffusion.EMA(model, TINY.ema).state_dict()))
    return folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    return write_run(str(tmp_path_factory.mktemp("finished") / "run"), "done")


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory):
    return write_run(str(tmp_path_factory.mktemp("unfinished") / "run"), "train_dpsgd")


def folder_digest(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


def run_sample(argv, capsys):
    """sample.main's exit status and what it printed."""
    try:
        code = sample.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr()


def expected_draw(run, n, seed, overrides):
    """What sample.py --seed `seed` must draw: the sampling loop on the run's EMA model with its
    settings, `overrides` replaced (images and labels, concatenated)."""
    cfg, model = sample.load_trained_model(run)
    cfg = dataclasses.replace(cfg, **overrides)
    batches = list(samplers.sample_uniform(diffusion.EDM(num_classes=10), model, n,
                                           torch.Generator().manual_seed(seed),
                                           **samplers.settings_of(cfg)))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@pytest.mark.parametrize("overrides", [{}, OVERRIDES], ids=["run's sampler", "flags"])
def test_sample_then_evaluate(overrides, finished_run, tmp_path, capsys, monkeypatch):
    # sample.py RUN --n 30 --out more.npz, then evaluate.py more.npz --dataset mnist: evaluate.py
    # must take the file, and hand FID and the classifier exactly the images and labels that
    # were drawn. (FID, the classifier and the data have their own tests: here they record.)
    more = tmp_path / "more.npz"
    given = [x for name, value in overrides.items() for x in (flags.flag(name), value)]
    code, printed = run_sample([finished_run, "--n", 30, "--out", more, "--seed", 1,
                                "--device", "cpu", *given], capsys)
    assert code == 0 and "no privacy spent" in printed.out, printed.err
    images, labels = expected_draw(finished_run, 30, 1, overrides)
    if overrides:  # they change the images, so the chain below would see them ignored
        assert not torch.equal(images, expected_draw(finished_run, 30, 1, {})[0])
    assert images.float().std() > 10  # images, not a constant

    handed = {}
    real = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    monkeypatch.setattr(data, "load", lambda *args: (real, torch.arange(40) % 10))
    monkeypatch.setattr(evaluate, "load_inception", lambda weights, device: "the network")
    monkeypatch.setattr(evaluate, "fid", lambda generated, reference, *args, **kwargs:
                        handed.update(fid=(generated, reference)) or 12.5)
    monkeypatch.setattr(evaluate, "classifier_accuracy", lambda images, labels, *args, **kwargs:
                        handed.update(classifier=(images, labels))
                        or dict(test_accuracy=0.25, best_epoch=1))
    assert evaluate.main([str(more), "--dataset", "mnist", "--n", "20", "--device", "cpu",
                          "--cache-dir", str(tmp_path / "cache")]) == 0
    assert torch.equal(handed["fid"][0], images[:20]) and torch.equal(handed["fid"][1], real[:20])
    assert torch.equal(handed["classifier"][0], images)
    assert torch.equal(handed["classifier"][1], labels)
    result = json.loads((tmp_path / "more.eval.json").read_text())
    assert result["fid"] == 12.5 and result["accuracy"] == 0.25 and result["fid_images"] == 20


def test_a_seed_fixes_the_draw_and_the_run_is_only_read(finished_run, tmp_path, capsys):
    digest = folder_digest(finished_run)
    drawn = []
    for name, seed in (("a", ["--seed", 1]), ("b", ["--seed", 1]), ("c", [])):
        code, printed = run_sample([finished_run, "--n", 12, "--out", tmp_path / f"{name}.npz",
                                    "--device", "cpu", *seed], capsys)
        assert code == 0, printed.err
        drawn.append(files.load_samples(str(tmp_path / f"{name}.npz"), "mnist")[0])
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])
    assert folder_digest(finished_run) == digest  # nothing written to, or next to, the run
    code, _ = run_sample([finished_run, "--n", 3, "--device", "cpu"], capsys)  # default --out
    assert code == 0 and os.path.exists(os.path.join(finished_run, "more_samples.npz"))
    os.remove(os.path.join(finished_run, "more_samples.npz"))


BIG = str(10 ** 12)  # a typo's count: sampling would run for years
BAD_INPUTS = {  # name: (extra arguments, words the line holds[, words it must not hold]); the
    # last --n/--device/--out wins. The run is the finished one unless the name says otherwise.
    "guidance nan": (["--guidance", "nan"], ["--guidance", "nan"]),
    "guidance inf": (["--guidance", "inf"], ["--guidance", "inf"]),
    "guidance negative": (["--guidance", "-0.5"], ["--guidance", "-0.5"]),
    "steps negative": (["--sample-steps", "-1"], ["--sample-steps", "-1"]),
    "steps above T": (["--sample-steps", "1001"], ["--sample-steps", "1001"]),
    "steps not a number": (["--sample-steps", "ten"], ["--sample-steps", "ten"]),
    "steps 0": (["--sample-steps", "0"], ["--sample-steps", "0"]),
    "n 0": (["--n", "0"], ["--n", "0"]),
    "n 1": (["--n", "1"], ["--n", f"2..{flags.MAX_COUNT}"]),  # evaluate.py needs two
    "n negative": (["--n", "-5"], ["--n", "-5"]),
    "n of years": (["--n", BIG], ["--n", f"2..{flags.MAX_COUNT}", BIG]),
    "seed 2**64": (["--seed", str(2 ** 64)], ["--seed", "2**64 - 1"], ["Overflow"]),
    "seed negative": (["--seed", "-1"], ["--seed", "-1"]),
    "cuda without a GPU": (["--device", "cuda"], ["--device cuda", "no CUDA GPU"]),
    "mps": (["--device", "mps"], ["--device mps", "untested"]),
    "unknown device": (["--device", "gpu0"], ["--device", "gpu0"]),
    "bad solver": (["--solver", "euler"], ["--solver", "euler"]),
    "empty out": (["--out", ""], ["--out", "empty"]),  # not RUN/more_samples.npz
    "exists": ([], ["--out", "exists"]),
    "no output folder": ([], ["cannot write", "nowhere"]),
    "unfinished run": ([], ["not finished training", "--resume"]),
    "no run": ([], ["RUN", "no checkpoint.pt"], ["--resume"]),  # sample.py has no --resume
    "empty run": ([], ["RUN", "empty"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_before_any_image_and_nothing_is_written(
        case, finished_run, unfinished_run, tmp_path, capsys, monkeypatch):
    extra, words, *absent = BAD_INPUTS[case]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also where there is one

    def no_sampling(*args, **kwargs):
        raise AssertionError("an image was drawn: the bad input should have been refused first")
    monkeypatch.setattr(samplers, "sample", no_sampling)
    run = {"unfinished run": unfinished_run, "no run": str(tmp_path / "nowhere"),
           "empty run": ""}.get(case, finished_run)
    target = tmp_path / ("nowhere/out.npz" if case == "no output folder" else "out.npz")
    if case == "exists":
        target.write_bytes(b"keep me")
    digest = folder_digest(run) if os.path.isdir(run) else None
    code, printed = run_sample([run, "--n", 5, "--out", target, "--device", "cpu", *extra],
                               capsys)
    err = printed.err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert "Traceback" not in err and printed.out == "", err
    assert all(word in err for word in words), err
    assert not any(word in err for word in (absent[0] if absent else [])), err
    assert (target.read_bytes() == b"keep me") if case == "exists" else not target.exists()
    assert sorted(os.listdir(tmp_path)) == (["out.npz"] if case == "exists" else [])
    assert (folder_digest(run) if digest else None) == digest
