"""Tests for audit/one_run.py, the one-run audit (Steinke, Nasr, Jagielski 2023): its
statistics, and each of the three audits in both directions. As the project's mechanisms are,
the empirical lower bound stays below the accountant's epsilon; with a gross bug (noise or
clipping lost, noise per pixel or per entry), it rises above it, so the audit can fail.

Expected values are derived here by hand (closed forms of the binomial bound, randomized
response, the mechanisms' signal) and never read off one_run.py. Every random draw is seeded, so
each test gives the same answer on every run.
"""
import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

import accountant
import central
import dpsgd
import frequency
import randomness
from audit import one_run as audit

DELTA = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # the audits' tensors are tiny (conftest.py)


def claimed_eps(q, sigma, steps):
    return accountant.epsilon([(randomness.sampling_rate(q), sigma, steps)], DELTA)[0]


# ------------------------------------------------------------------------------ the statistics
@pytest.mark.parametrize("guesses", [10, 100, 1000])
def test_all_guesses_right_without_delta_is_the_closed_form(guesses):
    # delta = 0, v = r: p-value p^r, which equals the level at p = level^(1/r); eps = logit(p).
    want = scipy.special.logit(0.05 ** (1 / guesses))
    got = audit.epsilon_lower_bound(guesses, guesses, guesses, 0.0, 0.05)
    assert abs(got - want) < 1e-5


def test_p_value_delta_term_by_hand():
    m, eps, delta = 1000, 1.3, 1e-4
    p = math.exp(eps) / (1 + math.exp(eps))
    # One guess, right: tail p; short by one: P[Bin(1, p) = 0] = 1 - p.
    want = p + 2 * m * delta * (1 - p)
    assert audit.p_value(m, 1, 1, eps, delta) == pytest.approx(want, rel=1e-12)
    # Two guesses, both right: tail p^2; short by 1: 2p(1-p); short by 1..2, averaged: (1-p^2)/2.
    alpha = max(2 * p * (1 - p), (1 - p * p) / 2)
    want = p * p + 2 * m * delta * alpha
    assert audit.p_value(m, 2, 2, eps, delta) == pytest.approx(want, rel=1e-12)


def test_chance_level_guessing_proves_nothing():
    assert audit.epsilon_lower_bound(1000, 500, 0, DELTA) == 0.0
    assert audit.epsilon_lower_bound(1000, 500, 250, DELTA) == 0.0
    # more delta, more slack: the bound can only fall
    assert (audit.epsilon_lower_bound(1000, 100, 90, 1e-3)
            < audit.epsilon_lower_bound(1000, 100, 90, 0.0))


def randomized_response(m, eps, rng):
    """Each canary's coin flip, reported truthfully with probability e^eps / (1 + e^eps):
    exactly eps-DP with respect to each flip, the mechanism one-run audits are tight for."""
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
    return np.where(truthful, included, ~included).astype(float), included


def test_audit_of_randomized_response_is_valid():
    # eps-DP: the 95 % lower bound may exceed eps in at most 5 % of the runs.
    rng = np.random.default_rng(0)
    bounds = [audit.audit_scores(*randomized_response(500, 1.0, rng), DELTA, both_sides=True)[0]
              for _ in range(100)]
    above = sum(bound > 1.0 for bound in bounds)
    assert above <= 10  # P[more than 10 of 100 | rate <= 5 %] < 1.2 %


def test_audit_of_randomized_response_is_nearly_tight():
    # 10^4 canaries at eps = 2: guessing "in" for the 5000 reported "in", about
    # p = e^2 / (1 + e^2) = 0.881 of them are right, +- 0.0046 (one sd). At level 0.01 the bound
    # is about logit(p - 2.33 sd) = logit(0.870) = 1.90, less 0.04 per sd of bad luck.
    scores, included = randomized_response(10_000, 2.0, np.random.default_rng(1))
    eps, guesses, correct = audit.audit_scores(scores, included, DELTA, both_sides=False)
    assert 1.75 < eps <= 2.0


# ---------------------------------------------------------------------------- DP-SGD as it is
# Claims of about eps = 1, 4.4 and 9.1 (the accountant's numbers for these settings).
@pytest.mark.parametrize("q, sigma, steps", [(1.0, 4.0, 1), (0.5, 2.0, 10), (0.2, 0.9, 20)])
def test_dpsgd_audit_stays_below_the_accountant(q, sigma, steps):
    result = audit.audit_dpsgd(500, q, sigma, steps, DELTA, randomness.secret_generator(0))
    assert result.mechanism == (randomness.sampling_rate(q), sigma, steps)
    assert result.eps_lower <= claimed_eps(q, sigma, steps)


def test_dpsgd_audit_sees_the_canaries():
    # q = 1, sigma = 1: canaries in the dataset score 1 + N(0, 1) (in units of C / qN), absent
    # ones N(0, 1); the top 5 % of 500 are then nearly all "in": the bound must be well above 0.
    result = audit.audit_dpsgd(500, 1.0, 1.0, 1, DELTA, randomness.secret_generator(0))
    assert result.eps_lower > 0.5


# ---------------------------------------------------------------- DP-SGD with a bug: caught
Q, STEPS, SIGMA_CLAIMED = 0.2, 20, 5.0  # claims eps ~ 1


