"""Does the guarantee hold? An empirical privacy audit of the three mechanisms, in one run each.

The accountant (accountant.py) proves an UPPER bound on epsilon, assuming the code does what the
proof says: sample each example with rate q, clip to C, add N(0, (sigma C)^2). An audit measures
a LOWER bound on epsilon from the code as it runs. If the lower bound exceeds the upper one, the
code or the proof is wrong. An audit cannot prove that the guarantee holds (a lower bound below
the claim is merely consistent with it), but it does catch bugs such as lost noise or clipping.

The audit is the one-run auditor of Steinke, Nasr and Jagielski, "Privacy Auditing with One (1)
Training Run" (NeurIPS 2023, arXiv:2305.08846):
  1. m canaries, each put in the dataset independently with probability 1/2 (a coin flip S_i).
  2. ONE run of the real mechanism on that dataset.
  3. A score per canary, computed from the output; guess "in" for the k+ highest scores and
     "out" for the k- lowest, abstain on the rest. v of the r = k+ + k- guesses are right.
  4. If the mechanism is (eps, delta)-DP, v is unlikely to be much larger than for randomized
     response with that eps, whose guesses are right with probability p = e^eps / (1 + e^eps).
     Their bound for (eps, delta)-DP (the approximate-DP case of their main theorem, as in the
     p-value function given with the paper):
       P[v or more right] <= P[Bin(r, p) >= v] + 2 m delta max_{i=1..v} P[v-i <= Bin(r, p) < v] / i.
     The largest eps whose p-value stays below `level` (0.05) is the lower bound: with 95 %
     confidence the mechanism is not (eps, delta)-DP for that eps, nor for any smaller one.
One run is enough because each canary is its own coin flip, and DP bounds what the output can
reveal about each flip, however many flips there are. The price: the evidence is r guesses, so
the bound is capped (at about log(r / 4.6): 4.7 for 500 right out of 500), and it is loose for
small eps, where a guess is right barely more often than a coin toss.

What we audit, with the project's own functions; canaries are designed so that the score sees as
much of the worst case as possible:
* DP-SGD, `dpsgd.dp_step` as it is (white box: the auditor picks the canaries' gradients). The
  model is a vector theta of m numbers (an nn.Embedding(m, 1)); canary i's loss is -G theta_i,
  so its gradient is the fixed direction e_i (exactly orthogonal to the other canaries') with
  norm G > C, which dp_step must clip to C. The run: T steps, each on a Poisson sample
  (randomness.poisson_sample) of the canaries in the dataset, SGD with learning rate 1.
  Score: the total update along the canary's direction, theta_T,i - theta_0,i.
* Central images, `central.noisy_class_means` as it is, T queries (the loop of central_images).
  Canary i is a white 28x28 image alone in class i, so class i's noisy mean is the canary (if
  sampled) plus noise, and the canary moves it by the full sensitivity sqrt(d'). (Canaries
  sharing one class would do worse: the part they have in common only tells how many were
  sampled.) Score: sum over the T queries of the pixel sum of class i's noisy mean. We score the
  means before clamping and upsampling: post-processing is free in privacy and only hides signal.
* The frequency release, `frequency.noisy_feature_table` as it is: one Gaussian release (q = 1)
  of the per-class sums of random Fourier features. Canary i is a random 8x8 image (public)
  alone in class i, so class i's column is the canary's feature term (norm 1, the whole
  sensitivity) plus noise. Score: the column projected on that term. (64 frequencies instead
  of 5,000: the sensitivity is 1 whatever their number, and the release is then small.)
In all three, a canary in the dataset joins each step's sample with rate q, so the claim for exactly
the audited run is the accountant's epsilon for (sampling_rate(q), sigma, T), what train.py,
central_images and frequency.release hand to the accountant.

Run `python -m audit` for the table of docs/audit.md (about a minute on one core).

This audit misses bugs that change eps by 2-4x (noise halved, a sampling rate 3x too high). For
those, `python -m audit --trials` runs the many-trial audit of trials.py: the same white-box
canaries in millions of independent trials, each mechanism as it is and with each bug; and
`python -m audit --ledger` checks the run's own ledger (ledger.py).
"""
from dataclasses import dataclass

import numpy as np
import scipy.special
import torch
from torch import nn

import accountant
import central
import dpsgd
import frequency
import randomness


# ---------------------------------------------------------------------------------------------
# The statistics: from m canaries, r guesses, v right to a lower bound on epsilon
# ---------------------------------------------------------------------------------------------

