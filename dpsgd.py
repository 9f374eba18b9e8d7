"""DP-SGD: Poisson sampling, per-example clipping, Gaussian noise.

This is Algorithm 1 of Abadi et al. 2016, "Deep Learning with Differential Privacy", with the
two refinements the hard stage of DP-FETA (PAPER.md section 3) relies on:

* Poisson sampling (each example joins a batch independently with probability q), because
  that is the mechanism the RDP accountant analyses (accountant.py); shuffled fixed-size
  batches are a different mechanism and would make the reported epsilon wrong.
* Noise multiplicity from Dockhorn et al. 2022 (DPDM): the caller's per-example loss may
  average K diffusion-noise draws of one example. That gives ONE gradient per example, which is
  clipped once. The privacy unit is the example: clipping the average bounds its influence by C
  whatever K is, so the K draws cost the privacy of one; and the average has lower variance
  than a single draw, so clipping it throws away less signal.

One logical step (`dp_step`):
    g_i   = grad of loss_i                      per example, via torch.func (vmap of vjp)
    g_i  <- g_i * min(1, C / (||g_i|| + 1e-6))   flat L2 norm over all trainable parameters
    g     = (sum_i g_i + N(0, (sigma C)^2 I)) / (q N)
and `g` is handed to any torch optimizer as `.grad`.
The batch is processed in physical chunks whose clipped gradients are summed and dropped, so
memory depends on the chunk size, never on the logical batch size.
"""

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap


def poisson_batches(n, q, steps, generator):
    """Yield `steps` int64 index tensors; each of the n examples is in a batch w.p. q.

    Batch sizes vary and a batch may be empty. The q used here must be exactly the q given to
    the accountant (q = expected batch size / n).
    """
    if n < 1:
        raise ValueError(f"n: must be a positive number of examples, got {n}")
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q: sampling rate must be in (0, 1], got {q}")
    for _ in range(steps):
        included = torch.rand(n, generator=generator, device=generator.device) < q
        yield included.nonzero().flatten().cpu()


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


def _trainable_params(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


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
        # measured, that doubles the memory of a chunk. Same gradients either way. (Under
        # autocast, torch 2.13's vmap rule for GroupNorm's backward fails on mixed dtypes
        # without the recorded graph, so that path keeps grad's behaviour.)
        loss, backward = vjp(lambda p: loss_of_one_example(p, *example), params)
        (grads,) = backward(torch.ones_like(loss), create_graph=autocast)
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


def per_sample_grads(model, per_example_loss, *batch_tensors, chunk_size=None):
    """Per-example gradients {parameter name: [B, *param.shape]} of per_example_loss.

    per_example_loss(model_callable, *tensors) -> [B]; every tensor in batch_tensors has the
    examples along dim 0. Gradients are computed chunk_size examples at a time (None: all).
    """
    check_per_example_independence(model)
    params = {n: p.detach() for n, p in _trainable_params(model).items()}
    grad_fn = _per_example_grad_fn(model, per_example_loss, len(batch_tensors))
    pieces = [grad_fn(params, *(t[s:e] for t in batch_tensors))[0]
              for s, e in _chunks(len(batch_tensors[0]), chunk_size)]
    return {n: torch.cat([piece[n] for piece in pieces]) for n in params}


def dp_step(model, optimizer, per_example_loss, batch_tensors, clip_norm, sigma,
            expected_batch_size, noise_generator, chunk_size=32, autocast=False):
    """One DP-SGD step on the (Poisson-sampled) batch; returns stats for logging.

    per_example_loss(model_callable, *tensors) -> [B], as for per_sample_grads.
    batch_tensors: tuple of tensors with the batch's examples along dim 0 (may be empty).
    expected_batch_size: q * N with the q of poisson_batches and of the accountant; the sum is
    divided by it, never by the realised size.
    noise_generator: seeded torch.Generator for the Gaussian noise.
    chunk_size: examples per vmap pass. Memory grows with it (never with the logical batch);
    on a 2-core CPU about 128 images per pass (chunk_size * K draws) ran fastest.
    autocast: run forward/backward under bfloat16 autocast (CPUs with bf16 units, GPUs); the
    per-example gradients, norms, clipping, running sum and noise stay float32.
    Returns {"loss": mean per-example loss (nan if empty), "clipped_fraction", "batch_size"}.
    """
    check_per_example_independence(model)
    if clip_norm <= 0 or sigma < 0 or expected_batch_size <= 0:
        raise ValueError(f"clip_norm, sigma, expected_batch_size: need C > 0, sigma >= 0, qN > 0, "
                         f"got {clip_norm}, {sigma}, {expected_batch_size}")
    if len({len(t) for t in batch_tensors}) != 1:
        raise ValueError(f"batch_tensors: need >= 1 tensors sharing dim 0, got shapes "
                         f"{[tuple(t.shape) for t in batch_tensors]}")
    named = _trainable_params(model)
    params = {n: p.detach() for n, p in named.items()}
    device = next(iter(params.values())).device
    grad_fn = _per_example_grad_fn(model, per_example_loss, len(batch_tensors), autocast)
    # The running sum is one flat float32 vector; each parameter's gradient is a view into it.
    summed = torch.zeros(sum(p.numel() for p in params.values()), device=device)
    summed_views = summed.split([p.numel() for p in params.values()])
    batch_size = len(batch_tensors[0])
    loss_total, num_clipped = 0.0, 0
    for s, e in _chunks(batch_size, chunk_size) if batch_size else []:
        grads, losses = grad_fn(params, *(t[s:e] for t in batch_tensors))
        grads = [g.reshape(e - s, -1) for g in grads.values()]  # [b, numel], float32 each
        # Flat L2 norm over all parameters from the per-tensor norms. (Concatenating the
        # gradients into one [b, P] matrix first costs an extra pass over memory: measured slower.)
        norms = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g, dim=1) for g in grads]), dim=0)
        factors = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
        for view, g in zip(summed_views, grads):
            view.addmv_(g.T, factors)  # sum_i factor_i * g_i, one matrix-vector product
        del grads  # the chunk's per-example gradients are dropped here: bounded memory
        loss_total += losses.sum().item()
        num_clipped += int((factors < 1.0).sum())
    # Noise calibrated to the sensitivity C of the sum: with Poisson sampling, adding or
    # removing one example changes the sum of clipped gradients by at most C. An empty batch
    # still gets its noise: skipping it would reveal that the batch was empty.
    summed.add_(torch.randn(summed.shape, generator=noise_generator,
                            device=noise_generator.device).to(device), alpha=sigma * clip_norm)
    # Divide by the public expected size qN: the realised size is itself data-dependent (it
    # moves by one when an example is added), so dividing by it would change the sensitivity
    # the accountant assumes; qN is a public constant, so dividing by it is post-processing.
    summed.div_(expected_batch_size)
    for p, view in zip(named.values(), summed_views):
        p.grad = view.view_as(p)
    optimizer.step()
    return {"loss": loss_total / batch_size if batch_size else float("nan"),
            "clipped_fraction": num_clipped / batch_size if batch_size else 0.0,
            "batch_size": batch_size}
