"""Does the code do what the accountant was told? A privacy audit from millions of trials.

The one-run audit (one_run.py) catches gross bugs: lost noise, lost clipping. This audit runs
each of the three mechanisms, through its production functions, in many independent trials at
a claim of eps = 1 (delta 1e-5), and catches far smaller errors: noise 15 % too small, clipping
at 1.2 C, a sampling rate 1.5x too high, a divisor that depends on the data, noise reused across
steps, fixed-size batches, the accountant fed the wrong delta. It is the classic audit by
repeated trials (Jagielski, Ullman, Oprea, "Auditing Differentially Private Machine Learning",
NeurIPS 2020; Nasr et al., "Adversary Instantiation", IEEE S&P 2021) with white-box canaries:
  1. A trial: a fair coin decides whether the canary is in the dataset; the mechanism runs; a
     score is computed from its output.
  2. An event R = {score > t} or {score < t} is chosen on a quarter of the trials; the others
     count the in- and out-trials in R, and Clopper-Pearson bounds both rates (bounds.py).
  3. Two readings of the same bounds (bounds.py): a lower bound on eps at delta, which holds
     for any mechanism; and the trade-off test of the claim itself: the claim eps = 1 rests on
     the code being one step (or T steps) of the Poisson-subsampled Gaussian with rate q and
     noise multiplier sigma, and an event whose rates that step cannot produce proves the code is
     less private than what the accountant was told. The first needs events of probability
     ~1e-5 to reach eps = 1 and stops at about half of the claim; the second is decided where
     events are common, and so measures the noise to a few per cent.
  4. The ledger check: the eps of what the run really gave the mechanism (rate, sigma, steps),
     recomputed by the accountant at the claimed delta, must not exceed the claim. A sigma
     calibrated at the wrong delta is exactly the mechanism it says it is; only this sees it
     (and, as too little noise, the trade-off test). ledger.py audits train.py's own ledger.

Designs. A trial is exact only if the canaries of one run are independent: each canary acts on
its own output coordinate (its own gradient coordinate in DP-SGD, its own class in the central
images and the frequency release), and every divisor is public. Each design has its own claim
(its q and T, sigma calibrated to eps = 1) and is audited at level / (number of designs) (a
union bound), so a mechanism's row is a 95 % statement. The trade-off test reads the one-step
designs; the others are read by eps. Its precision falls with q (at q = 0.1 a million trials
measure the noise to about 10 %, at q = 0.5 to 5 %), so the designs that look for the noise use
a q of 0.25 to 1, and the project's q = 0.1 is kept for the central images' five queries.
* DP-SGD (dpsgd.dp_step, randomness.poisson_sample):
  - one step, q = 0.25: canaries with gradient 10 C along their own coordinate, which dp_step
    clips to C. Score: the log-likelihood ratio of "in" against "out" under the claim (the most
    powerful test, Neyman-Pearson), from the canary's update y in units where a sampled canary
    adds 1: log(1 - q + q exp((y - 1/2) / sigma^2)). The trade-off test sees noise and rate.
  - two steps, q = 0.25: the same canaries for two steps. Adding per-step likelihood ratios
    cannot see an exact repeat of the noise (each step alone looks right), so a second score
    looks ACROSS steps: the spread of one canary's per-step updates, exactly 0 for an absent
    canary when the noise repeats, and for a present one unless it was sampled once only.
  - companions, q = 0.25: each dataset holds four companions whose gradient is the canary's
    reversed, and the canary if its coin says in. With Poisson sampling the companions only add
    noise (their count is random); with fixed-size batches the canary must displace a companion
    from the batch, and the sum moves by 2 C, not C. Each dataset is sampled on its own, and one
    dp_step takes a thousand of them on their own coordinates: the same as a step per dataset.
  - divisor probes, q = 0.5: a divisor that depends on the data (the realised batch size)
    breaks the independence of canaries and leaks through the SCALE of the whole output. So:
    one canary and one companion per run, a dataset of two where a divisor of 2 only occurs
    with the canary; 100 coordinates that no example touches reveal the divisor. Score
    "spread": their standard deviation in units of the claimed noise, 1 as the mechanism is.
* Central images (central.noisy_class_means):
  - one query, q = 0.5: a white 8 x 8 canary alone in its class (the pixel mean is a
    one-dimensional Gaussian mechanism whatever the size) and a black companion; an absent
    canary's place goes to a black image in a spare class, so that N (public) stays fixed.
  - five queries, the project's q = 0.1 and T = 5, 28 x 28: "signal", "spread" within a query
    (the divisor: the realised class count) and "across" the queries (noise reused).
* Frequency release (frequency.noisy_feature_table; q = 1): the canary and a companion in their
  own class, random images with D = 16 frequencies (the sensitivity is 1 for any D); score: the
  class's column, less the companion's feature term, projected on the canary's; "spread": the
  noise of the rest of the column (the divisor: a realised class count).

`python -m audit --trials` prints the table of docs/audit.md (about 4 minutes on one core).
"""
import math
import time
from typing import NamedTuple

