"""Privacy accounting for DP-FETA: Renyi DP of the Poisson-subsampled Gaussian mechanism.

Everything DP-FETA does with the sensitive images -- the central-image queries, every DP-SGD
step, and with --frequency the one release of random features -- is one Gaussian mechanism
(noise std = sigma * L2 sensitivity) applied to a Poisson sample (each record kept independently
with probability q; q = 1 keeps all). A run is therefore a
*history*: a list of (q, sigma, steps). This module turns a history into one (epsilon, delta).

1. Per step, at Renyi order alpha > 1 (Mironov, Talwar, Zhang 2019, "Renyi Differential Privacy
   of the Sampled Gaussian Mechanism", arXiv:1908.10530): rdp(alpha) = log(A) / (alpha - 1),
   where, with mu0 = N(0, sigma^2) and mu1 = N(1, sigma^2),
       A = E_{z ~ mu0} [ ((1 - q) + q * mu1(z) / mu0(z)) ^ alpha ].
   Integer alpha: expand the power binomially (exact, finite):
       A = sum_{k=0}^{alpha} C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2)).
   Fractional alpha (their Sec. 3.3): split the integral at z0 = sigma^2 log(1/q - 1) + 1/2, where the two
   mixture parts are equal, and expand on each side in powers of the smaller part:
       A = sum_i C(alpha, i) (1-q)^(alpha-i) q^i     e^((i^2-i)/(2 sigma^2)) Phi((z0 - i) / sigma)
         + sum_i C(alpha, i) q^(alpha-i) (1-q)^i     e^((j^2-j)/(2 sigma^2)) Phi((j - z0) / sigma),
   with j = alpha - i and Phi the standard normal CDF.
2. Composition: RDP at a fixed order adds up over steps and over mechanisms (Mironov 2017).
3. Conversion (Balle et al. 2020, "Hypothesis testing interpretations and Renyi DP", Thm 21;
   equal to Canonne, Kamath, Steinke 2020, Prop 12):
       eps = min_alpha  rdp(alpha) + log((alpha - 1) / alpha) - (log(delta) + log(alpha)) / (alpha - 1).

Everything is computed in log space and vectorised over the order grid; nothing is cached.
Precision: integer orders sum A - 1 (all terms positive), so they keep full relative precision.
The fractional series sums A itself; at sigma in the hundreds A is within 1e-10 of 1 and those
orders carry a round-off of ~1e-16 in log A per step: harmless, such settings pick large orders.
"""
from harness import cli  # noqa: F401  (first: a Ctrl-C while numpy loads is one line)
import math
import sys
import warnings

import numpy as np
from scipy.special import gammaln, gammasgn, log_ndtr, logsumexp

# The default grid (the same as Google's dp_accounting): 1.1..10.9 by 0.1, 11..63, and a few
# large orders. Few steps or large sigma want large orders: the central-image stage alone
# (q = 0.1, sigma = 5, 5 steps) picks 63, so a grid ending there could not see past it.
DEFAULT_ORDERS = np.concatenate([np.arange(11, 110) / 10, np.arange(11, 64),
                                 [128.0, 256.0, 512.0, 1024.0]])
DEFAULT_ORDERS.flags.writeable = False

SERIES_RTOL = 1e-14         # stop a fractional series once its tail is this small relative to A
SERIES_MAX_TERMS = 2 ** 14  # ... or at this many terms, keeping the (still rigorous) tail bound
SIGMA_RANGE = (1e-2, 1e6)   # where calibrate_sigma searches (its doubling may step to 2^20)


# ---------------------------------------------------------------- RDP of one step
def _log_binom(n, k):
    """log |C(n, k)| for real n and integer k >= 0 (gammaln is log |Gamma|)."""
    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


def _log_a_integer(q, sigma, alphas):
    """log A at integer orders, from A - 1 = sum_{k>=2} C(alpha,k) (1-q)^(alpha-k) q^k (e^(..) - 1).

    The binomial weights sum to 1, so 1 can be taken out term by term; the k = 0, 1 terms vanish
    and all others are positive. A - 1 thus keeps full relative precision even at large sigma,
    where A itself is 1 + 1e-12 and summing A directly would lose most digits.
    """
    a, k = alphas[:, None], np.arange(2, int(alphas.max()) + 1)[None, :]
    x = (k * k - k) / (2 * sigma ** 2)
    log_expm1 = x + np.log(-np.expm1(-x))  # log(e^x - 1), no overflow for x in the millions
    log_terms = _log_binom(a, k) + (a - k) * np.log1p(-q) + k * np.log(q) + log_expm1
    log_terms = np.where(k <= a, log_terms, -np.inf)  # C(alpha, k) = 0 past alpha
    return np.logaddexp(0.0, logsumexp(log_terms, axis=1))  # log(1 + (A - 1))


