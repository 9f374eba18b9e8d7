"""Where DP-SGD's gradient signal goes, on a run's checkpoint: the per-example gradient norms by
diffusion noise level, and one step's signal-to-noise ratio at several clip norms C.

    OMP_NUM_THREADS=1 python bench/gradient_signal.py RUN --data-dir ../shared/data/mnist

For n training images drawn at random, with the run's noise-level law and draws: signal is
the norm of the expected clipped per-example gradient, estimated from the products of distinct
examples only (the squared norm of a mean of n would add 1/n of their spread); noise is the norm
of one step's Gaussian noise after the division by the expected batch B, sigma C sqrt(P) / B for
P parameters, with the run's sigma (it does not depend on C). Clipping at C changes both: a C
far above the gradients clips nothing and adds noise for nothing.

This reads the sensitive images outside any guarantee, like FID's reference statistics: a tool
to choose settings with, never part of a release.
"""
import argparse
import dataclasses
import math
import os
import sys

import torch
from torch.func import functional_call, grad, vmap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from harness import data  # noqa: E402
import diffusion  # noqa: E402
from harness import runs  # noqa: E402
import settings  # noqa: E402
import train  # noqa: E402


def per_example_gradients(model, edm, images, labels, noise_draws, generator):
    """[n, P] float64: each example's gradient of the diffusion loss, flattened."""
    y_in, sigma, noise = edm.draw_inputs(labels, noise_draws, images.shape[1:], generator)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_of_one(params, *example):  # one example, given back its batch dimension
        return edm.loss(lambda *a: functional_call(model, params, a),
                         *(v.unsqueeze(0) for v in example)).sum()

    grad_fn = vmap(grad(loss_of_one), in_dims=(None, 0, 0, 0, 0))
    chunks = [grad_fn(params, *(v[s:s + 64] for v in (images, y_in, sigma, noise)))
              for s in range(0, len(images), 64)]
    grads = {name: torch.cat([chunk[name] for chunk in chunks]) for name in params}
    return torch.cat([g.reshape(len(images), -1).double() for g in grads.values()], 1), sigma


def signal_norm(clipped):
    """|E[g]| estimated without the self-products: (|sum|^2 - sum |g_i|^2) / (n (n - 1))."""
    n = len(clipped)
    squared = (clipped.sum(0).square().sum() - clipped.square().sum()) / (n * (n - 1))
    return squared.clamp(min=0).sqrt().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run folder (its checkpoint's weights: the warm-up's end for a "
                               "--no-dpsgd run, DP-SGD's end for a finished one)")
    p.add_argument("--data-dir")
    p.add_argument("--n", type=int, default=256, help="training images to measure on")
    p.add_argument("--clips", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.2, 0.5, 1.0])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    state = runs.load_checkpoint(args.run)
    cfg = settings.saved_config(state["cfg"])
    info = data.INFO[cfg.dataset]
    model = diffusion.make_unet(cfg.model, info["channels"], info["size"], info["classes"])
    model.load_state_dict(state["model"])
    images, labels = data.load(cfg.dataset, "train", args.data_dir)
    # The sigma of the run's DP-SGD (for a --no-dpsgd run: of the preset's DP-SGD after it).
    plan = train.privacy_plan(dataclasses.replace(cfg, dpsgd=True), len(images))["dpsgd"]
    generator = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(images), generator=generator)[:args.n]
    edm = diffusion.EDM(info["classes"])
    grads, sigma = per_example_gradients(model, edm, diffusion.to_model_range(images[pick]),
                                         labels[pick], cfg.noise_draws, generator)
    norms, sigma = grads.norm(dim=1), sigma.float().mean(1)
    print(f"{args.run}: {args.n} examples, K = {cfg.noise_draws}, DP-SGD's sigma "
          f"{plan['sigma']:.3f} at expected batch {cfg.batch}")
    # With K > 1 draws an example has K noise levels: it is banded by their mean.
    print("per-example gradient norm, median by noise level:")
    for low, high in ((0, 0.1), (0.1, 0.5), (0.5, 2), (2, math.inf)):
        band = (sigma >= low) & (sigma < high)
        if band.any():
            print(f"  sigma in [{low:g}, {high:g}): {band.sum().item():4d} examples, "
                  f"{norms[band].median().item():.3f}")
    print(f"  all: median {norms.median().item():.3f}")
    print("| C | clipped | signal | noise | signal / noise |\n|---|---|---|---|---|")
    for clip in args.clips:
        clipped = grads * (clip / norms).clamp(max=1)[:, None]
        noise = plan["sigma"] * clip * grads.shape[1] ** 0.5 / cfg.batch
        signal = signal_norm(clipped)
        print(f"| {clip:g} | {(norms > clip).double().mean().item():.0%} | {signal:.4f} | "
              f"{noise:.4f} | {signal / noise:.3f} |")


if __name__ == "__main__":
    main()
