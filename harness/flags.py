"""The flags of train.py and the checks every command line shares.

`parse_args` builds train.py's flags from settings.Config (each field's comment is its help);
`settings_of` turns them into a run's Config: a new run's preset with the flags given, or a
resumed run's own settings, of which only those that act after training may change
(AFTER_TRAINING). REQUIREMENTS states each number's bounds once; the other command lines
(sample.py, evaluate.py, central.py) take their counts and seeds through `bounded` (evaluate.py's
--n is checked against its samples file), and every command line
checks --device with `check_device`. Every problem is one line (ValueError, or exit status 2 for
flags that argparse cannot read), before anything is computed.
"""
import argparse
import dataclasses
import inspect
import re

import torch

import diffusion
import samplers
import settings
from harness import cli, data, runs
from settings import PRESETS, Config, saved_config


def parse_args(argv=None, description=None):
    comments = re.findall(r"^    (\w+): \w+ = .*?# (.*)$", inspect.getsource(settings.Config), re.M)
    help_of = dict(comments)
    p = cli.OneLineParser(description=description,
                      epilog="Settings left out come from the preset; a resumed run keeps its own.")

    def setting(flag, **kwargs):  # a Config field: its comment and the presets' values as help
        name = flag.lstrip("-").replace("no-", "").replace("-", "_")
        values = ", ".join(f"{k}: {getattr(v, name)}" for k, v in PRESETS.items())
        p.add_argument(flag, dest=name, default=None, help=f"{help_of[name]} [{values}]", **kwargs)

    p.add_argument("--preset", choices=PRESETS, help="settings bundle (default: paper on a GPU, "
                   "cpu otherwise)")
    setting("--dataset")
    setting("--eps", type=float)
    setting("--delta", type=float)
    setting("--no-central", action="store_const", const=False)
    setting("--central-q", type=float)
    setting("--central-sigma", type=float)
    setting("--central-queries", type=int)
    setting("--warmup-steps", type=int)
    setting("--warmup-batch", type=int)
    setting("--frequency", action="store_const", const=True)
    setting("--frequency-sigma", type=float)
    setting("--generator-steps", type=int)
    setting("--frequency-steps", type=int)
    setting("--no-dpsgd", action="store_const", const=False)
    setting("--model")
    setting("--batch", type=int)
    setting("--epochs", type=float)
    setting("--noise-draws", type=int)
    setting("--lr", type=float)
    setting("--clip", type=float)
    setting("--ema", type=float)
    setting("--chunk", type=int)
    setting("--autocast", action=argparse.BooleanOptionalAction)
    setting("--sample-steps", type=int)
    setting("--solver", choices=samplers.SOLVERS)
    setting("--churn", type=float)
    setting("--guidance", type=float)
    setting("--n-samples", type=int)
    setting("--fid-n", type=int)
    setting("--classifier-epochs", type=int)
    setting("--classifier-lr", type=float)
    setting("--train-subset", type=int)
    p.add_argument("--out", type=cli.path, help="run folder (default "
                   "runs/<dataset>-eps<eps>[-nocentral], or runs/<dataset>-nodpsgd)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in --out even if it holds one (its files are removed)")
    p.add_argument("--resume", type=cli.path, metavar="RUN_DIR", help="continue a stopped run")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available; when resuming, "
                   "the run's own)")
    p.add_argument("--seed", type=bounded("seed"), help="fix all randomness, DP noise included "
                   "(testing only: a known seed lets anyone remove the noise); default: a secret "
                   "generator")
    p.add_argument("--data-dir", type=cli.path,
                   help="folder with the dataset files (default ./data/<dataset>)")
    p.add_argument("--trust-data-files", action="store_true",
                   help="accept dataset files that are not the official ones (their number of "
                   "images or digest differs): your own data, knowingly")
    p.add_argument("--inception", type=cli.path, help="local FID Inception weights file")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0,
                   help="also checkpoint this often during training (in DP-SGD at the end of "
                   "a block of 10 steps; default 5)")
    args = p.parse_args(argv)
    for option in ("out", "overwrite"):  # refused rather than ignored
        if args.resume is not None and getattr(args, option):
            p.error(f"--{option}: a resumed run continues in its own folder ({args.resume}); "
                    f"leave out --{option}")
    return args


