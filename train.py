"""DP-FETA end to end: central images -> warm-up -> DP-SGD -> synthesis -> evaluation.

    python train.py --dataset mnist --eps 1

DP-FETA (Li, Gong, Li et al., "From Easy to Hard: Building a Shortcut for Differentially Private
Image Synthesis", S&P 2025) trains one diffusion model in two stages:
  1. easy: release a few noisy per-class means of Poisson samples of the sensitive set (central
     images, central.py) and warm the model up on augmentations of them (post-processing);
  2. hard: train the same model on the sensitive images with DP-SGD (dpsgd.py).
One RDP accountant (accountant.py) composes both mechanisms; the DP-SGD noise is calibrated so
the composition meets the requested (eps, delta). `--no-central` drops stage 1 (the DPDM
baseline). Every stage writes an atomic checkpoint, so `--resume RUN_DIR` continues a run,
privacy ledger included, and ends exactly where an uninterrupted run on the same device would.
"""
import argparse
import json
import math
import os
import secrets
import signal
import sys
import time

import numpy as np
import torch

import accountant
import central
import data
import diffusion
import dpsgd
import evaluate

# Settings per preset. "cpu" finishes in about 25 minutes on a 2-core laptop CPU; "paper" is
# the paper's protocol (../shared/PAPER.md; expected batch 4000 = 60000/15, so q = 1/15 and 150
# epochs are 2250 steps); "tiny" exercises every stage in about a minute (tests).
PRESETS = {
    "paper": dict(model="paper", central_q=0.1, central_sigma=5.0, central_queries=5,
                  warmup_steps=2000, warmup_batch=64, batch=4000, epochs=150.0, noise_draws=32,
                  chunk=256, autocast=0, lr=3e-4, clip=1.0, ema=0.999, sample_steps=0,
                  guidance=0.0, n_samples=60000, fid_n=60000, classifier_epochs=50,
                  classifier_lr=3e-4, train_subset=None),
    "cpu": dict(model="small", central_q=0.1, central_sigma=5.0, central_queries=5,
                warmup_steps=1200, warmup_batch=64, batch=1024, epochs=3.5, noise_draws=1,
                chunk=64, autocast=1, lr=1e-3, clip=1.0, ema=0.97, sample_steps=25,
                guidance=1.0, n_samples=2000, fid_n=1000, classifier_epochs=10,
                classifier_lr=1e-3, train_subset=None),
    "tiny": dict(model="small", central_q=0.1, central_sigma=5.0, central_queries=2,
                 warmup_steps=20, warmup_batch=16, batch=100, epochs=2.0, noise_draws=1,
                 chunk=32, autocast=0, lr=1e-3, clip=1.0, ema=0.9, sample_steps=5,
                 guidance=0.0, n_samples=100, fid_n=50, classifier_epochs=3,
                 classifier_lr=1e-3, train_subset=2000),
}

HELP = dict(
    model="UNet size: 'small' (CPU) or 'paper' (1.5M parameters)",
    central_q="Poisson sampling rate of each central-image query",
    central_sigma="noise multiplier sigma_c of the central-image queries",
    central_queries="number T of central-image queries (T*K images)",
    warmup_steps="optimizer steps of the warm-up on augmented central images",
    warmup_batch="batch size of the warm-up",
    batch="expected (Poisson) batch size of DP-SGD; q = batch / N",
    epochs="DP-SGD epochs; steps = epochs * N / batch",
    noise_draws="diffusion noise draws per example, averaged before clipping (multiplicity K)",
    chunk="physical chunk of examples per per-sample-gradient pass (memory, not privacy)",
    autocast="1: bfloat16 autocast in DP-SGD's forward pass (norms, clipping, noise stay "
             "float32); 0: float32",
    lr="Adam learning rate (both stages)",
    clip="per-example gradient clipping norm C",
    ema="EMA decay of the weights",
    sample_steps="DDIM sampling steps (0: the full ancestral DDPM sampler)",
    guidance="classifier-free guidance weight w (0 = plain conditional model)",
    n_samples="synthetic images to generate (uniformly random labels)",
    fid_n="images per side for FID (generated and real training); 0 skips FID",
    classifier_epochs="epochs of the accuracy classifier (trained on synthetic images only)",
    classifier_lr="Adam learning rate of the accuracy classifier",
    train_subset="use only the first N training images (the sensitive set; tests)",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Settings without a flag come from the preset.")
    p.add_argument("--dataset", help="mnist (default), fashionmnist or cifar10")
    p.add_argument("--eps", type=float, help="total privacy budget epsilon (default 1)")
    p.add_argument("--delta", type=float, help="privacy parameter delta (default 1e-5; < 1/N)")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="settings bundle (default: paper on a GPU, cpu otherwise)")
    p.add_argument("--no-central", action="store_true", default=None,
                   help="skip the easy stage: plain DP-SGD (the DPDM baseline)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the dataset files (default ./data/<dataset>, downloaded)")
    p.add_argument("--out", default=None, help="run folder (default runs/<dataset>-eps<eps>)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue a stopped run")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, ... (default: the run's own when resuming, else cuda if "
                        "available)")
    p.add_argument("--seed", type=int, default=None,
                   help="fix all randomness, DP noise included (testing only: a known seed "
                        "lets anyone remove the noise); default: a secret seed")
    p.add_argument("--inception", default=None, help="local FID Inception weights file")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0,
                   help="also checkpoint this often during training (default 5)")
    for name, value in PRESETS["cpu"].items():
        kind = str if name == "model" else int if value is None else type(value)
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=f"{HELP[name]} "
                       f"[cpu: {value}, paper: {PRESETS['paper'][name]}]")
    return p.parse_args(argv)


