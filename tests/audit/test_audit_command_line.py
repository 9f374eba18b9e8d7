"""Tests for the audits' command line (`python -m audit`, audit/__main__.py): absurd input is one
line, "error: ...", and exit status 2, before any work starts; and the three tables it prints."""
import pytest

import accountant
import randomness
from audit import __main__ as command_line
from audit import ledger, one_run, trials

DELTA = 1e-5
TOO_MANY = str(command_line.CANARIES[1] + 1)


def claimed_eps(q, sigma, steps):
    return accountant.epsilon([(randomness.sampling_rate(q), sigma, steps)], DELTA)[0]


# Each case names the flag that its one line must name. The audits themselves are replaced by a
# function that fails the test, so a case whose check is missing fails at once (instead of
# hanging, as --scale 1e300 did, or allocating, as --canaries 1e12 did).
BAD = [
    (["--canaries", "5"], "--canaries"),
    (["--canaries", TOO_MANY], "--canaries"),
    (["--canaries", "1000000000000"], "--canaries"),
    (["--canaries", "many"], "--canaries"),
    (["--trials", "--canaries", "100"], "--canaries"),
    (["--ledger", "--canaries", "100"], "--canaries"),
    (["--delta", "0"], "--delta"),
    (["--delta", "0.5"], "--delta"),
    (["--delta", "nan"], "--delta"),
    (["--delta", "-inf"], "--delta"),
    (["--delta", "1e-300"], "--delta"),
    (["--trials", "--scale", "0"], "--scale"),
    (["--trials", "--scale", "-1"], "--scale"),
    (["--trials", "--scale", "1e300"], "--scale"),
    (["--trials", "--scale", "inf"], "--scale"),
    (["--trials", "--scale", "nan"], "--scale"),
    (["--trials", "--scale", "1e-9"], "--scale"),
    (["--scale", "0.5"], "--scale"),
    (["--ledger", "--scale", "0.5"], "--scale"),
    (["--variant", "dpsgd:as-it-is"], "--variant"),
    (["--trials", "--variant", "dpsgd:nothing"], "--variant"),
    (["--trials", "--ledger"], "--ledger"),
    (["--seed", str(2 ** 64)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "0.5"], "--seed"),
]


@pytest.mark.parametrize("argv, flag", BAD, ids=[" ".join(argv) for argv, _ in BAD])
def test_absurd_input_is_one_line_and_status_2_before_any_work(argv, flag, monkeypatch, capsys):
    def started(*args, **kwargs):
        raise AssertionError(f"the audit started with {argv}")
    for module, name in ((one_run, "print_table"), (trials, "print_table"),
                         (ledger, "audit_ledger")):
        monkeypatch.setattr(module, name, started)
    with pytest.raises(SystemExit) as exit_info:
        command_line.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and flag in err


def test_the_bounds_hold_calibrations_for_every_claim_of_the_tables():
    # The ends of the delta range still give a sigma for each claim (no "cannot be met" error).
    for delta in command_line.DELTA:
        for _, _, q, steps in one_run.MECHANISMS:
            for eps in one_run.TARGET_EPS:
                assert accountant.calibrate_sigma(eps, delta, randomness.sampling_rate(q), steps)
        for *_, designs in trials.MECHANISMS:
            for design in designs:
                assert accountant.calibrate_sigma(1.0, delta, randomness.sampling_rate(design.q),
                                                  design.steps)


def rows_of(out):
    return [[cell.strip() for cell in line.split("|")[1:-1]]
            for line in out.splitlines() if line.startswith("| ")]


def test_one_run_table_rows_and_claims(monkeypatch, capsys):
    # A small table: one claim (eps = 4) per mechanism, and its run with the noise removed.
    # (q = 1: the accountant's closed form, so calibrating sigma takes no time.)
    monkeypatch.setattr(one_run, "MECHANISMS", (
        ("DP-SGD", one_run.audit_dpsgd, 1.0, 1), ("central images", one_run.audit_central, 1.0, 1),
        ("frequency release", one_run.audit_frequency, 1.0, 1)))
    monkeypatch.setattr(one_run, "TARGET_EPS", (4.0,))
    assert command_line.main(["--canaries", "50", "--seed", "0"]) == 0
    header, *body = rows_of(capsys.readouterr().out)
    assert header[0] == "mechanism" and len(header) == 9
    names = ["DP-SGD", "central images", "frequency release"]
    assert [row[0] for row in body] == [name + bug for name in names
                                        for bug in ("", ", noise removed (bug)")]
    for honest, bug in zip(body[0::2], body[1::2]):
        sigma = float(honest[3])
        assert abs(float(honest[4]) - claimed_eps(1.0, sigma, 1)) < 0.02  # sigma printed rounded
        assert float(honest[4]) <= 4.0 and bug[4] == honest[4] and float(bug[3]) == 0.0


def test_trials_table_rows_and_claims(capsys):
    # Two rows of `python -m audit --trials`, at a tiny scale: "true eps" is the accountant's for
    # the bug (here sigma x 0.7 in the first design), or inf; the ledger column is the eps of
    # what ran, which the wrong delta makes 1.69.
    argv = ["--trials", "--variant", "dpsgd:noise-x0.7",
            "--variant", "central:realised-class-count", "--variant", "frequency:delta-1e-3",
            "--scale", "0.002", "--seed", "0"]
    assert command_line.main(argv) == 0
    header, *body = rows_of(capsys.readouterr().out)
    assert header[:4] == ["mechanism", "variant", "true eps", "eps >="]
    assert [row[:2] for row in body] == [["DP-SGD", "noise-x0.7"],
                                         ["central images", "realised-class-count"],
                                         ["frequency release", "delta-1e-3"]]
    dpsgd_row, central_row, frequency_row = body
    sigma = accountant.calibrate_sigma(1.0, DELTA, randomness.sampling_rate(0.25), 1)
    assert float(dpsgd_row[2]) == pytest.approx(claimed_eps(0.25, 0.7 * sigma, 1), abs=0.005)
    assert central_row[2] == "inf" and float(central_row[3]) >= 0.0
    wrong = accountant.calibrate_sigma(1.0, 1e-3, 1.0, 1)
    assert float(frequency_row[6]) == pytest.approx(claimed_eps(1.0, wrong, 1), abs=0.005)
    assert "ledger" in frequency_row[7]


@pytest.mark.parametrize("problems, status", [([], 0), (["the ledger under-reports"], 1)])
def test_ledger_audit_exits_1_on_a_problem(problems, status, monkeypatch, capsys):
    result = ledger.LedgerAudit({("DP-SGD", 0.1, 2.0): 3}, [["DP-SGD", 0.1, 2.0, 3]],
                                [ledger.Finding("total", 0.5, 0.5)], 1.0, problems)
    monkeypatch.setattr(ledger, "audit_ledger", lambda **settings: result)
    assert command_line.main(["--ledger"]) == status
    out = capsys.readouterr().out
    assert ("PROBLEMS" in out) == bool(problems)
