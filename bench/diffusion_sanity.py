"""Sanity benchmark for diffusion.py, before any privacy.

Train a UNet non-privately on real MNIST for a fixed wall-clock time, sample images with given
labels, save a PNG grid, and let a CNN trained on real MNIST label the samples. If the model,
loss and sampler are right, the predicted label is the generated one for >= 90 % of samples.

    .venv/bin/python bench/diffusion_sanity.py                 # the full run: 10 minutes training
    .venv/bin/python bench/diffusion_sanity.py --minutes 1     # a smoke run

Writes bench/out/diffusion_sanity/{samples.png, result.json}. Timings depend on the machine's
load; the numbers printed are those of this run.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402
from harness import data  # noqa: E402
import diffusion  # noqa: E402
import samplers  # noqa: E402


def train_diffusion(images, labels, args, generator):
    model = diffusion.make_unet(args.model, 1, 28, 10)
    edm = diffusion.EDM()
    ema = diffusion.EMA(model, args.ema)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    limits = [f"{args.minutes} min"] if args.minutes < float("inf") else []
    limits += [f"{args.max_steps} steps"] if args.max_steps else []
    print(f"UNet '{args.model}': {diffusion.count_parameters(model)} parameters; training for "
          f"{' or '.join(limits)}, batch {args.batch}, lr {args.lr}"
          + (", bf16 autocast" if args.autocast else ""))
    x_all = images.float() / 127.5 - 1  # uint8 -> [-1, 1]
    started, step, seen, running = time.time(), 0, 0, None
    while time.time() - started < 60 * args.minutes and step < (args.max_steps or float("inf")):
        idx = torch.randint(len(x_all), (args.batch,), generator=generator)
        y_in, sigma, noise = edm.draw_inputs(labels[idx], 1, (1, 28, 28), generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast):
            loss = edm.loss(model, x_all[idx], y_in, sigma, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(model)
        step, seen = step + 1, seen + args.batch
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0:
            print(f"  step {step}: loss {running:.4f} ({seen / (time.time() - started):.0f} img/s)",
                  flush=True)
    elapsed = time.time() - started
    print(f"trained {step} steps ({seen} images, {seen / len(x_all):.2f} epochs) in "
          f"{elapsed:.0f} s: {seen / elapsed:.0f} img/s forward+backward; final loss {running:.4f}")
    return ema.model, edm, dict(steps=step, images=seen, seconds=elapsed, final_loss=running)


def train_classifier(images, labels, test_images, test_labels, minutes, generator):
    """evaluate.SmallCNN on real MNIST for a fixed time; returns it and its real test accuracy."""
    torch.manual_seed(0)  # its initialisation
    model = evaluate.SmallCNN(1, 28, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    started = time.time()
    while time.time() - started < 60 * minutes:
        idx = torch.randint(len(images), (128,), generator=generator)
        loss = F.cross_entropy(model(images[idx].float() / 255), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = (predict(model, test_images) == test_labels).float().mean().item()
    print(f"classifier: {accuracy:.4f} accuracy on the real test set")
    return model, accuracy


@torch.no_grad()
def predict(model, images):
    model.eval()
    return torch.cat([model(x.float() / 255).argmax(1) for x in images.split(1000)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="diffusion training time")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="also stop after this many steps (0: time only)")
    parser.add_argument("--autocast", action="store_true", help="train under bf16 autocast")
    parser.add_argument("--model", default="small", choices=sorted(diffusion.MODEL_SIZES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema", type=float, default=0.995,
                        help="EMA decay (short run: 0.999 would still remember the init)")
    parser.add_argument("--solver", default="heun", choices=samplers.SOLVERS)
    parser.add_argument("--n", type=int, default=1000, help="samples, 10 classes in turn")
    parser.add_argument("--sample-steps", type=int, default=18, help="sampler steps")
    parser.add_argument("--guidance", type=float, default=2.0,
                        help="classifier-free guidance weight w (0: plain conditional)")
    parser.add_argument("--classifier-minutes", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data", "mnist"))
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "diffusion_sanity"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = data.load("mnist", "train", args.data_dir)
    test_images, test_labels = data.load("mnist", "test", args.data_dir)

    model, edm, training = train_diffusion(images, labels, args, generator)

    sample_labels = torch.arange(10).repeat(args.n // 10 + 1)[:args.n]  # rows of 0..9 in the grid
    started = time.time()
    samples = samplers.sample(edm, model, sample_labels, generator,
                              steps=args.sample_steps, guidance=args.guidance,
                              batch_size=50, solver=args.solver)
    sample_seconds = time.time() - started
    print(f"sampled {args.n} images ({args.sample_steps} steps, guidance "
          f"{args.guidance}) in {sample_seconds:.0f} s: {args.n / sample_seconds:.1f} img/s")
    os.makedirs(args.out, exist_ok=True)
    data.save_grid(samples[:100], os.path.join(args.out, "samples.png"), nrow=10)

    real_classifier, real_accuracy = train_classifier(images, labels, test_images, test_labels,
                                                      args.classifier_minutes, generator)
    agreement = (predict(real_classifier, samples) == sample_labels).float().mean().item()
    print(f"AGREEMENT of the real-MNIST classifier with the generated labels: {agreement:.4f} "
          f"(target >= 0.90)")
    result = dict(vars(args), parameters=diffusion.count_parameters(model), training=training,
                  sample_seconds=sample_seconds, classifier_test_accuracy=real_accuracy,
                  agreement=agreement)
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}/samples.png and result.json")


if __name__ == "__main__":
    main()
