"""Run bookkeeping for train.py: the run folder, checkpoints, the report, progress and Ctrl-C.

Nothing here is about privacy or diffusion; it keeps train.py about the science. The rules:
* One run per folder: a run holds an OS lock on its folder (`lock_folder`) from before its first
  write until it exits, so a second run, a --resume or an --overwrite of a live run is refused.
* A file is written to a temporary file of its own in the same folder and renamed, so a crash or
  a full disk never leaves half a file, and the file as it was stays until the new one is whole.
* A checkpoint is one file: a header line with the SHA-256 of the rest, then torch.save's bytes.
  A flipped byte, a truncated copy or a foreign file is refused with one line, before anything
  in the run folder is touched; loading never executes code (weights_only).
* A run goes through STAGES in order; `Run.run_stage` skips the stages a resumed run has done and
  checkpoints after each one. A checkpoint names its stage by these strings.
* report.json is rewritten with every checkpoint, so it always says what the checkpoint holds.
* A new run never overwrites a folder that holds a run's files, unless asked to.
* The first Ctrl-C (or SIGTERM, SIGHUP: what schedulers and closed terminals send) asks the loop
  to checkpoint and stop at the next step boundary; a second one ends the process at once.
* In DP-SGD nothing that others can see happens inside a block of steps (`Progress`): a step's
  time grows with its secret batch size, so progress lines, checkpoints and report writes (and
  with them the files' modification times and report.json's timings) come only after whole
  blocks of DPSGD_BLOCK steps, and so does a stop.
"""
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import secrets
import signal
import sys
import time

import torch

from harness import data, team
# The stages of train.py in order, then "done": a checkpoint names the stage it is at by these
# strings, so they are the checkpoint format (settings, sample.py and bench/ use them too).
STAGES = ("release_central_images", "release_frequency_features", "warm_up",
          "warm_up_on_features", "train_dpsgd", "synthesize", "evaluate_release", "done")
TRAINED = STAGES[STAGES.index("synthesize"):]  # the stages at which training is over
CHECKPOINT = "checkpoint.pt"
REPORT = "report.json"
LOCK = ".lock"  # empty; held with flock while a run is live (never removed: see lock_folder)
DPSGD_BLOCK = 10  # DP-SGD steps per block: the fewest that any line, file or timing describes
# Every file a run writes; a folder holding any of them holds a run.
RUN_FILES = (CHECKPOINT, REPORT, "central_images.png", "warmup_samples.png", "samples.png",
             "stages.png", "samples.npz", "feature_samples.png")
_HEADER = b"DP-FETA checkpoint sha256="


class StopRequested(Exception):
    """Ctrl-C arrived; the run was checkpointed at a step boundary."""


class NotFinite(ValueError):
    """The weights hold NaN or inf: the run stops without saving them."""


def atomic_write(path, write, mode="wb"):
    """write(file) into a new temporary file next to path (a unique name: two writers never
    share one), then rename it over path. On any error the temporary file is removed and path
    is left as it was; an OSError names path (a full disk's error names no file)."""
    temporary = f"{path}.{secrets.token_hex(8)}.tmp"
    try:
        with open(temporary, mode.replace("w", "x")) as f:  # x: a new file, never another's
            write(f)
        os.replace(temporary, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), path) from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def lock_folder(folder, option):
    """Lock `folder` for this process's run: an exclusive flock on folder/.lock, held until the
    returned file is closed or the process ends (the OS releases it even after a crash or
    kill -9, so a stale lock cannot block a resume). The lock file itself stays: removing it
    would let a waiting run lock a file that no longer is the one the next run opens.
    One-line ValueErrors that start with `option`."""
    try:
        lock = open(os.path.join(folder, LOCK), "a")
    except FileNotFoundError:
        raise ValueError(f"{option}: there is no folder {folder}") from None
    except OSError as e:
        raise ValueError(f"{option}: cannot write to {folder} ({e.strerror})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise ValueError(f"{option}: {folder} is in use by another run (one run per folder); "
                         f"wait for it to end, or choose another folder") from None
    return lock


