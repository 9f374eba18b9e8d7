"""Tests for audit/bounds.py, the statistics of the many-trial audit: Clopper-Pearson, the two
readings of an event's counts (eps at delta; the trade-off curve of the claimed mechanism), and
the threshold audit's validity (a true claim is rejected at most 5 % of the time) and power on
mechanisms simulated here, whose answers are known in closed form. Every draw is seeded.
"""
import math

import numpy as np
import pytest
import scipy.stats

from audit import bounds

DELTA = 1e-5


def test_clopper_pearson_by_hand():
    # 0 of n: the upper bound u solves (1 - u)^n = alpha; n of n: the lower bound l, l^n = alpha
    lower, upper = bounds.clopper_pearson([0, 50], 50, 0.05)
    assert lower[0] == 0.0 and upper[0] == pytest.approx(1 - 0.05 ** (1 / 50), rel=1e-12)
    assert upper[1] == 1.0 and lower[1] == pytest.approx(0.05 ** (1 / 50), rel=1e-12)
    # in between, by definition: P[Bin(n, u) <= k] = alpha = P[Bin(n, l) >= k]
    lower, upper = bounds.clopper_pearson(7, 50, 0.05)
    assert scipy.stats.binom.cdf(7, 50, upper) == pytest.approx(0.05, rel=1e-9)
    assert scipy.stats.binom.sf(6, 50, lower) == pytest.approx(0.05, rel=1e-9)


def test_epsilon_of_by_hand():
    # P_in >= 0.3, P_out <= 0.1, delta 0.01: eps >= log(0.29 / 0.1); nothing shown is 0
    assert bounds.epsilon_of(0.3, 0.1, 0.01) == pytest.approx(math.log(2.9), rel=1e-12)
    assert bounds.epsilon_of(0.05, 0.1, 0.01) == 0.0
    assert bounds.epsilon_of(0.005, 0.001, 0.01) == 0.0  # below delta: no evidence


def best_in_rate(x, q, mu):
    """U(x) of the module docstring: the largest P_in of an event with P_out = x, for one step
    of the subsampled Gaussian: (1 - q) x + q Qbar(Qbar^-1(x) - mu)."""
    return (1 - q) * x + q * scipy.stats.norm.sf(scipy.stats.norm.isf(x) - mu)


@pytest.mark.parametrize("q, mu", [(1.0, 0.25), (0.25, 0.5), (0.1, 2.0)])
@pytest.mark.parametrize("x", [1e-4, 0.01, 0.3])
def test_mu_of_inverts_the_trade_off_curve(q, mu, x):
    # A point exactly on the curve of (q, mu) gives back mu; just above it, more; below, less.
    y = best_in_rate(x, q, mu)
    assert bounds.mu_of(y, x, q) == pytest.approx(mu, rel=1e-9)
    assert bounds.mu_of(y * 1.01, x, q) > mu > bounds.mu_of(y * 0.99, x, q)


def test_mu_of_shows_nothing_at_or_below_the_diagonal_and_everything_past_rate_q():
    assert bounds.mu_of(0.1, 0.1, 0.5) == 0.0 and bounds.mu_of(0.05, 0.1, 0.5) == 0.0
    # P_in above (1 - q) P_out + q: even sampling at rate q with no noise cannot do that
    assert bounds.mu_of(0.6, 0.01, 0.5) == math.inf


def gaussian_step_trials(n, q, sigma, rng, shift=1.0):
    """n trials of one Poisson-subsampled Gaussian step, the worst case of the claim: an
    included canary is sampled with rate q and moves the output by `shift`."""
    included = rng.random(n) < 0.5
    sampled = included & (rng.random(n) < q)
    return {"update": shift * sampled + sigma * rng.standard_normal(n)}, included