def fill_defaults(args):
    """Defaults of a new run: the preset (by device) fills every setting not given as a flag."""
    for name, value in dict(dataset="mnist", eps=1.0, delta=1e-5, no_central=False,
                            device="cuda" if torch.cuda.is_available() else "cpu").items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    preset = PRESETS[args.preset or ("paper" if args.device.startswith("cuda") else "cpu")]
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def check_args(args):
    """One-line ValueErrors for arguments that cannot work."""
    if not (args.eps > 0 and math.isfinite(args.eps)):
        raise ValueError(f"--eps must be a positive number, got {args.eps}")
    if not 0 < args.delta < 1:
        raise ValueError(f"--delta must lie in (0, 1), got {args.delta}")
    if args.dataset not in data.INFO:
        raise ValueError(f"--dataset: unknown '{args.dataset}', choose one of "
                         f"{', '.join(data.INFO)}")
    if args.model not in diffusion.MODEL_SIZES:
        raise ValueError(f"--model: unknown '{args.model}', choose one of "
                         f"{', '.join(diffusion.MODEL_SIZES)}")
    at_least_one = ("warmup_batch", "batch", "noise_draws", "chunk", "n_samples",
                    "central_queries")
    positive = ("epochs", "lr", "clip", "central_sigma", "classifier_epochs", "classifier_lr")
    for name in at_least_one + positive + ("warmup_steps", "sample_steps", "guidance", "fid_n"):
        value = getattr(args, name)
        smallest = 1 if name in at_least_one else 0
        if not (value > 0 if name in positive else value >= smallest) or not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be "
                             f"{'positive' if name in positive else f'>= {smallest}'}, got {value}")
    if args.sample_steps > 1000:
        raise ValueError(f"--sample-steps must be at most the 1000 diffusion steps, got "
                         f"{args.sample_steps}")
    if args.train_subset is not None and args.train_subset < 1:
        raise ValueError(f"--train-subset must be >= 1, got {args.train_subset}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device: unknown device '{args.device}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda was asked for, but torch sees no CUDA GPU")
    if args.autocast not in (0, 1):
        raise ValueError(f"--autocast must be 0 or 1, got {args.autocast}")
    if not 0 < args.central_q <= 1:
        raise ValueError(f"--central-q must lie in (0, 1], got {args.central_q}")
    if not 0 <= args.ema < 1:
        raise ValueError(f"--ema must lie in [0, 1), got {args.ema}")


def privacy_plan(args, n):
    """The mechanisms of the run and the DP-SGD noise that makes them meet (eps, delta)."""
    history = [] if args.no_central else [(args.central_q, args.central_sigma,
                                           args.central_queries)]
    q = args.batch / n
    if q > 1:
        raise ValueError(f"--batch {args.batch} is larger than the {n} training images")
    steps = max(1, round(args.epochs * n / args.batch))
    sigma = accountant.calibrate_sigma(args.eps, args.delta, q, steps, history=history)
    eps, order = accountant.epsilon(history + [(q, sigma, steps)], args.delta)
    return dict(n=n, delta=args.delta, target_eps=args.eps, central=history[0] if history
                else None, dpsgd=dict(q=q, sigma=sigma, steps=steps), eps=eps, order=order)