def prepare_folder(folder, overwrite=False):
    """Create and lock the run folder (the lock, see lock_folder, is returned), refusing one
    that holds a run's files unless `overwrite` (then those files are removed first, so old and
    new files never mix). Locked before it is looked at: a live run is never overwritten."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out: cannot write to {folder} ({e.strerror})") from None
    lock = lock_folder(folder, "--out")
    try:
        _clear_folder(folder, overwrite)
    except BaseException:
        lock.close()
        raise
    return lock


def _clear_folder(folder, overwrite):
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(folder, name))]
    found += sorted(n for n in os.listdir(folder) if n.startswith("fid_stats"))
    if found and not overwrite:
        hint = (f"continue it with --resume {folder}, " if CHECKPOINT in found else "")
        raise ValueError(f"--out: {folder} already holds a run ({', '.join(found)}); {hint}"
                         f"choose another --out, or pass --overwrite to replace it")
    try:
        for name in found:
            os.remove(os.path.join(folder, name))
        atomic_write(os.path.join(folder, ".writable"), lambda f: None)
        os.remove(os.path.join(folder, ".writable"))
    except OSError as e:
        raise ValueError(f"--out: cannot write to {folder} ({e.strerror})") from None


def resume(folder, held, locks):
    """The checkpoint in `folder` (None for a new run, folder None). If `locks` (the process
    that writes), the folder is locked first, for as long as `held` (an ExitStack) lasts."""
    if folder is None:
        return None
    # A folder that holds no run is refused without making a lock file in it: a refused
    # resume leaves it as it was. (A new run that has not checkpointed yet has one: it is
    # refused as in use. A folder that holds a checkpoint has one from its run.)
    if not os.path.exists(os.path.join(folder, CHECKPOINT)):
        if os.path.exists(os.path.join(folder, LOCK)):
            lock_folder(folder, "--resume").close()
        raise ValueError(f"--resume: no {CHECKPOINT} in {folder}")
    if locks:
        held.enter_context(lock_folder(folder, "--resume"))
    return load_checkpoint(folder)


def save_checkpoint(folder, state):
    """state (a plain dict of tensors, numbers, strings, lists and dicts) -> checkpoint.pt."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = _HEADER + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    atomic_write(os.path.join(folder, CHECKPOINT), lambda f: f.write(header + payload))


def load_checkpoint(folder, option="--resume"):
    """The dict saved by save_checkpoint, after checking its SHA-256; one-line ValueErrors
    that start with `option`, the command-line argument that named the folder."""
    path = os.path.join(folder, CHECKPOINT)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ValueError(f"{option}: no {CHECKPOINT} in {folder}") from None
    except OSError as e:
        raise ValueError(f"{option}: cannot read {path} ({e.strerror})") from None
    header, _, payload = raw.partition(b"\n")
    if not header.startswith(_HEADER):
        raise ValueError(f"{option}: {path} is not a DP-FETA checkpoint (no header)")
    if hashlib.sha256(payload).hexdigest().encode() != header[len(_HEADER):]:
        raise ValueError(f"{option}: {path} is damaged (its SHA-256 does not match); "
                         f"it cannot be used")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # a checksummed file that torch cannot read: a foreign writer
        raise ValueError(f"{option}: cannot read {path} ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{option}: {path} does not hold a checkpoint dict")
    return state


def write_report(folder, report):
    atomic_write(os.path.join(folder, REPORT), lambda f: json.dump(report, f, indent=2), "w")


def install_ctrl_c():
    """A flag object: the first Ctrl-C, SIGTERM or SIGHUP sets `stop.requested`; a second one
    ends the process at once, as that signal does by default (nothing more is written).
    Schedulers send SIGTERM a while before they kill a job, and a closed terminal sends SIGHUP:
    both get the checkpoint that Ctrl-C gets. A signal ignored when the run started (nohup,
    a background job) stays ignored."""
    stop = type("Stop", (), {"requested": False})()

    def handler(signum, frame):
        if stop.requested:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        stop.requested = True
        if signum == signal.SIGHUP:  # the terminal is gone: writing to it would fail
            for stream in ("stdout", "stderr"):
                if getattr(sys, stream).isatty():
                    setattr(sys, stream, open(os.devnull, "w"))
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: checkpointing at the end of this step (in DP-SGD: of this block of "
              f"{DPSGD_BLOCK} steps); {name} again ends the run at once", flush=True)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, handler)
    return stop