import torch
from torch import nn

import accountant
import frequency
import randomness
from audit import bounds, variants


def log_likelihood_ratio(y, q, sigma):
    """log P_in(y) / P_out(y) of one step's canary update y under the claimed mechanism:
    out, y ~ N(0, sigma^2); in, y ~ (1 - q) N(0, sigma^2) + q N(1, sigma^2)."""
    log_not_sampled = math.log1p(-q) if q < 1 else -math.inf
    return torch.logaddexp(torch.full_like(y, log_not_sampled),
                           math.log(q) + (y - 0.5) / sigma ** 2)


# ---------------------------------------------------------------------------------------------
# Trials (step 1): each returns ({score name: [n]}, included [n])
# ---------------------------------------------------------------------------------------------

def canary_loss(gradient_norm):
    """-G sign theta_i: the gradient of example (i, sign) is -G sign e_i at every theta."""
    return lambda model, index, sign: -gradient_norm * sign * model(index)[:, 0]


def dpsgd_canary_trials(trials, q, sigma, steps, generator, make=variants.DPSGD,
                        canaries=1000, clip_norm=1.0, gradient_norm=10.0):
    """`trials` canaries, `canaries` per run of `steps` DP-SGD steps (SGD, learning rate 1) on an
    nn.Embedding(canaries, 1): canary i's gradient is G e_i (G > C). Scores: "signal", the sum
    of the per-step log-likelihood ratios, and with several steps "across", the spread of the
    canary's per-step updates."""
    included, signal, across = [], [], []
    expected_batch_size = q * canaries / 2  # public: never the realised number of canaries
    for _ in range(math.ceil(trials / canaries)):
        mechanism = make()
        coins = torch.rand(canaries, generator=generator) < 0.5
        dataset = torch.arange(canaries)[coins]
        model = nn.Embedding(canaries, 1)
        nn.init.zeros_(model.weight)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        updates = torch.zeros(steps, canaries, dtype=torch.float64)
        for step in range(steps):
            before = model.weight.detach()[:, 0].double()
            batch = dataset[mechanism.sample(len(dataset), q, generator)]
            mechanism.step(model=model, optimizer=optimizer,
                           per_example_loss=canary_loss(gradient_norm),
                           batch_tensors=(batch, torch.ones(len(batch))), clip_norm=clip_norm,
                           sigma=sigma, expected_batch_size=expected_batch_size,
                           noise_generator=generator, chunk_size=canaries)
            updates[step] = ((model.weight.detach()[:, 0].double() - before)
                             * expected_batch_size / clip_norm)
        included.append(coins)
        signal.append(log_likelihood_ratio(updates, q, sigma).sum(0))
        across.append(updates.std(0) if steps > 1 else torch.zeros(canaries))
    scores = {"signal": torch.cat(signal).numpy()}
    if steps > 1:
        scores["across"] = torch.cat(across).numpy()
    return scores, torch.cat(included).numpy()


