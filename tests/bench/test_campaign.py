"""Tests of bench/campaign.py's command line and CSV: bad input is one line with exit status 2
before any job runs, and nothing is written; a row lands in the CSV in one rename.
(The jobs themselves are train.py runs and their scores: test_train.py, test_sample.py.)"""
import argparse
import importlib.util
import os

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("campaign", os.path.join(ROOT, "bench",
                                                                       "campaign.py"))
campaign = importlib.util.module_from_spec(spec)
spec.loader.exec_module(campaign)

FILES = {  # what the folder of each case holds besides a subfolder: CSVs that are not the queue's
    "binary.csv": b"\xff\xfe\x00\x81 not text",
    "other.csv": b"a,b\r\n1,2\r\n",
    "not_a_number.csv": b"id,kind,eps\r\nx-s0,train,abc\r\n",
    "extra_cell.csv": b"id,kind\r\nx-s0,train,surplus\r\n",
}
BAD_INPUTS = {  # name: (arguments after --out out --csv campaign.csv, words the line holds)
    "unknown job": (["--only", "nosuchjob"], ["--only", "nosuchjob"]),
    "one job unknown": (["--only", "trunk-s0", "nosuchjob"], ["--only", "nosuchjob"]),
    "table of a folder": (["--table", "--csv", "folder"], ["--csv", "folder"]),
    "table of no file": (["--table", "--csv", "missing.csv"], ["--csv", "missing.csv"]),
    "table of a binary file": (["--table", "--csv", "binary.csv"], ["--csv", "binary.csv"]),
    "table of another CSV": (["--table", "--csv", "other.csv"], ["--csv", "not the campaign's"]),
    "table of a cell that is no number": (["--table", "--csv", "not_a_number.csv"],
                                          ["--csv", "eps", "abc"]),
    "table of a row too long": (["--table", "--csv", "extra_cell.csv"], ["--csv", "extra_cell"]),
    "queue on a folder": (["--csv", "folder"], ["--csv", "folder"]),
    "queue on a binary file": (["--csv", "binary.csv"], ["--csv", "binary.csv"]),
    "empty csv path": (["--csv", ""], ["--csv", "empty"]),
    "empty out": (["--out", ""], ["--out", "empty"]),
    "empty data dir": (["--data-dir", ""], ["--data-dir", "empty"]),
    "unknown preset": (["--preset", "gpu"], ["--preset", "gpu"]),
}


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_before_any_job_and_nothing_is_written(case, tmp_path,
                                                                     monkeypatch, capsys):
    extra, words = BAD_INPUTS[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    for name, content in FILES.items():
        (tmp_path / name).write_bytes(content)
    before = tree(tmp_path)

    def no_job(job, args):
        raise AssertionError(f"job {job['id']} ran: the bad input should have been refused")
    for kind in ("do_trunk", "do_train", "do_post"):
        monkeypatch.setattr(campaign, kind, no_job)
    try:
        code = campaign.main(["--out", "out", "--csv", "campaign.csv", *extra])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    printed = capsys.readouterr()
    err = printed.err.strip()
    assert code == 2 and printed.out == "", err
    assert len(err.splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err
    assert all(word in err for word in words), err
    assert tree(tmp_path) == before  # no out/, no campaign.csv, no lock file


def test_the_repositorys_csv_makes_a_table(capsys):
    assert campaign.main(["--table"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| setting | seeds |") and len(lines) > 10


def test_the_table_names_an_fid_of_the_same_images_once(tmp_path, capsys):
    """Two post jobs whose FIDs agree to every digit read the same first 1,000 images: the
    later one's FID cell names the earlier row instead of counting the value again."""
    path = str(tmp_path / "campaign.csv")
    for id, fid in (("run-s0/n2k", "126.35309461302904"), ("run-s0/n20k", "126.35309461302904"),
                    ("run-s0/heun", "126.35309461302905")):  # the last digit: other images
        campaign.record(path, dict(id=id, kind="post", fid=fid, real_train_accuracy=0.8))
    assert campaign.main(["--table", "--csv", path]) == 0
    fid_cells = [line.split(" | ")[5] for line in capsys.readouterr().out.splitlines()[2:]]
    assert fid_cells == ["126.4", "= run-s0/n2k", "126.4"]


def test_a_variant_branches_only_from_a_finished_trunk(tmp_path, monkeypatch):
    """A trunk stopped in its warm-up (its machine went away) is finished before a variant
    branches from it: a branch of a half-warmed-up model would not be paired with its seed's
    other variants."""
    args = argparse.Namespace(preset="cpu", out=str(tmp_path), data_dir=None)
    (tmp_path / "trunk-edm-s1").mkdir()
    (tmp_path / "trunk-edm-s1" / campaign.runs.CHECKPOINT).write_bytes(b"")
    stages, calls = {"trunk-edm-s1": "warm_up"}, []

    def do_trunk(job, args):
        calls.append(job["id"])
        stages[job["id"]] = "done"

    def branch(trunk, folder, cfg, n):
        assert stages[os.path.basename(trunk)] == "done"
        raise StopIteration  # what follows the branch is not this test's

    monkeypatch.setattr(campaign.runs, "load_checkpoint",
                        lambda folder: {"stage": stages[os.path.basename(folder)]})
    monkeypatch.setattr(campaign.data, "load", lambda *a, **k: (None, list(range(60000))))
    monkeypatch.setattr(campaign, "do_trunk", do_trunk)
    monkeypatch.setattr(campaign, "branch", branch)
    with pytest.raises(StopIteration):
        campaign.do_train(next(j for j in campaign.JOBS if j["id"] == "edm-ema0.99-s1"), args)
    assert calls == ["trunk-edm-s1"]


def test_a_row_replaces_its_older_self_in_place_and_leaves_no_temporary_file(tmp_path):
    path = str(tmp_path / "campaign.csv")
    campaign.record(path, dict(id="a-s0", kind="post", fid=1.0, s_classifier=5.0))
    campaign.record(path, dict(id="b-s0", kind="post", fid=2.0))
    campaign.record(path, dict(id="a-s0", kind="post", fid=3.0, s_classifier=""))
    rows = campaign.read_rows(path)
    assert [(r["id"], r["fid"], r["s_classifier"]) for r in rows] == [
        ("a-s0", "3.0", "5.0"), ("b-s0", "2.0", "")]  # the value the new row lacks is kept
    assert sorted(os.listdir(tmp_path)) == ["campaign.csv", "campaign.csv.lock"]
    assert open(path, "rb").read().startswith(",".join(campaign.FIELDS).encode() + b"\r\n")


def test_every_job_has_the_config_train_py_would_make():
    # What decides whether a variant branches from its trunk: each job's flags read as train.py
    # reads them. A job whose flags train.py refuses, or a config_of that cannot read them, fails.
    args = argparse.Namespace(preset="cpu")
    for job in campaign.JOBS:
        if job["kind"] == "post":
            continue
        cfg = campaign.config_of(job["flags"], args, job["seed"])
        assert cfg.model == "small" and cfg.clip == 0.1, job["id"]  # the cpu preset, C = 0.1
    by_id = {job["id"]: job for job in campaign.JOBS}
    eps10 = campaign.config_of(by_id["edm-eps10-s0"]["flags"], args, 0)
    no_central = campaign.config_of(by_id["edm-no-central-s0"]["flags"], args, 0)
    assert eps10.eps == 10 and no_central.central is False