class Progress:
    """Called after every step of a loop. At the end of each block of `block` steps it prints a
    line (every `every` seconds, and at the last step: elapsed time and an ETA averaged over the
    steps so far), checks the weights (`check`), checkpoints every `checkpoint_minutes`, and
    stops if asked to (Ctrl-C). Inside a block nothing is shown or written, and a stop waits for
    the block's end: in DP-SGD (block=DPSGD_BLOCK), where a step's time grows with its secret
    batch size, no line, no file and no file's modification time describes fewer steps than a
    block. Blocks are counted from the stage's step 0 (a resumed run continues at a block's
    end); a short last block joins the one before it (25 steps: blocks end at 10 and 25)."""

    def __init__(self, stage, first, total, checkpoint, stop, checkpoint_minutes, every=10.0,
                 block=1, check=None):
        self.stage, self.first, self.total, self.block = stage, first, total, block
        self.checkpoint, self.stop, self.check = checkpoint, stop, check
        self.checkpoint_seconds, self.every = 60 * checkpoint_minutes, every
        self.started = self.last_line = self.last_save = time.time()
        self.stopping = False

    def ends_block(self, step):
        return step == self.total or (step % self.block == 0 and self.total - step >= self.block)

    def __call__(self, step, describe=""):
        """step: the number of steps done; describe: what to add to the line (or a function
        that returns it, called only when a line is printed)."""
        # The flag is read once per step: in a multi-process run each read is a collective
        # that all of them make together, so they all stop at the same block's end.
        requested = self.stop.requested
        self.stopping = self.stopping or requested
        if not self.ends_block(step):
            return
        if self.check:
            self.check(step)
        now, done = time.time(), step - self.first
        if now - self.last_line > self.every or step == self.total:
            elapsed = now - self.started
            eta = elapsed / max(done, 1) * (self.total - step)
            describe = describe() if callable(describe) else describe
            print(f"[{self.stage}] step {step}/{self.total}{describe} | "
                  f"{elapsed / 60:.1f} min | ETA {eta / 60:.1f} min", flush=True)
            self.last_line = now
        if self.stopping or now - self.last_save > self.checkpoint_seconds:
            self.checkpoint(step)
            self.last_save = now
            if self.stopping:
                raise StopRequested()


