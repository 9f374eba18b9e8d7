"""Does the run report what it spent? The audit of train.py's own privacy ledger.

train.py keeps a ledger (accountant.PrivacyLedger): each stage that touches the sensitive images
adds its mechanism (name, sampling rate q, noise multiplier sigma, steps), and the run reports
the ledger's eps. The other audits check that each mechanism is what the accountant is told;
this one checks what it is told. It runs train.py's stages (train.train) on a small synthetic
dataset and records every call of the three mechanisms' production functions with the
arguments it really got, one entry per step or query:

    central.noisy_class_means(..., q, sigma, ...)      -> ("central images", q', sigma)
    frequency.noisy_feature_table(..., sigma, ...)     -> ("frequency features", 1, sigma)
    dpsgd.dp_step(..., sigma=sigma, ...)               -> ("DP-SGD", q', sigma), q' the rate of
                                                          the randomness.poisson_sample before it

with q' = randomness.sampling_rate(q), the exact inclusion probability. From those calls the
accountant recomputes eps at the run's delta, and the audit compares (no statistics: equalities
of numbers, so a finding is certain):
  1. the ledger's delta is the run's, and for each mechanism, and in total, the ledger's eps
     equals the recomputed one. Below it, the ledger under-reports (a step not counted, a sigma
     or a rate that is not the one used, a stage missing); above it, it over-reports, which is
     safe but means that a call was not seen (a mechanism reached by another path) or that the
     ledger counts one that did not happen;
  2. the recomputed eps does not exceed the eps the run was asked for (the plan's sigma does not
     meet the claim: the accountant fed the wrong delta, say);
  3. every DP-SGD step took its batch from one randomness.poisson_sample (a fixed-size or
     shuffled batch would not, and the accountant's analysis would not apply).
The run stops where synthesis begins: no mechanism runs after it (the evaluation reads real
images to measure the release, outside the guarantee, as in the paper).
"""
import collections
import contextlib
import dataclasses
import functools
import inspect
import io
import tempfile
from typing import NamedTuple

import torch

import accountant
import central
import dpsgd
import frequency
import randomness
import settings
import train

# A run with all three mechanisms, small enough for seconds: 2 central queries, one frequency
# release, 10 DP-SGD steps at q = 0.05 on 200 images; no warm-up (post-processing).
SETTINGS = dataclasses.replace(settings.TINY, frequency=True, warmup_steps=0, generator_steps=1,
                               frequency_steps=0, batch=10, epochs=0.5, train_subset=0)
IMAGES = 200


class Finding(NamedTuple):
    mechanism: str   # a ledger name, or "total"
    recorded: float  # eps recomputed from the calls, at the run's delta
    reported: float  # eps of the ledger's entries of that name (total: the ledger's eps)


class LedgerAudit(NamedTuple):
    calls: dict      # {(name, q', sigma): calls} as recorded
    ledger: list     # the ledger's entries [name, q, sigma, steps]
    findings: list   # [Finding], per mechanism and in total
    target: float    # the eps the run was asked for
    problems: list   # one line per problem found ([]: none)


