"""From counts to bounds: the statistics of the many-trial audit (trials.py).

A trial: a fair coin puts a canary in the dataset or leaves it out, the mechanism runs, and a
score is read off its output. For an event R = {score > t} (or {score < t}) the audit counts
the in-trials and the out-trials that land in R, and Clopper-Pearson turns the counts into a
lower bound on one rate and an upper bound on the other (each one-sided at level / 2, so both
hold with probability >= 1 - level). Two claims are tested against them:

1. (eps, delta)-DP (Jagielski, Ullman, Oprea 2020; Nasr et al. 2021): every event R has
       P_in[R] <= e^eps P_out[R] + delta   and   P_out[R] <= e^eps P_in[R] + delta,
   so  eps >= log((lower P_in[R] - delta) / upper P_out[R]).  No model of the mechanism is
   assumed. Its limit: at delta = 1e-5 an eps of 1 is decided by events rarer than 1 in 10^4,
   which millions of trials barely see (the code as it is reaches about half of its claim).
2. The trade-off curve of the claimed mechanism (f-DP, Dong, Roth, Su 2022, "Gaussian
   Differential Privacy"). The accountant's eps = 1 rests on a claim that says more: the code
   IS one step of the Poisson-subsampled Gaussian mechanism with rate q and noise multiplier
   sigma (mu = 1/sigma). On every pair of neighbouring datasets such a step allows at most
       P_in[R] <= U(P_out[R]),   U(x) = (1 - q) x + q Qbar(Qbar^-1(x) - mu),
   Qbar(z) = P[N(0, 1) > z]: U is the best test of "in" against "out" for the worst pair (one
   example of norm C, sampled with rate q, against nothing; Neyman-Pearson: thresholds on the
   update), and that pair dominates every other (Zhu, Dong, Wang 2022, "Optimal Accounting of
   Differential Privacy via Characteristic Function"). The audited pairs are such pairs on the
   scored coordinates: the canary against its absence (the central and frequency designs put a
   null record in an unscored class instead, to keep N fixed, which the score never reads). An
   event above the curve proves, at the same confidence, that the code is LESS private than the
   claimed mechanism: the code or the accountant's input is wrong. Solving y > U(x) for mu: the
   code is not the q-step with any noise multiplier > 1 / mu_R, where (y = lower P_in[R],
   x = upper P_out[R])
       mu_R = Qbar^-1(x) - Qbar^-1((y - (1 - q) x) / q).
   That is a statement about the claim, not an eps at delta = 1e-5; it catches much smaller
   errors (noise 15 % too small, clipping at 1.2 C) in a million trials, because the curve is
   tested where events are common (P_out ~ 1e-3), not only at its delta = 1e-5 corner.
   Reversed events (P_out[R] against P_in[R]) need no curve of their own: the complement of
   {score > t} is {score <= t}, which the audit tries too.

Step 4 of the audit: R (the score, the side, the threshold) is chosen on the first quarter of the
trials and measured on the other three quarters, where the counts are plain binomials, so the
choice costs no confidence.
"""
import math
from typing import NamedTuple

import numpy as np
import scipy.special

CALIBRATION = 0.25   # the share of the trials that picks the event R
TAILS = np.logspace(-5, math.log10(0.5), 40)  # R's candidate thresholds, as tail quantiles


def clopper_pearson(k, n, alpha):
    """One-sided Clopper-Pearson bounds (lower, upper) on a rate from k successes of n: each
    holds with probability >= 1 - alpha. Exact (beta quantiles), vectorised over k."""
    k = np.asarray(k)
    lower = np.where(k > 0, scipy.special.betaincinv(np.maximum(k, 1), n - k + 1, alpha), 0.0)
    upper = np.where(k < n, scipy.special.betaincinv(k + 1, np.maximum(n - k, 1), 1 - alpha), 1.0)
    return lower, upper


def epsilon_of(lower_a, upper_b, delta):
    """The eps that P_a[R] <= e^eps P_b[R] + delta needs, from a lower bound on P_a[R] and an
    upper bound on P_b[R]; 0 where they show nothing."""
    with np.errstate(divide="ignore"):
        eps = np.log(np.maximum(np.asarray(lower_a) - delta, 0.0) / upper_b)
    return np.maximum(eps, 0.0)