def _fractional_terms(q, sigma, alphas, n_terms):
    """Terms i = 0..n_terms-1 of both fractional series: (log |term|, sign), shape [alphas, 2, i]."""
    z0 = sigma ** 2 * (np.log1p(-q) - np.log(q)) + 0.5
    a, i = alphas[:, None], np.arange(n_terms)[None, :]
    j = a - i
    log_binom, sign = _log_binom(a, i), gammasgn(a - i + 1)  # C(alpha, i) alternates for i > alpha
    # An order within rounding of an integer (2 + 1e-15) puts alpha - i + 1 on a pole of Gamma
    # for large i, where gammasgn is NaN: C(alpha, i) is then below 1e-15 of its neighbours'
    # size and far in the tail; it is taken as 0.
    sign = np.where(np.isfinite(log_binom), sign, 0.0)
    log_1 = (log_binom + j * np.log1p(-q) + i * np.log(q)
             + (i * i - i) / (2 * sigma ** 2) + log_ndtr((z0 - i) / sigma))
    log_2 = (log_binom + j * np.log(q) + i * np.log1p(-q)
             + (j * j - j) / (2 * sigma ** 2) + log_ndtr((j - z0) / sigma))
    return np.stack([log_1, log_2], axis=1), np.stack([sign, sign], axis=1)


def _log_a_fractional(q, sigma, alphas):
    """log A at fractional orders, summing the two series, with a rigorous tail bound.

    For i > alpha both series alternate in sign and their terms shrink in size (the binomial
    factor shrinks, and the rest is non-increasing because the normal hazard rate exceeds its
    argument), so each tail lies between 0 and its first omitted term. Adding that term, when
    positive, makes the result an upper bound on A: we may over-report, never under-report.
    Most settings converge in a few dozen terms; small sigma or q near 1/2 need thousands, so
    the terms double, for the orders not yet converged only.
    """
    log_a, todo = np.empty(len(alphas)), np.arange(len(alphas))
    n_terms = 128
    while n_terms <= alphas.max() + 1:  # the tail bound needs the tail to start past alpha
        n_terms *= 2
    while todo.size:
        log_t, sign = _fractional_terms(q, sigma, alphas[todo], n_terms + 1)
        peak = log_t[:, :, :-1].max(axis=(1, 2))
        scaled = sign * np.exp(log_t - peak[:, None, None])  # terms / e^peak, so no overflow
        total, next_term = scaled[:, :, :-1].sum(axis=(1, 2)), scaled[:, :, -1]
        log_a[todo] = peak + np.log(total + np.maximum(next_term, 0).sum(axis=1))
        converged = np.abs(next_term).max(axis=1) <= SERIES_RTOL * total
        todo = todo[~converged] if n_terms < SERIES_MAX_TERMS else todo[:0]
        n_terms *= 2
    return log_a


def rdp(q, sigma, steps, orders=None):
    """RDP (one value per order) of `steps` Poisson-subsampled Gaussian steps."""
    q, sigma, steps = _check_mechanism(q, sigma, steps)
    orders = _check_orders(orders)
    if q == 0 or steps == 0:
        return np.zeros(len(orders))
    if q == 1:  # no subsampling: the Gaussian mechanism's RDP in closed form
        return steps * orders / (2 * sigma ** 2)
    log_a = np.empty(len(orders))
    is_int = orders == np.round(orders)
    if is_int.any():
        log_a[is_int] = _log_a_integer(q, sigma, orders[is_int])
    if (~is_int).any():
        log_a[~is_int] = _log_a_fractional(q, sigma, orders[~is_int])
    # A >= 1 (Jensen); clipping float round-off below 0 can only raise the reported cost.
    return _check_finite("rdp", steps * np.maximum(log_a, 0.0) / (orders - 1),
                         f"q={q:g}, sigma={sigma:g}, steps={steps}")


# ---------------------------------------------------------------- composition and conversion
def _history_rdp(mechanisms, orders):
    """Total RDP of checked (q, sigma, steps) mechanisms: RDP composes by addition."""
    return sum((rdp(q, sigma, steps, orders) for q, sigma, steps in mechanisms),
               np.zeros(len(orders)))