@contextlib.contextmanager
def _replaced(module, name, replacement):
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def _spy(function, before, after=None):
    """`function`, calling before(its arguments by name) first, and after() once it returns."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def spied(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs)
        arguments.apply_defaults()
        before(arguments.arguments)
        result = function(*args, **kwargs)
        if after:
            after()
        return result
    return spied


@contextlib.contextmanager
def recording(calls):
    """While inside, every call of a mechanism adds one to calls[(name, q', sigma)]. A DP-SGD
    step's rate is that of the one Poisson sample drawn since the step before (None if there was
    not exactly one: the batch did not come from randomness.poisson_sample)."""
    samples = []  # the rates of the Poisson samples drawn since DP-SGD's last step

    def central_query(a):
        calls[("central images", randomness.sampling_rate(a["q"]), a["sigma"])] += 1

    def frequency_release(a):
        calls[("frequency features", 1.0, a["sigma"])] += 1

    def poisson_sample(a):
        samples.append(randomness.sampling_rate(a["q"]))

    def dp_step(a):
        calls[("DP-SGD", samples[0] if len(samples) == 1 else None, a["sigma"])] += 1
        samples.clear()

    spies = ((central, "noisy_class_means", central_query, samples.clear),  # its own sample
             (frequency, "noisy_feature_table", frequency_release, None),
             (randomness, "poisson_sample", poisson_sample, None),
             (dpsgd, "dp_step", dp_step, None))
    with contextlib.ExitStack() as stack:
        for module, name, before, after in spies:
            stack.enter_context(_replaced(module, name, _spy(getattr(module, name), before, after)))
        yield


def run_mechanisms(cfg, images, labels, seed):
    """train.train on (images, labels) with settings cfg: every stage up to the end of DP-SGD,
    where post-processing begins (train.post_process). Returns (the run's ledger, its plan).
    Nothing is written; its lines are not shown."""
    plan = train.privacy_plan(cfg, len(images))
    with tempfile.TemporaryDirectory() as folder:
        run = train.new_run(cfg, plan, folder, "cpu", seed)
        run.writes = False  # no checkpoint, no pictures
        run.stop = type("NeverStop", (), {"requested": False})()
        with contextlib.redirect_stdout(io.StringIO()):
            train.train(run, images, labels)
    return run.ledger, plan


def _eps(history, delta):
    return accountant.epsilon(history, delta)[0] if history else 0.0


def compare(calls, ledger, delta, target):
    """The checks of the module docstring: (findings, problems)."""
    findings, problems = [], []
    if ledger.delta != delta:
        problems.append(f"the ledger's delta is {ledger.delta:g}, the run's {delta:g}")
    unsampled = sum(n for (name, q, _), n in calls.items() if q is None)
    if unsampled:
        problems.append(f"{unsampled} DP-SGD steps without one Poisson sample before them")
    calls = {key: n for key, n in calls.items() if key[1] is not None}
    names = list(dict.fromkeys([name for name, *_ in calls] +
                               [name for name, *_ in ledger.entries]))
    for name in names + ["total"]:
        recorded = _eps([(q, sigma, steps) for (entry, q, sigma), steps in calls.items()
                         if name in (entry, "total")], delta)
        reported = (ledger.epsilon()[0] if name == "total" else
                    _eps([(q, sigma, steps) for entry, q, sigma, steps in ledger.entries
                          if entry == name], ledger.delta))
        findings.append(Finding(name, recorded, reported))
        if reported < recorded * (1 - 1e-12):
            problems.append(f"{name}: the ledger reports eps {reported:.4f}, the calls spent "
                            f"{recorded:.4f} (under-reported)")
        elif reported > recorded * (1 + 1e-12):
            problems.append(f"{name}: the ledger reports eps {reported:.4f}, the calls seen spent "
                            f"{recorded:.4f} (a call not seen, or counted without happening)")
    total = findings[-1].recorded
    if total > target * (1 + 1e-12):
        problems.append(f"the calls spent eps {total:.4f}, more than the {target:g} asked for")
    return findings, problems


def audit_ledger(seed=0, delta=SETTINGS.delta, cfg=SETTINGS, images=IMAGES):
    """train.py's stages with settings cfg at `delta` on `images` random MNIST-shaped images,
    every mechanism call recorded; returns a LedgerAudit. seed: the data's and the run's."""
    cfg = dataclasses.replace(cfg, delta=delta)
    generator = torch.Generator().manual_seed(seed)  # the synthetic data: public
    pictures = torch.randint(0, 256, (images, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (images,), generator=generator)
    calls = collections.Counter()
    with recording(calls):
        ledger, plan = run_mechanisms(cfg, pictures, labels, seed)
    findings, problems = compare(calls, ledger, cfg.delta, plan["target_eps"])
    return LedgerAudit(dict(calls), [list(entry) for entry in ledger.entries], findings,
                       plan["target_eps"], problems)


def print_report(result):
    print("| mechanism | calls recorded: q, sigma, calls | eps recomputed | eps the ledger "
          "reports |")
    print("|---|---|---|---|")
    for finding in result.findings:
        calls = "; ".join(f"{'no sample' if q is None else f'{q:.4g}'}, {sigma:.4g}, {n}"
                          for (name, q, sigma), n in result.calls.items()
                          if name == finding.mechanism)
        print(f"| {finding.mechanism} | {calls} | {finding.recorded:.4f} | "
              f"{finding.reported:.4f} |")
    print(f"\nasked for eps = {result.target:g}: " +
          ("the ledger reports what the calls spent." if not result.problems else
           "PROBLEMS:\n  " + "\n  ".join(result.problems)))