def p_value(canaries, guesses, correct, eps, delta):
    """P[`correct` or more of `guesses` right] at most, were the mechanism (eps, delta)-DP.

    An eps-DP mechanism lets no auditor beat randomized response, whose guesses are right
    independently with p = e^eps / (1 + e^eps): hence the binomial tail. delta adds at most
    2 m delta times the largest average probability of falling short by 1..i right guesses."""
    if correct == 0:
        return 1.0
    p = scipy.special.expit(eps)  # e^eps / (1 + e^eps), without overflow
    # scipy.special.bdtrc(k, r, p) = P[Bin(r, p) > k] (scipy.stats.binom.sf, without its overhead)
    tail = scipy.special.bdtrc(correct - 1, guesses, p)                     # P[Bin >= v]
    # P[v - i <= Bin < v] = P[Bin >= v - i] - P[Bin >= v] for i = 1..v, where P[Bin >= 0] = 1
    at_least = np.append(scipy.special.bdtrc(np.arange(correct - 2, -1, -1), guesses, p), 1.0)
    alpha = np.max((at_least - tail) / np.arange(1, correct + 1))
    return min(1.0, float(tail + 2 * canaries * delta * alpha))


def epsilon_lower_bound(canaries, guesses, correct, delta, level=0.05):
    """The largest eps (to 1e-6) whose p-value is below `level` (0 if eps = 0 is not rejected):
    with confidence 1 - level, the mechanism is not (eps, delta)-DP.

    Bisection keeps p_value(low) < level, so the eps returned was itself rejected; a mechanism
    that is not (eps, delta)-DP is not (eps', delta)-DP for any eps' < eps either."""
    if p_value(canaries, guesses, correct, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(canaries, guesses, correct, high, delta) < level:
        low, high = high, 2 * high
    while high - low > 1e-6:
        middle = (low + high) / 2
        if p_value(canaries, guesses, correct, middle, delta) < level:
            low = middle
        else:
            high = middle
    return low


def count_correct(scores, included, guess_in, guess_out):
    """Right guesses when guessing "in" for the `guess_in` highest scores and "out" for the
    `guess_out` lowest. Ties go by canary index, which the coin flips do not depend on."""
    order = np.argsort(scores, kind="stable")
    guessed_in, guessed_out = order[len(order) - guess_in:], order[:guess_out]
    return int(included[guessed_in].sum() + (~included[guessed_out]).sum())


# How many canaries the auditor guesses about, as fractions of m, fixed before any score is seen.
# Trying several and keeping the best is a multiple test: each try gets level / (number of
# tries), so that the best of them still holds at `level` (a union bound).
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5)


