"""The README's picture: a finished run's stages.png, copied to docs/stages.png.

    python bench/docs_picture.py bench/out/campaign/base-s0

The picture is the run's own file (central images | after the warm-up | final samples, one row
per class), so the README shows what the command really gives; the line printed says which run
it is, for the caption.
"""
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python bench/docs_picture.py RUN_DIR", file=sys.stderr)
        return 2
    run = argv[0]
    try:
        with open(os.path.join(run, "report.json")) as f:
            report = json.load(f)
        if report["stage"] != "done":
            raise ValueError(f"{run} has not finished (stage {report['stage']})")
        os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
        shutil.copyfile(os.path.join(run, "stages.png"), os.path.join(ROOT, "docs", "stages.png"))
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = report["settings"]
    print(f"docs/stages.png <- {run}: {s['dataset']}, eps {report['privacy_spent']['eps']:.3f}, "
          f"seed {report['seed']}, {s['guidance']=}, {s['solver']}-{s['sample_steps']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
