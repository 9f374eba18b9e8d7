"""What the command lines share: one device check (settings.check_device).
Each command line's own table of bad input is in its module's tests."""
import os

import pytest
import torch

import evaluate
import sample
import settings
import train


def test_the_device_check_takes_cpu_and_cuda_it_has():
    assert settings.check_device("cpu") == torch.device("cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "device_count", lambda: 2)
        assert settings.check_device("cuda:1") == torch.device("cuda:1")
        assert settings.check_device(None) == torch.device("cuda")
        with pytest.raises(ValueError, match="^--device cuda:2: this machine has 2"):
            settings.check_device("cuda:2")
        patch.setattr(torch.cuda, "is_available", lambda: False)
        assert settings.check_device(None) == torch.device("cpu")


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
