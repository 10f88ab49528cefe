"""Demo model benchmark (issue [3/6] item 5): does the shipped toy model draw what the prompt says?

    python -m tests.benchmarks.bench_demo [--pairs 100] [--size 64]

The fixed eval of ``tools/demo_eval.py``: 100 prompt x seed pairs (plain world captions of a world seed the model
was not trained on), txt2img 20 steps, DPM++ 2M Karras, CFG 7, through the studio's own loader and Engine, scored
by ``studio.demo_world.score``. Prints the colour / shape / background rates against the targets (>= 90 / 75 /
85 %) and the seconds per image; exits 1 when a target is missed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from studio.app import Studio  # noqa: E402
from studio.demo import TRAINED_NAME, install_demo_model  # noqa: E402
from studio.settings import Settings  # noqa: E402
from tools.demo_eval import TARGETS, score_with  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--verbose", action="store_true", help="one line per picture")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(models_dir=f"{tmp}/models", data_dir=f"{tmp}/data", outdir=f"{tmp}/out",
                            default_checkpoint=TRAINED_NAME)
        install_demo_model(settings)   # a copy in a throwaway models folder, as a user's --demo run makes
        studio = Studio(settings, load_extensions=False)
        try:
            # load (and import) outside the timed eval, so seconds per image is the generation alone
            studio.switch_checkpoint(TRAINED_NAME)
            scores = score_with(studio, TRAINED_NAME, args.pairs, args.size, print if args.verbose else None)
        finally:
            studio.close()
    print(f"{TRAINED_NAME}, {args.pairs} fixed pairs, {args.size}x{args.size}, 20 steps DPM++ 2M Karras, CFG 7")
    print(f"{'measure':12} {'right':>7} {'target':>8}  ok")
    missed = []
    for name, target in TARGETS.items():
        ok = scores[name] >= target
        missed += [] if ok else [name]
        print(f"{name:12} {scores[name]:7.0%} {'>=' + format(target, '.0%'):>8}  {'yes' if ok else 'NO'}")
    print(f"seconds per image: {scores['seconds'] / args.pairs:.3f} ({scores['seconds']:.1f} s in all)")
    if missed:
        print(f"target missed: {', '.join(missed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
