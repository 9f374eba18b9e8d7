"""DP-FETA end to end: central images -> warm-up -> DP-SGD -> synthesis -> evaluation.

    python train.py --dataset mnist --eps 1

DP-FETA (Li, Gong, Li et al., "From Easy to Hard: Building a Shortcut for Differentially
Private Image Synthesis", S&P 2025) trains one diffusion model in two stages:
  1. easy: release a few noisy per-class means of Poisson samples of the sensitive set (central
     images, central.py) and warm the model up on augmentations of them (post-processing);
  2. hard: train the same model on the sensitive images with DP-SGD (dpsgd.py).
One RDP accountant (accountant.py) composes the mechanisms; the DP-SGD noise is calibrated so
that the composition meets the requested (eps, delta). `--no-central` drops stage 1 (the DPDM
baseline); `--no-dpsgd` drops stage 2 and releases the warmed-up model, at the central images'
own epsilon. `--frequency` adds FETA-Pro's frequency stage between them (frequency.py): a third
mechanism, and a second warm-up on images fitted to it.

The privacy argument is in the signatures: only the `release_*` functions and `train_dpsgd` are
given the sensitive images, and they draw from the secret generator (randomness.py); the
warm-ups see what was released, synthesis sees the model. Each stage is checkpointed, so
`--resume RUN_DIR` ends where an uninterrupted run would (bit for bit on the CPU); harness/
holds what keeps a run safe (flags, run folder, lock, signals, torchrun, data files).
"""
from harness import cli  # noqa: F401  (first: a Ctrl-C while torch loads is one line)
import functools
import secrets
import sys

import torch

import accountant
import central
import diffusion
import dpsgd
import evaluate
import frequency
import randomness
import samplers
from harness import data, files, launch, runs


# ------------------------------------------------------------------------------ the privacy plan
def privacy_plan(cfg, n):
    """The mechanisms of the run, and the DP-SGD noise sigma that makes them meet (eps, delta).

    Both sampling rates are the exact inclusion probabilities of randomness.poisson_sample.
    The dataset size n is public (as in the paper): q = batch / n. With --no-dpsgd the releases
    before DP-SGD are the only mechanisms, and their own epsilon is the run's."""
    central_mechanism = ((randomness.sampling_rate(cfg.central_q), cfg.central_sigma,
                          cfg.central_queries) if cfg.central else None)
    frequency_mechanism = (1.0, cfg.frequency_sigma, 1) if cfg.frequency else None  # q = 1: all
    history = [m for m in (central_mechanism, frequency_mechanism) if m]
    spent_before, order = accountant.epsilon(history, cfg.delta)
    if spent_before >= cfg.eps:
        raise ValueError(f"--eps {cfg.eps:g} is not above the {spent_before:.4f} that the releases "
                         f"before DP-SGD spend: raise --eps, --central-sigma or --frequency-sigma")
    plan = dict(n=n, delta=cfg.delta, target_eps=cfg.eps, central=central_mechanism,
                frequency=frequency_mechanism, dpsgd=None, eps=spent_before, order=order)
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
        print(f"  frequency features: one Gaussian release, sigma_f={plan['frequency'][1]:g}")
    d = plan["dpsgd"]
    print(f"  DP-SGD: {d['steps']} steps, q={d['q']:.5g}, noise multiplier sigma={d['sigma']:.4g}"
          if d else "  no DP-SGD (--no-dpsgd): the warmed-up model is the release")
    print(f"  composed: eps={plan['eps']:.4f} <= {plan['target_eps']:g} "
          f"(best RDP order {plan['order']:g})")


# ------------------------------------------------------------------------------ the stages
def release_central_images(sensitive_images, sensitive_labels, cfg, secret):
    """Easy stage, release: T noisy per-class means of Poisson samples (central.py). Given the
    sensitive set; it draws from the secret generator."""
    return central.central_images(sensitive_images, sensitive_labels,
                                  data.INFO[cfg.dataset]["classes"], q=cfg.central_q,
                                  sigma=cfg.central_sigma, queries=cfg.central_queries,
                                  generator=secret)


