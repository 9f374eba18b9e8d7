"""Does the guarantee hold, within a factor of two? A privacy audit from millions of trials.

The one-run audit (audit/one_run.py) catches gross bugs: lost noise, lost clipping. This audit catches
subtler ones at a claim of eps = 1: noise or clipping off by 1.5x, a sampling rate 3x too high,
a divisor that depends on the data. It is the classic audit by repeated trials (Jagielski,
Ullman, Oprea, "Auditing Differentially Private Machine Learning", NeurIPS 2020; Nasr et al.,
"Adversary Instantiation", IEEE S&P 2021) with white-box canaries:
  1. A trial: a fair coin decides whether the canary is in the dataset; the real mechanism runs;
     a score is computed from its output.
  2. (eps, delta)-DP bounds every event R of the output, both ways round:
         P_in[R] <= e^eps P_out[R] + delta   and   P_out[R] <= e^eps P_in[R] + delta.
  3. For R = {score > t} or {score < t}, count the in-trials and out-trials that land in R.
     Clopper-Pearson turns the counts into a lower bound on one rate and an upper bound on the
     other (each at confidence 1 - level/2), so with confidence 1 - level
         eps >= log((lower bound of P_a[R] - delta) / upper bound of P_b[R]).
  4. R is chosen on the first quarter of the trials (the one that rejects the most there) and
     measured on the other three quarters: there, the counts are plain binomials.
This is a valid lower bound for any mechanism whose trials are independent and alike; no model
of the mechanism is assumed. Its limit: it only sees events of probability well above 1/n, and at
delta = 1e-5 an eps of 1 is decided by rarer ones. With 6e6 trials DP-SGD as it is reaches
about 0.6 of its claim, so a bug must roughly double eps to be caught (clipping at 1.5 C, eps
1.94: bounds 1.2-1.4).

Why not fit a Gaussian trade-off curve (GDP, Dong, Roth, Su 2022) to the scores, which needs
far fewer trials? A lower bound on mu is valid, but turning mu into eps assumes the curve is
Gaussian, and the subsampled Gaussian's is not: in its tails it approaches the Gaussian's without
subsampling. On DP-SGD as it is (below), the mu measured at the median score gives eps = 0.42,
at a false-positive rate of 1e-3 0.73; further out the fitted eps keeps rising, past the true
1.00 near 1e-9, towards 2.0. The number says where one looked, and bounds nothing.

Two designs per mechanism, each audited at level/2 (a union bound); the larger bound counts.
* Canaries: many per run, each its own trial. That is exact only if they are independent: each
  canary's gradient is 10 C along its own coordinate (DP-SGD; dp_step clips it to C), or each
  canary is a white image in its own class (central), and the divisor is public. Then a
  canary's output coordinates depend only on its own coin, its own Poisson draws and its own
  noise. Score: the log-likelihood ratio of "in" against "out" under the claimed mechanism
  (the most powerful test of the claim, by Neyman-Pearson), from the canary's update y_t in
  each step, in units where a sampled canary adds 1 and the noise is N(0, sigma^2):
      sum_t log(1 - q + q exp((y_t - 1/2) / sigma^2)).
* Divisor probes: a divisor that depends on the data (the realised batch size, the realised
  class count) breaks that independence, and it leaks through the SCALE of the whole output.
  So: one canary and one companion per run (per class for the central images, whose counts are
  per class), the worst case being a dataset of two: a divisor of 2 can only occur with the
  canary. The noise where no signal varies (DP-SGD: coordinates that no example touches; the
  central images: the pixels of the uniform canary's class) reveals the divisor. Score
  "spread": its smallest standard deviation in any step, 1 as the mechanism is, whatever the
  data.
The audited run is tiny (one DP-SGD step; the project's five central queries): a bug that only
shows across steps (the same noise in every step, say) needs a run with more steps (`steps`).
`python -m audit --trials` prints the README's table (about 5 minutes on 2 cores).
"""
import math
import time
from typing import NamedTuple

import numpy as np
import scipy.special
import torch
from torch import nn

import accountant
import central
import dpsgd
import randomness

CALIBRATION = 0.25   # the share of the trials that picks the event R (step 4)
TAILS = np.logspace(-5, math.log10(0.5), 40)  # R's candidate thresholds, as tail quantiles


# ---------------------------------------------------------------------------------------------
# The statistics: from counts to a lower bound on epsilon
# ---------------------------------------------------------------------------------------------

