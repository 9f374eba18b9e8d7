"""DP-FETA end to end: central images -> warm-up -> DP-SGD -> synthesis -> evaluation.

    python train.py --dataset mnist --eps 1

DP-FETA (Li, Gong, Li et al., "From Easy to Hard: Building a Shortcut for Differentially
Private Image Synthesis", S&P 2025) trains one diffusion model in two stages:
  1. easy: release a few noisy per-class means of Poisson samples of the sensitive set (central
     images, central.py) and warm the model up on augmentations of them (post-processing);
  2. hard: train the same model on the sensitive images with DP-SGD (dpsgd.py).
One RDP accountant (accountant.py) composes both mechanisms; the DP-SGD noise is calibrated so
the composition meets the requested (eps, delta). `--no-central` drops stage 1 (the DPDM
baseline); `--no-dpsgd` drops stage 2 and releases the warmed-up model, at the central images'
own epsilon (what the easy stage alone learns). The privacy argument is in the signatures: only
`release_central_images` and `train_dpsgd` are given the sensitive images, and both draw from
the secret generator (randomness.py); the warm-up sees the released central images, synthesis
sees the model.
Every stage checkpoints (runs.py), so `--resume RUN_DIR` continues a run, privacy ledger
included, and ends bit for bit where an uninterrupted run on the same device would.
`torchrun --nproc_per_node=N train.py ...` runs DP-SGD on N processes with the privacy of one
(distributed.py): one Poisson sample and one noise draw per step.
"""
import cli  # first: a Ctrl-C while torch loads is one line (cli.py)
import contextlib
import functools
import os
import secrets
import sys

import torch

import accountant
import central
import classifier
import data
import diffusion
import distributed
import dpsgd
import evaluate
import frequency
import inception
import randomness
import runs
import samplers
import settings


# ------------------------------------------------------------------------------ the privacy plan
def privacy_plan(cfg, n):
    """The mechanisms of the run, and the DP-SGD noise sigma that makes them meet (eps, delta).

    Both sampling rates are the exact inclusion probabilities of randomness.poisson_sample.
    The dataset size n is public (as in the paper): q = batch / n. With --no-dpsgd the central
    images are the only mechanism, and their own epsilon is the run's."""
    central_images = ((randomness.sampling_rate(cfg.central_q), cfg.central_sigma,
                       cfg.central_queries) if cfg.central else None)
    features = (1.0, cfg.frequency_sigma, 1) if cfg.frequency else None  # q = 1: the whole set
    history = [mechanism for mechanism in (central_images, features) if mechanism]
    spent_before, order = accountant.epsilon(history, cfg.delta)
    if spent_before >= cfg.eps:
        raise ValueError(f"--eps {cfg.eps:g} is not above the {spent_before:.4f} that the releases "
                         f"before DP-SGD spend: raise --eps, --central-sigma or --frequency-sigma")
    plan = dict(n=n, delta=cfg.delta, target_eps=cfg.eps, central=central_images,
                frequency=features, dpsgd=None, eps=spent_before, order=order)
    if not cfg.dpsgd:
        return plan
    if cfg.batch > n:
        raise ValueError(f"--batch {cfg.batch} is larger than the {n} training images")
    q, steps = randomness.sampling_rate(cfg.batch / n), max(1, round(cfg.epochs * n / cfg.batch))
    try:
        sigma = accountant.calibrate_sigma(cfg.eps, cfg.delta, q, steps, history=history)
    except ValueError as e:  # out of the calibration's reach: its reason, which names the eps
        raise ValueError(f"--eps {str(e).split(': ', 1)[-1]}") from None
    eps, order = accountant.epsilon(history + [(q, sigma, steps)], cfg.delta)
    return dict(plan, dpsgd=dict(q=q, sigma=sigma, steps=steps), eps=eps, order=order)