def test_dpsgd_audit_catches_lost_noise():
    # sigma = 0: a canary's score is C / qN times how often it was sampled (P[never] = 0.8^20 =
    # 1 %), an absent canary scores 0: the guesses are all right, and with r = 150 of m = 300
    # the bound is about log(r / log(5 / 0.05)) = 3.5, far above the claim.
    claimed = claimed_eps(Q, SIGMA_CLAIMED, STEPS)
    result = audit.audit_dpsgd(300, Q, 0.0, STEPS, DELTA, randomness.secret_generator(0))
    assert claimed < 1.5 and result.eps_lower > claimed + 1


def test_dpsgd_audit_catches_lost_clipping(monkeypatch):
    # Canary gradients of norm 100 C, unclipped, see 100 times less noise than the accountant
    # assumes (sigma 0.05 instead of 5): as good as no noise, as above.
    clipped_sum = dpsgd.clipped_sum
    monkeypatch.setattr(dpsgd, "clipped_sum", lambda model, loss, batch, clip_norm, *args:
                        clipped_sum(model, loss, batch, math.inf, *args))
    claimed = claimed_eps(Q, SIGMA_CLAIMED, STEPS)
    result = audit.audit_dpsgd(300, Q, SIGMA_CLAIMED, STEPS, DELTA, randomness.secret_generator(0),
                               gradient_norm=100.0)
    assert result.eps_lower > claimed + 1


# -------------------------------------------------------------------- central images as they are
# Claims of about eps = 1 (the project's q and T), 5 and 9.6.
@pytest.mark.parametrize("q, sigma, queries", [(0.1, 1.7, 5), (0.5, 1.2, 3), (1.0, 0.55, 1)])
def test_central_audit_stays_below_the_accountant(q, sigma, queries):
    result = audit.audit_central(500, q, sigma, queries, DELTA, randomness.secret_generator(0))
    assert result.mechanism == (randomness.sampling_rate(q), sigma, queries)
    assert result.eps_lower <= claimed_eps(q, sigma, queries)


def test_central_audit_sees_the_canaries():
    # q = 1, sigma = 1: the white canary adds d' to its class's pixel sum against noise of sd
    # sigma d' (d' pixels of sd sigma sqrt(d')): the same 1-vs-N(0, 1) picture as for DP-SGD.
    result = audit.audit_central(500, 1.0, 1.0, 1, DELTA, randomness.secret_generator(0))
    assert result.eps_lower > 0.5


# -------------------------------------------------------------- central images with a bug: caught
Q_C, QUERIES, SIGMA_C_CLAIMED = 0.5, 3, 4.0  # claims eps ~ 1


def test_central_audit_catches_lost_noise():
    # sigma = 0: a canary sampled at least once (1 - 0.5^3 = 7/8 of those in the dataset) scores
    # above every absent one: the top 20 % "in" guesses are all right, r = 60 of m = 300, and the
    # bound is about log(60 / log(5 / 0.05)) = 2.6.
    claimed = claimed_eps(Q_C, SIGMA_C_CLAIMED, QUERIES)
    result = audit.audit_central(300, Q_C, 0.0, QUERIES, DELTA, randomness.secret_generator(0))
    assert claimed < 1.5 and result.eps_lower > claimed + 1


def test_central_audit_catches_noise_calibrated_per_pixel(monkeypatch):
    # A classic bug: noise std sigma (sensitivity 1 per pixel) instead of sigma sqrt(d') (the L2
    # sensitivity of a whole image). On 28x28 images (d' = 196) that is 14 times too little noise.
    noisy_class_means = central.noisy_class_means
    d_prime = 14 * 14
    monkeypatch.setattr(central, "noisy_class_means", lambda images, labels, k, q, sigma, g:
                        noisy_class_means(images, labels, k, q, sigma / math.sqrt(d_prime), g))
    claimed = claimed_eps(Q_C, SIGMA_C_CLAIMED, QUERIES)
    result = audit.audit_central(300, Q_C, SIGMA_C_CLAIMED, QUERIES, DELTA,
                                 randomness.secret_generator(0))
    assert result.eps_lower > claimed + 1


# ---------------------------------------------------------------------- the frequency release
def test_frequency_audit_stays_below_the_accountant():
    # q = 1, one release: sigma 4.05 claims eps = 1, sigma 1.1 about 4.2 (the accountant's)
    for sigma in (4.05, 1.1):
        result = audit.audit_frequency(500, 1.0, sigma, 1, DELTA, randomness.secret_generator(0))
        assert result.mechanism == (1.0, sigma, 1)
        assert result.eps_lower <= claimed_eps(1.0, sigma, 1)


def test_frequency_audit_sees_the_canaries():
    # sigma = 1: a canary present scores 1 + N(0, 1) along its feature term (norm 1), an absent
    # one N(0, 1), as for DP-SGD at q = 1: the bound must be well above 0.
    result = audit.audit_frequency(500, 1.0, 1.0, 1, DELTA, randomness.secret_generator(0))
    assert result.eps_lower > 0.5


def test_frequency_audit_catches_noise_calibrated_per_entry(monkeypatch):
    # Noise sigma / sqrt(D) per entry (an entry's range taken for the sensitivity): with the
    # audit's D = 64 frequencies, 8 times too little noise: sigma 4.05 acts as 0.5.
    release = frequency.noisy_feature_table
    monkeypatch.setattr(frequency, "noisy_feature_table", lambda x, y, k, W, sigma, g:
                        release(x, y, k, W, sigma / math.sqrt(W.shape[0]), g))
    result = audit.audit_frequency(500, 1.0, 4.05, 1, DELTA, randomness.secret_generator(0))
    assert claimed_eps(1.0, 4.05, 1) <= 1.0 and result.eps_lower > 2.0
