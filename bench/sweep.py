"""Run named variants of a preset, one whole train.py run each, and write one CSV row per run.

    python bench/sweep.py --preset cpu --variants base no-central dpm2m-12 --seeds 0 1 2 \
        --data-dir ../shared/data/mnist --csv bench/out/sweep.csv

A variant is a few train.py flags on top of the preset (VARIANTS below; add your own). Each run
goes to bench/out/sweep/<variant>-seed<s>/ and is resumed if it was stopped, so the sweep can
be interrupted and started again; a finished run is read, not repeated. Runs are one after the
other: two at once would slow each other and distort the timings.

Each row: variant, seed, the flags, epsilon spent, the classifier's accuracy on held-out
*synthetic* images (for choosing settings without the test set), its test accuracy, FID, and
the seconds of each stage. Choose settings by the held-out synthetic accuracy and FID against
the training images; report the test accuracy of the chosen settings once.
"""
import argparse
import csv
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from harness import runs  # noqa: E402

VARIANTS = {
    "base": [],
    "no-central": ["--no-central"],
    "eps10": ["--eps", "10"],
    "eps10-no-central": ["--eps", "10", "--no-central"],
    "no-dpsgd": ["--no-dpsgd"],  # the warm-up model alone, at the central images' own epsilon
    "dpm2m-12": ["--solver", "dpm2m", "--sample-steps", "12"],
}


def run_variant(name, seed, args):
    folder = os.path.join(args.out, f"{name}-seed{seed}")
    report_path = os.path.join(folder, "report.json")
    report = json.load(open(report_path)) if os.path.exists(report_path) else None
    if report is None or report["stage"] != "done":
        cmd = [sys.executable, os.path.join(ROOT, "train.py")]
        cmd += (["--resume", folder] if report else
                ["--preset", args.preset, "--out", folder, "--seed", str(seed), *VARIANTS[name]])
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        print(" ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            return None
        report = json.load(open(report_path))
    accuracy = report["metrics"].get("accuracy", {})
    return dict(variant=name, seed=seed, flags=" ".join(VARIANTS[name]),
                eps=round(report["privacy_spent"]["eps"], 4),
                synthetic_val_accuracy=accuracy.get("val_accuracy"),
                test_accuracy=accuracy.get("test_accuracy"),
                fid=(report["metrics"].get("fid") or {}).get("value"),
                **{f"seconds_{s}": round(report["timings_s"].get(s, 0.0), 1)
                   for s in runs.STAGES[:-1]})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--variants", nargs="+", default=["base"], choices=VARIANTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="--seed of each run (fixes the DP noise too: for experiments only)")
    p.add_argument("--data-dir")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "sweep"))
    p.add_argument("--csv", default=os.path.join(ROOT, "bench", "out", "sweep.csv"))
    args = p.parse_args()
    rows = [row for name in args.variants for seed in args.seeds
            if (row := run_variant(name, seed, args)) is not None]
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["variant"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.csv}")
    return 0 if len(rows) == len(args.variants) * len(args.seeds) else 1


if __name__ == "__main__":
    sys.exit(main())
