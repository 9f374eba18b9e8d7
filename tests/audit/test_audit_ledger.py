"""Tests for audit/ledger.py: train.py's ledger against what its mechanisms were really called
with. As it is, the ledger reports exactly what the calls spent; each way a ledger or a plan can
be wrong (a step not counted or counted twice, a sigma or a delta that is not the one used, a
stage missing, a sigma calibrated at the wrong delta, a batch that is not a Poisson sample) is
caught: end to end on train.train where the bug is in train.py's path, and on compare() by hand
for the rest."""
import collections
import dataclasses
import types

import pytest
import torch

import accountant
import randomness
import train
from audit import ledger

SMALL = dataclasses.replace(ledger.SETTINGS, epochs=0.3)  # 100 images, batch 10: 3 steps
IMAGES = 100

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_py_reports_what_its_mechanisms_spent():
    result = ledger.audit_ledger(cfg=SMALL, images=IMAGES)
    plan = train.privacy_plan(SMALL, IMAGES)
    dpsgd_rate, dpsgd_sigma = plan["dpsgd"]["q"], plan["dpsgd"]["sigma"]
    # every call as train.py makes it: 2 central queries, 1 release, 3 steps at the plan's sigma
    assert result.calls == {("central images", randomness.sampling_rate(SMALL.central_q),
                             SMALL.central_sigma): SMALL.central_queries,
                            ("frequency features", 1.0, SMALL.frequency_sigma): 1,
                            ("DP-SGD", dpsgd_rate, dpsgd_sigma): 3}
    assert result.problems == [] and result.target == SMALL.eps
    assert [finding.mechanism for finding in result.findings] == [
        "central images", "frequency features", "DP-SGD", "total"]
    for finding in result.findings:
        assert finding.reported == pytest.approx(finding.recorded, rel=1e-12)
    assert 0.9 < result.findings[-1].recorded <= SMALL.eps  # the plan spends the budget


def test_a_plan_calibrated_at_the_wrong_delta_is_caught(monkeypatch):
    # train.privacy_plan's sigma for DP-SGD from an accountant fed delta 1e-3: the calls spend
    # more than the eps = 1 asked for at the run's delta 1e-5.
    calibrate = accountant.calibrate_sigma
    monkeypatch.setattr(accountant, "calibrate_sigma",
                        lambda eps, delta, *rest, **named: calibrate(eps, 1e-3, *rest, **named))
    result = ledger.audit_ledger(cfg=SMALL, images=IMAGES)
    assert any("more than the 1 asked for" in problem for problem in result.problems)


def test_a_ledger_that_counts_every_other_dpsgd_step_is_caught(monkeypatch):
    add, seen = accountant.PrivacyLedger.add, collections.Counter()

    def add_every_other(self, name, q, sigma, steps=1):
        seen[name] += 1
        if name != "DP-SGD" or seen[name] % 2:
            add(self, name, q, sigma, steps)
    monkeypatch.setattr(accountant.PrivacyLedger, "add", add_every_other)
    result = ledger.audit_ledger(cfg=SMALL, images=IMAGES)
    assert any(problem.startswith("DP-SGD: the ledger reports") for problem in result.problems)
    assert any(problem.startswith("total: the ledger reports") for problem in result.problems)


def test_a_dpsgd_loop_whose_batches_are_not_poisson_samples_is_caught(monkeypatch):
    # train.py's loop with a fixed-size sampler in place of randomness.poisson_sample
    def fixed_size(n, q, generator):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=generator)[:round(q * n)]] = True
        return mask
    monkeypatch.setattr(train, "randomness", types.SimpleNamespace(
        poisson_sample=fixed_size, sampling_rate=randomness.sampling_rate,
        secret_generator=randomness.secret_generator))
    result = ledger.audit_ledger(cfg=SMALL, images=IMAGES)
    assert "3 DP-SGD steps without one Poisson sample before them" in result.problems


# compare() by hand: the calls recorded, the ledger's entries, the ledger's delta
CENTRAL, DPSGD = ("central images", 0.1, 5.0), ("DP-SGD", 0.05, 1.5)
CALLS = {CENTRAL: 2, DPSGD: 10}
CASES = {  # name: (calls, ledger entries, ledger's delta, the problem to find; None: none)
    "as it is": (CALLS, [[*CENTRAL, 2], [*DPSGD, 10]], 1e-5, None),
    "a larger sigma in the ledger": (CALLS, [[*CENTRAL, 2], ["DP-SGD", 0.05, 1.6, 10]], 1e-5,
                                     "DP-SGD: the ledger reports"),
    "a smaller rate in the ledger": (CALLS, [[*CENTRAL, 2], ["DP-SGD", 0.04, 1.5, 10]], 1e-5,
                                     "DP-SGD: the ledger reports"),
    "fewer steps in the ledger": (CALLS, [[*CENTRAL, 2], [*DPSGD, 9]], 1e-5,
                                  "DP-SGD: the ledger reports"),
    "a stage missing": (CALLS, [[*DPSGD, 10]], 1e-5, "central images: the ledger reports"),
    "a step counted that did not happen": (CALLS, [[*CENTRAL, 2], [*DPSGD, 11]], 1e-5,
                                           "counted without happening"),
    "the ledger at delta 1e-3": (CALLS, [[*CENTRAL, 2], [*DPSGD, 10]], 1e-3,
                                 "the ledger's delta is 0.001"),
    "a step without a Poisson sample": ({CENTRAL: 2, DPSGD: 9, ("DP-SGD", None, 1.5): 1},
                                        [[*CENTRAL, 2], [*DPSGD, 10]], 1e-5,
                                        "1 DP-SGD steps without one Poisson sample"),
    "more than asked for": ({CENTRAL: 2, ("DP-SGD", 0.05, 0.5): 10},
                            [[*CENTRAL, 2], ["DP-SGD", 0.05, 0.5, 10]], 1e-5,
                            "the calls spent eps"),
}


@pytest.mark.parametrize("name", CASES)
def test_compare_finds_each_kind_of_wrong_report(name):
    calls, entries, ledger_delta, problem = CASES[name]
    book = accountant.PrivacyLedger(ledger_delta)
    for entry, q, sigma, steps in entries:
        book.add(entry, q, sigma, steps)
    findings, problems = ledger.compare(calls, book, 1e-5, target=1.0)
    if problem is None:
        assert problems == []
        assert all(f.reported == pytest.approx(f.recorded, rel=1e-12) for f in findings)
    else:
        assert any(problem in found for found in problems), problems
