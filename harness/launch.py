"""train.py's command line: a new or resumed run in its locked folder, and how it ends.

`main` does, in this order and before any mechanism runs: read the flags (flags.py); join
torchrun's processes (team.py); lock and read a resumed run's folder (runs.py); settle the
device, the settings and the data (the official files, data.py); make or check the privacy plan
(a resumed run must be resumed on the data and settings it was planned for); check that FID's
weights are there; prepare and lock a new run's folder. Any problem there is one line and exit
status 2, and nothing is written. Then train.py's stages run; each way they can end is one line
and an exit status: 0 done, 2 an error (the run so far is saved), 130 stopped by a signal (the
run is checkpointed and resumes with --resume).
"""
import contextlib
import os
import sys

import torch

import dpsgd
import inception
from harness import cli, data, flags, runs, team


def main(argv, description, privacy_plan, new_run, train, post_process):
    """train.py's main: privacy_plan(cfg, n) plans a new run, new_run(cfg, plan, folder, device,
    seed) builds one, train(run, images, labels) runs the stages that train (on every process)
    and post_process(run) those that only read the trained model (on one)."""
    cli.keep_freed_memory()  # speed only: millions of page faults without it
    args = flags.parse_args(argv, description=description)
    processes = team.Team()  # torchrun's processes; with one process it does nothing
    # One run per folder: its lock (runs.lock_folder) is held from before the run reads or
    # writes its folder until it ends, whichever way it ends.
    with contextlib.ExitStack() as held:
        try:
            processes.start()
            state = runs.resume(args.resume, held, processes.is_main)  # None: a new run
            options = flags.options_of(args, state, processes.device_of)
            cfg = flags.settings_of(args, state, options["device"])
            flags.check_settings(cfg)
            sensitive_images, sensitive_labels = load_sensitive_data(cfg, options)
            n = len(sensitive_images)  # public, like the dataset's name
            digest = data.digest(sensitive_images, sensitive_labels)  # private: the checkpoint's
            plan = plan_of(privacy_plan, cfg, state, n, digest, args.resume)
            if cfg.fid_n and (state is None or state["stage"] != "done") and processes.is_main:
                inception.load_inception(options["inception"])  # missing weights: fail now
            run = start_run(new_run, args, options, cfg, plan, state, digest, processes, held)
        except (ValueError, OSError, data.DataError, inception.WeightsError) as e:
            print(f"error: {e}", file=sys.stderr)
            run = None
        if not processes.all_ok(run is not None):  # with torchrun, a failure anywhere stops all
            processes.finish()
            return 2
        # Every process starts from rank 0's weights and generator states (its secret one too).
        run.align_processes()
        run.stop = processes.stop_together(runs.install_ctrl_c())
        return train_to_the_end(run, sensitive_images, sensitive_labels, train, post_process)


def load_sensitive_data(cfg, options):
    """The training images and labels (the first cfg.train_subset of them, 0: all)."""
    sensitive_images, sensitive_labels = data.load(cfg.dataset, "train", options["data_dir"],
                                                   options["trust_data_files"])
    subset = slice(cfg.train_subset or None)
    return sensitive_images[subset], sensitive_labels[subset]


def plan_of(privacy_plan, cfg, state, n, digest, folder):
    """The privacy plan: a new run's (privacy_plan), or a resumed run's own, refused unless it
    was made for these n training images (their digest) and these settings. n is public."""
    plan = privacy_plan(cfg, n) if state is None else state["plan"]
    if plan["n"] != n:
        raise ValueError(f"--data-dir: the run was planned for {plan['n']} training images, "
                         f"found {n}")
    if state is not None and state.get("data_sha256") not in (None, digest):  # None: old
        raise ValueError(f"--data-dir: these are not the training images of {folder} "
                         f"(their digest differs); resume on the data it was trained on")
    if (plan["dpsgd"] is not None) != cfg.dpsgd:
        raise ValueError(f"--resume: the privacy plan of {folder} does not match its "
                         f"settings (DP-SGD {'off' if cfg.dpsgd else 'on'} in the plan)")
    if cfg.delta >= 1 / n:
        print(f"warning: delta={cfg.delta:g} is not below 1/N = {1 / n:.2g}: a mechanism "
              f"that publishes one random record would meet it")
    return plan


