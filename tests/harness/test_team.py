"""Tests for DP-SGD on several processes (team.py): two CPU processes talking over gloo.

The claim under test is that N processes run the one-process mechanism: one global Poisson
sample whose examples are each used once, one noise draw per step, the same update, the same
privacy ledger, and a Ctrl-C that stops them all at one step. The processes get the environment
variables torchrun gives its workers; they are forked from the test process, so they start in
a moment instead of importing torch again (README: torchrun itself was run by hand). A test
fails, rather than hangs, when a process waits forever.
"""
import contextlib
import json
import math
import os
import socket
import time

import pytest
import torch
import torch._dynamo  # noqa: F401  (the first optimizer imports it, for many seconds: here
import torch.distributed as dist  # once, before processes are forked, not once in each)
from torch import nn

import accountant
import diffusion
from harness import team
from harness import flags
import dpsgd
import randomness
from harness import runs
import settings
import train
from conftest import StopAfter

WORLD = 2


# ------------------------------------------------------------------------- starting processes
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank, port, worker, args):
    """What torchrun does for a worker: its rank and the rendezvous in the environment. One
    thread per process: two processes share the cores, results are bit-reproducible, and a
    forked child never waits on the parent's OpenMP threads."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    worker(rank, *args)


@contextlib.contextmanager
def one_thread():
    """The test process computes with one thread, like each forked process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def on_processes(worker, *args, timeout=240):
    """worker(rank, *args) on WORLD forked processes; fails if one fails or hangs."""
    context = torch.multiprocessing.get_context("fork")
    port = free_port()
    processes = [context.Process(target=_as_rank, args=(rank, port, worker, args))
                 for rank in range(WORLD)]
    for p in processes:
        p.start()
    deadline = time.time() + timeout
    for p in processes:
        p.join(max(0.0, deadline - time.time()))
    hung = [p for p in processes if p.is_alive()]
    for p in hung:
        p.kill()  # only the processes this test started
    assert not hung, f"{len(hung)} of {WORLD} processes still waiting after {timeout} s"
    assert [p.exitcode for p in processes] == [0] * WORLD


# ------------------------------------------------------------------------- DP-SGD steps
N_EXAMPLES, STEPS, CLIP = 10, 8, 1.0


def tiny_images(seed=0):
    """Distinct random 8x8 images (so each example can be recognised by its pixels)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (N_EXAMPLES, 1, 8, 8), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (N_EXAMPLES,), generator=g))


class ZeroGradientNet(nn.Module):
    """Predicts eps = 0 whatever its weights: every per-example gradient is exactly zero, so a
    DP-SGD update is the noise alone."""

    def __init__(self, size=20000):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.register_buffer("zeros", torch.zeros(size))

    def forward(self, x, t, y):
        return x * 0 + (self.zeros * self.weight).sum()


def dpsgd_steps(model, q, sigma, steps, seed):
    """train.train_dpsgd for `steps` steps on tiny_images with SGD at lr 1 (the update is
    -noisy sum / qN); returns the weights before and after as flat vectors."""
    images, labels = tiny_images()
    cfg = settings.Config(noise_draws=2, clip=CLIP, chunk=3)
    plan = dict(q=randomness.sampling_rate(q), sigma=sigma, steps=steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    train.train_dpsgd(model, optimizer, diffusion.EMA(model, 0.9), images, labels, cfg, plan,
                      diffusion.EDM(num_classes=10), randomness.secret_generator(seed),
                      accountant.PrivacyLedger(1e-5), 0, lambda step, describe="": None,
                      team.Team(), cfg.chunk)
    return before, torch.cat([p.detach().flatten() for p in model.parameters()])


def recording(setattr):
    """Wrap randomness.poisson_sample and dpsgd.clipped_sum (through `setattr`) to record each
    step's global mask and the examples, recognised by their pixels, that this process clipped."""
    images = diffusion.to_model_range(tiny_images()[0]).flatten(1)
    record = dict(masks=[], shares=[])
    sample, clipped_sum = randomness.poisson_sample, dpsgd.clipped_sum

    def recording_sample(n, q, generator):
        record["masks"].append(sample(n, q, generator))
        return record["masks"][-1]

    def recording_clipped_sum(model, loss, batch_tensors, *args, **kwargs):
        x0 = batch_tensors[0].flatten(1)
        record["shares"].append([int((images == row).all(1).nonzero()) for row in x0])
        return clipped_sum(model, loss, batch_tensors, *args, **kwargs)

    setattr(randomness, "poisson_sample", recording_sample)
    setattr(dpsgd, "clipped_sum", recording_clipped_sum)
    return record


def unet():
    torch.manual_seed(0)
    return diffusion.make_unet("small", 1, 8, 10)


