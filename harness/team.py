"""DP-SGD on several processes (torchrun) with the privacy of one: one sample, one noise draw.

    torchrun --nproc_per_node=4 train.py --dataset mnist --eps 1

The accountant analyses one mechanism per DP-SGD step: a Poisson sample of the whole dataset,
the sum of its clipped per-example gradients, plus ONE draw of N(0, (sigma C)^2 I). Running the
step on N processes must give exactly that mechanism, so:

* Every process holds the same secret-generator state: rank 0's, drawn from its OS entropy and
  sent to the others in memory (`take_rank0_state`; never written anywhere but the private
  checkpoint, as in a one-process run). So every process draws the SAME global Poisson mask,
  the same diffusion inputs for the whole batch, and the same Gaussian noise vector.
* Each process takes a disjoint share of the batch (positions rank, rank + N, ... : every
  sampled example is used exactly once) and sums its clipped per-example gradients; a share may
  be empty, and that process still takes part in the step.
* `sum_over_processes` (an all-reduce) adds the shares' sums into the batch's sum, the same on
  every process. dpsgd.dp_step adds the noise to that sum, after the reduction: one draw per
  logical step, which every process computes identically, so the noisy sum, the optimizer step
  and the weights are the same everywhere (checked, `check_same_weights`). The update equals
  the one-process update up to the order of the float additions.
* Rank 0 alone draws the releases before DP-SGD (central images, frequency features) and writes
  files (ledger, report, checkpoint); the others take its releases and state. A Ctrl-C on any process stops all of them at the same step
  boundary (`StopTogether`). Synthesis and evaluation (post-processing) run on rank 0 alone.

So the privacy analysis does not depend on the number of processes. Across machines the
all-reduce carries unnoised gradient sums and the broadcast carries the generator state: the
network between the machines must be as trusted as the machines themselves.

Without torchrun (WORLD_SIZE unset or 1) nothing is set up and every function here returns at
once: the one-process run is unchanged. (torch imports torch.distributed itself: no import
cost.) torchrun's variables left in a plain shell (RANK=1, or WORLD_SIZE=2 without the
rendezvous) are refused in one line: RANK=1 alone would make a run that writes nothing, and
WORLD_SIZE=2 one that fails or waits for processes that never come.

Ctrl-C under torchrun: torchrun passes the signal to every process, which checkpoints at the
next step boundary (in DP-SGD, the block's end) and exits; torchrun itself then prints a
traceback (its SignalException) and exits with 1, whatever the processes did, and kills those
still running after --shutdown-timeout seconds (30 by default; give DP-SGD's blocks time).
"""
import os
import sys

import torch
import torch.distributed as dist


def world_size():
    return int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun


def rank():
    return int(os.environ.get("RANK", 0))


def check_environment():
    """One-line ValueError unless the environment is a plain process or a torchrun worker."""
    try:
        size, this = world_size(), rank()
    except ValueError:
        given = ", ".join(f"{n}={os.environ[n]!r}" for n in ("WORLD_SIZE", "RANK")
                          if n in os.environ)
        raise ValueError(f"{given}: WORLD_SIZE and RANK must be whole numbers") from None
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
               if name not in os.environ] if size > 1 else []
    if size < 1 or not 0 <= this < size or missing:
        raise ValueError(f"RANK={this} and WORLD_SIZE={size}{' without ' if missing else ''}"
                         f"{', '.join(missing)} are not a torchrun worker's: start several "
                         f"processes with torchrun, or unset RANK and WORLD_SIZE")


def is_main():
    """Rank 0: the process that draws the releases before DP-SGD and writes the run's files."""
    return rank() == 0


def started():
    return dist.is_initialized() and world_size() > 1


def start():
    """Join torchrun's process group (its environment variables say where the others are).
    CPU tensors travel by gloo; CUDA tensors by NCCL. The other processes' stdout goes to
    /dev/null (each line would be printed N times); their errors (stderr) are kept."""
    check_environment()
    if world_size() == 1:
        return
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    if not is_main():
        sys.stdout = open(os.devnull, "w")


def device_of_this_process(device):
    """cuda: one GPU per process, the one of its local rank on its machine."""
    if not started() or not device.startswith("cuda"):
        return device
    local_rank = int(os.environ["LOCAL_RANK"])
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"--device: process {local_rank} of this machine has no GPU of its own "
                         f"(torch sees {torch.cuda.device_count()}); start at most that many "
                         f"processes per machine (torchrun --nproc_per_node)")
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


def all_ok(ok):
    """True if `ok` on every process: a set-up that failed on one process stops them all,
    instead of leaving the others waiting for it."""
    if not started():
        return ok
    flag = torch.tensor([float(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def from_rank0(obj):
    """Rank 0's `obj` on every process (the others pass anything, e.g. None)."""
    if not started():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]


def take_rank0_state(model, *generators):
    """Every process continues from rank 0's weights and generator states. At the start this
    shares rank 0's secret generator; after a stage that rank 0 ran alone (or on GPUs, whose
    kernels need not be bit-reproducible) it puts all processes back in step."""
    if not started():
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, src=0)
    for generator in generators:
        generator.set_state(from_rank0(generator.get_state()))


def sum_over_processes(summed):
    """The sum of `summed` over all processes (in place): dpsgd.dp_step calls it on each
    process's sum of clipped gradients, before it adds the noise."""
    if started():
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed


def check_same_weights(model):
    """Raise if the processes' weights differ anywhere: they apply the same noisy sums from the
    same start, so they must be equal bit for bit."""
    if not started():
        return
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    lowest, highest = flat.clone(), flat.clone()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    if not torch.equal(lowest, highest):  # the same answer on every process
        raise RuntimeError("the processes' weights differ after DP-SGD (a bug: they apply the "
                           "same noisy sums)")


class StopTogether:
    """runs.install_ctrl_c's flag, agreed by all processes: once Ctrl-C reached any of them (on
    one machine torchrun passes it to all; across machines it may reach only some), every
    process stops at the same step boundary. Every process reads it once per step, together."""

    def __init__(self, stop):
        self.stop = stop

    @property
    def requested(self):
        if not started():
            return self.stop.requested
        flag = torch.tensor([float(self.stop.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def finish():
    """Leave the process group (after DP-SGD: rank 0 goes on alone)."""
    if started():
        dist.destroy_process_group()


class Team:
    """The run's processes, as train.py sees them: created once, and passed where a stage
    differs between processes. For one process (no torchrun) every method returns at once."""

    @property
    def is_main(self):
        return is_main()

    @property
    def share(self):
        """This process's positions in a batch: rank, rank + N, ..."""
        return slice(rank(), None, world_size())

    def start(self):
        start()

    def device_of(self, device):
        return device_of_this_process(device)

    def all_ok(self, ok):
        return all_ok(ok)

    def from_rank0(self, obj):
        return from_rank0(obj)

    def take_rank0_state(self, model, *generators):
        take_rank0_state(model, *generators)

    def sum_over_processes(self, summed):
        return sum_over_processes(summed)

    def check_same_weights(self, model):
        check_same_weights(model)

    def stop_together(self, stop):
        return StopTogether(stop)

    def finish(self):
        finish()