def print_plan(plan):
    print(f"privacy plan for {plan['n']} sensitive images, delta={plan['delta']:g}:")
    if plan["central"]:
        q, sigma_c, queries = plan["central"]
        print(f"  central images: {queries} Poisson-subsampled Gaussian queries, q={q:g}, "
              f"sigma_c={sigma_c:g}")
    if plan.get("frequency"):  # plans made before the frequency stage have no entry
        print(f"  frequency features: one Gaussian release of the whole set, "
              f"sigma_f={plan['frequency'][1]:g}")
    d = plan["dpsgd"]
    if d:
        print(f"  DP-SGD: {d['steps']} steps, q={d['q']:.5g}, noise multiplier "
              f"sigma={d['sigma']:.4g}")
    else:
        print("  no DP-SGD (--no-dpsgd): the warmed-up model is the release")
    print(f"  composed: eps={plan['eps']:.4f} <= {plan['target_eps']:g} "
          f"(best RDP order {plan['order']:g})")


# ------------------------------------------------------------------------------ the stages
def release_central_images(sensitive_images, sensitive_labels, cfg, secret):
    """Easy stage, release: T noisy per-class means of Poisson samples (central.py).
    One of the two functions given the sensitive set; it draws from the secret generator."""
    return central.central_images(sensitive_images, sensitive_labels,
                                  data.INFO[cfg.dataset]["classes"], q=cfg.central_q,
                                  sigma=cfg.central_sigma, queries=cfg.central_queries,
                                  generator=secret)