def warm_up(model, optimizer, central_images, central_labels, cfg, edm, public, first_step,
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
        loss = diffusion_step(model, optimizer, edm, augmented, pool_labels[pick], public)
        progress(step + 1, f" | loss {loss:.4f}")


def diffusion_step(model, optimizer, edm, images, labels, public):
    """One ordinary (non-private) step of the diffusion loss on released images in [0, 1], one
    noise draw each, the draws from the public generator; returns the batch's loss."""
    x0 = diffusion.to_model_range(images)
    y_in, sigma, noise = edm.draw_inputs(labels, 1, x0.shape[1:], public)
    loss = edm.loss(model, x0, y_in, sigma, noise).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def release_frequency_features(sensitive_images, sensitive_labels, cfg, secret, seed):
    """FETA-Pro's frequency stage, release (--frequency): one Gaussian release of the per-class
    sums of the images' random Fourier features (frequency.py). Given the sensitive set; its
    noise comes from the secret generator, its frequencies from the public `seed`."""
    return frequency.release(sensitive_images, sensitive_labels, data.INFO[cfg.dataset]["classes"],
                             cfg.frequency_sigma, seed, secret)


def warm_up_on_features(model, optimizer, image_generator, cfg, edm, public, first_step,
                        progress):
    """FETA-Pro's frequency stage, learning: the diffusion loss on fresh images of the generator
    fitted to the released features, no augmentation. Post-processing, like the first warm-up;
    it draws from the public generator."""
    device = next(model.parameters()).device
    for step in range(first_step, cfg.frequency_steps):
        with torch.no_grad():
            images, labels = image_generator.draw(cfg.warmup_batch, public)
        loss = diffusion_step(model, optimizer, edm, images.clamp(0, 1).to(device),
                              labels.to(device), public)
        progress(step + 1, f" | loss {loss:.4f}")


def train_dpsgd(model, optimizer, ema, sensitive_images, sensitive_labels, cfg, plan, edm,
                secret, ledger, first_step, progress, team, chunk):
    """Hard stage: DP-SGD on the sensitive images (dpsgd.py), one ledger entry per step. Given
    the sensitive set; every draw (Poisson sample, diffusion noise, Gaussian noise) comes from
    the secret generator.
    With several processes (`team`, harness/team.py) all hold the same secret-generator state,
    so they draw the same sample, the same diffusion inputs and the same noise; each computes
    the clipped gradients of its share of the sample, and dp_step adds the shares' sums."""
    device = next(model.parameters()).device
    x_all = diffusion.to_model_range(sensitive_images).to(device)
    n, q, sigma, steps = len(x_all), plan["q"], plan["sigma"], plan["steps"]
    for step in range(first_step, steps):
        batch = randomness.poisson_sample(n, q, secret).nonzero().flatten()
        # Drawn for the whole sample on every process (on the CPU), which keeps the secret
        # generators in step; this process uses positions rank, rank + N, ... of it. A share
        # may be empty: the process still takes part in the step.
        y_in, noise_level, noise = edm.draw_inputs(sensitive_labels[batch], cfg.noise_draws,
                                                   x_all.shape[1:], secret)
        share = team.share
        x0 = x_all[batch[share].to(device)]
        inputs = (x0, *(v[share].to(device) for v in (y_in, noise_level, noise)))
        dpsgd.dp_step(model, optimizer, edm.loss, inputs, clip_norm=cfg.clip,
                      sigma=sigma, expected_batch_size=q * n, noise_generator=secret,
                      chunk_size=chunk, autocast=cfg.autocast,
                      sum_over_processes=team.sum_over_processes)
        ledger.add("DP-SGD", q, sigma, 1)
        ema.update(model)
        # Only accounted quantities are shown: the batch's loss and its realised size are
        # statistics of the sensitive data that no mechanism privatised (logs get shared).
        progress(step + 1, lambda: f" | eps spent {ledger.epsilon()[0]:.3f}/{cfg.eps:g}")
    team.check_same_weights(model)


def synthesize(model, cfg, edm, public, pieces, progress):
    """cfg.n_samples images with uniformly random labels from the (EMA) model, appended batch by
    batch to `pieces` [(uint8 images, labels)] with a progress call (a checkpoint, a stop) after
    each: a resumed run continues the loop where it stopped (samplers.sample_uniform).
    Post-processing of the trained weights; it draws from the public generator."""
    done = sum(len(labels) for _, labels in pieces)
    for images, labels in samplers.sample_uniform(edm, model, cfg.n_samples - done, public,
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
    metrics = dict(accuracy=evaluate.classifier_accuracy(
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


def sample_grid(model, cfg, edm, public):
    """Ten samples per class, one row per class."""
    labels = torch.arange(data.INFO[cfg.dataset]["classes"], device=public.device)
    return samplers.sample(edm, model, labels.repeat_interleave(10), public,
                           **samplers.settings_of(cfg))


# ------------------------------------------------------------------------------ one run
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
    return runs.Run(folder, cfg, plan, device, model, diffusion.EDM(info["classes"]),
                    *fresh_optimizer_and_ema(model, cfg), secret, public, seed is not None,
                    accountant.PrivacyLedger(cfg.delta))


def fresh_optimizer_and_ema(model, cfg):
    return torch.optim.Adam(model.parameters(), lr=cfg.lr), diffusion.EMA(model, cfg.ema)


def train(run, sensitive_images, sensitive_labels):
    """The stages that read the sensitive images or train on what they released, in the
    paper's order. run.run_stage skips those a resumed run has done and checkpoints after each
    (harness/runs.py); with torchrun every process runs them (harness/team.py)."""
    cfg, info = run.cfg, data.INFO[run.cfg.dataset]
    print_plan(run.plan)

    def central_images():
        if cfg.central:
            images, labels, mechanism = run.release_once(lambda: release_central_images(
                sensitive_images, sensitive_labels, cfg, run.secret))
            run.ledger.add("central images", *mechanism)  # every process counts it once
            run.central = (images.cpu(), labels.cpu())
            print(f"[central] {len(images)} central images; eps spent "
                  f"{run.ledger.epsilon()[0]:.3f}")

    def frequency_features():
        if cfg.frequency:
            seed = int(torch.randint(2 ** 62, (1,), generator=run.public,  # W's: public
                                     device=run.public.device))
            table, mechanism = run.release_once(lambda: release_frequency_features(
                sensitive_images, sensitive_labels, cfg, run.secret, seed))
            run.ledger.add("frequency features", *mechanism)
            run.features = (table.cpu(), seed)
            print(f"[frequency] a {tuple(table.shape)} table of random Fourier features; eps "
                  f"spent {run.ledger.epsilon()[0]:.3f}")

    def warm():
        if cfg.central:  # the release's picture, once the checkpoint's ledger counts it
            images, labels = run.central
            run.save_grid(images[labels.argsort(stable=True)], "central_images.png",
                          nrow=cfg.central_queries)  # one row per class
        if cfg.central and cfg.warmup_steps:
            # Post-processing and cheap: every process runs the same steps from the same state.
            warm_up(run.model, run.optimizer, *run.central, cfg, run.edm, run.public, run.step,
                    run.progress(cfg.warmup_steps))
            run.save_grid(sample_grid(run.model, cfg, run.edm, run.public),
                          "warmup_samples.png", nrow=10)

    def warm_on_features():
        if cfg.frequency:
            # Fitted again when a stopped stage resumes: the same table and seed give the same
            # generator, so only its time is spent twice.
            table, seed = run.features
            image_generator = frequency.fit_generator(
                table, info["classes"], (info["channels"], info["size"], info["size"]), seed,
                cfg.generator_steps, progress=run.progress(cfg.generator_steps, keeps_step=True))
            fixed_labels = torch.arange(info["classes"]).repeat_interleave(10)
            run.save_grid(image_generator.draw(len(fixed_labels), torch.Generator().manual_seed(0),
                                               fixed_labels)[0], "feature_samples.png", nrow=10)
            warm_up_on_features(run.model, run.optimizer, image_generator, cfg, run.edm,
                                run.public, run.step, run.progress(cfg.frequency_steps))
            run.save_grid(sample_grid(run.model, cfg, run.edm, run.public),
                          "warmup_samples.png", nrow=10)
        # DP-SGD starts from the raw warmed-up weights, with a fresh optimizer and EMA; every
        # process from rank 0's weights and generator states (it alone drew the releases).
        run.align_processes()
        run.optimizer, run.ema = fresh_optimizer_and_ema(run.model, cfg)

    def dp_sgd():
        # With --no-dpsgd the EMA, fresh from the warmed-up weights, is what gets sampled.
        if cfg.dpsgd:
            chunk = launch.dpsgd_chunk(run.model, run.edm, cfg, sensitive_images.shape[1:])
            # Nothing is shown or written inside a block of DP-SGD steps, and a stop waits for
            # the block's end (runs.Progress): a step's time grows with its secret batch size.
            train_dpsgd(run.model, run.optimizer, run.ema, sensitive_images, sensitive_labels,
                        cfg, run.plan["dpsgd"], run.edm, run.secret, run.ledger, run.step,
                        run.progress(run.plan["dpsgd"]["steps"], runs.DPSGD_BLOCK), run.team,
                        chunk)

    run.run_stage("release_central_images", central_images)
    run.run_stage("release_frequency_features", frequency_features)
    run.run_stage("warm_up", warm)
    run.run_stage("warm_up_on_features", warm_on_features)
    run.run_stage("train_dpsgd", dp_sgd)


def post_process(run):
    """Synthesis and evaluation: they read only the trained model (and, to measure it, real
    data outside the guarantee). One process runs them."""
    cfg = run.cfg

    def synthesis():
        synthesize(run.ema.model, cfg, run.edm, run.public, run.pieces,
                   run.progress(cfg.n_samples))
        files.save_samples(run.path("samples.npz"), torch.cat([p[0] for p in run.pieces]),
                              torch.cat([p[1] for p in run.pieces]))
        run.save_grid(sample_grid(run.ema.model, cfg, run.edm, run.public), "samples.png",
                      nrow=10)
        data.save_side_by_side([("central images", run.path("central_images.png")),
                                ("frequency generator", run.path("feature_samples.png")),
                                ("after the warm-up", run.path("warmup_samples.png")),
                                ("final samples", run.path("samples.png"))],
                               run.path("stages.png"))

    def evaluation():
        images, labels = files.load_samples(run.path("samples.npz"), cfg.dataset)
        # The real side's FID statistics describe sensitive images: kept in the private run
        # folder, next to the checkpoint.
        fid_cache = lambda n: run.path(f"fid_stats_train_{n}.npz")  # noqa: E731
        real_data = functools.partial(data.load, cfg.dataset, data_dir=run.options["data_dir"],
                                      trust_files=run.options["trust_data_files"])
        run.metrics = evaluate_release(images, labels, cfg, real_data, run.device,
                                       run.options["inception"], fid_cache, run.stop_point)

    run.run_stage("synthesize", synthesis)
    run.run_stage("evaluate_release", evaluation)


def main(argv=None):
    """The command line (harness/launch.py): a new or resumed run, and its exit status."""
    return launch.main(argv, __doc__.split("\n\n")[0], privacy_plan, new_run, train,
                       post_process)


if __name__ == "__main__":
    sys.exit(main())
