"""Train the demo canny ControlNet with the studio's own ControlNet training, score it, and write it + its card.

    python -m tools.train_demo_controlnet            # train (resumes from --work), score, write the fp16 file
    python -m tools.train_demo_controlnet --eval 20  # score the committed file only

The run is an ordinary Train-tab run (``method = "controlnet"``, ``conditioning = "canny"``) on pictures of the
demo world, started through ``python -m studio.training`` so it saves state every ``--save-every`` steps and a
second call continues it. The committed file is the run's lllyasviel single file, cast to fp16.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from studio.demo import TRAINED_FILE
from studio.demo_world import World
from studio.training.atomic import atomic_path

DEFAULT_WORK = Path("~/.cache/studio/demo-controlnet").expanduser()
DEFAULT_OUT = TRAINED_FILE.with_name("demo-canny.safetensors")
WORLD_SEED = 5               # training pictures; the eval uses EVAL_WORLD_SEED
EVAL_WORLD_SEED = 4242
EVAL_SEED = 2000
RECIPE = {"learning_rate": 2e-4, "batch_size": 16, "max_steps": 10000, "caption_dropout": 0.5,
          "min_snr_gamma": 5.0, "resolution": 64, "seed": 0}
CANNY = {"module": "canny", "processor_res": 64, "threshold_a": 100, "threshold_b": 200}
OFF_CENTRE = ("top left", "top", "top right", "left", "right", "bottom left", "bottom", "bottom right")


def control_pairs(count: int, size: int = 64) -> list[tuple[str, int, object]]:
    """(prompt silent on position, seed, world sample) for the ControlNet eval: small and medium objects away from
    the centre, where the base model (which draws a prompt without a position in the middle) would not put them."""
    from studio.demo_world import caption
    world = World(EVAL_WORLD_SEED, size=("small", "medium"), position=OFF_CENTRE)
    out = []
    for i in range(count):
        sample = world.sample(i, size)
        lab = sample.label
        prompt = caption(type(lab)(lab.shape, lab.colour, lab.background, lab.size, "centre", lab.box), 0,
                         with_size=False)
        out.append((prompt.replace(" in the centre", "").replace(" in the center", ""), EVAL_SEED + i, sample))
    return out


def control_request(prompt: str, seed: int, image, model: str, checkpoint: str, **unit):
    from studio.controlnet.units import ControlUnit
    from studio.request import GenerationRequest
    units = (ControlUnit(model=model, image=image, **{**CANNY, **unit}),) if model else ()
    return GenerationRequest(prompt=prompt, seed=seed, steps=20, sampler_name="DPM++ 2M", scheduler="Karras",
                             cfg_scale=7.0, width=image.width, height=image.height, checkpoint=checkpoint,
                             save_images=False, controlnet_units=units)


def iou_with(studio, checkpoint: str, model: str, count: int, **unit) -> list[float]:
    """Mask IoU of each generated object with its control picture's object (``model`` "" = no unit)."""
    from studio.demo_world import mask_iou, score
    out = []
    for prompt, seed, sample in control_pairs(count):
        im = studio.generate(control_request(prompt, seed, sample.image, model, checkpoint, **unit)).images[0]
        out.append(mask_iou(score(im).mask, score(sample.image).mask))
    return out


def evaluate(controlnet: Path, count: int) -> dict:
    """Median IoU with and without the unit over ``count`` eval pairs, in a throwaway studio folder."""
    import statistics

    from studio.app import Studio
    from studio.settings import Settings
    with tempfile.TemporaryDirectory(prefix="demo-cn-eval-") as tmp:
        models = Path(tmp) / "models"
        (models / "Stable-diffusion").mkdir(parents=True)
        (models / "ControlNet").mkdir()
        os.symlink(TRAINED_FILE, models / "Stable-diffusion" / TRAINED_FILE.name)
        os.symlink(controlnet.resolve(), models / "ControlNet" / controlnet.name)
        studio = Studio(Settings(models_dir=str(models), data_dir=str(Path(tmp) / "data"),
                                 outdir=str(Path(tmp) / "outputs"), default_checkpoint=TRAINED_FILE.name),
                        load_extensions=False)
        try:
            t = time.monotonic()
            with_unit = iou_with(studio, TRAINED_FILE.name, controlnet.stem, count)
            without = iou_with(studio, TRAINED_FILE.name, "", count)
            end_03 = iou_with(studio, TRAINED_FILE.name, controlnet.stem, count, guidance_end=0.3)
        finally:
            studio.close()
    return {"count": count, "iou": statistics.median(with_unit), "iou_without": statistics.median(without),
            "iou_end_0.3": statistics.median(end_03), "hit_0.7": sum(v >= 0.7 for v in with_unit) / count,
            "seconds": round(time.monotonic() - t, 1)}


