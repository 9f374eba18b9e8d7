"""DP-SGD: per-example clipping and Gaussian noise on Poisson-sampled batches.

This is Algorithm 1 of Abadi et al. 2016, "Deep Learning with Differential Privacy", with the
two refinements the hard stage of DP-FETA (training on the sensitive images) relies on:

* Poisson sampling (each example joins a batch independently with probability q,
  randomness.poisson_sample), because that is the mechanism the RDP accountant analyses
  (accountant.py); shuffled fixed-size batches are a different mechanism and would make the
  reported epsilon wrong.
* Noise multiplicity from Dockhorn et al. 2022 (DPDM): the caller's per-example loss may
  average K diffusion-noise draws of one example. That gives ONE gradient per example, which is
  clipped once. The privacy unit is the example: clipping the average bounds its influence by C
  whatever K is, so the K draws cost the privacy of one; and the average has lower variance
  than a single draw, so clipping it throws away less signal.

One logical step (`dp_step`) is three functions, one per line of the algorithm:
    clipped_sum:  sum_i g_i min(1, C / ||g_i||)     g_i = grad of loss_i via torch.func (vmap of
                                                     vjp); flat L2 norm over all parameters
    add_noise:    + N(0, (sigma C)^2 I), drawn and added in float64
    scale_grad:   / (q N), handed to any torch optimizer as `.grad`
The batch is processed in physical chunks whose clipped gradients are summed and dropped, so
memory depends on the chunk size, never on the logical batch size.
"""
import torch
from torch import nn
from torch.func import functional_call, vjp, vmap


def dp_step(model, optimizer, per_example_loss, batch_tensors, clip_norm, sigma,
            expected_batch_size, noise_generator, chunk_size=32, autocast=False,
            sum_over_processes=None):
    """One DP-SGD step (Abadi et al. 2016, Algorithm 1) on a Poisson-sampled batch.

    per_example_loss(model_callable, *tensors) -> [B]: the loss of each example (a callable that
    runs the model, then the examples' tensors), written once for ordinary batches.
    batch_tensors: tuple of tensors with the batch's examples along dim 0 (may be empty).
    clip_norm C, noise multiplier sigma, expected_batch_size qN with the q of the sampler and
    the accountant. noise_generator: the secret generator (randomness.py).
    chunk_size: examples per vmap pass. Memory grows with it (never with the logical batch);
    on a 2-core CPU about 128 images per pass (chunk_size * K draws) ran fastest.
    autocast: the forward pass under bfloat16 autocast (CPUs with bf16 units, GPUs); the
    per-example gradients stay float32, and their norms, clipping, sum and noise float64.
    sum_over_processes: with several processes (torchrun), batch_tensors is this
    process's share of the batch and this function adds the shares' clipped sums (an
    all-reduce); every process must call dp_step every step, with an empty share too.
    Returns nothing: everything it could report about the batch is unprivatised.
    """
    check_per_example_independence(model)
    if autocast:
        check_autocast_support(model)
    _check_step_arguments(batch_tensors, clip_norm, sigma, expected_batch_size)
    summed = clipped_sum(model, per_example_loss, batch_tensors, clip_norm, chunk_size, autocast)
    if sum_over_processes is not None:
        summed = sum_over_processes(summed)  # now the whole batch's sum, on every process
    # The noise goes on the whole batch's sum, after any reduction: one draw per logical step.
    # (With several processes each draws the same vector from the same generator state and
    # adds it to the same sum: the same noisy sum everywhere, not one draw per process.)
    noisy_sum = add_noise(summed, sigma, clip_norm, noise_generator)
    scale_grad(model, noisy_sum, expected_batch_size)
    optimizer.step()


