"""Tests of runs.py's mechanisms on their own, without training: temporary files, the folder
lock, the stop signals, and what Progress lets an observer see of DP-SGD's steps.

train.py's use of them, end to end, is tested in test_train.py.
"""
import inspect
import os
import re
import signal
import subprocess
import sys

import pytest

from harness import runs
from harness import flags
import settings
import train


# ------------------------------------------------------------------------- files and lock
def test_two_writes_of_one_file_never_share_a_temporary_file(tmp_path):
    """A write that starts while another write of the same file is under way (two runs, or a
    run and a tool) must not take the other's temporary file: both finish, the last rename
    wins, and no temporary file is left."""
    path = str(tmp_path / "report.json")

    def outer(f):
        f.write("outer")
        runs.atomic_write(path, lambda g: g.write("inner"), "w")

    runs.atomic_write(path, outer, "w")
    assert open(path).read() == "outer"
    assert os.listdir(tmp_path) == ["report.json"]


def test_a_failed_write_leaves_the_file_as_it_was_and_no_temporary_file(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    runs.atomic_write(path, lambda f: f.write(b"good"))

    def disk_full(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        runs.atomic_write(path, disk_full)
    assert open(path, "rb").read() == b"good"
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_locked_folder_refuses_a_second_lock_until_it_is_released(tmp_path):
    first = runs.lock_folder(str(tmp_path), "--out")
    with pytest.raises(ValueError, match="--resume: .* is in use by another run"):
        runs.lock_folder(str(tmp_path), "--resume")  # another open file: like another process
    first.close()
    runs.lock_folder(str(tmp_path), "--resume").close()


def test_the_lock_holds_against_another_process_and_dies_with_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
         str(tmp_path / runs.LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match="in use by another run"):
            runs.prepare_folder(str(tmp_path))
    finally:
        holder.kill()  # the process this test started; the OS releases its lock
        holder.wait()
    runs.prepare_folder(str(tmp_path)).close()


# ------------------------------------------------------------------------- stop signals
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_ask_for_a_checkpoint_like_ctrl_c(quiet_signals, signum, capsys):
    stop = runs.install_ctrl_c()
    assert not stop.requested
    os.kill(os.getpid(), signum)
    assert stop.requested
    assert "checkpointing" in capsys.readouterr().out


def test_a_signal_ignored_at_the_start_stays_ignored(quiet_signals):
    """nohup ignores SIGHUP: closing the terminal must not stop a nohup'ed run."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    runs.install_ctrl_c()
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


# ------------------------------------------------------------------------- Progress
class Flag:
    requested = False


def events(total, block, stop_at=None, first=0):
    """The steps after which Progress wrote a checkpoint (checkpoint_minutes ~ 0: whenever it
    may) and whether it stopped, with a stop requested after step `stop_at`."""
    written, flag = [], Flag()
    progress = runs.Progress("train_dpsgd", first, total, written.append, flag,
                             checkpoint_minutes=1e-9, every=0.0, block=block)
    for step in range(first + 1, total + 1):
        flag.requested = stop_at is not None and step >= stop_at
        try:
            progress(step)
        except runs.StopRequested:
            return written, True
    return written, False


def test_dpsgd_files_and_lines_describe_whole_blocks_of_steps_only(capsys):
    """An observer who reads report.json (or the checkpoint's modification time, or the log)
    after every write sees only the ends of blocks of >= DPSGD_BLOCK steps, the last block
    included: 25 steps end blocks at 10 and 25, never at 20 (that would time 5 steps)."""
    block = runs.DPSGD_BLOCK
    for total in (block, 2 * block + 5, 3 * block):
        written, _ = events(total, block)
        lines = [int(line.split()[2].split("/")[0]) for line in capsys.readouterr().out.split("\n")
                 if line]
        assert lines == written  # each line at a write, each write with a line (every=0)
        assert written[-1] == total
        assert all(b - a >= block for a, b in zip([0] + written, written)), written
    # Without blocks (warm-up, synthesis) every step may be a checkpoint.
    assert events(5, 1)[0] == [1, 2, 3, 4, 5]


def test_a_stop_in_dpsgd_waits_for_the_end_of_its_block():
    """Ctrl-C during DP-SGD step 1 must not leave a report whose ledger and timing describe one
    step: the run stops, and writes, at the block's end."""
    block = runs.DPSGD_BLOCK
    assert events(3 * block, block, stop_at=1) == ([block], True)
    assert events(3 * block, block, stop_at=block + 3) == ([block, 2 * block], True)
    # a resumed run continues at a block's end and keeps the same blocks
    assert events(3 * block, block, stop_at=block + 1, first=block) == ([2 * block], True)
    assert events(5, 1, stop_at=2) == ([1, 2], True)  # warm-up: at once


def test_progress_checks_the_weights_at_each_block_end_before_writing():
    checked, written = [], []

    def check(step):
        checked.append(step)
        if step == 20:
            raise runs.NotFinite("NaN")

    progress = runs.Progress("train_dpsgd", 0, 30, written.append, Flag(), 1e-9, every=1e9,
                             block=10, check=check)
    with pytest.raises(runs.NotFinite):
        for step in range(1, 31):
            progress(step)
    assert checked == [10, 20] and written == [10]  # the NaN weights were never written


def test_train_runs_every_stage_once_in_the_checkpoints_order():
    """runs.STAGES names the stages in checkpoints, and a resume skips by its order: train.py
    must run exactly those stages, each once, in that order (a renamed, added or reordered
    stage would resume a run at the wrong place)."""
    source = inspect.getsource(train.train) + inspect.getsource(train.post_process)
    called = re.findall(r'run_stage\("(\w+)"', source)
    assert called == list(runs.STAGES[:-1]) and runs.STAGES[-1] == "done"
    assert set(flags.AFTER_TRAINING.values()) <= set(runs.TRAINED)


def test_run_stage_skips_stages_done_and_checkpoints_after_each():
    calls = []

    class HalfWay:  # a resumed run, stopped at step 7 of the warm-up
        stage, step = runs.STAGES.index("warm_up"), 7
        tally_time = lambda self: calls.append("tally")  # noqa: E731
        checkpoint = lambda self: calls.append(("checkpoint", self.stage, self.step))  # noqa: E731

    run = HalfWay()
    runs.Run.run_stage(run, "release_central_images", lambda: calls.append("central"))
    runs.Run.run_stage(run, "warm_up", lambda: calls.append(("warm up from", run.step)))
    runs.Run.run_stage(run, "train_dpsgd", lambda: calls.append(("DP-SGD from", run.step)))
    index = runs.STAGES.index
    assert calls == [("warm up from", 7), "tally", ("checkpoint", index("warm_up") + 1, 0),
                     ("DP-SGD from", 0), "tally", ("checkpoint", index("train_dpsgd") + 1, 0)]
    with pytest.raises(ValueError):
        runs.Run.run_stage(run, "no such stage", lambda: None)
