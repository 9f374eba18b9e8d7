"""The audits' command line, run from the repository root:

    python -m audit            the one-run audit (one_run.py): claims of eps = 1, 4, 10
    python -m audit --trials   the many-trial audit (trials.py): claims of eps = 1, with bugs
"""
import sys

import torch

import cli
from audit import one_run, trials


def main(argv=None):
    parser = cli.OneLineParser(prog="python -m audit",
                               description="Privacy audits of DP-SGD and the central images: "
                                           "empirical lower bounds on epsilon next to the "
                                           "accountant's. Default: the one-run audit (Steinke et "
                                           "al. 2023) at claims of eps = 1, 4, 10, about a minute "
                                           "on 2 cores; it catches gross bugs only.")
    parser.add_argument("--canaries", type=int, default=1000,
                        help="one-run audit: m canaries per audit (default 1000)")
    parser.add_argument("--trials", action="store_true",
                        help="run the many-trial audit (audit/trials.py) instead: at a claim of "
                             "eps = 1, each mechanism as it is and with each known bug; catches "
                             "bugs that double eps; about 20 s a row on 2 cores")
    parser.add_argument("--variant", action="append", choices=trials.VARIANT_NAMES,
                        metavar="NAME", help="with --trials: only this row (repeat for more); "
                        "one of: " + ", ".join(trials.VARIANT_NAMES))
    parser.add_argument("--scale", type=float, default=1.0,
                        help="with --trials: multiply the numbers of trials (default 1; 0.1 is "
                             "ten times faster and gives weaker bounds)")
    parser.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    parser.add_argument("--seed", type=int, default=None,
                        help="reproduce a table (default: a secret generator per run)")
    args = parser.parse_args(argv)
    if args.canaries < 10:
        parser.error(f"--canaries: need at least 10, got {args.canaries}")
    if not 0 < args.delta < 1:
        parser.error(f"--delta: must be in (0, 1), got {args.delta:g}")
    if not args.scale > 0:
        parser.error(f"--scale: must be > 0, got {args.scale:g}")
    if args.seed is not None and not 0 <= args.seed < 2 ** 64:
        parser.error(f"--seed: must be in 0..2**64 - 1, got {args.seed}")
    if (args.variant or args.scale != 1.0) and not args.trials:
        parser.error("--variant, --scale: only with --trials")
    # The audits' tensors are tiny: on a shared CPU, extra threads only wait for each other
    # (measured: a DP-SGD step 10x slower with 2 threads than with 1 on a loaded 2-core machine).
    torch.set_num_threads(1)
    if args.trials:
        trials.print_table(args.delta, args.seed, args.scale, args.variant)
    else:
        one_run.print_table(args.canaries, args.delta, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