def dpsgd_companion_trials(trials, q, sigma, steps, generator, make=variants.DPSGD,
                           groups=1000, companions=4, clip_norm=1.0, gradient_norm=10.0):
    """`trials` datasets, `groups` per DP-SGD step, dataset g on coordinate g of an
    nn.Embedding(groups, 1): `companions` examples with gradient -G e_g, then the canary with
    +G e_g if its coin says in. Each dataset is sampled on its own, by its own make() (a
    fixed-size sampler draws each dataset's batch); one dp_step then takes all the batches,
    which is the same as a step per dataset: clipping is per example, the noise per coordinate,
    and the divisor public. Score "signal": the update of coordinate g, in units of C / (q N)."""
    if steps != 1:
        raise ValueError("companion trials: one step")
    places = companions + 1                                # a dataset: companions, then canary
    place_signs = torch.tensor([-1.0] * companions + [1.0])
    included, signal = [], []
    expected_batch_size = q * companions  # public: q N, N the companions
    for _ in range(math.ceil(trials / groups)):
        coins = torch.rand(groups, generator=generator) < 0.5
        present = torch.ones(groups, places, dtype=torch.bool)
        present[:, -1] = coins                             # the canary's place, if in
        sampled = torch.cat([make().sample(int(size), q, generator) for size in present.sum(1)])
        coordinates = torch.arange(groups).repeat_interleave(places)[present.flatten()][sampled]
        signs = place_signs.repeat(groups)[present.flatten()][sampled]
        model = nn.Embedding(groups, 1)
        nn.init.zeros_(model.weight)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        make().step(model=model, optimizer=optimizer, per_example_loss=canary_loss(gradient_norm),
                    batch_tensors=(coordinates, signs), clip_norm=clip_norm, sigma=sigma,
                    expected_batch_size=expected_batch_size, noise_generator=generator,
                    chunk_size=max(1, len(signs)))
        included.append(coins)
        signal.append(model.weight.detach()[:, 0].double() * expected_batch_size / clip_norm)
    return {"signal": torch.cat(signal).numpy()}, torch.cat(included).numpy()


