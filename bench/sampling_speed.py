"""Benchmark of the CPU preset's sampler: images per second, float32 against bf16 autocast.

    python bench/sampling_speed.py [--steps 2] [--batches 50 100 250] [--reps 3]

The sampler is the CPU preset's (settings.CPU: the small UNet, DDIM, guidance w, so each step
runs the network on 2 x batch images). Its cost is the same at every step, so it is timed on
--steps steps and reported as images/s at the preset's number of steps (cpu preset:
settings.CPU.sample_steps); the weights are random, which does not change the cost.
The old sampler (float32, 500 images per network pass, the default until 2026-11-29) and
each variant are timed round-robin in one process. Quality is not measured here (see
bench/sampler_quality.py and the README).

The last line is `RESULT sampling_speedup=<fastest variant's images/s over the old sampler's>`.
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

OLD = ("float32", 500)  # the sampler before: float32, 500 images per network pass


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

    def run(batch, autocast):
        labels = torch.arange(batch) % 10
        samplers.sample(ddpm, model, labels, torch.Generator().manual_seed(0), steps=args.steps,
                        guidance=cfg.guidance, batch_size=batch, autocast=autocast)

    for (_, batch), autocast in variants.items():
        run(min(batch, 20), autocast)  # kernels set up: untimed
    seconds_per_image = {key: [] for key in variants}
    for _ in range(args.reps):
        for key, autocast in variants.items():
            started = time.perf_counter()
            run(key[1], autocast)
            seconds_per_image[key].append((time.perf_counter() - started) / key[1])
    scale = args.steps / cfg.sample_steps  # per-image time at the preset's steps
    rate = {key: scale / statistics.median(s) for key, s in seconds_per_image.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; DDIM, guidance "
          f"{cfg.guidance}, {args.steps} steps timed, shown at {cfg.sample_steps} steps")
    for key in variants:
        print(f"{key[0]:8s} batch {key[1]:5d}: {rate[key]:6.2f} images/s "
              f"({rate[key] / rate[OLD]:.2f}x the old)")
    fastest = max(rate, key=rate.get)
    print(f"fastest: {fastest[0]}, batch {fastest[1]}")
    print(f"RESULT sampling_speedup={rate[fastest] / rate[OLD]:.2f}")


if __name__ == "__main__":
    main()