def clopper_pearson(k, n, alpha):
    """One-sided Clopper-Pearson bounds (lower, upper) on a rate from k successes of n: each
    holds with probability >= 1 - alpha. Exact (beta quantiles), vectorised over k."""
    k = np.asarray(k)
    lower = np.where(k > 0, scipy.special.betaincinv(np.maximum(k, 1), n - k + 1, alpha), 0.0)
    upper = np.where(k < n, scipy.special.betaincinv(k + 1, np.maximum(n - k, 1), 1 - alpha), 1.0)
    return lower, upper


def _bounds(score, included, thresholds, delta, level):
    """The bound of step 3 for R = {score > t}, per threshold, both ways round: [2, len(t)]
    (row 0: P_in[R] <= e^eps P_out[R] + delta; row 1: P_out[R] <= e^eps P_in[R] + delta)."""
    rates = []
    for group in (included, ~included):
        sorted_scores = np.sort(score[group])
        hits = len(sorted_scores) - np.searchsorted(sorted_scores, thresholds, side="right")
        rates.append(clopper_pearson(hits, len(sorted_scores), level / 2))
    (in_lower, in_upper), (out_lower, out_upper) = rates
    with np.errstate(divide="ignore"):
        eps = np.log(np.maximum(np.stack([in_lower, out_lower]) - delta, 0.0)
                     / np.stack([out_upper, in_upper]))
    return np.maximum(eps, 0.0)  # no evidence is eps >= 0


class Bound(NamedTuple):
    eps_lower: float  # with confidence 1 - level, the mechanism is not (eps, delta)-DP
    event: str        # R, e.g. "signal > 2.31: in 6/4e5 ..." ("" if nothing was found)
    trials: int


def threshold_audit(scores, included, delta, level=0.05):
    """Steps 3 and 4. scores: {name: array [n]}, one score per trial for each name;
    included: bool [n], the coins. The calibration part tries R = {s > t} and {s < t} for each
    score s, thresholds t at its tail quantiles, both ways round; the rest measures the best."""
    included = np.asarray(included, dtype=bool)
    cut = int(CALIBRATION * len(included))
    candidates = [(0.0, "", 1, 0.0, 0)]  # (eps on the calibration part, name, sign, t, way)
    for name, score in scores.items():
        for sign in (1, -1):  # R = {s > t}, and {s < t} = {-s > -t}
            signed = sign * np.asarray(score[:cut], dtype=float)
            thresholds = np.quantile(signed, 1 - TAILS)
            eps = _bounds(signed, included[:cut], thresholds, delta, level)
            way, index = np.unravel_index(np.argmax(eps), eps.shape)
            candidates.append((eps[way, index], name, sign, thresholds[index], way))
    eps, name, sign, threshold, way = max(candidates, key=lambda candidate: candidate[0])
    if eps == 0:
        return Bound(0.0, "", len(included))  # nothing to measure
    signed, test = sign * np.asarray(scores[name][cut:], dtype=float), included[cut:]
    eps = float(_bounds(signed, test, np.array([threshold]), delta, level)[way, 0])
    hit = signed > threshold
    counts = f"in {np.sum(hit & test)}/{np.sum(test)}, out {np.sum(hit & ~test)}/{np.sum(~test)}"
    return Bound(eps, f"{name} {'>' if sign == 1 else '<'} {sign * threshold:.4g}: {counts}",
                 len(included))


def log_likelihood_ratio(y, q, sigma):
    """log P_in(y) / P_out(y) of one step's canary update y under the claimed mechanism:
    out, y ~ N(0, sigma^2); in, y ~ (1 - q) N(0, sigma^2) + q N(1, sigma^2)."""
    log_not_sampled = math.log1p(-q) if q < 1 else -math.inf
    return torch.logaddexp(torch.full_like(y, log_not_sampled),
                           math.log(q) + (y - 0.5) / sigma ** 2)


# ---------------------------------------------------------------------------------------------
# The mechanisms and their bugs
# ---------------------------------------------------------------------------------------------

class Variant(NamedTuple):
    """What runs in place of the claimed mechanism: the production functions, or a bug as a
    small change of one of them; the claim (q, sigma, T) stays the same.
    actual(q, sigma) -> the (q, sigma) that really runs, for the accountant; None: no finite
    epsilon (the worst case over datasets is unbounded)."""
    actual: object = lambda q, sigma: (q, sigma)
    sample: object = randomness.poisson_sample   # DP-SGD's sampler: (n, q, generator) -> mask
    step: object = dpsgd.dp_step                 # DP-SGD's step, called with keywords only
    release: object = central.noisy_class_means  # one central-image query