def dpsgd_probe_trials(trials, q, sigma, steps, generator, make=variants.DPSGD,
                       noise_coordinates=100, clip_norm=1.0, gradient_norm=10.0):
    """`trials` runs on a dataset of two: the canary (index 0, if its coin says in) and a
    companion (index 1), each with gradient G along its own coordinate; coordinates 2.. are
    touched by no example. Scores: "signal" and "spread" (the smallest, over steps, standard
    deviation of the untouched coordinates' updates, in units of the claimed noise)."""
    included = torch.rand(trials, generator=generator) < 0.5
    signal = torch.zeros(trials, dtype=torch.float64)
    spread = torch.full((trials,), math.inf, dtype=torch.float64)
    model = nn.Embedding(2 + noise_coordinates, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # no state: reused across runs
    expected_batch_size = 2 * q  # public: qN with N = 2, whether the canary is in or not
    for trial in range(trials):
        mechanism = make()
        dataset = torch.tensor([0, 1]) if included[trial] else torch.tensor([1])
        nn.init.zeros_(model.weight)
        for _ in range(steps):
            before = model.weight.detach()[:, 0].double()
            batch = dataset[mechanism.sample(len(dataset), q, generator)]
            mechanism.step(model=model, optimizer=optimizer,
                           per_example_loss=canary_loss(gradient_norm),
                           batch_tensors=(batch, torch.ones(len(batch))), clip_norm=clip_norm,
                           sigma=sigma, expected_batch_size=expected_batch_size,
                           noise_generator=generator)
            update = (model.weight.detach()[:, 0].double() - before) * expected_batch_size
            signal[trial] += log_likelihood_ratio(update[:1] / clip_norm, q, sigma)[0]
            spread[trial] = min(spread[trial], float(update[2:].std() / (sigma * clip_norm)))
    return {"signal": signal.numpy(), "spread": spread.numpy()}, included.numpy()


def central_trials(trials, q, sigma, queries, generator, make=variants.Central, classes=2000,
                   side=8):
    """`trials` classes, `classes` per run of `queries` queries. Class k < K holds a black
    companion and, if its coin says in, a white side x side canary; an absent canary's place
    goes to a black image in a spare class K, so that N = 2K (public) stays fixed. A black
    image adds nothing to a sum: only the counts see the companion. Scores: "signal" (the
    log-likelihood ratios of the class's pixel means), "spread" (the smallest, over queries,
    standard deviation of the class's pixels in units of the claimed noise) and, with several
    queries, "across" (the spread of the class's pixel means over the queries)."""
    included, signal, spread, across = [], [], [], []
    d_prime = (side // 2) ** 2
    divisor = q * 2 * classes / (classes + 1)  # noisy_class_means' q N / K, public
    for _ in range(math.ceil(trials / classes)):
        mechanism = make()
        coins = torch.rand(classes, generator=generator) < 0.5
        labels = torch.cat([torch.arange(classes),
                            torch.where(coins, torch.arange(classes), classes)])
        images = torch.zeros((2 * classes, 1, side, side), dtype=torch.uint8)
        images[classes:][coins] = 255
        pixel_means = torch.zeros(queries, classes, dtype=torch.float64)
        smallest = torch.full((classes,), math.inf, dtype=torch.float64)
        for query in range(queries):
            means = mechanism.query(images, labels, classes + 1, q, sigma, generator)
            sums = means[:classes].flatten(1) * divisor  # back to noisy sums: canary + noise
            pixel_means[query] = sums.mean(1)  # the pixel mean: 1 + N(0, sigma^2) if sampled
            smallest = torch.minimum(smallest, sums.std(1) / (sigma * math.sqrt(d_prime)))
        included.append(coins)
        signal.append(log_likelihood_ratio(pixel_means, q, sigma).sum(0))
        spread.append(smallest)
        across.append(pixel_means.std(0) if queries > 1 else torch.zeros(classes))
    scores = {"signal": torch.cat(signal).numpy(), "spread": torch.cat(spread).numpy()}
    if queries > 1:
        scores["across"] = torch.cat(across).numpy()
    return scores, torch.cat(included).numpy()


def frequency_trials(trials, q, sigma, steps, generator, make=variants.Frequency,
                     classes=100_000, num_frequencies=16, side=4):
    """`trials` classes, `classes` per release (q = 1, one step). Class k < K holds a companion
    image and, if its coin says in, the canary image; an absent canary's place goes to a spare
    class K, so that N = 2K (public) stays fixed. Both images and the frequencies W are public
    and fixed. Scores: "signal", the class's column times N (the public divisor undone), less
    the companion's feature term, projected on the canary's term, in units where the canary
    adds 1; "spread", the standard deviation of the column's other directions in units of the
    claimed noise."""
    if q != 1 or steps != 1:
        raise ValueError("frequency trials: one release of the whole set (q = 1)")
    W = frequency.frequencies(side * side, seed=0, num_frequencies=num_frequencies)
    canary, companion = torch.rand(2, 1, 1, side, side, generator=torch.Generator().manual_seed(1))
    # Each image's own term of the sums, as the production function computes it (norm 1 - 2^-17)
    term = lambda image: frequency.feature_sums(image, torch.zeros(1, dtype=torch.long), 1, W)[:, 0]
    canary_term, companion_term = term(canary), term(companion)
    basis = torch.linalg.qr(torch.stack([canary_term, companion_term], dim=1)).Q  # [2D, 2]
    included, signal, spread = [], [], []
    for _ in range(math.ceil(trials / classes)):
        coins = torch.rand(classes, generator=generator) < 0.5
        labels = torch.cat([torch.arange(classes),
                            torch.where(coins, torch.arange(classes), classes)])
        images = torch.cat([companion.expand(classes, -1, -1, -1),
                            torch.where(coins.view(-1, 1, 1, 1), canary, companion)])
        table = make().release(images, labels, classes + 1, W, sigma, generator)
        columns = table[:, :classes] * len(images) - companion_term[:, None]  # canary + noise
        signal.append(canary_term @ columns / (canary_term @ canary_term))
        rest = columns - basis @ (basis.T @ columns)  # noise only, in 2D - 2 directions
        spread.append(rest.norm(dim=0) / (sigma * math.sqrt(len(rest) - 2)))
        included.append(coins)
    return ({"signal": torch.cat(signal).numpy(), "spread": torch.cat(spread).numpy()},
            torch.cat(included).numpy())


# ---------------------------------------------------------------------------------------------
# The audits (steps 2 to 4)
# ---------------------------------------------------------------------------------------------

class Design(NamedTuple):
    name: str
    trials: object   # (n, q, sigma, steps, generator, make, **options) -> (scores, included)
    q: float         # the sampling rate of the claim, as the flags give it
    steps: int       # T: DP-SGD steps or central queries
    count: int       # trials at --scale 1
    options: dict = {}  # more keyword arguments of `trials` (never modified)


class Result(NamedTuple):
    design: str
    sigma_claim: float  # the noise multiplier that claims eps = claim at (q, T, delta)
    sigma_run: float    # the one the run was given (variant.calibrate)
    eps_run: float      # the accountant's eps of what ran: (q, sigma_run, T) at delta
    bound: bounds.Bound


def claimed_sigma(design, delta, claim=1.0):
    """The noise multiplier that makes the accountant claim eps = `claim` for the design's run."""
    q = randomness.sampling_rate(design.q)  # what the accountant is told, as in train.py
    return accountant.calibrate_sigma(claim, delta, q, design.steps)


def audit(designs, make, delta, generator, scale=1.0, claim=1.0, level=0.05):
    """Each design run with the noise a run is given for a claim of eps = `claim`, and audited at
    level / len(designs). make(): a fresh mechanism (variants.py). Returns [Result]."""
    results = []
    for design in designs:
        q = randomness.sampling_rate(design.q)
        sigma_claim = claimed_sigma(design, delta, claim)
        sigma_run = make().calibrate(claim, delta, q, design.steps)
        eps_run = accountant.epsilon([(q, sigma_run, design.steps)], delta)[0]
        count = max(100, int(scale * design.count))
        scores, included = design.trials(count, design.q, sigma_run, design.steps, generator,
                                         make, **design.options)
        bound = bounds.threshold_audit(scores, included, delta, level / len(designs),
                                       q if design.steps == 1 else None)
        results.append(Result(design.name, sigma_claim, sigma_run, eps_run, bound))
    return results


class Verdict(NamedTuple):
    eps_lower: float     # the largest lower bound on eps at delta, any design
    noise_share: float   # the smallest sigma_upper / sigma_claim, one-step designs (inf: none)
    eps_at_noise: float  # the accountant's eps at that design's (q, sigma_upper): for reading
    eps_run: float       # the largest eps of what ran (the ledger check)
    caught_by: str       # "" (not caught), or which tests: "eps", "trade-off", "ledger"
    event: str           # the event of the most telling design


def verdict(results, designs, delta, claim=1.0):
    """What a row says: each test against the claim, and whether any of them objects."""
    eps_lower = max(result.bound.eps_lower for result in results)
    share, eps_at_noise, best = math.inf, 0.0, None
    for result, design in zip(results, designs):
        if design.steps == 1 and result.bound.sigma_upper / result.sigma_claim < share:
            share, best = result.bound.sigma_upper / result.sigma_claim, result
            sigma, q = result.bound.sigma_upper, randomness.sampling_rate(design.q)
            eps_at_noise = (math.inf if sigma < accountant.SIGMA_LIMITS[0] else
                            accountant.epsilon([(q, sigma, 1)], delta)[0])
    eps_run = max(result.eps_run for result in results)
    caught = [name for name, objects in (("eps", eps_lower > claim), ("trade-off", share < 1),
                                         ("ledger", eps_run > claim * (1 + 1e-9))) if objects]
    telling = best if share < 1 else max(results, key=lambda result: result.bound.eps_lower)
    return Verdict(eps_lower, share, eps_at_noise, eps_run, ", ".join(caught),
                   f"{telling.design}: {telling.bound.event}")


# (key, name, variants, designs): each claim is eps = 1 at the run's delta.
MECHANISMS = (
    ("dpsgd", "DP-SGD", variants.DPSGD_VARIANTS, (
        Design("one step", dpsgd_canary_trials, 0.25, 1, 1_000_000),
        Design("two steps", dpsgd_canary_trials, 0.25, 2, 200_000),
        Design("companions", dpsgd_companion_trials, 0.25, 1, 100_000),
        Design("divisor probes", dpsgd_probe_trials, 0.5, 1, 1500))),
    ("central", "central images", variants.CENTRAL_VARIANTS, (
        Design("one query", central_trials, 0.5, 1, 1_000_000, dict(classes=10_000)),
        Design("five queries", central_trials, 0.1, 5, 20_000, dict(classes=2000, side=28)))),
    ("frequency", "frequency release", variants.FREQUENCY_VARIANTS, (
        Design("one release", frequency_trials, 1.0, 1, 1_000_000),)),
)
VARIANT_NAMES = [f"{key}:{label}" for key, _, variants_of, _ in MECHANISMS for label in variants_of]


def true_eps(make, design, delta, claim=1.0):
    """The accountant's eps of what the variant really runs in `design` (inf: unbounded)."""
    mechanism = make()
    q = randomness.sampling_rate(design.q)
    ran_as = mechanism.runs_as(q, mechanism.calibrate(claim, delta, q, design.steps))
    return math.inf if ran_as is None else accountant.epsilon([(*ran_as, design.steps)], delta)[0]


def print_table(delta, seed=None, scale=1.0, only=None):
    """The table of docs/audit.md: each mechanism as it is and with each bug, all claiming eps = 1.
    scale: multiplies the numbers of trials; only: names from VARIANT_NAMES (None: all)."""
    print(f"Claims of eps = 1 at delta = {delta:g}; every test at 95 % confidence. Caught: a lower "
          "bound on eps above 1 (eps), noise below the claimed sigma (trade-off), or the eps of "
          "what ran above 1 (ledger).\n")
    for key, name, variants_of, designs in MECHANISMS:
        claims = ", ".join(f"{design.name} (q {design.q:g}, T {design.steps}, sigma "
                           f"{claimed_sigma(design, delta):.3f}, "
                           f"{max(100, int(scale * design.count))} trials)" for design in designs)
        print(f"{name}: {claims}")
    print("\n| mechanism | variant | true eps | eps >= | noise <= (x sigma) | eps at that noise | "
          "eps of what ran | caught by | most telling event | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, name, variants_of, designs in MECHANISMS:
        for label, make in variants_of.items():
            if only is not None and f"{key}:{label}" not in only:
                continue
            start = time.perf_counter()
            results = audit(designs, make, delta, randomness.secret_generator(seed), scale)
            row = verdict(results, designs, delta)
            print(f"| {name} | {label} | {true_eps(make, designs[0], delta):.2f} | "
                  f"{row.eps_lower:.2f} | {row.noise_share:.3f} | {row.eps_at_noise:.2f} | "
                  f"{row.eps_run:.2f} | {row.caught_by or 'no'} | {row.event} | "
                  f"{time.perf_counter() - start:.0f} |", flush=True)