def print_plan(plan):
    print(f"privacy plan for {plan['n']} sensitive images, delta={plan['delta']:g}:")
    if plan["central"]:
        q, s, t = plan["central"]
        print(f"  central images: {t} Poisson-subsampled Gaussian queries, q={q:g}, "
              f"sigma_c={s:g}")
    d = plan["dpsgd"]
    print(f"  DP-SGD: {d['steps']} steps, q={d['q']:.5g}, noise multiplier sigma={d['sigma']:.4g}")
    print(f"  composed: eps={plan['eps']:.4f} <= {plan['target_eps']:g} "
          f"(best RDP order {plan['order']:g})")


class StopRequested(Exception):
    """Ctrl-C arrived; the run was checkpointed at a step boundary."""


def atomic_write(path, write, mode="wb"):
    """write(file) into a temporary file, then rename it: a crash never leaves half a file."""
    with open(path + ".tmp", mode) as f:
        write(f)
    os.replace(path + ".tmp", path)


class Pipeline:
    """One run: its state (model, EMA, optimizer, RNG, privacy ledger) and its stages.

    The stages run in the order of STAGES; after each one, and every few minutes inside the
    training loops, the whole state goes into `checkpoint.pt`, so a resumed run continues with
    exactly the same random numbers and the same privacy ledger.
    """
    STAGES = ["central", "warmup", "dpsgd", "sample", "evaluate", "done"]

    def __init__(self, args, checkpoint=None):
        self.args, self.folder = args, args.out
        info = data.INFO[args.dataset]
        self.channels, self.size, self.classes = info["channels"], info["size"], info["classes"]
        self.device = torch.device(args.device)
        self.model = diffusion.make_unet(args.model, self.channels, self.size,
                                         self.classes).to(self.device)
        self.ddpm = diffusion.DDPM(num_classes=self.classes).to(self.device)
        self.ema = diffusion.EMA(self.model, args.ema)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        # Two independent generators. The secret one draws the Poisson samples and all noise
        # of the mechanisms: whoever knows its state can recompute the noise, and the guarantee
        # is gone. The public one draws what the release shows (warm-up, sample labels,
        # sampler noise). One generator for both would leak: torch's CPU generator is a
        # Mersenne twister, whose state can be solved from enough published labels.
        self.secret_rng = torch.Generator(self.device)
        self.public_rng = torch.Generator(self.device)
        if checkpoint is None:
            # Independent OS-drawn seeds, kept in the checkpoint only; --seed is for tests.
            self.seeds = ((args.seed, args.seed + 1) if args.seed is not None
                          else (secrets.randbits(62), secrets.randbits(62)))
            self.secret_rng.manual_seed(self.seeds[0])
            self.public_rng.manual_seed(self.seeds[1])
            self.stage, self.step, self.plan = "central", 0, None
            self.ledger = accountant.PrivacyLedger(args.delta)
            self.central = None
            self.timings, self.metrics = {}, {}
        else:
            self.load(checkpoint)

    # ----------------------------------------------------------------- checkpoints, files
    def path(self, name):
        return os.path.join(self.folder, name)

    def save(self):
        state = dict(args=vars(self.args), seeds=self.seeds, stage=self.stage, step=self.step,
                     plan=self.plan, ledger=self.ledger.to_dict(), central=self.central,
                     model=self.model.state_dict(), ema=self.ema.state_dict(),
                     optimizer=self.optimizer.state_dict(),
                     secret_rng=self.secret_rng.get_state(),
                     public_rng=self.public_rng.get_state(), timings=self.timings,
                     metrics=self.metrics)
        atomic_write(self.path("checkpoint.pt"), lambda f: torch.save(state, f))

    def load(self, state):
        self.seeds, self.stage, self.step, self.plan = (state["seeds"], state["stage"],
                                                         state["step"], state["plan"])
        self.ledger = accountant.PrivacyLedger.from_dict(state["ledger"])
        self.central = state["central"]
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.secret_rng.set_state(state["secret_rng"])
        self.public_rng.set_state(state["public_rng"])
        self.timings, self.metrics = state["timings"], state["metrics"]

    def write_report(self):
        eps, order = self.ledger.epsilon() if self.ledger.history else (0.0, None)
        args = {k: v for k, v in vars(self.args).items() if k != "seed"}
        report = dict(args=args, seed="fixed by --seed" if self.args.seed is not None
                      else "secret", stage=self.stage, privacy_plan=self.plan,
                      privacy_ledger=self.ledger.to_dict(),
                      privacy_spent=dict(eps=eps, delta=self.args.delta, order=order),
                      metrics=self.metrics, timings_s=self.timings)
        atomic_write(self.path("report.json"), lambda f: json.dump(report, f, indent=2), "w")

    # ----------------------------------------------------------------------- the stages
    def run(self, images, labels, stop):
        """Run the remaining stages on the sensitive set (uint8 images, labels)."""
        while self.stage != "done":
            started = time.time()
            try:
                getattr(self, "stage_" + self.stage)(images, labels, stop)
            finally:
                self.timings[self.stage] = self.timings.get(self.stage, 0.0) + \
                    time.time() - started
            self.stage, self.step = self.STAGES[self.STAGES.index(self.stage) + 1], 0
            self.save()
            self.write_report()

    def stage_central(self, images, labels, stop):
        """Easy stage, release: noisy per-class means of Poisson samples (central.py)."""
        if self.args.no_central:
            return
        a = self.args
        central_images, central_labels, mechanism = central.central_images(
            images, labels, self.classes, q=a.central_q, sigma=a.central_sigma,
            queries=a.central_queries, generator=self.secret_rng)
        self.ledger.add("central images", *mechanism)
        self.central = (central_images.cpu(), central_labels.cpu())
        order = central_labels.argsort(stable=True)  # one row per class
        data.save_grid(central_images[order], self.path("central_images.png"),
                       nrow=a.central_queries)
        print(f"[central] {len(central_images)} central images -> "
              f"{self.path('central_images.png')}; eps so far {self.ledger.epsilon()[0]:.3f}")

    def stage_warmup(self, images, labels, stop):
        """Easy stage, learning: train on augmented central images (post-processing)."""
        if self.args.no_central or self.args.warmup_steps == 0:
            return
        a = self.args
        pool_images, pool_labels = (t.to(self.device) for t in self.central)

        def warmup_step():
            pick = torch.randint(len(pool_images), (a.warmup_batch,), device=self.device,
                                 generator=self.public_rng)
            x0 = central.augment(pool_images[pick], self.public_rng,
                                 max_magnitude=3 if self.channels == 1 else 9) * 2 - 1
            y_in, t, noise = self.ddpm.draw_inputs(pool_labels[pick], 1, x0.shape[1:],
                                                   self.public_rng)
            loss = self.ddpm.loss(self.model, x0, y_in, t, noise).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            return f"loss {loss.item():.4f}"

        self.train_loop("warmup", a.warmup_steps, a.warmup_batch, warmup_step, stop)
        # DP-SGD starts from the warmed-up (raw) weights with a fresh optimizer and EMA.
        self.save_sample_grid("warmup_samples.png", self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=a.lr)
        self.ema = diffusion.EMA(self.model, a.ema)

    def stage_dpsgd(self, images, labels, stop):
        """Hard stage: DP-SGD on the sensitive images (dpsgd.py), one ledger entry a step."""
        a, plan = self.args, self.plan["dpsgd"]
        x_all = images.to(self.device).float().div_(255).mul_(2).sub_(1)
        y_all = labels.to(self.device)
        n, q, sigma, steps = len(x_all), plan["q"], plan["sigma"], plan["steps"]
        batches = dpsgd.poisson_batches(n, q, steps - self.step, self.secret_rng)

        def dp_step():
            idx = next(batches)
            x0 = x_all[idx]
            y_in, t, noise = self.ddpm.draw_inputs(y_all[idx], a.noise_draws, x0.shape[1:],
                                                   self.secret_rng)
            stats = dpsgd.dp_step(self.model, self.optimizer, self.ddpm.loss,
                                  (x0, y_in, t, noise), clip_norm=a.clip, sigma=sigma,
                                  expected_batch_size=q * n, noise_generator=self.secret_rng,
                                  chunk_size=a.chunk, autocast=bool(a.autocast))
            self.ledger.add("DP-SGD", q, sigma, 1)
            self.ema.update(self.model)
            return stats

        def describe(stats):
            # Only what the accountant covers: the batch's loss and its realised size are
            # statistics of the sensitive data that no mechanism privatised, so they are not
            # printed (logs get shared).
            return f"| eps spent {self.ledger.epsilon()[0]:.3f}/{a.eps:g}"

        # images/s counts the expected batch qN: the realised size is part of the secret sample.
        self.train_loop("dpsgd", steps, q * n, dp_step, stop, describe)

    def stage_sample(self, images, labels, stop):
        """Synthesis: n images with uniformly random labels from the EMA model."""
        a = self.args
        started = time.time()
        sample_labels = torch.randint(self.classes, (a.n_samples,), device=self.device,
                                      generator=self.public_rng)
        pieces = []
        for start in range(0, a.n_samples, 500):
            pieces.append(self.sample(self.ema.model, sample_labels[start:start + 500]))
            print(f"[sample] {start + len(pieces[-1])}/{a.n_samples} images, "
                  f"{time.time() - started:.0f} s", flush=True)
        array = torch.cat(pieces).permute(0, 2, 3, 1).numpy()
        if self.channels == 1:
            array = array[..., 0]
        atomic_write(self.path("samples.npz"), lambda f: np.savez_compressed(
            f, images=array, labels=sample_labels.cpu().numpy()))
        self.save_sample_grid("samples.png", self.ema.model)

    def stage_evaluate(self, images, labels, stop):
        """Accuracy of a classifier trained on the samples, and FID against the training set.

        These metrics read the real data outside the DP guarantee, as in the paper: they
        measure the release, they are not part of it."""
        a = self.args
        with np.load(self.path("samples.npz")) as samples:
            synthetic, synthetic_labels = samples["images"], samples["labels"]
        test_images, test_labels = data.load(a.dataset, "test", a.data_dir)
        result = evaluate.classifier_accuracy(synthetic, synthetic_labels, test_images,
                                              test_labels, self.classes, a.classifier_epochs,
                                              lr=a.classifier_lr, seed=0, device=self.device)
        self.metrics["accuracy"] = result
        print(f"[evaluate] accuracy on the real test set: {result['test_accuracy']:.4f} "
              f"(classifier trained on {result['n_train']} synthetic images)")
        if a.fid_n:
            n_fake, n_real = min(a.fid_n, len(synthetic)), min(a.fid_n, len(images))
            inception = evaluate.load_inception(a.inception, self.device)
            fake = evaluate.feature_statistics(evaluate.inception_features(
                synthetic[:n_fake], device=self.device, model=inception))
            # The real side's statistics describe sensitive images: they stay in the (private)
            # run folder, next to the checkpoint, and are reused when the run is resumed.
            real = evaluate.reference_stats(a.dataset, n_real, self.folder, a.data_dir,
                                            device=self.device, model=inception)
            value = evaluate.frechet_distance(*fake, *real)
            self.metrics["fid"] = dict(value=value, n_generated=n_fake, n_real=n_real,
                                       real="first images of the training set")
            print(f"[evaluate] FID {value:.2f} ({n_fake} generated vs {n_real} training images)")

    # -------------------------------------------------------------------------- helpers
    def sample(self, model, sample_labels):
        return self.ddpm.sample(model, sample_labels, self.public_rng,
                                steps=self.args.sample_steps or None, guidance=self.args.guidance)

    def save_sample_grid(self, name, model):
        grid_labels = torch.arange(self.classes, device=self.device).repeat_interleave(10)
        data.save_grid(self.sample(model, grid_labels), self.path(name), nrow=10)

    def train_loop(self, stage, total, images_per_step, step_fn, stop, describe=lambda s: s):
        """Steps self.step..total-1 with progress lines, checkpoints and Ctrl-C handling."""
        first, started, last_print, last_save = self.step, time.time(), 0.0, time.time()
        while self.step < total:
            stats = step_fn()
            self.step += 1
            now = time.time()
            if now - last_print > 10 or self.step in (first + 1, total):
                rate = (self.step - first) / (now - started)
                print(f"[{stage}] step {self.step}/{total} {describe(stats)} | "
                      f"{rate * images_per_step:.0f} images/s | "
                      f"ETA {(total - self.step) / rate / 60:.1f} min", flush=True)
                last_print = now
            if stop["requested"] or now - last_save > 60 * self.args.checkpoint_minutes:
                self.save()
                last_save = now
                if stop["requested"]:
                    raise StopRequested()


