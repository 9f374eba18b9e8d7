"""Benchmark of dpsgd.dp_step against the fastest plain (non-private) training step.

    python bench/dp_step_speed.py [--batch 256] [--draws 1] [--chunk 64] [--reps 5] [--profile]
                                  [--float32-only] [--channels-last] [--compile]

Model: the UNet the CPU preset trains (diffusion.make_unet("small", 1, 28, 10)), with the
diffusion loss averaged over K noise draws (noise multiplicity). Inputs are random images:
the cost of a step does not depend on pixel values.

* Speed: plain steps (chunked forward/backward of the mean loss, then Adam) and DP steps
  (per-example gradients, clipping, noise, Adam) on the same logical batch, each in float32
  and under bf16 autocast, each at several physical chunk sizes, all timed round-robin in one
  process so that machine load hits every variant alike. The headline is the fastest DP
  variant against the fastest plain variant (the honest comparison: a user without privacy
  would pick the fastest plain step); the old same-dtype, same-chunk float32 ratio is kept.
  Ratios are medians of the per-round ratios.
* Memory: one DP step at logical batch 512 and at 4096, each in a fresh subprocess; the peak
  is the growth of the resident set (ru_maxrss) over the resident set just before the step,
  i.e. what the step itself needs on top of the model and the batch's inputs.

The last line is `RESULT dp_over_best_plain=<r> dp_over_plain_same_dtype=<r>
peak_mib_512=<MiB> peak_mib_4096=<MiB>` (ratios of step times: 1.43 is 0.7x the throughput).
"""
import argparse
import copy
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
    edm = diffusion.EDM()
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, 1, 28, 28, generator=g) * 2 - 1
    labels = torch.randint(0, 10, (batch,), generator=g)
    y_in, sigma_draws, noise = edm.draw_inputs(labels, draws, (1, 28, 28), g)
    return model, edm, (x0, y_in, sigma_draws, noise)


def plain_step(model, optimizer, loss_fn, tensors, chunk, autocast):
    """The non-private baseline: gradients of the batch mean, `chunk` examples per pass."""
    optimizer.zero_grad(set_to_none=True)
    n = len(tensors[0])
    for s in range(0, n, chunk):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model, *(t[s:s + chunk] for t in tensors)).sum() / n
        loss.backward()
    optimizer.step()