def dp_step_dividing_by_realised_batch(batch_tensors, expected_batch_size, **rest):
    """The pitfall dpsgd.scale_grad avoids: divide by the realised batch size (at least 1)."""
    dpsgd.dp_step(batch_tensors=batch_tensors, expected_batch_size=max(len(batch_tensors[0]), 1),
                  **rest)


def noisy_class_means_dividing_by_realised_count(images, labels, num_classes, q, sigma, generator):
    """The pitfall central.noisy_class_means avoids: noisy_class_means re-implemented with one
    change, each class's noisy sum divided by the class's realised count (at least 1)."""
    mask = randomness.poisson_sample(len(images), q, generator)
    sampled = central.downsample(images[mask])
    sums = torch.zeros((num_classes,) + sampled.shape[1:], dtype=torch.float64)
    sums.index_add_(0, labels[mask], sampled)
    noise = torch.randn(sums.shape, generator=generator, dtype=torch.float64)
    counts = torch.bincount(labels[mask], minlength=num_classes).clamp(min=1)
    return (sums + sigma * math.sqrt(sums[0].numel()) * noise) / counts.view(-1, 1, 1, 1)


def _clipping_at(factor):
    """dp_step clipping at factor * C while its noise stays the claim's sigma C."""
    return lambda clip_norm, sigma, **rest: dpsgd.dp_step(clip_norm=factor * clip_norm,
                                                          sigma=sigma / factor, **rest)


DPSGD_VARIANTS = {
    "as-it-is": Variant(),
    "noise-x0.5": Variant(lambda q, s: (q, s / 2),
                          step=lambda sigma, **rest: dpsgd.dp_step(sigma=sigma / 2, **rest)),
    "noise-x0.25": Variant(lambda q, s: (q, s / 4),
                           step=lambda sigma, **rest: dpsgd.dp_step(sigma=sigma / 4, **rest)),
    "no-noise": Variant(None, step=lambda sigma, **rest: dpsgd.dp_step(sigma=0.0, **rest)),
    "clip-1.5C": Variant(lambda q, s: (q, s / 1.5), step=_clipping_at(1.5)),
    "no-clipping": Variant(None, step=_clipping_at(1e3)),  # the canaries' 10 C pass unclipped
    "sampling-3q": Variant(lambda q, s: (3 * q, s),
                           sample=lambda n, q, g: randomness.poisson_sample(n, 3 * q, g)),
    "sampling-q=1": Variant(lambda q, s: (1.0, s),
                            sample=lambda n, q, g: randomness.poisson_sample(n, 1.0, g)),
    "realised-batch-size": Variant(None, step=dp_step_dividing_by_realised_batch),
}

_means = central.noisy_class_means
CENTRAL_VARIANTS = {
    "as-it-is": Variant(),
    "noise-x0.5": Variant(lambda q, s: (q, s / 2),
                          release=lambda x, y, k, q, sigma, g: _means(x, y, k, q, sigma / 2, g)),
    "no-noise": Variant(None, release=lambda x, y, k, q, sigma, g: _means(x, y, k, q, 0.0, g)),
    # noise std sigma per pixel, not sigma sqrt(d'): the audit's 8x8 images have d' = 16
    "noise-per-pixel": Variant(lambda q, s: (q, s / 4), release=lambda x, y, k, q, sigma, g:
                               _means(x, y, k, q, sigma / math.sqrt(x[0].numel() / 4), g)),
    "sampling-3q": Variant(lambda q, s: (3 * q, s),
                           release=lambda x, y, k, q, sigma, g: _means(x, y, k, 3 * q, sigma, g)),
    "sampling-q=1": Variant(lambda q, s: (1.0, s),
                            release=lambda x, y, k, q, sigma, g: _means(x, y, k, 1.0, sigma, g)),
    "realised-class-count": Variant(None, release=noisy_class_means_dividing_by_realised_count),
}


# ---------------------------------------------------------------------------------------------
# Trials (step 1)
# ---------------------------------------------------------------------------------------------