def install_ctrl_c():
    """The first Ctrl-C asks the training loops to checkpoint and stop at a step boundary."""
    stop = {"requested": False}

    def handler(signum, frame):
        if stop["requested"]:  # a second Ctrl-C aborts at once
            signal.default_int_handler(signum, frame)
        stop["requested"] = True
        print("\nCtrl-C: checkpointing at the end of this step (Ctrl-C again to abort)")

    signal.signal(signal.SIGINT, handler)
    return stop


def load_checkpoint(args):
    """The checkpoint of the run in --resume; `args` become that run's own settings."""
    path = os.path.join(args.resume, "checkpoint.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise ValueError(f"--resume: no checkpoint.pt in {args.resume}") from None
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"--resume: cannot read {path} ({type(e).__name__})") from None
    saved = state["args"]
    for key in ("dataset", "eps", "delta", "no_central"):
        if getattr(args, key) is not None and saved[key] != getattr(args, key):
            raise ValueError(f"--resume: {args.resume} is a run with {key}={saved[key]}, "
                             f"not {getattr(args, key)}")
    if args.device and torch.device(args.device).type != torch.device(saved["device"]).type:
        raise ValueError(f"--device: {args.resume} ran on {saved['device']}; its random state "
                         f"only continues there")
    # The run continues with its own settings; only where things are may change.
    where = dict(out=args.resume, resume=args.resume, device=args.device or saved["device"],
                 checkpoint_minutes=args.checkpoint_minutes,
                 data_dir=args.data_dir or saved["data_dir"],
                 inception=args.inception or saved["inception"])
    args.__dict__.update({**saved, **where})
    return state