@pytest.mark.parametrize("q, sigma", [(1.0, 4.0), (0.25, 2.0)])
def test_trade_off_test_of_a_true_claim_is_valid(q, sigma):
    # The mechanism IS the claim: the 95 % test may call it less private than itself in at most
    # 5 % of the audits. P[more than 10 of 100 | rate <= 5 %] < 1.2 %.
    rng = np.random.default_rng(0)
    rejected = sum(bounds.threshold_audit(*gaussian_step_trials(20_000, q, sigma, rng), DELTA,
                                          q=q).sigma_upper <= sigma for _ in range(100))
    assert rejected <= 10


def test_trade_off_test_measures_the_noise_to_a_few_per_cent():
    # q = 1, sigma = 2 (mu = 0.5), 1e6 trials: near the median an event's rates are ~0.4 with
    # standard error sqrt(0.24 / 375,000) = 8e-4 each; the 97.5 % bounds move each Qbar^-1 by
    # 1.96 * 8e-4 / phi(0.25) = 0.004, so the measured mu is about 0.5 - 0.008 and sigma_upper
    # about 2.03: within 5 % above the truth. Noise 10 % too small (sigma 1.8) is caught.
    rng = np.random.default_rng(1)
    honest = bounds.threshold_audit(*gaussian_step_trials(1_000_000, 1.0, 2.0, rng), DELTA, q=1.0)
    assert 2.0 < honest.sigma_upper < 2.1
    smaller = bounds.threshold_audit(*gaussian_step_trials(1_000_000, 1.0, 1.8, rng), DELTA,
                                     q=1.0)
    assert smaller.sigma_upper < 1.9


def test_trade_off_test_sees_a_wrong_rate():
    # Sampled at 0.4 while the claim says 0.25, same noise: no noise multiplier at rate 0.25
    # explains it (the in-trials' extra mass sits where only sampled canaries go).
    rng = np.random.default_rng(2)
    scores, included = gaussian_step_trials(1_000_000, 0.4, 2.0, rng)
    assert bounds.threshold_audit(scores, included, DELTA, q=0.25).sigma_upper < 2.0


def randomized_response_trials(n, eps, rng):
    """n trials of randomized response about the coin: exactly eps-DP, and every event's
    probability ratio is e^eps or 1, so threshold tests are tight for it."""
    included = rng.random(n) < 0.5
    truthful = rng.random(n) < math.exp(eps) / (1 + math.exp(eps))
    return {"reported": np.where(truthful, included, ~included).astype(float)}, included


def test_threshold_audit_of_randomized_response_is_valid():
    # eps-DP: the 95 % lower bound may exceed eps in at most 5 % of the audits.
    rng = np.random.default_rng(0)
    audits = [bounds.threshold_audit(*randomized_response_trials(4000, 1.0, rng), DELTA)
              for _ in range(100)]
    assert sum(audit.eps_lower > 1.0 for audit in audits) <= 10  # P[> 10 | 5 %] < 1.2 %


def test_threshold_audit_of_randomized_response_is_nearly_tight():
    # 3e5 measured trials, 1.5e5 per group: "reported in" has rate 0.731 in, 0.269 out (ratio e).
    # One-sided 97.5 % bounds are 1.96 sd off: 0.31 % and 0.84 % relative, so eps >= ~0.989.
    audit = bounds.threshold_audit(
        *randomized_response_trials(400_000, 1.0, np.random.default_rng(1)), DELTA)
    assert 0.97 < audit.eps_lower <= 1.0


@pytest.mark.parametrize("q", [None, 0.5])
def test_threshold_audit_measures_on_trials_it_did_not_choose_with(q):
    # The first quarter chooses the event R, the other three quarters measure it: scores that
    # are perfect in the first quarter and pure noise after it prove nothing.
    rng = np.random.default_rng(2)
    included = rng.random(40_000) < 0.5
    scores = np.where(np.arange(40_000) < 10_000, included, rng.random(40_000))
    audit = bounds.threshold_audit({"score": scores}, included, DELTA, q=q)
    assert audit.eps_lower == 0.0 and audit.sigma_upper == math.inf