def dpsgd_canary_trials(trials, q, sigma, steps, generator, variant=Variant(), canaries=1000,
                        clip_norm=1.0, gradient_norm=10.0):
    """`trials` canaries, `canaries` per run of `steps` dp_steps (SGD, learning rate 1) on an
    nn.Embedding(canaries, 1): canary i's loss is -G theta_i, its gradient G e_i (G > C).
    Returns ({"signal": log-likelihood ratios [n]}, included [n] bool)."""
    included, signal = [], []
    loss = lambda model, index: -gradient_norm * model(index)[:, 0]
    expected_batch_size = q * canaries / 2  # public: never the realised number of canaries
    for _ in range(math.ceil(trials / canaries)):
        coins = torch.rand(canaries, generator=generator) < 0.5
        dataset = torch.arange(canaries)[coins]
        model = nn.Embedding(canaries, 1)
        nn.init.zeros_(model.weight)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        llr = torch.zeros(canaries, dtype=torch.float64)
        for _ in range(steps):
            before = model.weight.detach()[:, 0].double()
            batch = dataset[variant.sample(len(dataset), q, generator)]
            variant.step(model=model, optimizer=optimizer, per_example_loss=loss,
                         batch_tensors=(batch,), clip_norm=clip_norm, sigma=sigma,
                         expected_batch_size=expected_batch_size, noise_generator=generator,
                         chunk_size=canaries)
            y = (model.weight.detach()[:, 0].double() - before) * expected_batch_size / clip_norm
            llr += log_likelihood_ratio(y, q, sigma)
        included.append(coins)
        signal.append(llr)
    return {"signal": torch.cat(signal).numpy()}, torch.cat(included).numpy()


