"""Score the demo checkpoint through the studio's own loader and Engine, and write its model card.

Used by ``python -m tools.train_demo --eval`` and by ``tests/benchmarks/bench_demo.py``: the same 100 fixed
prompt x seed pairs (20 steps, DPM++ 2M Karras, CFG 7), scored by ``studio.demo_world.score``.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from studio.demo_world import World, caption
from studio.errors import StudioError
from studio.training.atomic import atomic_path

EVAL_WORLD_SEED = 777        # eval prompts come from a world seed the training set does not use
EVAL_SEED = 1000
TARGETS = {"colour": 0.90, "shape": 0.75, "background": 0.85}


def eval_pairs(count: int, size: int) -> list[tuple[str, int, object]]:
    """(prompt, seed, label) of the fixed eval set: plain world captions of a world seed not trained on."""
    world = World(EVAL_WORLD_SEED)
    return [(caption(lab, 0, with_size=False), EVAL_SEED + i, lab)
            for i, lab in enumerate(world.label(i, size) for i in range(count))]


def eval_request(prompt: str, seed: int, size: int, checkpoint: str):
    from studio.request import GenerationRequest
    return GenerationRequest(prompt=prompt, seed=seed, steps=20, sampler_name="DPM++ 2M", scheduler="Karras",
                             cfg_scale=7.0, width=size, height=size, checkpoint=checkpoint, save_images=False)


def score_with(studio, checkpoint: str, count: int, size: int, report=None) -> dict:
    """Draw and score the eval pairs with an open Studio; ``report`` gets one line per picture."""
    from studio.demo_world import score

    hits = {k: 0 for k in TARGETS}
    t = time.monotonic()
    for prompt, seed, label in eval_pairs(count, size):
        s = score(studio.generate(eval_request(prompt, seed, size, checkpoint)).images[0])
        m = s.matches(label)
        for k in hits:
            hits[k] += m[k]
        if report:
            report(f"eval {prompt!r} seed {seed}: {s.colour} {s.shape} on {s.background} "
                   f"{'ok' if all(m[k] for k in hits) else 'MISS'}")
    return {"count": count, "size": size, **{k: v / count for k, v in hits.items()},
            "seconds": round(time.monotonic() - t, 1)}


def evaluate(out: Path, count: int, size: int, *, report=None) -> dict:
    """Score ``count`` generations of the checkpoint file at ``out`` in a throwaway studio folder."""
    from studio.app import Studio
    from studio.settings import Settings

    with tempfile.TemporaryDirectory(prefix="demo-eval-") as tmp:
        models = Path(tmp) / "models" / "Stable-diffusion"
        models.mkdir(parents=True)
        os.symlink(out.resolve(), models / out.name)
        studio = Studio(Settings(models_dir=str(Path(tmp) / "models"), data_dir=str(Path(tmp) / "data"),
                                 outdir=str(Path(tmp) / "outputs"), default_checkpoint=out.name),
                        load_extensions=False)
        try:
            return score_with(studio, out.name, count, size, report)
        finally:
            studio.close()


def summary(scores: dict) -> str:
    return ("eval: " + ", ".join(f"{k} {scores[k]:.0%} (>= {TARGETS[k]:.0%})" for k in TARGETS)
            + f" over {scores['count']} pairs, {scores['seconds']:.0f} s")


def file_info(out: Path, recipe_type) -> tuple[object, dict]:
    """The recipe and training facts stored in the checkpoint's metadata."""
    from safetensors import safe_open
    if not out.is_file():
        raise StudioError(f"No demo checkpoint at {out}.", field="out", fix="train it first (--stage all)")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata() or {}
    recipe = json.loads(meta.get("demo.recipe", "{}"))
    recipe = recipe_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items()})
    return recipe, json.loads(meta.get("demo.training", "{}"))


def card_path(out: Path) -> Path:
    return out.with_suffix(".md")


def write_card(out: Path, r, info: dict, scores: dict | None) -> Path:
    """The model card: what the model is, how it was trained, what it scores."""
    rec = info.get("reconstruction") or {}
    lines = [
        f"# {out.name}: a toy SD1-layout model of the demo world", "",
        "Draws one flat-colour shape on a flat background from prompts like \"a red circle on a blue "
        "background\" or \"a small yellow star at the top, white background\". It knows the shapes, colours, "
        "sizes and positions of `studio.demo_world` and nothing else; it has never seen the held-out concepts "
        "(heart, striped), which the training tests teach it.", "",
        "## How it was made", "",
        f"`python -m tools.train_demo` (seed {r.seed}, world seed {r.world_seed}, {r.images} world pictures at "
        f"{r.size} px), on CPU.", "",
        f"- VAE: SD VAE layout (AutoencoderKL, 4 latent channels, factor 8, channels {list(r.vae_channels)}), "
        f"{r.vae_steps} steps of L1 + L2 + {r.kl_weight:g} KL on {r.vae_crop} px crops, batch {r.vae_batch}, "
        f"AdamW {r.vae_lr:g}; latent shift and "
        f"scale folded into quant_conv / post_quant_conv so latents x 0.18215 are unit-variance.",
        f"- VAE round trip on unseen pictures: L1 {rec.get('l1', '?')}, scorer colour {rec.get('colour', '?')}, "
        f"shape {rec.get('shape', '?')}, background {rec.get('background', '?')}.",
        f"- Text encoder: CLIPTextModel (width {r.text_width}, {r.text_layers} layers, shipped CLIP tokenizer), "
        f"{'trained with the UNet' if r.train_text else 'frozen at random init'}.",
        f"- UNet: SD1 layout (UNet2DConditionModel, channels {list(r.unet_channels)}, cross-attention per level "
        f"{list(r.unet_attention)}, 8 heads, {r.layers_per_block} res block per level), {r.unet_steps} steps, "
        f"batch {r.batch}, epsilon prediction, DDPM scaled_linear 0.00085-0.012 / 1000 steps, Min-SNR "
        f"gamma {r.min_snr_gamma:g}, {r.caption_dropout:.0%} empty captions, AdamW {r.unet_lr:g} (text {r.text_lr:g}) "
        f"with {r.warmup} warmup steps and cosine decay, EMA {r.ema:g}.",
        f"- Training time: VAE {info.get('vae_minutes', '?')} min, UNet {info.get('unet_minutes', '?')} min; "
        f"final UNet loss {info.get('unet_loss', '?')}.",
        f"- File: LDM single file in SD1.5 layout, fp16, {out.stat().st_size / 1e6:.1f} MB.", "",
        "## Scores", "",
    ]
    if scores:
        lines += [f"`python -m tools.train_demo --eval {scores['count']}`: {scores['count']} fixed prompt x seed "
                  f"pairs at {scores['size']} px, txt2img 20 steps, DPM++ 2M Karras, CFG 7, through the studio's "
                  "loader and Engine, scored by `studio.demo_world.score`.", "",
                  "| attribute | right | target |", "|---|---|---|",
                  *(f"| {k} | {scores[k]:.0%} | >= {TARGETS[k]:.0%} |" for k in TARGETS)]
    else:
        lines.append("Not scored yet: run `python -m tools.train_demo --eval`.")
    path = card_path(out)
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