def clipped_sum(model, per_example_loss, batch_tensors, clip_norm, chunk_size=32,
                autocast=False):
    """sum_i clip(g_i), as one flat float64 vector over the trainable parameters.

    clip(g) = g * min(1, C' / ||g||) with C' = C (1 - clip_margin). Norms, factors and the sum are
    float64: a gradient of any scale is clipped correctly, and the sums of two neighbouring
    batches differ by at most C, rounding included (clip_margin says exactly when), given the
    same gradients for the examples they share. (That an example's float32 gradient comes out
    bit for bit the same whatever else is in its chunk is assumed, not proven: batched kernels
    may round differently for another batch size.) An example whose gradient is not finite (a
    NaN or inf anywhere) contributes zero: its influence would otherwise be unbounded, and zero
    is a contribution of norm <= C like any other. How many examples were clipped or dropped is
    never returned: those counts are statistics of the sensitive batch that no mechanism
    privatised.
    """
    params = {n: p.detach() for n, p in _trainable_params(model).items()}
    device = next(iter(params.values())).device
    grad_fn = _per_example_grad_fn(model, per_example_loss, len(batch_tensors), autocast)
    numels = [p.numel() for p in params.values()]
    safe_clip = clip_norm * (1 - clip_margin(numels))
    # The running sum is one flat float64 vector; each parameter's gradient is a view into it.
    # (float32 rounding of a sum of 60,000 contributions moved it by up to 1.0017 C: measured.)
    summed = torch.zeros(sum(numels), dtype=torch.float64, device=device)
    summed_views = summed.split(numels)
    for s, e in _chunks(len(batch_tensors[0]), chunk_size):
        grads, _ = grad_fn(params, *(t[s:e] for t in batch_tensors))
        # [b, numel], float32 each. contiguous(): vmap may hand back an expanded view, whose
        # elements share memory (a parameter used as p.sum() has the gradient 1 for every
        # example and entry), and nan_to_num_ below writes in place; for any other gradient
        # it is a no-op.
        grads = [g.reshape(e - s, -1).contiguous() for g in grads.values()]
        # Flat L2 norm over all parameters from the per-tensor norms, in float64: the squares of
        # float32 numbers neither underflow nor overflow there, whatever the gradient's scale.
        # (Concatenating the gradients into one [b, P] matrix first costs an extra pass over
        # memory: measured slower.)
        norms = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g, dim=1, dtype=torch.float64) for g in grads]), dim=0)
        factors = (safe_clip / norms).clamp(max=1.0)
        factors = torch.where(norms.isfinite(), factors, 0.0)
        for view, g in zip(summed_views, grads):
            # 0 * NaN is NaN: a dropped example's entries are zeroed as well (no branch on
            # whether any were non-finite, so the step does the same work either way). The
            # float64 copy holds one tensor's chunk at a time.
            view.addmv_(g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).T.double(), factors)
        del grads  # the chunk's per-example gradients are dropped here: bounded memory
    return summed


def add_noise(summed, sigma, clip_norm, generator):
    """summed + N(0, (sigma C)^2 I) in float64, drawn from `generator` (on its device).

    Calibrated to the sensitivity C of the sum: with Poisson sampling, adding or removing one
    example changes the sum of clipped gradients by at most C. An empty batch gets its noise
    too: skipping it would reveal that the batch was empty.
    Why float64 (Mironov 2012, "On significance of the least significant bits for differential
    privacy"): torch's float32 normal is Box-Muller on 24-bit uniforms, a discrete law cut off
    at |z| <= 5.77, whose gaps and cut-off a neighbouring dataset's outputs need not share.
    torch's float64 normal on the CPU is Box-Muller computed in float64 on 53-bit uniforms
    k / 2^53 (|z| <= 8.6); the noisy sum is formed in float64 and only then cast to float32
    (scale_grad), which is post-processing. What remains: beyond a Box-Muller radius of about 7
    (4.6e-11 of the pairs drawn) the 53-bit law's values lie farther apart than float32's grid,
    so such a coordinate's released value can be impossible under a neighbouring dataset.
    Closing that takes noise on a fixed grid (a discrete Gaussian), the sum snapped to it."""
    noise = torch.randn(summed.shape, generator=generator, dtype=torch.float64,
                        device=generator.device)
    return summed.double() + sigma * clip_norm * noise.to(summed.device)


def scale_grad(model, noisy_sum, expected_batch_size):
    """Set each trainable parameter's .grad to its slice of noisy_sum / (q N), in its dtype.

    The divisor is the expected batch size qN, a public constant: dividing by it is
    post-processing. The realised batch size moves by one when an example is added, so dividing
    by it would change the sensitivity the accountant assumes."""
    flat = noisy_sum / expected_batch_size
    named = _trainable_params(model)
    for p, view in zip(named.values(), flat.split([p.numel() for p in named.values()])):
        p.grad = view.view_as(p).to(p.dtype)  # the cast of the noisy value: post-processing


# ------------------------------------------------------------------------------ how, in detail
def _per_example_grad_fn(model, per_example_loss, num_tensors, autocast=False):
    """Return f(params, *chunk_tensors) -> (grads dict of [b, ...], losses [b]).

    Inside vmap each example is seen alone, re-given a batch dim of 1, so the caller's loss is
    written once for ordinary batches. Buffers and frozen parameters are read from `model`.
    autocast: the forward pass only runs under bfloat16 autocast (as with loss.backward(), the
    backward pass follows the forward's dtypes); gradients come out float32 like the weights.
    """
    device_type = next(model.parameters()).device.type

    def loss_of_one_example(params, *example):
        def model_fn(*args, **kwargs):
            return functional_call(model, params, args, kwargs)

        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            loss = per_example_loss(model_fn, *(t.unsqueeze(0) for t in example))
        return loss.float().sum()  # [1] -> []

    def grad_and_loss_of_one_example(params, *example):
        # This is torch.func.grad, spelled as vjp so that we can pass create_graph=False: grad
        # always records the backward pass for higher derivatives, which DP-SGD never takes;
        # measured, that doubles the memory of a chunk. Same gradients either way.
        loss, backward = vjp(lambda p: loss_of_one_example(p, *example), params)
        (grads,) = backward(torch.ones_like(loss), create_graph=False)
        return grads, loss

    # randomness="different": layers like dropout draw an independent mask per example, as in
    # an ordinary batched forward pass.
    return vmap(grad_and_loss_of_one_example, in_dims=(None,) + (0,) * num_tensors,
                randomness="different")