def dpsgd_worker(rank, out):
    """On each process: (1) STEPS steps of the small UNet at q = 0.2 of 10 examples (a share
    is often empty), recording what each step used; (2) one step of ZeroGradientNet; (3) the
    weights check, after changing one weight on rank 1 only."""
    team.start()
    record = recording(setattr)
    _, unet_weights = dpsgd_steps(unet(), q=0.2, sigma=0.1, steps=STEPS, seed=1)
    zero_before, zero_after = dpsgd_steps(ZeroGradientNet(), q=0.5, sigma=2.0, steps=1, seed=2)
    model = ZeroGradientNet(size=3)
    with torch.no_grad():
        model.weight[1] += rank
    try:
        team.check_same_weights(model)
        mismatch_caught = False
    except RuntimeError:
        mismatch_caught = True
    team.finish()
    torch.save(dict(masks=record["masks"][:STEPS], shares=record["shares"][:STEPS],
                    unet=unet_weights, zero_update=zero_after - zero_before,
                    mismatch_caught=mismatch_caught), os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dpsgd"))
    on_processes(dpsgd_worker, out)
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]


def test_every_example_of_the_global_sample_is_used_exactly_once(two_processes):
    masks = [r["masks"] for r in two_processes]
    assert len(masks[0]) == STEPS and all(torch.equal(a, b) for a, b in zip(*masks))
    empty_share = False
    for step, mask in enumerate(masks[0]):
        shares = [r["shares"][step] for r in two_processes]
        assert sorted(shares[0] + shares[1]) == mask.nonzero().flatten().tolist(), step
        empty_share |= min(len(share) for share in shares) == 0
    # The steps above all finished, so a process with nothing to clip took part in its step.
    assert empty_share, "no step gave a process an empty share: this test did not test that"


def test_two_process_steps_equal_one_process_steps(two_processes, monkeypatch):
    """The same seed gives the same sample, diffusion draws and noise; the distributed sum of
    clipped gradients is the sum up to float summation order: a few float32 ulps of C, far
    below the 1e-5 C / qN per step allowed here. (Leaving out the other process's share
    moves a weight by about C / qN / sqrt(#weights) ~ 2e-3 C / qN, 200 times that.)"""
    record = recording(monkeypatch.setattr)
    with one_thread():
        _, alone = dpsgd_steps(unet(), q=0.2, sigma=0.1, steps=STEPS, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(record["masks"], two_processes[0]["masks"]))
    assert sum(len(share) for share in record["shares"]) > 0  # there were gradients to sum
    scale = CLIP / (randomness.sampling_rate(0.2) * N_EXAMPLES)
    for r in two_processes:
        difference = (r["unet"] - alone).abs().max().item()
        assert difference <= 1e-5 * scale * STEPS, difference


def test_weights_are_identical_across_processes(two_processes):
    assert torch.equal(two_processes[0]["unet"], two_processes[1]["unet"])
    assert torch.equal(two_processes[0]["zero_update"], two_processes[1]["zero_update"])
    # and check_same_weights, which train_dpsgd runs at its end, sees a difference of one weight
    assert all(r["mismatch_caught"] for r in two_processes)


def test_noise_is_added_once_per_step(two_processes):
    """All clipped gradients are zero, so the SGD (lr 1) update is -sigma C z / qN with
    z ~ N(0, I): its spread over 20,000 weights must be sigma C / qN. The sample standard
    deviation of 20,000 normals has a relative standard error of 1 / sqrt(2 * 20,000) = 0.5 %;
    the tolerance is 3 % (6 standard errors). Noise added by each process before the sum would
    give 2 times (the same draw twice) or sqrt(2) times (independent draws) the spread."""
    update = two_processes[0]["zero_update"].double()
    expected = 2.0 * CLIP / (randomness.sampling_rate(0.5) * N_EXAMPLES)
    assert abs(update.std().item() / expected - 1) < 0.03, update.std().item() / expected
    assert abs(update.mean().item()) < 6 * expected / math.sqrt(len(update))