def time_speed(args):
    """Every step variant (plain or DP, float32 or bf16 autocast, each physical chunk size)
    timed round-robin in one process on one model, so machine load hits all alike. Returns
    (DP's best over plain's best, DP over plain in float32 at --chunk), each the median of the
    per-round ratios."""
    model, edm, tensors = setup(args.batch, args.draws)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    # --channels-last: the same model and images in channels-last memory layout, float32
    layout_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    layout_optimizer = torch.optim.Adam(layout_model.parameters(), lr=1e-5)
    noise_gen = torch.Generator().manual_seed(1)
    n = len(tensors[0])

    def plain(chunk, autocast, net=model, opt=optimizer):
        return lambda batch: plain_step(net, opt, edm.loss, batch, chunk, autocast)

    def dp(chunk, autocast, net=model, opt=optimizer):
        return lambda batch: dpsgd.dp_step(net, opt, edm.loss, batch, clip_norm=1.0,
                                           sigma=1.0, expected_batch_size=n,
                                           noise_generator=noise_gen, chunk_size=chunk,
                                           autocast=autocast)

    # --compile: a copy of the model under torch.compile (the DP step's vmap then traces the
    # compiled module); compiling happens in the untimed first call and is timed there
    compiled_model = torch.compile(copy.deepcopy(model)) if args.compile else None
    compiled_optimizer = (torch.optim.Adam(compiled_model.parameters(), lr=1e-5)
                          if args.compile else None)

    def channels_last(step):  # the images in channels-last layout too
        return lambda batch: step((batch[0].contiguous(memory_format=torch.channels_last),
                                   *batch[1:]))

    variants = {}
    for kind, make, chunks in (("plain", plain, args.plain_chunks), ("dp", dp, args.dp_chunks)):
        for autocast in (False,) if args.float32_only else (False, True):
            for chunk in chunks:
                variants[(kind, "bf16" if autocast else "fp32", chunk)] = make(chunk, autocast)
        for chunk in chunks if args.channels_last else ():
            variants[(kind, "fp32-cl", chunk)] = channels_last(
                make(chunk, False, layout_model, layout_optimizer))
        for chunk in chunks if args.compile else ():
            variants[(kind, "fp32-co", chunk)] = make(chunk, False, compiled_model,
                                                      compiled_optimizer)
    for key, step in variants.items():
        started = time.perf_counter()
        step(tensors)  # traces vmap, compiles, sets up kernels: untimed in the rounds below
        if key[1] == "fp32-co":
            print(f"{key[0]:5s} {key[1]:7s} chunk {key[2]:4d}: first step (compiling) "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    times = {key: [] for key in variants}
    for _ in range(args.reps):
        for key, step in variants.items():
            started = time.perf_counter()
            step(tensors)
            times[key].append(time.perf_counter() - started)
    median = {key: statistics.median(t) for key, t in times.items()}
    for key in variants:
        print(f"{key[0]:5s} {key[1]:7s} chunk {key[2]:4d}: {n / median[key]:7.1f} examples/s "
              f"({n * args.draws / median[key]:7.1f} images/s)", flush=True)
    best = {kind: min((key for key in variants if key[0] == kind), key=median.get)
            for kind in ("plain", "dp")}
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))
    same = (("dp", "fp32", args.chunk), ("plain", "fp32", args.chunk))
    for kind, key in best.items():
        print(f"fastest {kind}: {key[1]}, chunk {key[2]}", flush=True)
    print(f"fastest dp / fastest plain: {ratio(best['dp'], best['plain']):.2f} (time per step); "
          f"dp / plain, float32, chunk {args.chunk}: {ratio(*same):.2f}", flush=True)
    return ratio(best["dp"], best["plain"]), ratio(*same)


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(args):
    """One DP step at logical batch args.memory_child; prints JSON with the peak RSS growth."""
    model, edm, tensors = setup(args.memory_child, args.draws)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    before = rss_mib()
    started = time.perf_counter()
    dpsgd.dp_step(model, optimizer, edm.loss, tensors, clip_norm=1.0, sigma=1.0,
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
    """torch.profiler tables of one plain and one DP step at --chunk (bf16 with --autocast)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    model, edm, tensors = setup(args.batch, args.draws)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    steps = {"plain": lambda: plain_step(model, optimizer, edm.loss, tensors, args.chunk,
                                         args.autocast),
             "dp": lambda: dpsgd.dp_step(model, optimizer, edm.loss, tensors, 1.0, 1.0,
                                         args.batch, torch.Generator(), args.chunk, args.autocast)}
    for name, step in steps.items():
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"===== {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total",
                                                           row_limit=15))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="logical batch for the speed test")
    parser.add_argument("--draws", type=int, default=1,
                        help="noise draws K per example (CPU preset: 1)")
    parser.add_argument("--chunk", type=int, default=64,
                        help="the chunk of the same-dtype ratio, the memory test and --profile "
                             "(CPU preset: 64)")
    parser.add_argument("--plain-chunks", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--dp-chunks", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--reps", type=int, default=5, help="timed rounds over all variants")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--autocast", action="store_true", help="--profile under bf16 autocast")
    parser.add_argument("--float32-only", action="store_true",
                        help="leave out the bf16 variants (on a CPU without bf16 kernels they are "
                             "emulated, 14x slower)")
    parser.add_argument("--channels-last", action="store_true",
                        help="also time the float32 steps in channels-last memory layout")
    parser.add_argument("--compile", action="store_true",
                        help="also time the float32 steps of a torch.compile'd model")
    parser.add_argument("--memory-batches", type=int, nargs=2, default=[512, 4096])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler tables and exit")
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
          f"K = {args.draws} draws; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    over_best, over_same = time_speed(args)
    peaks = ([float("nan")] * 2 if args.skip_memory
             else [measure_memory(args, b) for b in args.memory_batches])
    print(f"RESULT dp_over_best_plain={over_best:.2f} dp_over_plain_same_dtype={over_same:.2f} "
          f"peak_mib_{args.memory_batches[0]}={peaks[0]:.0f} "
          f"peak_mib_{args.memory_batches[1]}={peaks[1]:.0f}")


if __name__ == "__main__":
    main()