def _chunks(batch_size, chunk_size):
    chunk_size = batch_size if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be a positive integer or None, got {chunk_size}")
    return [(s, min(s + chunk_size, batch_size)) for s in range(0, batch_size, chunk_size)]


# The clipping norms C that dp_step accepts: the normal float32 numbers, like the gradients that C
# bounds. For every such C and every finite float32 gradient, the float64 arithmetic of clipping,
# summing and noising neither underflows nor overflows, as clip_margin's proof assumes. (With
# float32 squares, C = 1e-30 clipped nothing: a gradient of norm 10 C had squares below float32's
# range, its norm came out 0, and it passed unclipped.)
CLIP_NORM_RANGE = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)


def clip_margin(numels):
    """The relative margin m such that clipping to C (1 - m) keeps the sensitivity of the
    computed sum <= C, rounding included: adding or removing one example moves the float64 sum
    of clipped gradients by at most C exactly, in batches of fewer than 2^17 examples.

    numels: the sizes of the trainable parameter tensors. Norms, factors and sums are float64
    (unit roundoff u = 2^-53), where the squares and products of float32 gradients never
    underflow or overflow (C in CLIP_NORM_RANGE). Two roundings are covered (Higham, "Accuracy
    and Stability of Numerical Algorithms"):
    * the norm (Sec. 4.2): a sum of n non-negative terms is off by at most (n - 1) u of itself,
      so a tensor's norm by about n u / 2, the norm over all tensors by len(numels) u / 2 more,
      and the factor C' / norm adds one u: the first term below, with room;
    * the sum (Sec. 3.1): a float64 sum of n products, in any order (chunks, BLAS, processes),
      is off by at most n u / (1 - n u) times the sum of their absolute values: for n
      contributions of norm <= C, by about n^2 u C in L2. Neighbouring batches (n and n + 1
      examples) then differ by at most 2 (n + 1)^2 u C more than the one contribution: under
      2^-18 C for n + 1 <= 2^17 (every batch of MNIST's 60,000 images), and 2^-17 covers it.
      For a batch of n >= 2^17 examples the bound is C (1 + 2 (n + 1)^2 u) instead.
    m is about 8e-6: far below any effect on utility."""
    return (max(numels) + len(numels) + 8) * 2.0 ** -53 + 2.0 ** -17


# ------------------------------------------------------------------------------ checks
def check_per_example_independence(model):
    """Refuse layers that mix examples of a batch: one example's gradient would then depend on
    the others, clipping would no longer bound one example's influence, and the privacy
    analysis would be void. (Running statistics are also an unprotected release of data.)"""
    for name, module in model.named_modules():
        mixes = isinstance(module, nn.modules.batchnorm._BatchNorm) or (  # also SyncBatchNorm
            isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats
        )
        if mixes:
            raise ValueError(
                f"model: layer '{name}' ({type(module).__name__}) mixes examples in a batch or keeps "
                "running statistics, which DP-SGD cannot clip per example; use GroupNorm instead"
            )


def check_autocast_support(model):
    """Under bfloat16 autocast on the CPU, an nn.GroupNorm runs in bfloat16 and torch 2.13's
    per-example (vmap) backward of it fails on the mixed dtypes deep inside autograd. Refuse it
    here in one line instead; a GroupNorm that computes in float32 (diffusion.GroupNorm) works,
    and is what CUDA's autocast does anyway."""
    for name, module in model.named_modules():
        if isinstance(module, nn.GroupNorm) and type(module).forward is nn.GroupNorm.forward:
            raise ValueError(
                f"model: layer '{name}' (GroupNorm) would run in bfloat16 under autocast, where "
                "torch's per-example backward fails; compute it in float32 (diffusion.GroupNorm) "
                "or turn autocast off")


def _check_step_arguments(batch_tensors, clip_norm, sigma, expected_batch_size):
    low, high = CLIP_NORM_RANGE
    if not (low <= clip_norm <= high and sigma >= 0 and expected_batch_size > 0):
        raise ValueError(f"clip_norm, sigma, expected_batch_size: need C in [{low:.3g}, "
                         f"{high:.3g}] (the normal float32 range), sigma >= 0, qN > 0, "
                         f"got {clip_norm}, {sigma}, {expected_batch_size}")
    if len({len(t) for t in batch_tensors}) != 1:
        raise ValueError(f"batch_tensors: need >= 1 tensors sharing dim 0, got shapes "
                         f"{[tuple(t.shape) for t in batch_tensors]}")


def _trainable_params(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
