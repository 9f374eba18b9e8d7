"""Benchmark of dpsgd.dp_step against a plain (non-private) training step.

    python bench/dp_step_speed.py [--batch 256] [--draws 4] [--chunk 32] [--threads N] [--autocast] [--profile]

Model: the UNet the CPU preset trains (diffusion.make_unet("small", 1, 28, 10)), with the
diffusion loss averaged over K noise draws (noise multiplicity). Inputs are random images:
the cost of a step does not depend on pixel values.

* Speed: a plain step (chunked forward/backward of the mean loss, then Adam) and a DP step
  (per-example gradients, clipping, noise, Adam) on the same logical batch with the same
  physical chunk, alternated in one process so both see the same machine load; the ratio is
  the median of the per-pair time ratios. With --autocast, also under bfloat16 autocast.
* Memory: one DP step at logical batch 512 and at 4096, each in a fresh subprocess; the peak
  is the growth of the resident set (ru_maxrss) over the resident set just before the step,
  i.e. what the step itself needs on top of the model and the batch's inputs.

The last line is `RESULT dp_over_plain=<ratio> peak_mib_512=<MiB> peak_mib_4096=<MiB>`.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo, not bench/

import torch  # noqa: E402

import diffusion  # noqa: E402
import dpsgd  # noqa: E402


def setup(batch, draws, seed=0):
    torch.manual_seed(seed)
    model = diffusion.make_unet("small", 1, 28, 10)
    # As after the warm-up: the zero-initialised output layer would make every other gradient 0.
    torch.nn.init.normal_(model.conv_out.weight, std=0.02)
    ddpm = diffusion.DDPM()
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, 1, 28, 28, generator=g) * 2 - 1
    y_in, t, noise = ddpm.draw_inputs(torch.randint(0, 10, (batch,), generator=g), draws,
                                      (1, 28, 28), g)
    return model, ddpm, (x0, y_in, t, noise)


def plain_step(model, optimizer, loss_fn, tensors, chunk, autocast):
    """The non-private baseline: same chunks, gradients of the batch mean, no per-example work."""
    optimizer.zero_grad(set_to_none=True)
    n = len(tensors[0])
    for s in range(0, n, chunk):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model, *(t[s:s + chunk] for t in tensors)).sum() / n
        loss.backward()
    optimizer.step()


def make_steps(model, ddpm, tensors, chunk, autocast):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    noise_gen = torch.Generator().manual_seed(1)
    n = len(tensors[0])
    return {"plain": lambda: plain_step(model, optimizer, ddpm.loss, tensors, chunk, autocast),
            "dp": lambda: dpsgd.dp_step(model, optimizer, ddpm.loss, tensors, clip_norm=1.0,
                                        sigma=1.0, expected_batch_size=n, noise_generator=noise_gen,
                                        chunk_size=chunk, autocast=autocast)}


def time_pair(args, autocast):
    """Alternate plain and DP steps; returns the median step times (wall, CPU) and the median
    per-pair ratio dp / plain."""
    model, ddpm, tensors = setup(args.batch, args.draws)
    for fn in make_steps(model, ddpm, [t[:args.chunk] for t in tensors], args.chunk,
                         autocast).values():
        fn()  # the first calls trace vmap and set up oneDNN kernels: not timed
    steps = make_steps(model, ddpm, tensors, args.chunk, autocast)
    wall, cpu = {"plain": [], "dp": []}, {"plain": [], "dp": []}
    for rep in range(args.reps):
        for name, fn in steps.items():  # alternated, so load changes hit both alike
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    tag = "bf16 autocast" if autocast else "float32"
    for name in steps:
        print(f"{tag:13s} {name:5s}: {args.batch / statistics.median(wall[name]):6.1f} examples/s "
              f"({args.batch * args.draws / statistics.median(wall[name]):6.1f} images/s) wall, "
              f"{args.batch / statistics.median(cpu[name]):6.1f} examples per CPU-second", flush=True)
    ratio = lambda t: statistics.median(d / p for d, p in zip(t["dp"], t["plain"]))
    print(f"{tag:13s} dp/plain: {ratio(wall):.2f} wall, {ratio(cpu):.2f} CPU time", flush=True)
    return statistics.median(wall["plain"]), statistics.median(wall["dp"]), ratio(wall)


def time_speed(args):
    # The two precisions are timed in separate phases: interleaving them in one loop was
    # measured to slow the float32 DP step down (~1.4x -> ~1.6x), a measurement artefact.
    plain32, dp32, ratio32 = time_pair(args, autocast=False)
    if args.autocast:
        plain16, dp16, _ = time_pair(args, autocast=True)
        print(f"dp bf16 autocast / plain float32: {dp16 / plain32:.2f} (median step times)")
    return ratio32


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(args):
    """One DP step at logical batch args.memory_child; prints JSON with the peak RSS growth."""
    model, ddpm, tensors = setup(args.memory_child, args.draws)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    before = rss_mib()
    started = time.perf_counter()
    dpsgd.dp_step(model, optimizer, ddpm.loss, tensors, clip_norm=1.0, sigma=1.0,
                  expected_batch_size=args.memory_child, noise_generator=torch.Generator(),
                  chunk_size=args.chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps(dict(batch=args.memory_child, rss_before_mib=before, peak_rss_mib=peak,
                          growth_mib=peak - before, seconds=time.perf_counter() - started)))


def measure_memory(args, batch):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", str(batch),
           "--draws", str(args.draws), "--chunk", str(args.chunk)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True)
                        .stdout.strip().splitlines()[-1])
    print(f"memory, logical batch {batch}: RSS {result['rss_before_mib']:.0f} MiB before the step, "
          f"peak {result['peak_rss_mib']:.0f} MiB, growth {result['growth_mib']:.0f} MiB "
          f"({result['seconds']:.0f} s)", flush=True)
    return result["growth_mib"]


def profile(args):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    model, ddpm, tensors = setup(args.batch, args.draws)
    for name, fn in make_steps(model, ddpm, tensors, args.chunk, args.autocast).items():
        fn()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"===== {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total",
                                                           row_limit=15))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="logical batch for the speed test")
    parser.add_argument("--draws", type=int, default=4, help="noise draws K per example (CPU preset: 4)")
    parser.add_argument("--chunk", type=int, default=32,
                        help="physical chunk in examples (32 x K=4 draws = 128 images: fastest here)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--autocast", action="store_true",
                        help="also time both steps under bfloat16 autocast (and profile with it)")
    parser.add_argument("--memory-batches", type=int, nargs=2, default=[512, 4096])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables and exit")
    parser.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    if args.profile:
        return profile(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{diffusion.count_parameters(setup(1, 1)[0])} parameters, batch {args.batch}, "
          f"K = {args.draws} draws, chunk {args.chunk}; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    ratio = time_speed(args)
    peaks = ([float("nan")] * 2 if args.skip_memory
             else [measure_memory(args, b) for b in args.memory_batches])
    print(f"RESULT dp_over_plain={ratio:.2f} peak_mib_{args.memory_batches[0]}={peaks[0]:.0f} "
          f"peak_mib_{args.memory_batches[1]}={peaks[1]:.0f}")


if __name__ == "__main__":
    main()