def train(work: Path, steps: int, images: int, save_every: int) -> Path:
    """Run (or continue) the training in ``work``; returns the run's fp32 single file."""
    from studio.demo_world import write_dataset
    from studio.training.config import TrainConfig
    from studio.training.runner import cli_main
    models = work / "models"
    base = models / "Stable-diffusion" / TRAINED_FILE.name
    if not base.exists():
        base.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TRAINED_FILE, base)
    dataset = work / "dataset"
    if not (dataset / f"{images - 1:04d}.txt").is_file():
        write_dataset(dataset, images, world=World(WORLD_SEED), size=64)
    cfg = TrainConfig(base_model=str(base), method="controlnet", conditioning="canny", dataset_dir=str(dataset),
                      output_name="demo-canny", models_dir=str(models), run_dir=str(work / "run"),
                      min_image_side=32, **{**RECIPE, "max_steps": steps}, save_every=save_every,
                      sample_every=save_every, sample_at_start=False,
                      sample_prompts="a red circle on a blue background --w 64 --h 64 --s 20 --d 1\n"
                                     "a yellow star on a purple background --w 64 --h 64 --s 20 --d 2")
    toml = cfg.save(work / "run.toml")
    resume = (work / "run" / "state" / "trainer.json").is_file()
    code = cli_main([str(toml), "--no-bar"] + (["--resume"] if resume else []))
    if code:
        raise SystemExit(code)
    return models / "ControlNet" / "demo-canny.safetensors"


def write_fp16(src: Path, out: Path) -> Path:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(src), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k).to(torch.float16).contiguous() for k in f.keys()}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={**meta, "studio.precision": "fp16"})
    return out


def write_card(out: Path, scores: dict | None, minutes: float | None) -> Path:
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        meta = f.metadata() or {}
    lines = [
        f"# {out.name}: a canny ControlNet for the demo model", "",
        f"Puts the demo model's shape where a canny edge map says (`{TRAINED_FILE.name}`, 64 px). Use it with the "
        "`canny` preprocessor (or `none` on an edge map you drew) in any ControlNet unit.", "",
        "## How it was made", "",
        "`python -m tools.train_demo_controlnet`: the studio's own ControlNet training (Train tab method "
        "`controlnet`, conditioning `canny`), initialised from the demo UNet's encoder with zero convolutions.",
        f"- {meta.get('studio.num_train_images', '?')} demo-world pictures (world seed {WORLD_SEED}, 64 px), canny "
        "maps made by the studio's preprocessor, half of the captions dropped so the map alone places the object.",
        f"- {meta.get('studio.steps', '?')} steps, batch {RECIPE['batch_size']}, AdamW {RECIPE['learning_rate']:g} "
        f"constant, Min-SNR {RECIPE['min_snr_gamma']:g}, seed {RECIPE['seed']}, fp32 on CPU"
        + (f", {minutes:.0f} min." if minutes else "."),
        f"- File: lllyasviel single-file layout (`control_model.*`), fp16, {out.stat().st_size / 1e6:.1f} MB.", "",
        "## Scores", "",
    ]
    if scores:
        lines += [f"`python -m tools.train_demo_controlnet --eval {scores['count']}`: {scores['count']} pictures of "
                  "small / medium shapes away from the centre; the prompt names colour, shape and background but "
                  "not the position; txt2img 20 steps DPM++ 2M Karras CFG 7; the canny unit at weight 1 reads the "
                  "picture. Mask IoU of the generated object with the picture's (`studio.demo_world.score`):", "",
                  "| unit | median IoU |", "|---|---|",
                  f"| canny, weight 1 | {scores['iou']:.2f} ({scores['hit_0.7']:.0%} of pictures >= 0.7) |",
                  f"| canny, guidance end 0.3 | {scores['iou_end_0.3']:.2f} |",
                  f"| none | {scores['iou_without']:.2f} |"]
    else:
        lines.append("Not scored yet: run `python -m tools.train_demo_controlnet --eval`.")
    path = out.with_suffix(".md")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.train_demo_controlnet", description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"run folder (default {DEFAULT_WORK})")
    p.add_argument("--steps", type=int, default=RECIPE["max_steps"], help="training steps in all")
    p.add_argument("--images", type=int, default=2048, help="world pictures in the training set")
    p.add_argument("--save-every", type=int, default=500, help="steps between saved states and samples")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the file to write (default {DEFAULT_OUT})")
    p.add_argument("--eval", type=int, nargs="?", const=20, default=None, metavar="N",
                   help="only score --out (or --candidate) on N pairs")
    p.add_argument("--candidate", type=Path, help="with --eval: score this file instead of --out")
    args = p.parse_args(argv)
    if args.eval:
        scores = evaluate(args.candidate or args.out, args.eval)
        print(scores)
        if not args.candidate:
            write_card(args.out, scores, None)
        return 0
    t = time.monotonic()
    src = train(args.work, args.steps, args.images, args.save_every)
    minutes = (time.monotonic() - t) / 60
    write_fp16(src, args.out)
    scores = evaluate(args.out, 20)
    print(scores)
    write_card(args.out, scores, minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