def make_run_folder(args):
    args.out = args.out or os.path.join(
        "runs", f"{args.dataset}-eps{args.eps:g}" + ("-nocentral" if args.no_central else ""))
    if os.path.exists(os.path.join(args.out, "checkpoint.pt")):
        raise ValueError(f"--out: {args.out} already holds a run; continue it with "
                         f"--resume {args.out} or choose another --out")
    try:
        os.makedirs(args.out, exist_ok=True)
        atomic_write(os.path.join(args.out, ".writable"), lambda f: None)
        os.remove(os.path.join(args.out, ".writable"))
    except OSError as e:
        raise ValueError(f"--out: cannot write to {args.out} ({e.strerror})") from None


def run(args):
    state = load_checkpoint(args) if args.resume else None
    if state is None:
        fill_defaults(args)
    check_args(args)
    images, labels = data.load(args.dataset, "train", args.data_dir)
    if args.train_subset:
        images, labels = images[:args.train_subset], labels[:args.train_subset]
    # Planned before anything is written, so a budget that cannot be met writes nothing.
    plan = state["plan"] if state else privacy_plan(args, len(images))
    if plan["n"] != len(images):
        raise ValueError(f"--data-dir: the run was planned for {plan['n']} training images, "
                         f"found {len(images)}")
    if args.delta >= 1 / len(images):
        print(f"warning: delta={args.delta:g} is not below 1/N = {1 / len(images):.2g}: "
              f"a mechanism that publishes one random record would meet it")
    if args.fid_n and (state is None or state["stage"] != "done"):
        evaluate.load_inception(args.inception)  # missing FID weights: fail now, not at the end
    if state is None:
        make_run_folder(args)
    torch.manual_seed(0)  # only the models' initial weights; all else uses the run's generator
    pipeline = Pipeline(args, state)
    if state is None:
        pipeline.plan = plan
        pipeline.save()
    print_plan(pipeline.plan)
    print(f"run folder: {args.out} (stage {pipeline.stage}, step {pipeline.step})")
    pipeline.write_report()
    try:
        pipeline.run(images, labels, install_ctrl_c())
    except (ValueError, data.DataError, evaluate.WeightsError) as e:  # e.g. no FID weights
        raise type(e)(f"{e}; the run so far is saved: fix this, then continue with --resume "
                      f"{args.out}") from None
    eps, order = pipeline.ledger.epsilon() if pipeline.ledger.history else (0.0, None)
    print(f"done: ({eps:.4f}, {args.delta:g})-DP; report in {pipeline.path('report.json')}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, data.DataError, evaluate.WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StopRequested:
        print(f"stopped; continue with: python train.py --resume {args.out}")
        return 130


if __name__ == "__main__":
    sys.exit(main())
