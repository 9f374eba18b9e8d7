"""The command lines of two science modules, kept out of their way: `python accountant.py`
(epsilon of a history of mechanisms, or the sigma that meets an epsilon) and `python
central.py` (a release of central images alone, as PNGs). Each refuses bad input in one line,
exit status 2, before any work.
"""
import argparse
import math
import os
import sys
import warnings

import torch

import accountant
import central
import randomness
from harness import cli, data, flags


# ------------------------------------------------------------------------------ accountant.py
def _stage(text):
    parts = text.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"needs Q,SIGMA,STEPS, got {text!r}")
    return tuple(parts)  # checked by rdp() like any other input


def _rounded_up(value):  # what the command line prints must not understate eps or sigma
    return f"{math.ceil(value * 1e4) / 1e4:.4f}"


def _answer(args):
    delta, history, last = accountant._check_delta(args.delta), list(args.stage), (args.q, args.sigma, args.steps)
    if args.eps is not None:
        if args.q is None or args.steps is None:
            raise ValueError("--eps: needs --q and --steps (the mechanism to calibrate)")
        sigma = accountant.calibrate_sigma(args.eps, delta, args.q, args.steps, history)
        sigma = math.ceil(sigma * 1e4) / 1e4  # the printed sigma itself still meets the target
        eps, order = accountant.epsilon(history + [(args.q, sigma, args.steps)], delta)
        return f"sigma={sigma:.4f} (epsilon={_rounded_up(eps)} at delta={delta:g}, best order {order:g})"
    if None not in last:
        history.append(last)
    elif any(value is not None for value in last):
        raise ValueError("--q, --sigma, --steps: give all three (or --eps instead of --sigma)")
    if not history:
        raise ValueError("--stage, --q: nothing to account; give a mechanism")
    eps, order = accountant.epsilon(history, delta)
    if order is None:
        return f"epsilon={_rounded_up(eps)} at delta={delta:g} (nothing touches the data)"
    return f"epsilon={_rounded_up(eps)} at delta={delta:g} (best order {order:g})"


def accountant_command(argv=None):
    parser = cli.OneLineParser(
        description="Epsilon spent by Poisson-subsampled Gaussian mechanisms (RDP accountant),\n"
                    "or the smallest sigma that meets a target epsilon. Prints one line.",
        epilog="examples:\n"
               "  accountant.py --q 0.0683 --sigma 13.24 --steps 2197\n"
               "  accountant.py --q 0.0683 --eps 1 --steps 2197\n"
               "  accountant.py --stage 0.1,5,5 --q 0.0683 --eps 1 --steps 2197  # central, then DP-SGD\n"
               "  accountant.py --stage 0.1,5,5 --stage 0.0683,13.24,2197",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=_stage, action="append", default=[], metavar="Q,SIGMA,STEPS",
                        help="an earlier mechanism of the history; repeat for several, in order")
    parser.add_argument("--q", help="sampling rate of the last mechanism")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("--sigma", help="its noise multiplier: print epsilon")
    noise.add_argument("--eps", help="target epsilon: print the smallest sigma that meets it")
    parser.add_argument("--steps", help="its number of steps")
    parser.add_argument("--delta", default="1e-5", help="delta (default 1e-5)")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print(_answer(args))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for message in dict.fromkeys(str(w.message) for w in caught):  # each warning once
        print(f"warning: {message}", file=sys.stderr)
    return 0



# ------------------------------------------------------------------------------ central.py
def save_central_pictures(images, num_classes, out_dir, generator):
    """PNG grids: central.png (one row per class, one column per query) and augmented.png
    (each row: one central image of each class, freshly augmented)."""
    os.makedirs(out_dir, exist_ok=True)
    queries = images.shape[0] // num_classes
    by_class = images.view(queries, num_classes, *images.shape[1:]).transpose(0, 1)
    data.save_grid(by_class.reshape(images.shape), os.path.join(out_dir, "central.png"),
                   nrow=queries)
    first = images[:num_classes].repeat(8, 1, 1, 1)   # 8 draws of each class's first image
    data.save_grid(central.augment(first, generator), os.path.join(out_dir, "augmented.png"),
                   nrow=num_classes)


def central_command(argv=None):
    parser = cli.OneLineParser(description="Release DP-FETA central images and save PNGs.")
    parser.add_argument("--dataset", default="mnist", choices=data.INFO)
    parser.add_argument("--data-dir", type=cli.path)
    parser.add_argument("--trust-data-files", action="store_true",
                        help="accept dataset files that are not the official ones, knowingly")
    parser.add_argument("--out", type=cli.path, required=True)
    parser.add_argument("--q", type=flags.bounded("central_q"), default=0.1)
    parser.add_argument("--sigma", type=flags.bounded("central_sigma"), default=5.0)
    parser.add_argument("--queries", type=flags.bounded("central_queries"), default=5)
    parser.add_argument("--seed", type=flags.bounded("seed"), default=None,
                        help="testing only: a known seed lets anyone remove the noise "
                             "(default: a secret generator)")
    args = parser.parse_args(argv)
    try:
        # A release spends privacy: an earlier one in --out is never overwritten.
        for name in ("central.png", "augmented.png"):
            if os.path.exists(os.path.join(args.out, name)):
                raise ValueError(f"--out: {args.out} already holds {name}; choose another folder")
        images, labels = data.load(args.dataset, "train", args.data_dir, args.trust_data_files)
        try:  # a folder we cannot make fails before the release
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out: cannot make the folder {args.out} ({e.strerror})") from None
        info = data.INFO[args.dataset]
        secret = randomness.secret_generator(args.seed)
        released, _, mechanism = central.central_images(
            images, labels, info["classes"], args.q, args.sigma, args.queries, secret)
        # The augmentation shown in the picture draws from its own generator: its draws are
        # visible, and must reveal nothing about the secret generator's state.
        public = torch.Generator().manual_seed(0)
        save_central_pictures(released, info["classes"], args.out, public)
    except (ValueError, OSError, data.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # (No timing: the release's time grows with its secret Poisson sample sizes.)
    print(f"central images {tuple(released.shape)}; mechanism (q, sigma, T) = {mechanism}; PNGs "
          f"in {args.out}")
    return 0
