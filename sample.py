"""Draw more synthetic images from a trained run, without training again.

    python sample.py runs/mnist-eps1 --n 10000        # -> runs/mnist-eps1/more_samples.npz
    python sample.py runs/mnist-eps1 --n 60000 --out mnist60k.npz --sample-steps 20
    python evaluate.py mnist60k.npz --dataset mnist

The images come from the run's EMA weights, which are themselves post-processing of the
DP releases: sampling reads nothing else from the checkpoint (never its secret generator
state, never the data), so it costs no privacy and its epsilon is the run's. Draw as many as
you like. The run's sampler settings are the defaults; --sample-steps, --solver, --churn and
--guidance (train.py's flags, with its checks) change them for this file only. The images are drawn by
the loop that train.py's synthesis uses (samplers.sample_uniform) and written as the samples
file that train.py writes and evaluate.py reads (harness/files.py). An existing output
file is never overwritten.
"""
from harness import cli  # noqa: F401  (first: a Ctrl-C while torch loads is one line)
from harness import flags
import dataclasses
import os
import secrets
import sys

import torch

from harness import data
from harness import files
import diffusion
from harness import runs
import samplers
import settings

SAMPLER_SETTINGS = ("sample_steps", "solver", "churn", "guidance")  # what this command may change


def load_trained_model(folder):
    """The run's settings and its EMA model, if DP-SGD has finished; one-line ValueErrors."""
    state = runs.load_checkpoint(folder, "RUN")  # this command's argument in its messages
    try:
        cfg = settings.saved_config(state["cfg"])
        stage = state["stage"]
    except (KeyError, TypeError):
        raise ValueError(f"{folder}: the checkpoint holds no valid settings") from None
    if stage not in runs.TRAINED:
        raise ValueError(f"{folder}: the run has not finished training (it is at stage "
                         f"'{stage}'); continue it with: python train.py --resume {folder}")
    info = data.INFO[cfg.dataset]
    model = diffusion.make_unet(cfg.model, info["channels"], info["size"], info["classes"])
    ema = diffusion.EMA(model, cfg.ema)
    ema.load_state_dict(state["ema"])
    return cfg, ema.model.eval()


def main(argv=None):
    p = cli.OneLineParser(prog="sample.py", description=__doc__.split("\n\n")[0])
    # Bounds, like the device check, are train.py's (harness/flags.py): --n is its --n-samples.
    p.add_argument("run", type=cli.path, metavar="RUN",
                   help="a run folder of train.py that has finished DP-SGD")
    p.add_argument("--n", type=flags.bounded("n_samples"), required=True,
                   help="number of images (labels uniform)")
    p.add_argument("--out", type=cli.path, help="output .npz (default: RUN/more_samples.npz)")
    p.add_argument("--sample-steps", type=flags.bounded("sample_steps"),
                   help="sampler steps (default: the run's)")
    p.add_argument("--solver", choices=samplers.SOLVERS, help="default: the run's")
    p.add_argument("--churn", type=flags.bounded("churn"),
                   help="Heun's S_churn, noise re-added while sampling (default: the run's)")
    p.add_argument("--guidance", type=flags.bounded("guidance"),
                   help="guidance weight w (default: the run's)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--seed", type=flags.bounded("seed"),
                   help="fix the sampler's randomness (default: fresh)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.run, "more_samples.npz")
    try:
        # Everything that can be checked in seconds is checked before any image is drawn.
        device = flags.check_device(args.device)
        cfg, model = load_trained_model(args.run)
        if os.path.exists(out):
            raise ValueError(f"--out: {out} exists; choose another file (nothing is overwritten)")
        files.check_writable(out)
        cfg = dataclasses.replace(cfg, **{name: getattr(args, name) for name in SAMPLER_SETTINGS
                                          if getattr(args, name) is not None})
        flags.check_settings(cfg)  # the sampler settings together (heun needs EDM)
        model = model.to(device)
        edm = diffusion.EDM(data.INFO[cfg.dataset]["classes"])
        generator = torch.Generator(device).manual_seed(
            secrets.randbits(63) if args.seed is None else args.seed)
        images, labels = [], []
        for batch_images, batch_labels in samplers.sample_uniform(
                edm, model, args.n, generator, **samplers.settings_of(cfg)):
            images.append(batch_images)
            labels.append(batch_labels)
            print(f"sampled {sum(map(len, labels))}/{args.n}", flush=True)
        files.save_samples(out, torch.cat(images), torch.cat(labels))
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} images to {out} (no privacy spent: post-processing of the run's model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