def mu_of(lower_in, upper_out, q):
    """mu_R of the module docstring: the code is not one Poisson-subsampled Gaussian step with
    rate q and any noise multiplier >= 1 / mu_R. 0 where the counts show nothing; inf where no
    noise at all would explain them (more "in" hits than sampling at rate q can give)."""
    lower_in, upper_out = np.asarray(lower_in, dtype=float), np.asarray(upper_out, dtype=float)
    share_sampled = (lower_in - (1 - q) * upper_out) / q   # what the sampled canaries must hit
    with np.errstate(divide="ignore", invalid="ignore"):
        # Qbar^-1(x) = -ndtri(x): mu_R = ndtri(share_sampled) - ndtri(upper_out)
        mu = scipy.special.ndtri(np.clip(share_sampled, 0.0, 1.0)) - scipy.special.ndtri(upper_out)
    mu = np.where(share_sampled >= 1, math.inf, mu)
    return np.where(share_sampled > upper_out, np.maximum(mu, 0.0), 0.0)


class Bound(NamedTuple):
    eps_lower: float    # eps >= this at delta, with confidence 1 - level (0: no evidence)
    sigma_upper: float  # the code is less private than one claimed step with any noise
                        # multiplier >= this (inf: no evidence; one-step designs only)
    event: str          # R and its counts in the measured part ("" if nothing was found)
    trials: int


def _rates(score, included, thresholds, level):
    """Clopper-Pearson bounds of P_in[score > t] and P_out[score > t] for each threshold t:
    ((in_lower, in_upper), (out_lower, out_upper)), each at level / 2."""
    rates = []
    for group in (included, ~included):
        sorted_scores = np.sort(score[group])
        hits = len(sorted_scores) - np.searchsorted(sorted_scores, thresholds, side="right")
        rates.append(clopper_pearson(hits, len(sorted_scores), level / 2))
    return rates


def _criterion(rates, delta, q):
    """What the event is chosen by, per threshold: with q (a one-step design), mu_R; without,
    eps both ways round, [2, thresholds] (row 0: in above out; row 1: out above in)."""
    (in_lower, in_upper), (out_lower, out_upper) = rates
    if q is not None:
        return mu_of(in_lower, out_upper, q)[None, :]
    return np.stack([epsilon_of(in_lower, out_upper, delta),
                     epsilon_of(out_lower, in_upper, delta)])


def threshold_audit(scores, included, delta, level=0.05, q=None):
    """The audit of the module docstring. scores: {name: array [n]}, one score per trial for
    each name; included: bool [n], the coins. q: the sampling rate of a one-step design, whose
    event is chosen by the trade-off test (and whose eps is read off the same counts); None: a
    design of several steps, whose event is chosen by eps, either way round.
    The calibration part tries R = {s > t} and {s < t} for each score s and thresholds t at its
    tail quantiles; the rest measures the best of them."""
    included = np.asarray(included, dtype=bool)
    cut = int(CALIBRATION * len(included))
    best = (0.0, "", 1, 0.0, 0)  # (criterion on the calibration part, name, sign, t, way)
    for name, score in scores.items():
        for sign in (1, -1):  # R = {s > t}, and {s < t} = {-s > -t}
            signed = sign * np.asarray(score[:cut], dtype=float)
            thresholds = np.quantile(signed, 1 - TAILS)
            value = _criterion(_rates(signed, included[:cut], thresholds, level), delta, q)
            way, index = np.unravel_index(np.argmax(value), value.shape)
            if value[way, index] > best[0]:
                best = (value[way, index], name, sign, thresholds[index], way)
    value, name, sign, threshold, way = best
    if value == 0:
        return Bound(0.0, math.inf, "", len(included))  # nothing to measure
    signed, test = sign * np.asarray(scores[name][cut:], dtype=float), included[cut:]
    rates = _rates(signed, test, np.array([threshold]), level)
    (in_lower, in_upper), (out_lower, out_upper) = rates
    sigma = math.inf
    if q is not None:  # one pair of bounds, (in_lower, out_upper), for both readings
        mu = float(mu_of(in_lower, out_upper, q)[0])
        sigma = 1 / mu if mu > 0 else math.inf
        eps = float(epsilon_of(in_lower, out_upper, delta)[0])
    elif way == 0:
        eps = float(epsilon_of(in_lower, out_upper, delta)[0])
    else:
        eps = float(epsilon_of(out_lower, in_upper, delta)[0])
    hit = signed > threshold
    counts = f"in {np.sum(hit & test)}/{np.sum(test)}, out {np.sum(hit & ~test)}/{np.sum(~test)}"
    return Bound(eps, sigma, f"{name} {'>' if sign == 1 else '<'} {sign * threshold:.4g}: "
                             f"{counts}", len(included))