def dpsgd_probe_trials(trials, q, sigma, steps, generator, variant=Variant(),
                       noise_coordinates=100, clip_norm=1.0, gradient_norm=10.0):
    """`trials` runs on a dataset of two: the canary (index 0, if its coin says in) and a
    companion (index 1), each with gradient G along its own coordinate; coordinates 2.. are
    touched by no example. Returns ({"signal": ..., "spread": ...}, included [n])."""
    included = torch.rand(trials, generator=generator) < 0.5
    signal = torch.zeros(trials, dtype=torch.float64)
    spread = torch.full((trials,), math.inf, dtype=torch.float64)
    loss = lambda model, index: -gradient_norm * model(index)[:, 0]
    model = nn.Embedding(2 + noise_coordinates, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # no state: reused across runs
    expected_batch_size = 2 * q  # public: qN with N = 2, whether the canary is in or not
    for trial in range(trials):
        dataset = torch.tensor([0, 1]) if included[trial] else torch.tensor([1])
        nn.init.zeros_(model.weight)
        for _ in range(steps):
            before = model.weight.detach()[:, 0].double()
            batch = dataset[variant.sample(len(dataset), q, generator)]
            variant.step(model=model, optimizer=optimizer, per_example_loss=loss,
                         batch_tensors=(batch,), clip_norm=clip_norm, sigma=sigma,
                         expected_batch_size=expected_batch_size, noise_generator=generator)
            update = (model.weight.detach()[:, 0].double() - before) * expected_batch_size
            signal[trial] += log_likelihood_ratio(update[:1] / clip_norm, q, sigma)[0]
            spread[trial] = min(spread[trial], float(update[2:].std() / (sigma * clip_norm)))
    return {"signal": signal.numpy(), "spread": spread.numpy()}, included.numpy()


def central_trials(trials, q, sigma, queries, generator, variant=Variant(), classes=2000,
                   side=8):
    """`trials` classes, `classes` per call of `queries` releases. Class k < K holds a black
    companion and, if its coin says in, a white side x side canary; an absent canary's place
    goes to a black image in a spare class K, so that N = 2K (public) stays fixed. A black
    image adds nothing to a sum: only the counts see the companion.
    Returns ({"signal": log-likelihood ratios, "spread": ...}, included [n])."""
    included, signal, spread = [], [], []
    d_prime = (side // 2) ** 2
    divisor = q * 2 * classes / (classes + 1)  # noisy_class_means' q N / K, public
    for _ in range(math.ceil(trials / classes)):
        coins = torch.rand(classes, generator=generator) < 0.5
        labels = torch.cat([torch.arange(classes),
                            torch.where(coins, torch.arange(classes), classes)])
        images = torch.zeros((2 * classes, 1, side, side), dtype=torch.uint8)
        images[classes:][coins] = 255
        llr = torch.zeros(classes, dtype=torch.float64)
        smallest = torch.full((classes,), math.inf, dtype=torch.float64)
        for _ in range(queries):
            sums = variant.release(images, labels, classes + 1, q, sigma, generator)
            sums = sums[:classes].flatten(1) * divisor  # back to noisy sums: canary + noise
            llr += log_likelihood_ratio(sums.mean(1), q, sigma)  # pixel mean: 1 + N(0, sigma^2)
            smallest = torch.minimum(smallest, sums.std(1) / (sigma * math.sqrt(d_prime)))
        included.append(coins)
        signal.append(llr)
        spread.append(smallest)
    return ({"signal": torch.cat(signal).numpy(), "spread": torch.cat(spread).numpy()},
            torch.cat(included).numpy())


# ---------------------------------------------------------------------------------------------
# The audits: both designs, each at level / 2
# ---------------------------------------------------------------------------------------------

def audit_dpsgd(q, sigma, steps, delta, generator, variant=Variant(), canaries=6_000_000,
                probes=4000, level=0.05):
    """The larger of the canaries' and the probes' bounds (Bound) for DP-SGD claiming (q, sigma,
    steps); `variant` is what runs."""
    first = threshold_audit(*dpsgd_canary_trials(canaries, q, sigma, steps, generator, variant),
                            delta, level / 2)
    second = threshold_audit(*dpsgd_probe_trials(probes, q, sigma, steps, generator, variant),
                             delta, level / 2)
    return max(first, second, key=lambda bound: bound.eps_lower)


def audit_central(q, sigma, queries, delta, generator, variant=Variant(), canaries=2_000_000,
                  probes=20_000, level=0.05):
    """As audit_dpsgd, for the central images: canaries on 8x8 images (the pixel mean is a
    one-dimensional Gaussian mechanism whatever the size), probes on 28x28 (196 noisy pixels
    measure the spread to 5 %)."""
    first = threshold_audit(*central_trials(canaries, q, sigma, queries, generator, variant),
                            delta, level / 2)
    second = threshold_audit(*central_trials(probes, q, sigma, queries, generator, variant,
                                             side=28), delta, level / 2)
    return max(first, second, key=lambda bound: bound.eps_lower)


# (key, name, audit, variants, q, T, trials of each design): DP-SGD for one step at q = 0.25,
# the central images at the project's q = 0.1 and T = 5; sigma is calibrated to claim eps = 1.
MECHANISMS = (("dpsgd", "DP-SGD", audit_dpsgd, DPSGD_VARIANTS, 0.25, 1, (6_000_000, 4000)),
              ("central", "central images", audit_central, CENTRAL_VARIANTS, 0.1, 5,
               (2_000_000, 20_000)))
VARIANT_NAMES = [f"{key}:{label}" for key, _, _, variants, *_ in MECHANISMS for label in variants]


def print_table(delta, seed=None, scale=1.0, only=None):
    """The README's table: each mechanism as it is and with each bug, all claiming eps = 1.
    scale: multiplies the numbers of trials; only: names from VARIANT_NAMES (None: all)."""
    print(f"Claims of eps = 1 at delta = {delta:g}; lower bounds at 95 % confidence. A bound "
          "above 1 means the code is not what the accountant was told.\n")
    print("| mechanism | variant | sigma | eps of what runs | audit: eps >= | event R, counts in "
          "the test part | trials of its design | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for key, name, run_audit, variants, q, steps, trials in MECHANISMS:
        sampling = randomness.sampling_rate(q)  # what the accountant is told, as in train.py
        sigma = accountant.calibrate_sigma(1.0, delta, sampling, steps)
        for label, variant in variants.items():
            if only is not None and f"{key}:{label}" not in only:
                continue
            true_eps = "inf"
            if variant.actual is not None:
                q_run, sigma_run = variant.actual(sampling, sigma)
                true_eps = f"{accountant.epsilon([(q_run, sigma_run, steps)], delta)[0]:.2f}"
            start = time.perf_counter()
            bound = run_audit(q, sigma, steps, delta, randomness.secret_generator(seed), variant,
                              *(max(100, int(scale * n)) for n in trials))
            print(f"| {name} | {label} | {sigma:.3f} | {true_eps} | {bound.eps_lower:.2f} | "
                  f"{bound.event} | {bound.trials} | {time.perf_counter() - start:.0f} |",
                  flush=True)