def start_run(new_run, args, options, cfg, plan, state, digest, processes, held):
    """The run in its folder (a new one's prepared and locked, see runs.prepare_folder), at its
    start or where its checkpoint `state` left it; checkpointed once, so the folder holds it."""
    if cfg.dpsgd:
        name = f"{cfg.dataset}-eps{cfg.eps:g}" + ("" if cfg.central else "-nocentral")
    else:
        name = f"{cfg.dataset}-nodpsgd"
    folder = args.resume or args.out or os.path.join("runs", name)
    run = new_run(cfg, plan, folder, options["device"], args.seed)
    run.options, run.checkpoint_minutes = options, args.checkpoint_minutes
    run.team, run.writes = processes, processes.is_main  # one process writes the run's files
    if state is not None:
        run.restore(state)
    elif run.writes:
        held.enter_context(runs.prepare_folder(folder, args.overwrite))
    run.data_digest = digest
    stage = runs.STAGES[run.stage]
    if stage == "done":  # a finished run: nothing to run, and its files stay as they are
        print(f"run folder: {folder} (finished: every stage has run)")
        return run
    print(f"run folder: {folder} (stage {run.stage + 1} of {len(runs.STAGES) - 1}, {stage}, "
          f"step {run.step})")
    run.checkpoint()
    return run


def train_to_the_end(run, sensitive_images, sensitive_labels, train, post_process):
    """The stages, with each way they can end as one line and an exit status. Synthesis and
    evaluation post-process the trained weights: after DP-SGD the processes part, and rank 0
    alone goes on."""
    try:
        train(run, sensitive_images, sensitive_labels)
        run.team.finish()
        if run.team.is_main:
            post_process(run)
    except runs.NotFinite as e:  # resuming would repeat it: its own advice
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, data.DataError, inception.WeightsError) as e:
        print(f"error: {e}; the run so far is saved: fix this, then continue with --resume "
              f"{run.folder}", file=sys.stderr)
        return 2
    except runs.StopRequested:  # the run was checkpointed where it stopped
        print(f"stopped; continue with: python train.py --resume {run.folder}")
        return 130
    finally:
        run.team.finish()
    eps, _ = run.ledger.epsilon()
    print(f"done: ({eps:.4f}, {run.cfg.delta:g})-DP; report in {run.path(runs.REPORT)}")
    return 0


def dpsgd_chunk(model, edm, cfg, image_shape):
    """Examples per per-example-gradient pass: cfg.chunk on a CPU (which has no out-of-memory
    error to catch: Linux ends the process instead); on a GPU, largest_chunk_that_fits."""
    if next(model.parameters()).device.type != "cuda":
        return cfg.chunk
    return largest_chunk_that_fits(model, edm, cfg, image_shape)


def largest_chunk_that_fits(model, edm, cfg, image_shape):
    """cfg.chunk if one pass of it fits in the device's memory, else half the largest chunk
    that fits. A pass holds the activations of chunk x K
    noise-draw images (the paper preset: 256 x 32, about 140 GiB in float32 by the CPU's
    measure, more than most GPUs have). The extra halving is headroom: a real step also holds
    Adam's moments and the noise, and a chunk at the edge of memory could fail hours later.
    The chunk changes neither the gradients nor the privacy, only memory and speed. The probe
    runs on random inputs from its own generator: it sees no sensitive image, so the chunk it
    picks reveals none, and it leaves the run's generators and weights as they were."""
    device = next(model.parameters()).device
    dpsgd.check_per_example_independence(model)  # dp_step's checks, before the probe's pass
    if cfg.autocast:
        dpsgd.check_autocast_support(model)
    probe = torch.Generator().manual_seed(0)
    chunk = cfg.chunk
    while chunk >= 1:
        x0 = torch.rand(chunk, *image_shape, generator=probe) * 2 - 1
        y = torch.randint(edm.num_classes, (chunk,), generator=probe)
        inputs = (x0, *edm.draw_inputs(y, cfg.noise_draws, image_shape, probe))
        try:
            dpsgd.clipped_sum(model, edm.loss, tuple(v.to(device) for v in inputs), cfg.clip,
                              chunk, cfg.autocast)
            fits = chunk if chunk == cfg.chunk else max(1, chunk // 2)
            if fits < cfg.chunk:
                print(f"[DP-SGD] {fits} examples per pass: {cfg.chunk} do not fit in {device} "
                      f"memory with room to spare")
            return fits
        except torch.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()  # outside the except: the failed pass's tensors are freed now
        chunk //= 2
    raise ValueError(f"one example's pass ({cfg.noise_draws} noise draws) does not fit in the "
                     f"memory of {device}")
