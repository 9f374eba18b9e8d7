"""Benchmark of the CPU preset's sampler: images per second against the old one.

    python bench/sampling_speed.py [--steps 2] [--batches 50 100 250] [--reps 3]

The model is the CPU preset's (settings.CPU: the small UNet), sampled with guidance 1 (the preset's
until 2026-12-04, as measured), so each step runs the network on 2 x batch images; the weights are
random, which does not change the cost. A step of DDIM and of DPM-Solver++(2M) is one network call
and costs the same, at every step, so each variant (float32 or bf16 autocast, images per network
pass) is timed on --steps steps, round-robin in one process with the old sampler (DDIM, 25 steps,
float32, 500 images per network pass: the CPU preset's until 2026-11-29). Images/s are then shown
per 25 steps (the speedup per step) and at the preset's own solver and steps (settings.CPU). Quality
is not measured here (bench/sampler_quality.py: FID of the same variants on one trained model).

The last line is `RESULT sampling_speedup=<the preset's sampler (its precision, steps and
solver, samplers.CPU_BATCH images per pass), images/s over the old sampler's> per_step=<the
same at equal steps>`.
"""
import argparse
import os
import statistics
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo, not bench/

import torch  # noqa: E402

import diffusion  # noqa: E402
import samplers  # noqa: E402
import settings  # noqa: E402

OLD = ("float32", 500)  # the sampler before: DDIM with OLD_STEPS steps, float32, 500 images
OLD_STEPS = 25           # per network pass
GUIDANCE = 1.0           # the weight the results were measured at


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="sampler steps timed per call")
    parser.add_argument("--batches", type=int, nargs="+", default=[50, 100, 250],
                        help="images per network batch of the variants (float32 and bf16)")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds over all variants")
    args = parser.parse_args()
    cfg = settings.CPU
    torch.manual_seed(0)
    model = diffusion.make_unet(cfg.model, 1, 28, 10)
    torch.nn.init.normal_(model.conv_out.weight, std=0.02)
    ddpm = diffusion.DDPM()
    variants = {OLD: False}  # the old sampler first
    variants.update({(name, b): autocast for name, autocast in (("float32", False), ("bf16", True))
                     for b in args.batches})
    preset = ("bf16" if cfg.autocast else "float32", samplers.CPU_BATCH)  # what train.py runs
    variants.setdefault(preset, cfg.autocast)

    def run(batch, autocast):
        labels = torch.arange(batch) % 10
        samplers.sample(ddpm, model, labels, torch.Generator().manual_seed(0), steps=args.steps,
                        guidance=GUIDANCE, batch_size=batch, autocast=autocast,
                        solver=cfg.solver)

    for (_, batch), autocast in variants.items():
        run(min(batch, 20), autocast)  # kernels set up: untimed
    seconds_per_image = {key: [] for key in variants}
    for _ in range(args.reps):
        for key, autocast in variants.items():
            started = time.perf_counter()
            run(key[1], autocast)
            seconds_per_image[key].append((time.perf_counter() - started) / key[1])
    # images/s at OLD_STEPS steps
    rate = {key: args.steps / OLD_STEPS / statistics.median(s)
            for key, s in seconds_per_image.items()}
    at_preset = OLD_STEPS / (cfg.sample_steps or ddpm.num_steps)  # 0: ancestral, T steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; guidance "
          f"{GUIDANCE}, {args.steps} steps timed; images/s at {OLD_STEPS} steps and at the "
          f"preset's {cfg.solver} with {cfg.sample_steps} steps")
    print(f"old: float32 batch {OLD[1]}, DDIM {OLD_STEPS} steps: {rate[OLD]:6.2f} images/s")
    for key in list(variants)[1:]:
        print(f"{key[0]:8s} batch {key[1]:5d}: {rate[key]:6.2f} images/s "
              f"({rate[key] / rate[OLD]:.2f}x the old) | at the preset's steps "
              f"{rate[key] * at_preset:6.2f} ({rate[key] * at_preset / rate[OLD]:.2f}x)")
    fastest = max(rate, key=rate.get)
    print(f"fastest: {fastest[0]}, batch {fastest[1]}; the preset's: {preset[0]}, batch "
          f"{preset[1]}")
    print(f"RESULT sampling_speedup={rate[preset] * at_preset / rate[OLD]:.2f} "
          f"per_step={rate[preset] / rate[OLD]:.2f}")


if __name__ == "__main__":
    main()