# Settings that only change what happens after training, with the train.py stage (runs.STAGES)
# that uses them: a resumed run may change them while that stage has not started (once it has,
# its output so far was made with them, and a change would mix two settings in one release).
AFTER_TRAINING = dict(n_samples="synthesize", sample_steps="synthesize", solver="synthesize",
                      churn="synthesize", guidance="synthesize", fid_n="evaluate_release",
                      classifier_epochs="evaluate_release", classifier_lr="evaluate_release")


def settings_of(args, state, device):
    """The run's Config: a new run's preset with the flags given (no --preset: by its device);
    a resumed run's own (state: its checkpoint), where only the AFTER_TRAINING settings of
    stages not yet started may change."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
             if getattr(args, f.name) is not None}
    if state is None:
        preset = args.preset or ("paper" if device.startswith("cuda") else "cpu")
        return dataclasses.replace(PRESETS[preset], **given)
    try:
        cfg, reached = saved_config(state["cfg"]), runs.STAGES.index(state["stage"])
        started = bool(state["step"] or state["samples"])  # the stage reached made some output
    except settings.DDPMRun as e:  # a run of an earlier version: say why
        raise ValueError(f"--resume: {args.resume}: {e}") from None
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"--resume: {args.resume} holds no valid settings") from None
    for name, value in given.items():
        if value == getattr(cfg, name):
            continue
        stage = runs.STAGES.index(AFTER_TRAINING[name]) if name in AFTER_TRAINING else -1
        if not (reached < stage or reached == stage and not started):
            raise ValueError(f"{flag(name)}: {args.resume} is a run with "
                             f"{name}={getattr(cfg, name)}; a resumed run keeps its settings "
                             f"(only sampling and evaluation settings of stages not yet "
                             f"started may change)")
    for option in ("preset", "seed"):
        if getattr(args, option) is not None:
            raise ValueError(f"--{option}: a resumed run continues its own settings and random "
                             f"state")
    return dataclasses.replace(cfg, **given)


def options_of(args, state, device_of):
    """Where things are (device, data, FID weights, --trust-data-files): as given, else a
    resumed run's own (state: its checkpoint), the device by default cuda if there is one;
    checked (check_options). device_of: the device of this process (team.py)."""
    saved = state.get("options") if state and isinstance(state.get("options"), dict) else {}
    options = {name: getattr(args, name) or saved.get(name)
               for name in ("device", "data_dir", "inception", "trust_data_files")}
    options["device"] = options["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    check_options(argparse.Namespace(**{**vars(args), **options}), state)
    return dict(options, device=device_of(options["device"]))


# What each number must be: (test, in words). Anything else is refused before any work. The
# upper bounds keep runs where float32 arithmetic and the methods mean something: Adam moves
# each weight by about lr per step (lr = 1e30 and C = 1e38, whose square and noise overflow,
# ended in all-black samples), and counts stop at ten million, far beyond any protocol here,
# where a typo would otherwise start a run with an ETA of years.
MAX_COUNT = 10_000_000
REQUIREMENTS = dict(
    eps=(lambda v: v > 0, "> 0"), delta=(lambda v: 0 < v < 1, "in (0, 1)"),
    central_q=(lambda v: 0 < v <= 1, "in (0, 1]"),
    central_sigma=(lambda v: 0 < v <= 1e6, "in (0, 1e6]"),
    central_queries=(lambda v: 1 <= v <= 1000, "in 1..1000"),
    warmup_steps=(lambda v: 0 <= v <= MAX_COUNT, f"in 0..{MAX_COUNT}"),
    warmup_batch=(lambda v: 1 <= v <= MAX_COUNT, f"in 1..{MAX_COUNT}"),
    frequency_sigma=(lambda v: 0 < v <= 1e6, "in (0, 1e6]"),
    generator_steps=(lambda v: 0 <= v <= MAX_COUNT, f"in 0..{MAX_COUNT}"),
    frequency_steps=(lambda v: 0 <= v <= MAX_COUNT, f"in 0..{MAX_COUNT}"),
    batch=(lambda v: v >= 1, ">= 1"), epochs=(lambda v: 0 < v <= 10_000, "in (0, 10000]"),
    noise_draws=(lambda v: 1 <= v <= 1024, "in 1..1024"),
    lr=(lambda v: 0 < v <= 1, "in (0, 1]"), clip=(lambda v: 1e-6 <= v <= 1e6, "in [1e-6, 1e6]"),
    ema=(lambda v: 0 <= v < 1, "in [0, 1)"), chunk=(lambda v: v >= 1, ">= 1"),
    sample_steps=(lambda v: 1 <= v <= 1000, "in 1..1000"),
    guidance=(lambda v: 0 <= v <= 100, "in [0, 100]"),
    churn=(lambda v: 0 <= v <= 1000, "in [0, 1000]"),
    n_samples=(lambda v: 2 <= v <= MAX_COUNT, f"in 2..{MAX_COUNT}"),
    fid_n=(lambda v: v == 0 or 2 <= v <= MAX_COUNT,
           f"0 (no FID) or in 2..{MAX_COUNT} (two images a side at least)"),
    classifier_epochs=(lambda v: 1 <= v <= 10_000, "in 1..10000"),
    classifier_lr=(lambda v: 0 < v <= 1, "in (0, 1]"),
    train_subset=(lambda v: v >= 0, ">= 0 (0: all)"),
    # Not a setting: the --seed of every command line, what torch's generators take.
    seed=(lambda v: 0 <= v < 2 ** 64, "in 0..2**64 - 1"))


def meets(name, value):
    """Whether the number `value` meets REQUIREMENTS[name] (and is finite)."""
    test, _ = REQUIREMENTS.get(name, (lambda v: True, ""))
    return test(value) and value < float("inf")


def bounded(name):
    """The argparse type of a flag that sets the same quantity as `name` (a setting, or
    "seed"): the other command lines take their counts, rates and seeds through it (sample.py's
    --n is n_samples, central.py's --queries central_queries), so each bound is written once,
    in REQUIREMENTS, and a value out of it is refused while the flags are read."""
    kind = {f.name: f.type for f in dataclasses.fields(Config)}.get(name, int)

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got '{text}'") from None
        if not meets(name, value):
            raise argparse.ArgumentTypeError(f"must be {REQUIREMENTS[name][1]}, got {value}")
        return value
    return parse


def flag(name):
    return f"--no-{name}" if name in ("central", "dpsgd") else "--" + name.replace("_", "-")


def check_settings(cfg):
    """One-line ValueErrors for settings that cannot work (a resumed run's too)."""
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if type(value) is not f.type and not (f.type is float and type(value) is int):
            raise ValueError(f"{flag(f.name)}: expected {f.type.__name__}, got {value!r}")
        if isinstance(value, (int, float)) and not meets(f.name, value):
            raise ValueError(f"{flag(f.name)} must be {REQUIREMENTS[f.name][1]}, got {value}")
    for name, allowed in dict(dataset=data.INFO, model=diffusion.MODEL_SIZES,
                              solver=samplers.SOLVERS).items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name}: unknown '{getattr(cfg, name)}', choose one of "
                             f"{', '.join(allowed)}")
    if not cfg.dpsgd and not (cfg.central and cfg.warmup_steps):
        raise ValueError("--no-dpsgd: the warm-up on the central images is then all the training; "
                         "it needs the easy stage (no --no-central) and --warmup-steps >= 1")