def audit_scores(scores, included, delta, both_sides, level=0.05):
    """Steps 3 and 4: guesses from the scores, then the lower bound on epsilon.

    scores [m]: higher means "more likely in"; included [m] bool: the coin flips.
    both_sides: guess "in" for the top r/2 and "out" for the bottom r/2; else "in" for the top r.
    A subsampled mechanism run for few steps never samples many of the canaries in the dataset,
    and those look exactly like absent ones: then only "in" guesses can be confident.
    Returns (eps_lower, guesses, correct) of the best try."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m, best = len(scores), (0.0, 0, 0)
    for fraction in GUESS_FRACTIONS:
        guesses = max(2, int(fraction * m)) // 2 * 2
        guess_in, guess_out = (guesses // 2, guesses // 2) if both_sides else (guesses, 0)
        correct = count_correct(scores, included, guess_in, guess_out)
        eps = epsilon_lower_bound(m, guesses, correct, delta, level / len(GUESS_FRACTIONS))
        best = max(best, (eps, guesses, correct))
    return best


@dataclass
class AuditResult:
    eps_lower: float   # the empirical lower bound on epsilon (confidence 1 - level)
    canaries: int      # m: each in the dataset with probability 1/2
    guesses: int       # r = k+ + k-
    correct: int       # v
    mechanism: tuple   # (q', sigma, T) of the run, as the accountant takes it


# ---------------------------------------------------------------------------------------------
# Audit 1: DP-SGD
# ---------------------------------------------------------------------------------------------

def audit_dpsgd(canaries, q, sigma, steps, delta, generator, clip_norm=1.0, gradient_norm=10.0,
                level=0.05):
    """One run of `steps` dp_steps on m = `canaries` canaries with gradients gradient_norm * e_i
    (gradient_norm > clip_norm: clipping must act); see the module docstring.
    generator: draws the coin flips, the Poisson samples and the noise."""
    included = torch.rand(canaries, generator=generator) < 0.5           # step 1: the coin flips
    dataset = torch.arange(canaries)[included]                           # canary indices
    model = nn.Embedding(canaries, 1)                                    # theta: [m, 1]
    nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    def canary_loss(model, index):  # -G theta_i: gradient -G e_i, the same at every theta
        return -gradient_norm * model(index)[:, 0]

    # The divisor qN must be public; here N, the number of canaries in the dataset, depends on
    # the coin flips, so we divide by its expectation. (It scales all scores alike anyway.)
    expected_batch_size = q * canaries / 2
    for _ in range(steps):                                               # step 2: one run
        batch = dataset[randomness.poisson_sample(len(dataset), q, generator)]
        dpsgd.dp_step(model, optimizer, canary_loss, (batch,), clip_norm, sigma,
                      expected_batch_size, generator)
    scores = model.weight.detach()[:, 0].numpy()                         # theta_T - theta_0
    eps, guesses, correct = audit_scores(scores, included.numpy(), delta, both_sides=True,
                                         level=level)
    mechanism = (randomness.sampling_rate(q), sigma, steps)
    return AuditResult(eps, canaries, guesses, correct, mechanism)


# ---------------------------------------------------------------------------------------------
# Audit 2: central images
# ---------------------------------------------------------------------------------------------

def audit_central(canaries, q, sigma, queries, delta, generator, side=28, level=0.05):
    """One run of `queries` noisy_class_means on m = `canaries` white side x side images, canary
    i alone in class i; see the module docstring. generator: as for audit_dpsgd."""
    included = torch.rand(canaries, generator=generator) < 0.5           # step 1: the coin flips
    labels = torch.arange(canaries)[included]
    images = torch.full((len(labels), 1, side, side), 255, dtype=torch.uint8)
    scores = torch.zeros(canaries, dtype=torch.float64)
    for _ in range(queries):                                             # step 2: one run
        # (noisy_class_means divides by q N / K with the realised N: the same for all scores.)
        means = central.noisy_class_means(images, labels, canaries, q, sigma, generator)
        scores += means.flatten(1).sum(1)
    # Few queries at a small q never sample most canaries: guess "in" only.
    eps, guesses, correct = audit_scores(scores.numpy(), included.numpy(), delta,
                                         both_sides=False, level=level)
    mechanism = (randomness.sampling_rate(q), sigma, queries)
    return AuditResult(eps, canaries, guesses, correct, mechanism)


# ---------------------------------------------------------------------------------------------
# Audit 3: the frequency release
# ---------------------------------------------------------------------------------------------

def audit_frequency(canaries, q, sigma, steps, delta, generator, side=8, num_frequencies=64,
                    level=0.05):
    """One frequency.noisy_feature_table release on m = `canaries` copies of a random side x side
    image (public), canary i alone in class i; see the module docstring. q and steps must be 1:
    the release reads the whole set once. generator: as for audit_dpsgd."""
    if q != 1 or steps != 1:
        raise ValueError("the frequency release is one release of the whole set: q = 1, T = 1")
    W = frequency.frequencies(side * side, seed=0, num_frequencies=num_frequencies)  # public
    image = torch.rand(1, 1, side, side, generator=torch.Generator().manual_seed(1))  # public
    term = frequency.feature_sums(image, torch.zeros(1, dtype=torch.long), 1, W)[:, 0]
    included = torch.rand(canaries, generator=generator) < 0.5           # step 1: the coin flips
    labels = torch.arange(canaries)[included]
    table = frequency.noisy_feature_table(image.expand(len(labels), -1, -1, -1), labels,
                                          canaries, W, sigma, generator)  # step 2: one run
    scores = term @ table  # (the public divisor N scales all scores alike)
    eps, guesses, correct = audit_scores(scores.numpy(), included.numpy(), delta, both_sides=True,
                                         level=level)
    return AuditResult(eps, canaries, guesses, correct, (1.0, sigma, 1))


# ---------------------------------------------------------------------------------------------
# The table of docs/audit.md
# ---------------------------------------------------------------------------------------------

# (name, audit, q, steps): DP-SGD at q = 0.1 for 100 steps; the central images at the project's
# q = 0.1 and T = 5 queries; the frequency release, once on the whole set. sigma is calibrated so
# that the accountant claims each target eps.
MECHANISMS = (("DP-SGD", audit_dpsgd, 0.1, 100), ("central images", audit_central, 0.1, 5),
              ("frequency release", audit_frequency, 1.0, 1))
TARGET_EPS = (1.0, 4.0, 10.0)


def print_table(canaries, delta, seed=None):
    """The one-run table: each mechanism at claims of eps = 1, 4, 10, and with its noise removed."""
    print(f"delta = {delta:g}; lower bounds at 95 % confidence. A lower bound above the "
          "claimed eps would mean a bug.\n")
    print("| mechanism | q | T | sigma | claimed eps | audit: eps >= | m | guesses | correct |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, run_audit, q, steps in MECHANISMS:
        sampling = randomness.sampling_rate(q)  # what the accountant is told, as in train.py
        sigmas = [accountant.calibrate_sigma(eps, delta, sampling, steps)
                  for eps in TARGET_EPS]
        # The last row runs the first row's mechanism with its noise removed, still making the
        # first row's claim: the audit must object.
        runs = [(name, sigma, sigma) for sigma in sigmas] + [(f"{name}, noise removed (bug)",
                                                              0.0, sigmas[0])]
        for label, sigma_run, sigma_claimed in runs:
            generator = randomness.secret_generator(seed)
            result = run_audit(canaries, q, sigma_run, steps, delta, generator)
            q_run, _, steps_run = result.mechanism  # the run's own (q', sigma, T), sigma claimed
            claimed, _ = accountant.epsilon([(q_run, sigma_claimed, steps_run)], delta)
            print(f"| {label} | {q:g} | {steps} | {sigma_run:.3f} | {claimed:.2f} | "
                  f"{result.eps_lower:.2f} | {result.canaries} | {result.guesses} | "
                  f"{result.correct} |", flush=True)
