"""Draw more synthetic images from a trained run, without training again.

    python sample.py runs/mnist-eps1 --n 10000        # -> runs/mnist-eps1/more_samples.npz
    python sample.py runs/mnist-eps1 --n 60000 --out mnist60k.npz --steps 20 --solver dpm2m

The images come from the run's EMA weights, which are themselves post-processing of the
DP releases: sampling reads nothing else from the checkpoint (never its secret generator
state, never the data), so it costs no privacy and its epsilon is the run's. Draw as many as
you like. The run's sampler settings are the defaults; --steps, --solver and --guidance
change them for this file only. The .npz holds `images` (uint8 N x C x H x W) and `labels`,
the layout evaluate.py reads. An existing output file is never overwritten.
"""
import os
import secrets
import sys

import numpy as np
import torch

import data
import diffusion
import runs
import samplers
import settings

BATCH = 500  # images per sampler call, a progress line after each


def load_trained_model(folder):
    """The run's settings and its EMA model, if DP-SGD has finished; one-line ValueErrors."""
    state = runs.load_checkpoint(folder)
    try:
        cfg = settings.Config(**state["cfg"])
        stage = state["stage"]
    except (KeyError, TypeError):
        raise ValueError(f"{folder}: the checkpoint holds no valid settings") from None
    if stage not in ("synthesize", "evaluate_release", "done"):
        raise ValueError(f"{folder}: the run has not finished training (it is at stage "
                         f"'{stage}'); continue it with: python train.py --resume {folder}")
    info = data.INFO[cfg.dataset]
    model = diffusion.make_unet(cfg.model, info["channels"], info["size"], info["classes"])
    ema = diffusion.EMA(model, cfg.ema)
    ema.load_state_dict(state["ema"])
    return cfg, ema.model.eval()


def main(argv=None):
    p = settings.OneLineParser(prog="sample.py", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run folder of train.py that has finished DP-SGD")
    p.add_argument("--n", type=int, required=True, help="number of images (labels uniform)")
    p.add_argument("--out", help="output .npz (default: RUN/more_samples.npz)")
    p.add_argument("--steps", type=int, help="sampler steps (0: ancestral; default: the run's)")
    p.add_argument("--solver", choices=samplers.SOLVERS, help="default: the run's")
    p.add_argument("--guidance", type=float, help="guidance weight w (default: the run's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, help="fix the sampler's randomness (default: fresh)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.run, "more_samples.npz")
    try:
        if args.n < 1:
            raise ValueError(f"--n: need at least 1 image, got {args.n}")
        if os.path.exists(out):
            raise ValueError(f"--out: {out} exists; choose another file (nothing is overwritten)")
        cfg, model = load_trained_model(args.run)
        steps = cfg.sample_steps if args.steps is None else args.steps
        guidance = cfg.guidance if args.guidance is None else args.guidance
        device = torch.device(args.device)
        model = model.to(device)
        ddpm = diffusion.DDPM(num_classes=data.INFO[cfg.dataset]["classes"])
        generator = torch.Generator(device).manual_seed(
            secrets.randbits(63) if args.seed is None else args.seed)
        labels = torch.randint(ddpm.num_classes, (args.n,), generator=generator, device=device)
        pieces = []
        for i, batch in enumerate(labels.split(BATCH)):
            pieces.append(samplers.sample(ddpm, model, batch, generator, steps=steps or None,
                                          guidance=guidance, autocast=cfg.autocast,
                                          solver=args.solver or cfg.solver))
            print(f"sampled {min((i + 1) * BATCH, args.n)}/{args.n}", flush=True)
        runs.atomic_write(out, lambda f: np.savez_compressed(
            f, images=torch.cat(pieces).numpy(), labels=labels.cpu().numpy()))
    except (ValueError, RuntimeError, OSError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} images to {out} (no privacy spent: post-processing of the run's model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
