"""Sample images during training from a kohya-style prompt list, with the weights being trained.

The pipeline is a view over the training modules (no reload, no copy). Line format:
``a photo of sks dog --n blurry --w 512 --h 512 --d 1 --l 7.5 --s 20`` (negative, width, height, seed, CFG, steps;
``--g 3.5``: distilled guidance);
ControlNet runs also read ``--cn path/to/condition.png`` (else the dataset's conditions are used in turn), and
save the condition beside each sample.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

_OPT = re.compile(r"\s--(\w+)\s*")


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int = 0
    cfg: float | None = None   # --l; None: 7, or 1 for guidance-distilled models
    guidance: float = 3.5      # --g: distilled guidance (FLUX dev), as kohya's flux sample prompts
    steps: int = 20
    control: str = ""          # --cn: a ControlNet condition image


def parse_prompt_line(line: str, *, width: int = 512, height: int = 512, steps: int = 20, seed: int = 0
                      ) -> SamplePrompt | None:
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    parts = _OPT.split(" " + line)
    sp = SamplePrompt(parts[0].strip(), width=width, height=height, steps=steps, seed=seed)
    for key, value in zip(parts[1::2], parts[2::2]):
        value = value.strip()
        try:
            if key == "n":
                sp.negative = value
            elif key == "w":
                sp.width = int(value)
            elif key == "h":
                sp.height = int(value)
            elif key == "d":
                sp.seed = int(value)
            elif key == "l":
                sp.cfg = float(value)
            elif key == "g":
                sp.guidance = float(value)
            elif key == "s":
                sp.steps = int(value)
            elif key == "cn":
                sp.control = value
        except ValueError:
            continue  # kohya ignores options it cannot read; so do we
    sp.width, sp.height = max(8, sp.width // 8 * 8), max(8, sp.height // 8 * 8)
    return sp


def read_prompts(source: str, **defaults) -> list[SamplePrompt]:
    """``source`` is a prompt file path or the prompt lines themselves."""
    text = source
    if source and "\n" not in source and Path(source).is_file():
        text = Path(source).read_text(encoding="utf-8")
    out = [parse_prompt_line(line, **defaults) for line in (text or "").splitlines()]
    return [p for p in out if p is not None]


def make_pipeline(components, text_encoder=None, tokenizer=None, controlnet=None):
    """A txt2img pipeline over the (training) modules; with ``controlnet`` the ControlNet one."""
    import diffusers

    c = components
    # kohya samples with DDIM by default; flow-matching models with their own Euler
    sched = diffusers.FlowMatchEulerDiscreteScheduler if c.prediction_type == "flow" else diffusers.DDIMScheduler
    modules = {**c.text_modules(), "vae": c.vae, "unet": c.unet, "scheduler": sched.from_config(c.scheduler_config)}
    if text_encoder is not None:   # a TI run's encoder with the new vectors
        modules.update(text_encoder=text_encoder, tokenizer=tokenizer or c.tokenizer)
    return c.spec.make_pipeline("txt2img", modules, controlnet=controlnet)


@torch.no_grad()
def render_samples(components, prompts: list[SamplePrompt], folder: Path, step: int, *, clip_skip: int = 1,
                   prompt_filter=None, stop=None, autocast=None, controlnet=None, conditions=()) -> list[dict]:
    """Render every prompt; PNGs go to ``folder/step{N}_{i}.png`` atomically. Returns progress events.

    ``autocast()`` (the accelerator's) wraps the denoising: under fp16 / bf16 the trained tensors are fp32 beside
    half-precision weights (a TI embedding table inside the text encoder). The VAE decodes outside it, at its own
    dtype (fp32 in training). ``stop()`` is asked between denoising steps: a stop request ends sampling at once
    (the half-denoised image is not saved). With ``controlnet`` each prompt is conditioned on its ``--cn`` image or
    on ``conditions[i]`` in turn, and the saved PNG shows the condition left of the sample."""
    import contextlib

    from .atomic import save_image

    import inspect
    from types import SimpleNamespace

    pipe = make_pipeline(components, controlnet=controlnet)
    spec = components.spec
    takes = inspect.signature(pipe.__call__).parameters
    grid = spec.size_multiple
    modes = {m: m.training for m in [*components.modules().values(), *([controlnet] if controlnet else [])]}
    for m in modes:
        m.eval()
    events = []
    try:
        for i, sp in enumerate(prompts):
            if stop is not None and stop():
                break
            prompt = prompt_filter(sp.prompt) if prompt_filter else sp.prompt
            gen = torch.Generator("cpu").manual_seed(sp.seed)
            kw = {"clip_skip": clip_skip - 1} if clip_skip > 1 and "clip_skip" in takes else {}
            # no --l: 7 as before, 1 (no real CFG) for a guidance-distilled model (kohya's FLUX samples)
            cfg = sp.cfg if sp.cfg is not None else 1.0 if spec.distilled_guidance else 7.0
            # the family's guidance arguments: FLUX takes --g as its distilled guidance and --l as real CFG
            kw.update(spec.guidance_kwargs(SimpleNamespace(cfg_scale=cfg, distilled_cfg_scale=sp.guidance),
                                           components))
            width, height = max(grid, sp.width // grid * grid), max(grid, sp.height // grid * grid)
            if stop is not None:
                kw["callback_on_step_end"] = _interrupt_on(stop)
            control = None
            if controlnet is not None:
                control = _condition(sp.control or (conditions[i % len(conditions)] if conditions else ""),
                                     width, height)
                kw["image"] = control
            with autocast() if autocast else contextlib.nullcontext():
                latents = pipe(prompt, negative_prompt=sp.negative or None, width=width, height=height,
                               num_inference_steps=sp.steps, generator=gen, output_type="latent", **kw).images
            if stop is not None and stop():
                break
            image = decode(pipe, spec.unpack_latents(latents, height, width))
            if control is not None:
                image = _beside(control, image)
            path = save_image(folder / f"step{step:06d}_{i:02d}.png", image)
            events.append({"type": "sample", "step": step, "index": i, "path": str(path), "prompt": sp.prompt})
    finally:
        for m, was_training in modes.items():
            m.train(was_training)
    return events


def _condition(path, width: int, height: int):
    from PIL import Image

    from ..errors import StudioError
    if not path or not Path(path).is_file():
        raise StudioError(f"ControlNet sample condition {path!r} not found.", field="sampling.sample_prompts",
                          fix="give an existing image with --cn, or leave --cn out to use the dataset's conditions")
    with Image.open(path) as im:
        return im.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)


def _beside(left, right):
    from PIL import Image
    out = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
    out.paste(left, (0, 0))
    out.paste(right, (left.width, 0))
    return out


def decode(pipe, latents: torch.Tensor):
    """Latents -> a PIL image with the VAE at its own dtype (diffusers' SD1 pipeline would feed it the UNet's)."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
    image = vae.decode(latents).sample
    return pipe.image_processor.postprocess(image.float(), output_type="pil")[0]


def _interrupt_on(stop):
    def callback(pipe, step, timestep, kwargs):
        if stop():
            pipe._interrupt = True     # diffusers' pipelines skip the remaining steps
        return kwargs
    return callback
