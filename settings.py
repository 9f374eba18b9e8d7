"""The settings of a run: one table, and the presets.

`Config` holds every setting of a run; each field's comment is its --help text, and its
defaults are the paper's protocol (the official code's settings for MNIST). The presets are
written as differences from it, so the scaled-down CPU protocol is visible in a few lines. The
flags that set them, their bounds and what a resumed run may change: harness/flags.py.
"""
import dataclasses

import torch

@dataclasses.dataclass(frozen=True)
class Config:
    # Each comment is the flag's --help text. The defaults are the paper's protocol.
    dataset: str = "mnist"         # mnist, fashionmnist or cifar10
    eps: float = 1.0               # total privacy budget epsilon, both stages (--no-dpsgd: a cap)
    delta: float = 1e-5            # privacy parameter delta (should be < 1/N)
    central: bool = True           # the easy stage; --no-central skips it (plain DP-SGD: DPDM)
    central_q: float = 0.1         # Poisson sampling rate of each central-image query
    central_sigma: float = 5.0     # noise multiplier sigma_c of each central-image query
    central_queries: int = 5       # number T of central-image queries (T*K central images)
    warmup_steps: int = 2000       # Adam steps of the warm-up on augmented central images
    warmup_batch: int = 64         # batch size of the warm-up
    frequency: bool = False        # FETA-Pro's frequency stage (an option beyond DP-FETA)
    frequency_sigma: float = 26.6  # noise multiplier sigma_f of the frequency release
    generator_steps: int = 3000    # Adam steps fitting the generator to the frequency release
    frequency_steps: int = 2340    # warm-up steps on the generator's images (--frequency)
    dpsgd: bool = True             # the hard stage; --no-dpsgd releases the warmed-up model
    model: str = "paper"           # UNet size: paper or small (diffusion.MODEL_SIZES)
    batch: int = 4096              # expected (Poisson) batch size of DP-SGD: q = batch / N
    epochs: float = 150.0          # DP-SGD epochs: steps = epochs * N / batch
    noise_draws: int = 32          # diffusion noise draws K per example, averaged before clipping
    lr: float = 3e-4               # Adam learning rate (warm-up and DP-SGD)
    clip: float = 1.0              # per-example gradient clipping norm C
    ema: float = 0.999             # EMA decay of the weights during DP-SGD
    chunk: int = 256               # examples per per-example-gradient pass (a GPU may use fewer)
    autocast: bool = False         # bf16 network in DP-SGD and sampling (clipping and noise: fp64)
    sample_steps: int = 1000       # sampler steps (noise levels)
    solver: str = "heun"           # sampler: heun, dpm2m (DPM-Solver++(2M)) or ddim (Euler)
    churn: float = 10.0            # heun's S_churn: noise re-added while sampling (0: deterministic)
    guidance: float = 0.0          # classifier-free guidance weight w (0: plain conditional model)
    n_samples: int = 60000         # synthetic images to generate (uniformly random labels)
    fid_n: int = 60000             # images per side for FID (generated vs training); 0 skips FID
    classifier_epochs: int = 50    # epochs of the accuracy classifier (synthetic images only)
    classifier_lr: float = 3e-4    # Adam learning rate of the accuracy classifier
    train_subset: int = 0          # use only the first N training images (0: all; for tests)


# The official code's MNIST protocol (SunnierLee/DP-FETA, configs/mnist_28), which DPImageBench
# measured at 95.6 % accuracy and FID 13.7 (60k) at eps = 1 (11 to 20 hours on 3 to 4 GPUs):
# expected batch 4096 of 60,000 for 150 epochs (2,197 DP-SGD steps), K = 32, C = 1, EMA 0.999;
# a 2,000-step warm-up at batch 64; EDM's stochastic sampler, 1,000 steps at S_churn 10.
PAPER = Config()
# A 2-core CPU: the small UNet, one noise draw, 205 DP-SGD steps at expected batch 1024, clip
# norm 0.1 (below every per-example gradient norm after the warm-up, so each example counts
# alike), 10,000 synthetic images drawn by DPM-Solver++(2M) in 15 steps without guidance. The
# sizes were chosen by hand to fit about half an hour, the rest by the campaign (results and how
# they were chosen: bench/README.md). bf16 autocast only where the CPU has bf16 kernels (AVX-512
# or AMX): elsewhere bf16 is emulated, and a pass of the small UNet took 14x as long as in
# float32 (an AVX2 CPU; bench/README.md).
CPU_HAS_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
CPU = dataclasses.replace(PAPER, model="small", warmup_steps=1200, batch=1024, epochs=3.5,
                          clip=0.1, noise_draws=1, chunk=64, autocast=CPU_HAS_BF16, lr=1e-3,
                          ema=0.97, solver="dpm2m", sample_steps=15, churn=0.0,
                          guidance=0.0, generator_steps=1000, frequency_steps=1200,
                          n_samples=10000, fid_n=1000, classifier_epochs=10, classifier_lr=1e-3)
# Every stage in about a minute (the tests): 12 warm-up steps, 12 DP-SGD steps at expected
# batch 25 of 500 images, 100 samples, FID on 10 images a side.
TINY = dataclasses.replace(CPU, central_queries=2, warmup_steps=12, warmup_batch=16, batch=25,
                           generator_steps=10, frequency_steps=6,
                           epochs=0.6, chunk=25, autocast=False, ema=0.9, sample_steps=5,
                           guidance=0.0, n_samples=100, fid_n=10, classifier_epochs=3,
                           train_subset=500)
PRESETS = {"paper": PAPER, "cpu": CPU, "tiny": TINY}


# Settings that went away with the DDPM formulation, which earlier versions trained: a saved
# Config (a checkpoint, a report) may still hold them.
REMOVED = ("formulation", "timesteps")


class DDPMRun(ValueError):
    """A run trained with the DDPM formulation of an earlier version."""


def saved_config(saved):
    """The Config of a checkpoint's or report's settings (a dict); TypeError if it is none.
    A run trained with the DDPM formulation of earlier versions cannot be continued or sampled
    (one-line ValueError): those made before EDM came have no "churn" setting, those made while
    both were there name theirs in "formulation"."""
    if saved.get("formulation", "edm" if "churn" in saved else "ddpm") != "edm":
        raise DDPMRun("the run was trained with the DDPM formulation of an earlier version; "
                         "this version trains and samples EDM only (start a new run)")
    return Config(**{k: v for k, v in saved.items() if k not in REMOVED})