def check_device(name):
    """The torch.device that --device `name` names (None: cuda if torch sees a GPU, else cpu),
    if this project runs on it and this machine has it; else one ValueError line. The one
    device check of every command line: cpu and cuda[:N]. Apple's GPUs (mps) are refused: the
    per-example gradients and the float64 clipping and noise were never tested there (MPS has
    no float64), and the privacy argument rests on that arithmetic."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):  # torch's own message lists a dozen exotic device types
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got '{name}'") from None
    if device.type == "mps":
        raise ValueError(f"--device {name}: Apple GPUs (mps) are untested here; use cpu or cuda")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got '{name}'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here (try --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s)")
    return device


def check_options(args, state):
    """The options that are not settings: --device (check_device, and a resumed run's own
    kind, where its random state continues) and --checkpoint-minutes."""
    device = check_device(args.device)
    try:
        saved = torch.device(state["options"]["device"]) if state else None
    except (RuntimeError, KeyError, TypeError):
        raise ValueError(f"--resume: the checkpoint in {args.resume} names no valid "
                         f"device") from None
    if saved is not None and saved.type != device.type:
        raise ValueError(f"--device: {args.resume} ran on {saved}; its random state only "
                         f"continues there")
    if not 0 < args.checkpoint_minutes < float("inf"):
        raise ValueError(f"--checkpoint-minutes must be > 0, got {args.checkpoint_minutes}")