def warm_up(model, optimizer, central_images, central_labels, cfg, ddpm, public, first_step,
            progress):
    """Easy stage, learning: the diffusion loss on freshly augmented central images. It reads
    only the release, so it is post-processing and costs no privacy; it draws from the public
    generator."""
    device = next(model.parameters()).device
    pool_images, pool_labels = central_images.to(device), central_labels.to(device)
    for step in range(first_step, cfg.warmup_steps):
        pick = torch.randint(len(pool_images), (cfg.warmup_batch,), generator=public,
                             device=public.device).to(device)
        augmented = central.augment(pool_images[pick], public)
        x0 = diffusion.to_model_range(augmented)
        y_in, t, noise = ddpm.draw_inputs(pool_labels[pick], 1, x0.shape[1:], public)
        loss = ddpm.loss(model, x0, y_in, t, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress(step + 1, f" | loss {loss.item():.4f}")


def release_frequency_features(sensitive_images, sensitive_labels, cfg, secret, seed):
    """FETA-Pro's frequency stage, release (an option, --frequency): one Gaussian release of
    the per-class sums of the images' random Fourier features (frequency.py). The third
    function given the sensitive set; its noise comes from the secret generator, its
    frequencies from the public `seed`."""
    return frequency.release(sensitive_images, sensitive_labels, data.INFO[cfg.dataset]["classes"],
                             cfg.frequency_sigma, seed, secret)


def warm_up_on_features(model, optimizer, image_generator, cfg, ddpm, public, first_step,
                        progress):
    """FETA-Pro's frequency stage, learning: the diffusion loss on fresh images of the generator
    fitted to the released features, no augmentation. Post-processing, like the first warm-up;
    it draws from the public generator."""
    for step in range(first_step, cfg.frequency_steps):
        with torch.no_grad():
            images, labels = image_generator.draw(cfg.warmup_batch, public)
        x0 = diffusion.to_model_range(images.clamp(0, 1))
        y_in, t, noise = ddpm.draw_inputs(labels, 1, x0.shape[1:], public)
        loss = ddpm.loss(model, x0, y_in, t, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress(step + 1, f" | loss {loss.item():.4f}")


def largest_chunk_that_fits(model, ddpm, cfg, image_shape):
    """Examples per per-example-gradient pass on a GPU: cfg.chunk if one pass fits in its
    memory, else half the largest chunk that fits. A pass holds the activations of chunk x K
    noise-draw images (the paper preset: 256 x 32, about 140 GiB in float32 by the CPU's
    measure, more than most GPUs have). The extra halving is headroom: a real step also holds
    Adam's moments and the noise, and a chunk at the edge of memory could fail hours later.
    The chunk changes neither the gradients nor the privacy, only memory and speed. The probe
    runs on random inputs from its own generator: it sees no sensitive image, so the chunk it
    picks reveals none, and it leaves the run's generators and weights as they were."""
    dpsgd.check_per_example_independence(model)  # dp_step's checks, before the probe's pass
    if cfg.autocast:
        dpsgd.check_autocast_support(model)
    device = next(model.parameters()).device
    probe = torch.Generator().manual_seed(0)
    chunk = cfg.chunk
    while chunk >= 1:
        x0 = torch.rand(chunk, *image_shape, generator=probe) * 2 - 1
        y = torch.randint(ddpm.num_classes, (chunk,), generator=probe)
        inputs = (x0, *ddpm.draw_inputs(y, cfg.noise_draws, image_shape, probe))
        try:
            dpsgd.clipped_sum(model, ddpm.loss, tuple(v.to(device) for v in inputs), cfg.clip,
                              chunk, cfg.autocast)
            return chunk if chunk == cfg.chunk else max(1, chunk // 2)
        except torch.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()  # outside the except: the failed pass's tensors are freed now
        chunk //= 2
    raise ValueError(f"one example's pass ({cfg.noise_draws} noise draws) does not fit in the "
                     f"memory of {device}")


def train_dpsgd(model, optimizer, ema, sensitive_images, sensitive_labels, cfg, plan, ddpm,
                secret, ledger, first_step, progress, team):
    """Hard stage: DP-SGD on the sensitive images (dpsgd.py), one ledger entry per step.
    The other function given the sensitive set; every draw (Poisson sample, diffusion noise,
    Gaussian noise) comes from the secret generator.
    With several processes (`team`, distributed.py) all hold the same secret-generator state,
    so they draw the same sample, the same diffusion inputs and the same noise; each computes
    the clipped gradients of its share of the sample, and dp_step adds the shares' sums."""
    device = next(model.parameters()).device
    x_all = diffusion.to_model_range(sensitive_images).to(device)
    n, q, sigma, steps = len(x_all), plan["q"], plan["sigma"], plan["steps"]
    # (A CPU has no out-of-memory error to catch: Linux ends the process instead.)
    chunk = (largest_chunk_that_fits(model, ddpm, cfg, x_all.shape[1:]) if device.type == "cuda"
             else cfg.chunk)
    if chunk < cfg.chunk:
        print(f"[DP-SGD] {chunk} examples per pass: {cfg.chunk} do not fit in {device} memory "
              f"with room to spare")
    for step in range(first_step, steps):
        batch = randomness.poisson_sample(n, q, secret).nonzero().flatten()
        # Drawn for the whole sample on every process (on the CPU), which keeps the secret
        # generators in step; this process uses positions rank, rank + N, ... of it. A share
        # may be empty: the process still takes part in the step.
        y_in, t, noise = ddpm.draw_inputs(sensitive_labels[batch], cfg.noise_draws,
                                          x_all.shape[1:], secret)
        share = team.share
        x0 = x_all[batch[share].to(device)]
        inputs = (x0, *(v[share].to(device) for v in (y_in, t, noise)))
        dpsgd.dp_step(model, optimizer, ddpm.loss, inputs, clip_norm=cfg.clip,
                      sigma=sigma, expected_batch_size=q * n, noise_generator=secret,
                      chunk_size=chunk, autocast=cfg.autocast,
                      sum_over_processes=team.sum_over_processes)
        ledger.add("DP-SGD", q, sigma, 1)
        ema.update(model)
        # Only accounted quantities are shown: the batch's loss and its realised size are
        # statistics of the sensitive data that no mechanism privatised (logs get shared).
        progress(step + 1, lambda: f" | eps spent {ledger.epsilon()[0]:.3f}/{cfg.eps:g}")
    team.check_same_weights(model)


def synthesize(model, cfg, ddpm, public, pieces, progress):
    """cfg.n_samples images with uniformly random labels from the (EMA) model, drawn by the one
    sampling loop (samplers.sample_uniform) and appended batch by batch to `pieces`
    [(uint8 images, labels)], with a progress call (a checkpoint, a stop) after each batch: a
    resumed run continues the loop where it stopped. Post-processing of the trained weights;
    it draws from the public generator."""
    done = sum(len(labels) for _, labels in pieces)
    for images, labels in samplers.sample_uniform(ddpm, model, cfg.n_samples - done, public,
                                                  **samplers.settings_of(cfg)):
        pieces.append((images, labels))
        done += len(labels)
        progress(done)


def evaluate_release(images, labels, cfg, real_data, device, weights, fid_cache, progress):
    """Accuracy of a classifier trained on the synthetic images only (tested once on the real
    test set), and FID against the first fid_n real training images. Both read real data outside
    the guarantee, as in the paper: they measure the release, they are not part of it.
    real_data(split): the dataset's images and labels (data.load)."""
    test_images, test_labels = real_data("test")
    metrics = dict(accuracy=classifier.classifier_accuracy(
        images, labels, test_images, test_labels, data.INFO[cfg.dataset]["classes"],
        cfg.classifier_epochs, lr=cfg.classifier_lr, seed=0, device=device, progress=progress))
    print(f"[evaluate] accuracy on the real test set: {metrics['accuracy']['test_accuracy']:.4f}")
    if cfg.fid_n:
        real = real_data("train")[0][:cfg.train_subset or None]
        n_fake, n_real = min(cfg.fid_n, len(images)), min(cfg.fid_n, len(real))
        value = evaluate.fid(images[:n_fake], real[:n_real], device=device, weights=weights,
                             reference_cache=fid_cache(n_real), progress=progress)
        metrics["fid"] = dict(value=value, n_generated=n_fake, n_real=n_real,
                              real="first images of the training set")
        print(f"[evaluate] FID {value:.2f} ({n_fake} generated vs {n_real} training images)")
    return metrics


def save_sample_grid(model, cfg, ddpm, public, path):
    """Ten samples per class, one row per class."""
    labels = torch.arange(data.INFO[cfg.dataset]["classes"], device=public.device)
    images = samplers.sample(ddpm, model, labels.repeat_interleave(10), public,
                             **samplers.settings_of(cfg))
    data.save_grid(images, path, nrow=10)


# ------------------------------------------------------------------------------ one run
def load_sensitive_data(cfg, options):
    """The training images and labels (the first cfg.train_subset of them, 0: all)."""
    images, labels = data.load(cfg.dataset, "train", options["data_dir"],
                               options["trust_data_files"])
    subset = slice(cfg.train_subset or None)
    return images[subset], labels[subset]


def plan_of(cfg, state, n, digest, folder):
    """The privacy plan: a new run's (privacy_plan), or a resumed run's own, refused unless it
    was made for these n training images (their digest) and these settings."""
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


def new_run(cfg, plan, folder, device, seed):
    """A run at its start: initial weights, optimizer, EMA, generators, an empty ledger."""
    info = data.INFO[cfg.dataset]
    torch.manual_seed(0)  # the initial weights only: public, the same for every run
    model = diffusion.make_unet(cfg.model, info["channels"], info["size"], info["classes"])
    model = model.to(device)
    # The secret generator draws the mechanisms' Poisson samples and noise (randomness.py); the
    # public one draws what the release shows (warm-up, sample labels, sampler noise).
    # Independent, so that published outputs reveal nothing about the secret state.
    secret = randomness.secret_generator(seed)
    public = torch.Generator(device).manual_seed(
        secrets.randbits(63) if seed is None else (seed + 1) % 2 ** 64)
    return runs.Run(folder, cfg, plan, device, model,
                    diffusion.make_diffusion(cfg.formulation, info["classes"], cfg.timesteps),
                    *fresh_optimizer_and_ema(model, cfg), secret, public, seed is not None,
                    accountant.PrivacyLedger(cfg.delta))


def fresh_optimizer_and_ema(model, cfg):
    return torch.optim.Adam(model.parameters(), lr=cfg.lr), diffusion.EMA(model, cfg.ema)


def start_run(args, options, cfg, plan, state, digest, team, held):
    """The run in its folder (a new one's prepared and locked, see runs.prepare_folder), at its
    start or where its checkpoint `state` left it; checkpointed once, so the folder holds it."""
    if cfg.dpsgd:
        name = f"{cfg.dataset}-eps{cfg.eps:g}" + ("" if cfg.central else "-nocentral")
    else:
        name = f"{cfg.dataset}-nodpsgd"
    folder = args.resume or args.out or os.path.join("runs", name)
    run = new_run(cfg, plan, folder, options["device"], args.seed)
    run.options, run.checkpoint_minutes = options, args.checkpoint_minutes
    run.writes = team.is_main  # one process writes the run's files
    if state is not None:
        run.restore(state)
    elif run.writes:
        held.enter_context(runs.prepare_folder(folder, args.overwrite))
    run.data_digest = digest
    print_plan(plan)
    stage = runs.STAGES[run.stage]
    if stage == "done":  # a finished run: nothing to run, and its files stay as they are
        print(f"run folder: {folder} (finished: every stage has run)")
        return run
    print(f"run folder: {folder} (stage {run.stage + 1} of {len(runs.STAGES) - 1}, {stage}, "
          f"step {run.step})")
    run.checkpoint()
    return run


def train(run, sensitive_images, sensitive_labels, team):
    """The five stages, in the paper's order; run.run_stage skips those a resumed run has done
    and checkpoints after each one. `team`: the processes (distributed.py; one: no-ops)."""
    cfg = run.cfg

    def central_images():
        if not cfg.central:
            return
        # With several processes rank 0 alone draws the release (one draw of the mechanism)
        # and the others receive it; every process's ledger counts it once.
        release = (release_central_images(sensitive_images, sensitive_labels, cfg, run.secret)
                   if team.is_main else None)
        images, labels, mechanism = team.from_rank0(release)
        run.ledger.add("central images", *mechanism)
        run.central = (images.cpu(), labels.cpu())
        order = labels.argsort(stable=True)  # one row per class
        if run.writes:
            data.save_grid(images[order], run.path("central_images.png"), nrow=cfg.central_queries)
        print(f"[central] {len(images)} central images -> {run.path('central_images.png')}; "
              f"eps spent {run.ledger.epsilon()[0]:.3f}")

    def frequency_features():
        if not cfg.frequency:
            return
        seed = int(torch.randint(2 ** 62, (1,), generator=run.public))  # W's: public
        release = (release_frequency_features(sensitive_images, sensitive_labels, cfg,
                                              run.secret, seed) if team.is_main else None)
        table, mechanism = team.from_rank0(release)
        run.ledger.add("frequency features", *mechanism)
        run.features = (table.cpu(), seed)
        print(f"[frequency] released a {tuple(table.shape)} table of random Fourier features; "
              f"eps spent {run.ledger.epsilon()[0]:.3f}")

    def warm():
        if cfg.central and cfg.warmup_steps:
            # Post-processing and cheap: every process runs the same steps from the same state.
            warm_up(run.model, run.optimizer, *run.central, cfg, run.ddpm, run.public, run.step,
                    run.progress(cfg.warmup_steps))
            if run.writes:
                save_sample_grid(run.model, cfg, run.ddpm, run.public,
                                 run.path("warmup_samples.png"))

    def warm_on_features():
        if cfg.frequency:
            # The generator is fitted again when a stopped stage resumes: the same table and
            # seed give the same generator, so only its time is spent twice.
            info = data.INFO[cfg.dataset]
            table, seed = run.features
            fit_progress = run.progress(cfg.generator_steps, keeps_step=True)
            image_generator = frequency.fit_generator(
                table, info["classes"], (info["channels"], info["size"], info["size"]), seed,
                cfg.generator_steps, progress=fit_progress)
            if run.writes and run.step == 0:
                grid, _ = image_generator.draw(10 * info["classes"], torch.Generator().manual_seed(0),
                                               torch.arange(info["classes"]).repeat_interleave(10))
                data.save_grid(grid, run.path("feature_samples.png"), nrow=10)
            warm_up_on_features(run.model, run.optimizer, image_generator, cfg, run.ddpm,
                                run.public, run.step, run.progress(cfg.frequency_steps))
            if run.writes:
                save_sample_grid(run.model, cfg, run.ddpm, run.public,
                                 run.path("warmup_samples.png"))
        start_dpsgd()

    def start_dpsgd():
        # DP-SGD starts from the raw warmed-up weights, with a fresh optimizer and EMA: on
        # every process rank 0's weights and generator states (it alone drew the central
        # images and the grid, and GPU kernels need not be bit-reproducible).
        team.take_rank0_state(run.model, run.secret, run.public)
        run.optimizer, run.ema = fresh_optimizer_and_ema(run.model, cfg)

    def dp_sgd():
        # With --no-dpsgd the EMA, fresh from the warmed-up weights, is what gets sampled.
        if cfg.dpsgd:
            # Nothing is shown or written inside a block of DP-SGD steps, and a stop waits for
            # the block's end (runs.Progress): a step's time grows with its secret batch size.
            train_dpsgd(run.model, run.optimizer, run.ema, sensitive_images, sensitive_labels,
                        cfg, run.plan["dpsgd"], run.ddpm, run.secret, run.ledger, run.step,
                        run.progress(run.plan["dpsgd"]["steps"], runs.DPSGD_BLOCK), team)

    def synthesis():
        synthesize(run.ema.model, cfg, run.ddpm, run.public, run.pieces,
                   run.progress(cfg.n_samples))
        evaluate.save_samples(run.path("samples.npz"), torch.cat([p[0] for p in run.pieces]),
                              torch.cat([p[1] for p in run.pieces]))
        save_sample_grid(run.ema.model, cfg, run.ddpm, run.public, run.path("samples.png"))
        data.save_side_by_side([("central images", run.path("central_images.png")),
                                ("frequency generator", run.path("feature_samples.png")),
                                ("after the warm-up", run.path("warmup_samples.png")),
                                ("final samples", run.path("samples.png"))],
                               run.path("stages.png"))

    def evaluation():
        def stop_point(message):  # evaluation's progress lines are its batch boundaries
            print(message, file=sys.stderr, flush=True)
            if run.stop.requested:
                run.checkpoint()
                raise runs.StopRequested()

        images, labels = evaluate.load_samples(run.path("samples.npz"), cfg.dataset)
        # The real side's FID statistics describe sensitive images: kept in the private run
        # folder, next to the checkpoint.
        fid_cache = lambda n: run.path(f"fid_stats_train_{n}.npz")  # noqa: E731
        real_data = functools.partial(data.load, cfg.dataset, data_dir=run.options["data_dir"],
                                      trust_files=run.options["trust_data_files"])
        run.metrics = evaluate_release(images, labels, cfg, real_data, run.device,
                                       run.options["inception"], fid_cache, stop_point)

    run.run_stage("release_central_images", central_images)
    run.run_stage("release_frequency_features", frequency_features)
    run.run_stage("warm_up", warm)
    run.run_stage("warm_up_on_features", warm_on_features)
    run.run_stage("train_dpsgd", dp_sgd)
    team.finish()  # synthesis and evaluation post-process the trained weights: rank 0 alone
    if team.is_main:
        run.run_stage("synthesize", synthesis)
        run.run_stage("evaluate_release", evaluation)


def main(argv=None):
    cli.keep_freed_memory()  # speed only: up to 100,000 page faults a second without it
    args = settings.parse_args(argv, description=__doc__.split("\n\n")[0])
    team = distributed.Team()  # torchrun's processes; with one process it does nothing
    # One run per folder: its lock (runs.lock_folder) is held from before the run reads or
    # writes its folder until it ends, whichever way it ends.
    with contextlib.ExitStack() as held:
        try:
            team.start()
            state = runs.resume(args.resume, held, team.is_main)  # None: a new run
            options = settings.options_of(args, state, team.device_of)
            cfg = settings.settings_of(args, state, options["device"])
            settings.check_settings(cfg)
            sensitive_images, sensitive_labels = load_sensitive_data(cfg, options)
            n = len(sensitive_images)  # public, like the dataset's name
            digest = data.digest(sensitive_images, sensitive_labels)  # private: the checkpoint's
            plan = plan_of(cfg, state, n, digest, args.resume)
            if cfg.fid_n and (state is None or state["stage"] != "done") and team.is_main:
                inception.load_inception(options["inception"])  # missing weights: fail now
            run = start_run(args, options, cfg, plan, state, digest, team, held)
        except (ValueError, OSError, data.DataError, inception.WeightsError) as e:
            print(f"error: {e}", file=sys.stderr)
            run = None
        if not team.all_ok(run is not None):  # with torchrun, a failure anywhere stops all
            team.finish()
            return 2
        # Every process starts from rank 0's weights and generator states (its secret one too).
        team.take_rank0_state(run.model, run.secret, run.public)
        run.stop = team.stop_together(runs.install_ctrl_c())
        return train_to_the_end(run, sensitive_images, sensitive_labels, team)


def train_to_the_end(run, sensitive_images, sensitive_labels, team):
    """train(), with each way it can end as one line and an exit status."""
    try:
        train(run, sensitive_images, sensitive_labels, team)
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
        team.finish()
    eps, _ = run.ledger.epsilon()
    print(f"done: ({eps:.4f}, {run.cfg.delta:g})-DP; report in {run.path(runs.REPORT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
