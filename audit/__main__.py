"""The audits' command line, run from the repository root:

    python -m audit            the one-run audit (one_run.py) at claims of eps = 1, 4, 10
    python -m audit --trials   the many-trial audit (trials.py): each mechanism at a claim of
                               eps = 1, as it is and with each known bug
    python -m audit --ledger   train.py's ledger against what its mechanisms ran (ledger.py)

A problem with the flags is one line, "error: ...", and exit status 2, before any work starts
(cli.OneLineParser); the bounds below are stated once, here.
"""
import math
import sys

import torch

from harness import cli
from audit import ledger, one_run, trials

CANARIES = (10, 10_000)   # one-run: the DP-SGD canaries' per-example gradients grow as m^2
SCALE = (1e-3, 10.0)      # --trials: 10 is ten times the trials, about 40 minutes on one core
DELTA = (1e-12, 1e-2)     # the accountant calibrates every claim of the tables in this range
SEEDS = (0, 2 ** 64 - 1)  # what randomness.secret_generator takes


def check_range(parser, flag, value, bounds):
    low, high = bounds
    if not (math.isfinite(value) and low <= value <= high):
        parser.error(f"{flag}: must be a number in [{low:g}, {high:g}], got {value:g}")


def parse_args(argv):
    parser = cli.OneLineParser(
        prog="python -m audit",
        description="Privacy audits of DP-SGD, the central images and the frequency release: "
                    "empirical lower bounds next to the accountant's claims. Default: the "
                    "one-run audit (Steinke et al. 2023) at claims of eps = 1, 4, 10, about a "
                    "minute on one core; it catches gross bugs only.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--trials", action="store_true",
                      help="the many-trial audit instead: at a claim of eps = 1, each mechanism "
                           "as it is and with each known bug; about 4 minutes on one core")
    mode.add_argument("--ledger", action="store_true",
                      help="the ledger audit instead: train.py's stages on 200 synthetic "
                           "images, its ledger against what its mechanisms were called with")
    parser.add_argument("--canaries", type=int, default=None,
                        help=f"one-run audit: m canaries per audit (default 1000; "
                             f"{CANARIES[0]} to {CANARIES[1]})")
    parser.add_argument("--variant", action="append", choices=trials.VARIANT_NAMES,
                        metavar="NAME", help="with --trials: only this row (repeat for more); "
                        "one of: " + ", ".join(trials.VARIANT_NAMES))
    parser.add_argument("--scale", type=float, default=None,
                        help=f"with --trials: multiply the numbers of trials (default 1; "
                             f"{SCALE[0]:g} to {SCALE[1]:g}; less is faster and weaker)")
    parser.add_argument("--delta", type=float, default=1e-5,
                        help=f"delta of the claims (default 1e-5; {DELTA[0]:g} to {DELTA[1]:g})")
    parser.add_argument("--seed", type=int, default=None,
                        help="reproduce a table (default: a secret generator per run)")
    args = parser.parse_args(argv)
    if args.canaries is not None:
        if args.trials or args.ledger:
            parser.error("--canaries: only for the one-run audit (without --trials, --ledger)")
        check_range(parser, "--canaries", args.canaries, CANARIES)
    if (args.variant or args.scale is not None) and not args.trials:
        parser.error("--variant, --scale: only with --trials")
    if args.scale is not None:
        check_range(parser, "--scale", args.scale, SCALE)
    check_range(parser, "--delta", args.delta, DELTA)
    if args.seed is not None and not SEEDS[0] <= args.seed <= SEEDS[1]:
        parser.error(f"--seed: must be in 0..2**64 - 1, got {args.seed}")
    return args


def main(argv=None):
    args = parse_args(argv)
    # The audits' tensors are tiny: on a shared CPU, extra threads only wait for each other
    # (measured: a DP-SGD step 10x slower with 2 threads than with 1 on a loaded 2-core machine).
    torch.set_num_threads(1)
    if args.trials:
        trials.print_table(args.delta, args.seed, args.scale or 1.0, args.variant)
        return 0
    if args.ledger:
        result = ledger.audit_ledger(seed=0 if args.seed is None else args.seed,
                                     delta=args.delta)
        ledger.print_report(result)
        return 1 if result.problems else 0
    one_run.print_table(args.canaries or 1000, args.delta, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