def _rdp_to_epsilon(total_rdp, delta, orders, warn=True):
    """Best (eps, order) over the grid (Balle et al. 2020 Thm 21); warn if it is at an edge."""
    eps = total_rdp + np.log1p(-1 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    best = int(np.argmin(eps))
    _check_finite("epsilon", eps[best], f"delta={delta:g} at order {orders[best]:g}")
    if warn and len(orders) > 1 and orders[best] in (orders.min(), orders.max()):
        warnings.warn(f"best order {orders[best]:g} is at the edge of the order grid; "
                      "a wider grid may give a smaller epsilon", stacklevel=3)
    return max(float(eps[best]), 0.0), float(orders[best])  # a negative eps still means 0


def epsilon(history, delta, orders=None):
    """(eps, best_order) spent by a history of (q, sigma, steps) mechanisms at `delta`.

    A history that never touches the data (empty, or q = 0 or steps = 0 in every entry) gives
    exactly (0.0, None): its output does not depend on the data at all."""
    delta, orders, mechanisms = _check_delta(delta), _check_orders(orders), _check_history(history)
    if all(q == 0 or steps == 0 for q, _, steps in mechanisms):
        return 0.0, None  # the conversion formula would still charge its log(1/delta) term
    return _rdp_to_epsilon(_history_rdp(mechanisms, orders), delta, orders)


def calibrate_sigma(target_eps, delta, q, steps, history=(), orders=None):
    """Smallest sigma (to 0.1 %, rounded up) such that history + (q, sigma, steps) spends <= target_eps.

    eps falls as sigma grows (each order's RDP does), so: bracket, then bisect, and return the
    upper end of the bracket, which always meets the target.
    """
    target_eps = _check("target_eps", target_eps, lambda v: v > 0, "> 0")
    delta, orders = _check_delta(delta), _check_orders(orders)
    q = _check("q", q, lambda v: 0 < v <= 1, "in (0, 1] (q = 0 costs nothing)")
    steps = int(_check("steps", steps, lambda v: v >= 1 and v == int(v), "a whole number >= 1"))
    spent = _history_rdp(_check_history(history), orders)
    floor = _rdp_to_epsilon(spent, delta, orders, warn=False)[0]
    if floor >= target_eps:
        raise ValueError(f"target_eps: {target_eps:g} is not above the {floor:.4g} that the history "
                         "alone spends (on this order grid)")

    def meets(sigma):
        total = spent + rdp(q, sigma, steps, orders)
        return _rdp_to_epsilon(total, delta, orders, warn=False)[0] <= target_eps

    low = high = 1.0  # after bracketing: meets(high) and not meets(low)
    while meets(low):
        if low <= SIGMA_RANGE[0]:
            raise ValueError(f"target_eps: {target_eps:g} is met even with sigma = {low:g}, "
                             f"the least noise searched: a budget so large protects nothing; "
                             f"choose a smaller one")
        high, low = low, low / 2
    while not meets(high):
        if high >= SIGMA_RANGE[1]:
            raise ValueError(f"target_eps: {target_eps:g} cannot be met even with sigma = {high:g}")
        low, high = high, high * 2
    while high / low - 1 > 1e-3:
        middle = (low + high) / 2
        low, high = (low, middle) if meets(middle) else (middle, high)
    _rdp_to_epsilon(spent + rdp(q, high, steps, orders), delta, orders)  # warns at a grid edge
    return high


# ---------------------------------------------------------------- ledger
class PrivacyLedger:
    """The history of one run, named per stage, saved in checkpoints as plain JSON.

    add() merges into the last entry when name, q and sigma are equal, so DP-SGD can add one
    step at a time and the history stays as short as the number of distinct stages.
    """

    def __init__(self, delta):
        self.delta = _check_delta(delta)
        self.entries = []  # [name, q, sigma, steps]

    def add(self, name, q, sigma, steps=1):
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: must be a non-empty string, got {name!r}")
        q, sigma, steps = _check_mechanism(q, sigma, steps)
        if self.entries and self.entries[-1][:3] == [name, q, sigma]:
            self.entries[-1][3] += steps
        else:
            self.entries.append([name, q, sigma, steps])

    @property
    def history(self):
        return [(q, sigma, steps) for _, q, sigma, steps in self.entries]

    def epsilon(self, orders=None):
        return epsilon(self.history, self.delta, orders)

    def to_dict(self):
        return {"delta": self.delta,
                "entries": [dict(name=n, q=q, sigma=s, steps=t) for n, q, s, t in self.entries]}

    @classmethod
    def from_dict(cls, d):
        try:
            ledger = cls(d["delta"])
            for entry in d["entries"]:
                ledger.add(entry["name"], entry["q"], entry["sigma"], entry["steps"])
        except (KeyError, TypeError):
            raise ValueError("ledger: expected {'delta': d, 'entries': [{name, q, sigma, steps}]}") from None
        return ledger


# ---------------------------------------------------------------- input checks
# Accepted inputs. sigma^2 overflows past sigma = sqrt(largest float) = 1.34e154, and below
# sigma ~ 5e-152 one step's RDP is already inf or NaN (sooner with more steps); next to 1, orders
# divide round-off by alpha - 1 (NaN at the float after 1). So sigma must lie in SIGMA_LIMITS, steps
# in [0, MAX_STEPS] and orders in [MIN_ORDER, MAX_ORDER]: far wider than DP-SGD uses (sigma 0.1 to
# 1e4, millions of steps), and inside that box every result is finite; each one is still checked,
# and a non-finite one is an error, never a return value. sigma = 0 (no noise) has epsilon = inf:
# refused likewise. A history that never touches the data (empty, or q = 0 or steps = 0 throughout)
# spends exactly eps = 0, reported as (0.0, None): no order is involved.
SIGMA_LIMITS = (1e-3, 1e8)  # the sigmas accepted at all: around SIGMA_RANGE, inside float range
MAX_STEPS = 10 ** 15        # below 2^53, so every accepted count is exact in float64
MIN_ORDER = 1.001           # nearer 1 the conversion alone charges > 1000 log(1/delta)
MAX_ORDER = 10_000          # the sums grow with the order; 1024 is already ample


def _check(name, value, ok, requirement):
    """float(value) if it is a finite number with ok(value), else a one-line ValueError."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value}")
    if not ok(value):
        raise ValueError(f"{name}: must be {requirement}, got {value:g}")
    return value


def _check_mechanism(q, sigma, steps):
    low, high = SIGMA_LIMITS
    q = _check("q", q, lambda v: 0 <= v <= 1, "in [0, 1]")
    sigma = _check("sigma", sigma, lambda v: v != 0, "> 0 (sigma = 0 adds no noise: epsilon = inf)")
    sigma = _check("sigma", sigma, lambda v: low <= v <= high, f"in [{low:g}, {high:g}]")
    steps = _check("steps", steps, lambda v: 0 <= v <= MAX_STEPS and v == int(v),
                   f"a whole number in [0, {MAX_STEPS:.0e}]")
    return q, sigma, int(steps)


def _check_history(history):
    """The history as a list of checked (q, sigma, steps) triples."""
    try:
        entries = list(history)
    except TypeError:
        raise ValueError(f"history: must be a list of (q, sigma, steps), got {history!r}") from None
    checked = []
    for index, entry in enumerate(entries):
        try:
            q, sigma, steps = entry
        except (TypeError, ValueError):
            raise ValueError(f"history[{index}]: must be a (q, sigma, steps) triple") from None
        checked.append(_check_mechanism(q, sigma, steps))
    return checked


def _check_delta(delta):
    return _check("delta", delta, lambda v: 0 < v < 1, "in (0, 1)")


def _check_orders(orders):
    if orders is None:
        return DEFAULT_ORDERS
    try:
        orders = np.atleast_1d(np.asarray(orders, dtype=float))
    except (TypeError, ValueError):
        raise ValueError("orders: must be a list of numbers") from None
    in_range = np.all((orders >= MIN_ORDER) & (orders <= MAX_ORDER))
    if orders.ndim != 1 or orders.size == 0 or not in_range:
        raise ValueError(f"orders: must be a non-empty list of numbers in [{MIN_ORDER}, {MAX_ORDER}]")
    return orders


def _check_finite(name, values, inputs):
    """values, unless one is NaN or inf: inside the accepted inputs none should be, so a non-finite
    result is a bug, reported as a one-line error instead of a silent NaN or inf."""
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name}: not finite for {inputs} (an accountant bug; please report it)")
    return values


if __name__ == "__main__":  # the command line lives in harness/commands.py
    from harness import commands
    sys.exit(commands.accountant_command(sys.argv[1:]))