@pytest.mark.parametrize("variables, words", [
    (dict(RANK="1"), "RANK=1 and WORLD_SIZE=1"),  # used to print "done", having written nothing
    (dict(WORLD_SIZE="2"), "without MASTER_ADDR"),  # used to end in a traceback
    (dict(WORLD_SIZE="2", RANK="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1", LOCAL_RANK="0"),
     "RANK=2 and WORLD_SIZE=2"),
    (dict(WORLD_SIZE="two"), "whole numbers"),
])
def test_torchrun_variables_without_torchrun_are_refused_in_one_line(
        mnist_dir, tmp_path, monkeypatch, capsys, variables, words):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    assert train.main(small_run_flags(mnist_dir, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and words in err, err
    assert not out.exists() and not dist.is_initialized()


def test_without_torchrun_nothing_is_set_up(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    team.start()
    assert not dist.is_initialized()
    summed = torch.ones(3)
    assert team.sum_over_processes(summed) is summed and torch.equal(summed, torch.ones(3))
    assert team.from_rank0("mine") == "mine" and team.is_main()
    assert team.device_of_this_process("cuda:1") == "cuda:1"


# ------------------------------------------------------------------------- whole runs
def small_run_flags(mnist_dir, out):
    """The tiny preset cut to 100 images, 1 warm-up step and 20 DP-SGD steps at q = 0.04 (two
    blocks of runs.DPSGD_BLOCK steps: DP-SGD stops only at a block's end)."""
    return ["--dataset", "mnist", "--eps", "1", "--preset", "tiny", "--seed", "0",
            "--data-dir", mnist_dir, "--out", str(out), "--device", "cpu",
            "--train-subset", "100", "--batch", "4", "--epochs", "0.8", "--warmup-steps", "1",
            "--sample-steps", "1", "--n-samples", "10", "--fid-n", "0"]


def stop_at(n, monkeypatch=None):
    """Ctrl-C after n reads of the stop flag (conftest.StopAfter); the loops read it once per
    step (here 1 warm-up step, then 20 DP-SGD steps) and once per sample batch."""
    if monkeypatch:
        monkeypatch.setattr(runs, "install_ctrl_c", lambda: StopAfter(n))
    else:
        runs.install_ctrl_c = lambda: StopAfter(n)


def stopped_and_resumed_worker(rank, out, flags, resume_port):
    """train.main on each process. Ctrl-C reaches rank 1 alone, at DP-SGD step 2; every process
    stops at the end of that block of steps (step 10). The run is resumed on two processes and
    stopped again on rank 0, at the first sample batch (by then rank 1 is done: synthesis is
    rank 0's alone)."""
    stop_at(1 + 1 if rank == 1 else 10 ** 9)  # reads: warm-up step, DP-SGD step 1, step 2
    stopped = train.main(flags)
    # rank 0 writes the checkpoint; the others may return before it has
    state = runs.load_checkpoint(out) if rank == 0 else dict(stage=None, step=None)
    os.environ["MASTER_PORT"] = str(resume_port)
    stop_at(10 if rank == 0 else 10 ** 9)  # reads: DP-SGD steps 11 to 20, the sample batch
    resumed = train.main(["--resume", out])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(dict(stopped=stopped, resumed=resumed, stage=state["stage"],
                       step=state["step"]), f)


@pytest.fixture(scope="module")
def stopped_and_resumed(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    on_processes(stopped_and_resumed_worker, str(out), small_run_flags(mnist_dir, out),
                 free_port())
    results = []
    for rank in range(WORLD):
        with open(out / f"rank{rank}.json") as f:
            results.append(json.load(f))
    return out, results


def test_ctrl_c_on_one_process_stops_every_process_at_the_same_step(stopped_and_resumed):
    _, results = stopped_and_resumed
    assert [r["stopped"] for r in results] == [130, 130]  # rank 0 never saw the Ctrl-C
    assert (results[0]["stage"], results[0]["step"]) == ("train_dpsgd", runs.DPSGD_BLOCK)
    assert [r["resumed"] for r in results] == [130, 0]  # stopped in rank 0's synthesis


def test_ledger_and_epsilon_are_those_of_one_process(mnist_dir, stopped_and_resumed):
    """What a one-process run of these settings records is its plan, mechanism by mechanism
    (test_train checks that): the central images once, every DP-SGD step once."""
    out, _ = stopped_and_resumed
    with open(out / runs.REPORT) as f:
        report = json.load(f)
    cfg = flags.settings_of(flags.parse_args(small_run_flags(mnist_dir, out)), None, None)
    plan = train.privacy_plan(cfg, cfg.train_subset)
    history = [tuple(plan["central"]),
               (plan["dpsgd"]["q"], plan["dpsgd"]["sigma"], plan["dpsgd"]["steps"])]
    ledger = accountant.PrivacyLedger.from_dict(report["privacy_ledger"])
    assert [entry[0] for entry in ledger.entries] == ["central images", "DP-SGD"]
    assert ledger.history == history and report["stage"] == "synthesize"
    assert report["privacy_spent"]["eps"] == accountant.epsilon(history, cfg.delta)[0]
    assert report["privacy_spent"]["eps"] == plan["eps"]


def test_stopped_and_resumed_two_process_run_ends_where_a_one_process_run_ends(
        mnist_dir, stopped_and_resumed, tmp_path, monkeypatch):
    """The same seed: the same central images and generator states bit for bit (the processes
    drew exactly what one process draws), the same weights up to float summation order (Adam
    at lr 1e-3 for 5 steps: an ulp or two of weights below 0.2, under 1e-8; 1e-7 allowed)."""
    two, _ = stopped_and_resumed
    one = tmp_path / "run"
    stop_at(1 + 20, monkeypatch)  # at the first sample batch, as the two-process run
    with one_thread():
        assert train.main(small_run_flags(mnist_dir, one)) == 130
    a, b = runs.load_checkpoint(one), runs.load_checkpoint(two)
    assert (a["stage"], a["ledger"]) == (b["stage"], b["ledger"])
    assert torch.equal(a["central"][0], b["central"][0])
    assert torch.equal(a["secret_rng"], b["secret_rng"])
    assert torch.equal(a["public_rng"], b["public_rng"])
    for weights_a, weights_b in ((a["model"], b["model"]), (a["ema"]["model"], b["ema"]["model"])):
        for name, tensor in weights_a.items():
            assert torch.allclose(tensor, weights_b[name], rtol=0, atol=1e-7), name