class Run:
    """One run's state, which is what its checkpoint holds: settings (a Config), privacy plan,
    model, optimizer, EMA, the secret and public generators, the privacy ledger, the stage and
    step reached, and what the stages produced so far (central images, sample batches, metrics).
    train.py builds it (`new_run`); its stages fill it (`run_stage`)."""

    def __init__(self, folder, cfg, plan, device, model, edm, optimizer, ema, secret, public,
                 seeded, ledger):
        self.folder, self.cfg, self.plan = folder, cfg, plan
        self.device, self.model, self.edm = torch.device(device), model, edm
        self.optimizer, self.ema, self.secret, self.public = optimizer, ema, secret, public
        self.seeded, self.ledger = seeded, ledger
        self.options = dict(device=str(self.device))  # where things are: device, data, weights
        self.team = team.Team()  # torchrun's processes (launch.start_run); alone: no-ops
        self.writes = True  # False on all but one of the processes of a distributed run
        self.stop, self.checkpoint_minutes = None, 10.0  # the flag of install_ctrl_c; its period
        self.stage, self.step, self.central, self.pieces = 0, 0, None, []
        self.features = None  # --frequency: the released table and its frequencies' seed
        self.metrics, self.timings, self.clock = {}, {}, time.time()
        self.data_digest = None  # data.digest of the training data (private, like all here)

    def path(self, name):
        return os.path.join(self.folder, name)

    def release_once(self, draw):
        """draw()'s result, drawn once: with several processes rank 0 alone draws it (one draw
        of the mechanism, from its secret generator) and the others receive it."""
        return self.team.from_rank0(draw() if self.team.is_main else None)

    def align_processes(self):
        """Every process continues from rank 0's weights and generator states: after a stage
        that rank 0 ran alone, or on GPUs, whose kernels need not be bit-reproducible."""
        self.team.take_rank0_state(self.model, self.secret, self.public)

    def stop_point(self, message):
        """A progress line of a loop whose steps are not the stage's (the evaluation's batches):
        printed to stderr; a requested stop checkpoints here and stops."""
        print(message, file=sys.stderr, flush=True)
        if self.stop.requested:
            self.checkpoint()
            raise StopRequested()

    def save_grid(self, images, name, nrow):
        """A PNG grid in the run folder, written by the one process that writes."""
        if self.writes:
            data.save_grid(images, self.path(name), nrow)

    def run_stage(self, name, body):
        """body() unless the run is past stage `name` (a resumed run); then the time is the
        stage's, the run moves to the next stage, and a checkpoint saves it. A stage stopped
        half-way continues from its saved step: body() reads self.step."""
        if self.stage > STAGES.index(name):
            return
        body()
        self.tally_time()  # the time so far is this stage's, not the next one's
        self.stage, self.step = STAGES.index(name) + 1, 0
        self.checkpoint()

    def progress(self, total, block=1, keeps_step=False):
        """A Progress for this stage's loop, from the step reached; it also stops the run on
        NaN or inf weights (check_weights). keeps_step: a loop inside a stage's step (the
        frequency stage's generator fit), whose steps are not the stage's: it checkpoints only
        to stop, at the stage's step, and starts again on resume."""
        if keeps_step:
            return Progress(STAGES[self.stage], 0, total, lambda step: self.checkpoint(),
                            self.stop, float("inf"), check=self.check_weights)
        return Progress(STAGES[self.stage], self.step, total, self.checkpoint, self.stop,
                        self.checkpoint_minutes, block=block, check=self.check_weights)

    def tally_time(self):
        """Add the wall-clock time since the last tally to the stage in progress."""
        name = STAGES[self.stage]
        self.timings[name] = self.timings.get(name, 0.0) + time.time() - self.clock
        self.clock = time.time()

    def check_weights(self, step=None):
        """NotFinite unless every weight is a finite number. Training that diverged (e.g. a
        learning rate far too large) would otherwise go on to release noise, and it is checked
        before every checkpoint, so such weights are never saved over the last good ones."""
        if all(torch.isfinite(p).all() for p in self.model.parameters()):
            return
        raise NotFinite(f"the weights are NaN or inf after {STAGES[self.stage]} step "
                        f"{self.step if step is None else step}: training diverged (--lr or "
                        f"--clip too large?); the last checkpoint is kept, but a resume would "
                        f"repeat the same steps: start a new run with other settings")

    def checkpoint(self, step=None):
        """Save the whole state, then the report that describes it."""
        self.check_weights(step)
        if step is not None:
            self.step = step
        if not self.writes:
            return
        self.tally_time()
        name = STAGES[self.stage]
        settings = dataclasses.asdict(self.cfg)
        save_checkpoint(self.folder, dict(
            cfg=settings, plan=self.plan, options=self.options, seeded=self.seeded,
            stage=name, step=self.step, ledger=self.ledger.to_dict(), central=self.central,
            features=self.features,
            samples=self.pieces, metrics=self.metrics, timings=self.timings,
            model=self.model.state_dict(), ema=self.ema.state_dict(),
            optimizer=self.optimizer.state_dict(), secret_rng=self.secret.get_state(),
            public_rng=self.public.get_state(), data_sha256=self.data_digest))
        eps, order = self.ledger.epsilon()
        write_report(self.folder, dict(
            settings=settings, seed="fixed by --seed" if self.seeded else "secret", stage=name,
            privacy_plan=self.plan, privacy_ledger=self.ledger.to_dict(),
            privacy_spent=dict(eps=eps, delta=self.cfg.delta, order=order),
            metrics=self.metrics, timings_s=self.timings))

    def restore(self, state):
        """Load a checkpoint's state: every check and every load happens here, before anything
        is written, so a checkpoint that does not fit leaves the run folder as it was.
        Raises one-line ValueErrors."""
        try:
            self._restore(state)
        except (KeyError, TypeError, AttributeError, RuntimeError, ValueError) as e:
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else repr(e)
            raise ValueError(f"--resume: the checkpoint in {self.folder} does not fit this run "
                             f"({type(e).__name__}: {reason})") from None

    def _restore(self, state):
        if state["stage"] not in STAGES or type(state["step"]) is not int:
            raise ValueError(f"unknown stage {state['stage']!r} or step {state['step']!r}")
        self.stage, self.step = STAGES.index(state["stage"]), state["step"]
        self.model.load_state_dict(state["model"])  # strict: names and shapes
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        shapes = [p.shape for p in self.model.parameters()]
        for per_parameter in self.optimizer.state_dict()["state"].values():  # torch does not check
            for value in per_parameter.values():
                if value.dim() and value.shape not in shapes:
                    raise ValueError(f"optimizer state of shape {tuple(value.shape)}")
        self.secret.set_state(state["secret_rng"])
        self.public.set_state(state["public_rng"])
        self.ledger = type(self.ledger).from_dict(state["ledger"])
        self.central, self.pieces = state["central"], [tuple(p) for p in state["samples"]]
        self.features = state.get("features")  # checkpoints from before the stage have none
        shape = (self.model.in_channels, self.model.image_size, self.model.image_size)
        for images, labels in ([self.central] if self.central else []) + self.pieces:
            if tuple(images.shape[1:]) != shape or labels.shape != images.shape[:1]:
                raise ValueError(f"stored images of shape {tuple(images.shape)}")
        self.seeded, self.metrics, self.timings = state["seeded"], state["metrics"], state["timings"]
