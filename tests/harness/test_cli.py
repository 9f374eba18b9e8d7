"""What the command lines share: one device check (flags.check_device), a Ctrl-C while a
command is still loading torch, numpy or scipy is one line (cli.py), not a traceback, and freed
memory is reused (cli.keep_freed_memory).
Each command line's own table of bad input is in its module's tests."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import evaluate
import sample
import settings
from harness import flags
import train
from conftest import ROOT

# The command lines and a module each imports after cli.py that takes seconds to load.
SLOW_IMPORTS = {"train.py": "torch", "sample.py": "torch", "evaluate.py": "torch",
                "central.py": "torch", "accountant.py": "numpy"}


CTRL_C = "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(60)\n"


@pytest.mark.parametrize("script", SLOW_IMPORTS)
def test_ctrl_c_while_a_command_loads_is_one_line(script, tmp_path):
    """A Ctrl-C during `import torch` (here: a torch, first on the path, that sends the process
    SIGINT when imported) ends it at once as Ctrl-C does, with one line; a failure of another
    kind still shows its traceback."""
    def run(name, code):
        fake = tmp_path / name / SLOW_IMPORTS[script]
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text(code)
        return subprocess.run([sys.executable, script, "--help"], cwd=ROOT, text=True,
                              capture_output=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=str(fake.parent)))

    stopped = run("ctrl_c", CTRL_C)
    assert stopped.returncode == -signal.SIGINT and stopped.stdout == ""
    assert stopped.stderr.strip() == "stopped (Ctrl-C)", stopped.stderr
    broken = run("broken", "raise ImportError('a broken install')\n")
    assert broken.returncode == 1 and "Traceback" in broken.stderr
    assert "a broken install" in broken.stderr


def test_the_device_check_takes_cpu_and_cuda_it_has():
    assert flags.check_device("cpu") == torch.device("cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "device_count", lambda: 2)
        assert flags.check_device("cuda:1") == torch.device("cuda:1")
        assert flags.check_device(None) == torch.device("cuda")
        with pytest.raises(ValueError, match="^--device cuda:2: this machine has 2"):
            flags.check_device("cuda:2")
        patch.setattr(torch.cuda, "is_available", lambda: False)
        assert flags.check_device(None) == torch.device("cpu")


@pytest.mark.parametrize("device, words", [
    ("mps", ["--device mps", "untested"]), ("mps:0", ["--device mps:0", "untested"]),
    ("xpu", ["--device", "xpu"]), ("meta", ["--device", "meta"]), ("gpu9", ["--device", "gpu9"]),
    ("cuda", ["--device cuda", "no CUDA GPU"]), ("cuda:3", ["--device cuda:3", "no CUDA GPU"]),
])
def test_every_command_line_refuses_a_device_with_the_same_line(device, words, tmp_path,
                                                                monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also where there is one
    monkeypatch.chdir(tmp_path)
    results = []
    for main, argv in ((train.main, ["--out", "run"]), (sample.main, ["run", "--n", "10"]),
                       (evaluate.main, ["samples.npz", "--dataset", "mnist"])):
        try:
            code = main([*argv, "--device", device])
        except SystemExit as e:
            code = e.code
        results.append((code, capsys.readouterr().err))
    assert len(set(results)) == 1, results  # one check: the same status and line from each
    code, err = results[0]
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:"), err
    assert all(word in err for word in words), err
    assert os.listdir(tmp_path) == []


# Two 64 MiB tensors made and freed 20 times (one of Inception's activations for FID is
# larger), after 5 rounds that warm the heap up: the page faults of the 20, in a fresh process.
REUSE = """import resource, sys, torch
sys.path.insert(0, {root!r})
from harness import cli
if {keep}:
    cli.keep_freed_memory()
for _ in range(25):
    if _ == 5:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 << 20)
    y = x * 2
    del x, y
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_not_faulted_in_again():
    """keep_freed_memory: large blocks freed and asked for again come from the heap, without
    page faults; by default glibc maps each anew (16,384 faults per 64 MiB block). Measured:
    655,400 faults against 16,384 to 32,768."""
    def faults(keep):
        code = REUSE.format(root=str(ROOT), keep=keep)
        return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True, timeout=120).stdout)
    pages = 20 * 2 * (64 << 20) // 4096
    assert faults(False) > pages / 2  # the default: every block faulted in again
    assert faults(True) < pages / 10
