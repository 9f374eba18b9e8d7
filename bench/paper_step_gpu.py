"""The paper preset's DP-SGD step on a GPU: noise-draw images per second and peak memory.

    python bench/paper_step_gpu.py [--device cuda] [--batch 1000] [--chunks 32 64 128 256] [--steps 2]

Model and step: the paper UNet (diffusion.make_unet("paper", 1, 28, 10)),
K = 32 noise draws per example, dpsgd.dp_step with Adam, as `train.py --preset paper` runs it.
The logical batch only sets how many chunks a step has (the paper's is 4096; a smaller one
measures the same per-example rate in less time). For each precision (float32, whose
convolutions use TF32 on the GPU by cuDNN's default while matrix products stay float32, and
bfloat16 autocast) and chunk size:
one untimed step, then `--steps` timed ones; a chunk that does not fit in memory is reported
and skipped. `--device cpu` runs the same code on the CPU, where the memory column is the
growth of the process's peak resident set (run one chunk size per call to read it).

First the work: FLOPs per example counted by torch's FlopCounterMode, and the paper protocol's
hours at a few sustained rates. Each row: examples/s, noise-draw images/s (examples x K), the
FLOP rate that achieves, the step's peak GPU memory, and the paper protocol's 2250 steps of
4096 examples projected at that rate on one GPU. The official
code's rate to compare with is about 1,860 noise-draw images/s per A6000 GPU (its published
11 to 20 hours on 3 to 4 GPUs for 150 epochs of 60,000 images x 32 draws).
The last line: `RESULT best_images_per_s=<r> precision=<p> chunk=<c> projected_hours=<h>`.
"""
import argparse
import os
import resource
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo, not bench/

import torch  # noqa: E402

import diffusion  # noqa: E402
import dpsgd  # noqa: E402
import randomness  # noqa: E402

PAPER_STEPS, PAPER_BATCH, DRAWS = 2197, 4096, 32


def one_config(device, batch, chunk, autocast, steps):
    torch.manual_seed(0)
    model = diffusion.make_unet("paper", 1, 28, 10).to(device)
    torch.nn.init.normal_(model.conv_out.weight, std=0.02)  # as after the warm-up (not zero)
    edm = diffusion.EDM(num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    generator = randomness.secret_generator(0)
    x0 = (torch.rand(batch, 1, 28, 28, generator=generator) * 2 - 1).to(device)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    cuda = device.type == "cuda"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    times = []
    for step in range(steps + 1):
        y_in, sigma_draws, noise = edm.draw_inputs(labels, DRAWS, (1, 28, 28), generator)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        dpsgd.dp_step(model, optimizer, edm.loss,
                      (x0, y_in.to(device), t.to(device), noise.to(device)), clip_norm=1.0,
                      sigma=1.0, expected_batch_size=batch, noise_generator=generator,
                      chunk_size=chunk, autocast=autocast)
        if cuda:
            torch.cuda.synchronize(device)
        if step:  # the first step compiles kernels and warms the allocator
            times.append(time.perf_counter() - start)
    if cuda:
        return min(times), torch.cuda.max_memory_allocated(device) / 2 ** 20
    # On the CPU: how far the process's peak resident set grew (only the first configuration
    # of a call, or one larger than all before it, is measured by this).
    return min(times), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before


def flops_per_example():
    """Floating-point operations of one example's forward and backward pass (K draws), as
    torch's FlopCounterMode counts them (convolutions and matrix products, which dominate).
    Per-example weight gradients take the same FLOPs as summed ones (a batched product per
    layer instead of one product), so this is also the DP step's network work per example."""
    from torch.utils.flop_counter import FlopCounterMode
    model = diffusion.make_unet("paper", 1, 28, 10)
    edm = diffusion.EDM(num_classes=10)
    g = torch.Generator().manual_seed(0)
    y_in, sigma_draws, noise = edm.draw_inputs(torch.tensor([3]), DRAWS, (1, 28, 28), g)
    with FlopCounterMode(display=False) as counter:
        edm.loss(model, torch.zeros(1, 1, 28, 28), y_in, sigma_draws, noise).sum().backward()
    return counter.get_total_flops()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=1000, help="logical batch of a timed step")
    p.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128, 256],
                   help="examples per pass (x 32 draws; about 0.55 GiB each in float32 on a CPU)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    parameters = diffusion.count_parameters(diffusion.make_unet("paper", 1, 28, 10))
    flops = flops_per_example()
    total = PAPER_STEPS * PAPER_BATCH * flops
    print(f"torch {torch.__version__}, {name}, batch {args.batch}, K = {DRAWS}, model 'paper' "
          f"({parameters} parameters)\n{flops / 1e9:.1f} GFLOP per example (forward and "
          f"backward, K draws); the paper protocol is {total / 1e15:,.0f} PFLOP of network work: "
          + ", ".join(f"{total / (r * 1e12) / 3600:.1f} h at {r} TFLOP/s sustained"
                      for r in (25, 100, 400)), flush=True)
    best = None
    for autocast in (False, True):
        precision = "bf16 autocast" if autocast else "float32/TF32"
        for chunk in args.chunks:
            try:
                seconds, peak = one_config(device, args.batch, chunk, autocast, args.steps)
            except torch.cuda.OutOfMemoryError:
                print(f"{precision:14s} chunk {chunk:4d}: out of memory", flush=True)
                torch.cuda.empty_cache()
                continue
            rate = args.batch / seconds
            hours = PAPER_STEPS * PAPER_BATCH / rate / 3600
            print(f"{precision:14s} chunk {chunk:4d}: {rate:8.1f} examples/s, "
                  f"{rate * DRAWS:9.0f} noise-draw images/s, {rate * flops / 1e12:7.2f} TFLOP/s, "
                  f"peak {peak:8.0f} MiB, paper protocol {hours:7.1f} h on this device",
                  flush=True)
            if best is None or rate > best[0]:
                best = (rate, precision.split()[0], chunk, hours)
    rate, precision, chunk, hours = best
    print(f"RESULT best_images_per_s={rate * DRAWS:.0f} precision={precision} chunk={chunk} "
          f"projected_hours={hours:.2f}")


if __name__ == "__main__":
    main()
