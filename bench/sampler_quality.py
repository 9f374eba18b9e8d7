"""Do the faster sampler settings keep quality? FID of several samplers on one trained model.

    python bench/sampler_quality.py [--train-steps 2000] [--n 1000] [--data-dir DIR]

A small UNet is trained non-privately on real MNIST for --train-steps Adam steps at batch 64 under
bf16 autocast (bench/diffusion_sanity.py's loop; saved, and reused on the next call: a fixed number
of steps, so the model does not depend on the machine's speed; 10 minutes on a slow day gave noise,
FID 372), then each sampler variant draws --n images with guidance 1 (the CPU preset's until
2026-12-04, so the kept FIDs stay comparable) and the FID of each set against the first --n training
images is computed (1,000 vs 1,000, as in the README). Each FID is kept in a JSON file next to the
model, and a variant already there is not drawn again (a stopped run resumes). The spread between
the two float32 DDIM sets that differ only in their seed is the run-to-run noise that every other
difference is compared with.
Needs the FID Inception weights. The last line: `RESULT noise=<|FID seed 0 - seed 1|>
<variant>=<FID - FID of the float32 DDIM seed 0> ...`.
"""
import argparse
import json
import os
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo, not bench/
sys.path.insert(1, os.path.join(sys.path[0], "bench"))

import torch  # noqa: E402

from harness import data  # noqa: E402
import diffusion  # noqa: E402
import evaluate  # noqa: E402
import inception  # noqa: E402
import samplers  # noqa: E402
from diffusion_sanity import train_diffusion  # noqa: E402

# name: (solver, steps, bf16 autocast, seed, images per network batch)
GUIDANCE = 1.0  # the weight every kept FID was measured at
VARIANTS = {  # in order of interest, so that a stopped run has the important rows
    "ddim25-fp32-b500": ("ddim", 25, False, 0, 500),  # the CPU preset's until 2026-11-29
    "dpm2m15-bf16-b100": ("dpm2m", 15, True, 0, 100),  # the CPU preset's since 2026-11-30
    "ddim25-fp32-b500-seed1": ("ddim", 25, False, 1, 500),
    "ddim25-bf16-b100": ("ddim", 25, True, 0, 100),
    "ddim15-bf16-b100": ("ddim", 15, True, 0, 100),  # is it the solver, or just fewer steps?
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-steps", type=int, default=2000, help="non-private training steps")
    p.add_argument("--n", type=int, default=1000, help="images per FID side")
    p.add_argument("--data-dir", default=os.path.join(sys.path[0], "..", "shared", "data", "mnist"))
    p.add_argument("--out", default=os.path.join(sys.path[0], "bench", "out", "sampler_quality"))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    images, labels = data.load("mnist", "train", args.data_dir)
    model_path = os.path.join(args.out, f"model_{args.train_steps}_steps.pt")
    if os.path.exists(model_path):
        model = diffusion.make_unet("small", 1, 28, 10)
        model.load_state_dict(torch.load(model_path, weights_only=True))
    else:
        train_args = argparse.Namespace(model="small", num_steps=1000, schedule="linear",
                                        timestep_dist="uniform", ema=0.995, lr=2e-3, batch=64,
                                        minutes=float("inf"), max_steps=args.train_steps,
                                        autocast=True)
        model, _, _ = train_diffusion(images, labels, train_args, torch.Generator().manual_seed(0))
        torch.save(model.state_dict(), model_path)
    model.eval()
    ddpm = diffusion.DDPM()
    fid_network = inception.load_inception(None, "cpu")
    cache = os.path.join(args.out, f"fid_stats_mnist_train_{args.n}.npz")
    fids_path = os.path.join(args.out, f"fids_{args.train_steps}_steps_{args.n}.json")
    saved = {}
    if os.path.exists(fids_path):
        with open(fids_path) as f:
            saved = json.load(f)
    fids = {}
    for name, (solver, steps, autocast, seed, batch) in VARIANTS.items():
        if name in saved:  # a variant's settings never change under its name
            fids[name] = saved[name]
            print(f"{name:24s} FID {fids[name]:7.2f}  (from {fids_path})", flush=True)
            continue
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        sample_labels = torch.randint(10, (args.n,), generator=generator)
        samples = samplers.sample(ddpm, model, sample_labels, generator, steps=steps,
                                  guidance=GUIDANCE, batch_size=batch,
                                  autocast=autocast, solver=solver)
        seconds = time.perf_counter() - started
        fids[name] = evaluate.fid(samples, images[:args.n], "cpu", model=fid_network,
                                  reference_cache=cache, progress=None)
        data.save_grid(samples[:100], os.path.join(args.out, f"{name}.png"), nrow=10)
        with open(fids_path + ".tmp", "w") as f:  # then renamed: a kill never leaves half a file
            json.dump(dict(saved, **fids), f, indent=1)
        os.replace(fids_path + ".tmp", fids_path)
        print(f"{name:24s} FID {fids[name]:7.2f}  ({args.n / seconds:.2f} images/s)", flush=True)
    base = fids["ddim25-fp32-b500"]
    print("RESULT noise={:.2f} ".format(abs(base - fids["ddim25-fp32-b500-seed1"]))
          + " ".join(f"{name}={fid - base:+.2f}" for name, fid in fids.items()
                     if name not in ("ddim25-fp32-b500", "ddim25-fp32-b500-seed1")))


if __name__ == "__main__":
    main()
