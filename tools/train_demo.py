"""Train the demo checkpoint on the demo world (studio.demo_world), on a CPU, seeded and resumable.

Run from the repo root: ``python -m tools.train_demo`` (all stages), then ``python -m tools.train_demo --eval``.

Stages, each resumable from its own state file in ``--state`` (default ~/.cache/studio/demo-train/):
  vae      an SD-layout AutoencoderKL (4 latent channels, factor 8) learns to reconstruct world pictures;
  latents  a fixed set of world pictures is encoded once (the latent scale is folded into the VAE, see
           ``normalise_latents``);
  unet     an SD1-layout UNet with cross-attention and a CLIP text encoder (shipped tokenizer) learn to denoise
           the cached latents (epsilon, SD1's DDPM schedule, Min-SNR, caption dropout for CFG, EMA);
  export   an LDM single file exactly like an SD1.5 checkpoint (fp16) plus a markdown card beside it.
``--eval [N]`` loads the file through the studio's own loader and Engine, draws N fixed prompt x seed pairs
(20 steps, DPM++ 2M Karras, CFG 7) and scores them with studio.demo_world.score; the scores go into the card.

State is saved every ``--save-every`` seconds and on Ctrl-C / SIGTERM (atomically); a rerun continues from it.
Noise, timesteps, batches and captions of step k depend only on (seed, k), so a resumed run draws what an
uninterrupted one would have.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from studio.demo_world import World, caption
from studio.errors import StudioError
from studio.training.atomic import atomic_path
from studio.training.losses import diffusion_loss, step_generator

from . import demo_eval

DEFAULT_STATE = Path("~/.cache/studio/demo-train").expanduser()
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "studio" / "demo_assets" / "demo-shapes.safetensors"
VAE_SCALE = 0.18215          # SD1's latent scaling factor: the loader assumes it, so the latents are fitted to it
MAX_FILE_MB = 25

# fields that fix the architecture or the data: a state made with other values cannot be continued
_FIXED = ("size", "images", "world_seed", "seed", "vae_channels", "unet_channels", "unet_attention", "text_width",
          "text_layers", "layers_per_block")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the model. ``quick()`` is a tiny variant for tests."""

    size: int = 64
    images: int = 8192
    world_seed: int = 0
    seed: int = 0
    vae_channels: tuple[int, ...] = (32, 64, 64, 128)
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_attention: tuple[bool, ...] = (True, True, False)   # cross-attention per level (SD1: all but the last)
    layers_per_block: int = 1
    text_width: int = 64
    text_layers: int = 4
    train_text: bool = True
    vae_steps: int = 4000
    unet_steps: int = 8000
    batch: int = 32
    vae_lr: float = 1e-3
    unet_lr: float = 5e-4
    text_lr: float = 2e-4
    warmup: int = 200
    min_lr_share: float = 0.1
    kl_weight: float = 1e-6
    vae_batch: int = 16
    vae_crop: int = 32         # the VAE is convolutional: it learns edges and colours from crops at a quarter the cost
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema: float = 0.999

    @classmethod
    def quick(cls) -> "Recipe":
        return cls(images=32, vae_channels=(32, 32, 32, 32), unet_channels=(32, 64), unet_attention=(True, False),
                   text_width=32, text_layers=1, vae_steps=3, unet_steps=3, batch=4, vae_batch=4, warmup=1,
                   ema=0.9)

    def fixed(self) -> dict:
        return {k: _plain(getattr(self, k)) for k in _FIXED}


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


# ---------------------------------------------------------------- models (layouts the studio's loader reads back)

def make_vae(r: Recipe):
    from diffusers import AutoencoderKL
    n = len(r.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                         up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=r.vae_channels,
                         layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=r.size,
                         scaling_factor=VAE_SCALE)


def make_text_encoder(r: Recipe):
    from transformers import CLIPTextConfig, CLIPTextModel
    # the loader's rules (ldm_config.clip_config): 64-wide heads, quick_gelu, 77 positions, CLIP's special ids
    cfg = CLIPTextConfig(hidden_size=r.text_width, intermediate_size=4 * r.text_width,
                         num_hidden_layers=r.text_layers, num_attention_heads=max(1, r.text_width // 64),
                         vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=r.text_width, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModel(cfg)


def make_unet(r: Recipe):
    from diffusers import UNet2DConditionModel
    attn = r.unet_attention
    # SD1: 8 heads at every level (diffusers' attention_head_dim=8), conv proj_in (no linear projection);
    # the loader cannot read heads off the weights and assumes exactly this (ldm_config.unet_config).
    return UNet2DConditionModel(
        sample_size=r.size // 8, in_channels=4, out_channels=4, block_out_channels=r.unet_channels,
        layers_per_block=r.layers_per_block, norm_num_groups=32, cross_attention_dim=r.text_width,
        attention_head_dim=8, use_linear_projection=False,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)))


def params_m(*modules) -> float:
    return sum(p.numel() for m in modules for p in m.parameters()) / 1e6


# ---------------------------------------------------------------- data

def world_images(r: Recipe) -> tuple[torch.Tensor, list]:
    """The training pictures as uint8 [N, 3, H, W] and their labels (rendering is ~1 ms a picture)."""
    world = World(r.world_seed)
    labels = [world.label(i, r.size) for i in range(r.images)]
    from studio.demo_world import render
    arr = np.stack([np.asarray(render(lab, r.size)) for lab in labels])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), labels


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1.0


def crop(images: torch.Tensor, side: int, gen: torch.Generator) -> torch.Tensor:
    """One random ``side`` crop of the batch, on the 8 px latent grid."""
    h, w = images.shape[-2:]
    if side >= min(h, w):
        return images
    y, x = (int(torch.randint(0, (n - side) // 8 + 1, (1,), generator=gen)) * 8 for n in (h, w))
    return images[..., y:y + side, x:x + side]


def captions_for(labels, idx: list[int], rng: np.random.Generator, dropout: float) -> list[str]:
    """A fresh caption wording per use (template and whether the size is named); ``dropout`` of them empty."""
    out = []
    for i in idx:
        variant, with_size, drop = int(rng.integers(1 << 16)), bool(rng.random() < 0.5), rng.random() < dropout
        out.append("" if drop else caption(labels[i], variant, with_size=with_size))
    return out


# ---------------------------------------------------------------- state files

def save_state(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path, r: Recipe) -> dict | None:
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("fixed") != r.fixed():
        diff = {k: (state.get("fixed", {}).get(k), v) for k, v in r.fixed().items()
                if state.get("fixed", {}).get(k) != v}
        raise StudioError(f"The saved state {path} was made with other settings ({diff}: saved, asked).",
                          field="state", fix="use another --state folder, or delete that file to start again")
    return state


def lr_at(step: int, total: int, base: float, r: Recipe) -> float:
    """Linear warmup, then cosine down to ``min_lr_share`` of the base."""
    if step < r.warmup:
        return base * (step + 1) / r.warmup
    t = min(1.0, (step - r.warmup) / max(1, total - r.warmup))
    return base * (r.min_lr_share + (1 - r.min_lr_share) * 0.5 * (1 + math.cos(math.pi * t)))


class Stopper:
    """Turns Ctrl-C / SIGTERM into a request to save and stop after the current step."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log(f"signal {signum}: saving state after this step, then stopping")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def log(text: str) -> None:
    print(text, flush=True)


class Progress:
    """Progress lines: loss averaged since the last line, seconds per step, time left."""

    def __init__(self, name: str, start: int, total: int, every: int):
        self.name, self.total, self.every = name, total, every
        self.losses: list[float] = []
        self.last: float | None = None   # the mean loss of the last progress line
        self.t0, self.s0 = time.monotonic(), start

    def step(self, step: int, loss: float, lr: float) -> None:
        self.losses.append(loss)
        if step % self.every and step != self.total:
            return
        dt = (time.monotonic() - self.t0) / max(1, step - self.s0)
        left = (self.total - step) * dt
        self.last = round(float(np.mean(self.losses)), 5)
        log(f"{self.name} step {step}/{self.total} loss {self.last:.5f} lr {lr:.2e} "
            f"{dt:.2f} s/step, {left / 60:.1f} min left")
        self.losses.clear()


def train_loop(name: str, state_path: Path, state: dict, total: int, step_fn, snapshot, *, save_every: float,
               log_every: int, stopper: Stopper) -> tuple[dict, bool]:
    """Run ``step_fn(step) -> (loss, lr)`` from ``state['step']`` to ``total``, saving ``snapshot()`` every
    ``save_every`` seconds, at the end and on a stop request. Returns (state, finished)."""
    step = state["step"]
    if step >= total:
        log(f"{name}: at step {step}/{total}, nothing to train")
        return state, True
    log(f"{name}: {'resuming at' if step else 'starting from'} step {step}/{total}")
    progress = Progress(name, step, total, log_every)
    last_save, t_start = time.monotonic(), time.monotonic()
    elapsed0 = state.get("elapsed", 0.0)
    while step < total and not stopper.requested:
        loss, lr = step_fn(step)
        step += 1
        progress.step(step, loss, lr)
        if time.monotonic() - last_save >= save_every and step < total:
            state = snapshot(step, elapsed0 + time.monotonic() - t_start)
            save_state(state_path, state)
            last_save = time.monotonic()
    loss = progress.last if progress.last is not None else state.get("loss")
    state = {**snapshot(step, elapsed0 + time.monotonic() - t_start), "loss": loss}
    save_state(state_path, state)
    log(f"{name}: saved state at step {step}/{total} to {state_path}")
    return state, step >= total


# ---------------------------------------------------------------- stage 1: VAE

def train_vae(r: Recipe, state_dir: Path, images: torch.Tensor, *, save_every: float, log_every: int,
              stopper: Stopper) -> tuple[object, dict, bool]:
    path = state_dir / "vae.pt"
    state = load_state(path, r)
    torch.manual_seed(r.seed)
    vae = make_vae(r)
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    if state:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"])
    else:
        state = {"step": 0}
        log(f"vae: {params_m(vae):.2f} M parameters, channels {r.vae_channels}")
    vae.train()

    def step_fn(step):
        gen = step_generator(r.seed, step, "vae")
        idx = torch.randint(0, len(images), (r.vae_batch,), generator=gen)
        x = to_unit(crop(images[idx], r.vae_crop, gen))
        lr = lr_at(step, r.vae_steps, r.vae_lr, r)
        for g in opt.param_groups:
            g["lr"] = lr
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + r.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return float(loss.detach()), lr

    def snapshot(step, elapsed):
        return {"fixed": r.fixed(), "step": step, "model": vae.state_dict(), "opt": opt.state_dict(),
                "rng": torch.get_rng_state(), "elapsed": elapsed, "recipe": dataclasses.asdict(r)}

    state, done = train_loop("vae", path, state, r.vae_steps, step_fn, snapshot, save_every=save_every,
                             log_every=log_every, stopper=stopper)
    return vae.eval(), state, done


# ---------------------------------------------------------------- stage 2: latents

@torch.no_grad()
def normalise_latents(vae, images: torch.Tensor, batch: int = 64) -> dict:
    """Fold a per-channel shift and scale into quant_conv / post_quant_conv so that posterior means times SD1's
    0.18215 have zero mean and unit variance: the loader fixes the scaling factor, and samplers start from unit
    noise. The 1x1 convolutions make this exact (decode(encode(x)) is unchanged)."""
    means = torch.cat([vae.encode(to_unit(images[i:i + batch])).latent_dist.mean
                       for i in range(0, len(images), batch)])
    mu = means.mean(dim=(0, 2, 3))
    scale = 1.0 / (VAE_SCALE * means.std(dim=(0, 2, 3)).clamp_min(1e-6))
    q, p = vae.quant_conv, vae.post_quant_conv
    c = mu.numel()
    # quant_conv: [mean; logvar] = W h + b  ->  mean' = s (mean - mu), logvar' = logvar + 2 log s
    q.weight[:c] *= scale.view(c, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mu) * scale
    q.bias[c:] += 2 * torch.log(scale)
    # post_quant_conv: P z + b with z = z' / s + mu
    p.bias += (p.weight[:, :, 0, 0] @ mu)
    p.weight /= scale.view(1, c, 1, 1)
    return {"mean": mu.tolist(), "scale": scale.tolist()}


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Scaled latents (posterior means x 0.18215) of every picture, as the UNet sees them."""
    return torch.cat([vae.encode(to_unit(images[i:i + batch])).latent_dist.mean * VAE_SCALE
                      for i in range(0, len(images), batch)])


@torch.no_grad()
def reconstruction_scores(vae, r: Recipe, count: int = 64) -> dict:
    """Scorer accuracy on VAE round trips of pictures outside the training set (what the VAE preserves)."""
    from studio.demo_world import score
    world = World(demo_eval.EVAL_WORLD_SEED)
    samples = list(world.samples(count, r.size))
    x = torch.stack([torch.from_numpy(np.array(s.image)).permute(2, 0, 1) for s in samples])
    rec = vae.decode(vae.encode(to_unit(x)).latent_dist.mean).sample
    arr = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    hits = {"colour": 0, "shape": 0, "background": 0}
    from PIL import Image
    for a, s in zip(arr, samples):
        m = score(Image.fromarray(a)).matches(s.label)
        for k in hits:
            hits[k] += m[k]
    l1 = float((rec - to_unit(x)).abs().mean())
    return {"l1": round(l1, 4), **{k: round(v / count, 3) for k, v in hits.items()}}


def cached_latents(r: Recipe, state_dir: Path, vae, vae_state: dict, images: torch.Tensor) -> dict:
    path = state_dir / "latents.pt"
    state = load_state(path, r)
    if state and state["vae_step"] == vae_state["step"]:
        for k, v in state["vae_fold"].items():
            vae.get_submodule(k).load_state_dict(v)
        return state
    log(f"latents: encoding {len(images)} pictures")
    t = time.monotonic()
    stats = normalise_latents(vae, images)
    latents = encode_all(vae, images)
    log(f"latents: {tuple(latents.shape)}, std {latents.std():.3f}, {time.monotonic() - t:.0f} s")
    state = {"fixed": r.fixed(), "vae_step": vae_state["step"], "latents": latents, "stats": stats,
             "vae_fold": {k: vae.get_submodule(k).state_dict() for k in ("quant_conv", "post_quant_conv")},
             "reconstruction": reconstruction_scores(vae, r)}
    log(f"latents: VAE round trip {state['reconstruction']}")
    save_state(path, state)
    return state


# ---------------------------------------------------------------- stage 3: UNet + text encoder

def train_unet(r: Recipe, state_dir: Path, latents_state: dict, labels: list, *, save_every: float,
               log_every: int, stopper: Stopper):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from studio.loading.ldm_config import scheduler_config
    from studio.loading.tokenizers import load_clip_tokenizer

    path = state_dir / "unet.pt"
    state = load_state(path, r)
    if state and state["vae_step"] != latents_state["vae_step"]:
        raise StudioError(f"The UNet state in {path} was trained on latents of another VAE (step "
                          f"{state['vae_step']}, now {latents_state['vae_step']}).", field="state",
                          fix="delete unet.pt to train the UNet again on the new latents")
    torch.manual_seed(r.seed + 1)
    unet, te = make_unet(r), make_text_encoder(r)
    tok = load_clip_tokenizer()
    sched = DDPMScheduler.from_config(scheduler_config("epsilon"))
    te.requires_grad_(r.train_text)
    groups = [{"params": list(unet.parameters()), "lr": r.unet_lr, "base": r.unet_lr, "weight_decay": 1e-2}]
    if r.train_text:
        groups.append({"params": list(te.parameters()), "lr": r.text_lr, "base": r.text_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    trained = [p for g in groups for p in g["params"]]
    ema = EMAModel(trained, decay=r.ema, use_ema_warmup=True) if r.ema else None
    if state:
        unet.load_state_dict(state["unet"])
        te.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"])
    else:
        state = {"step": 0}
        log(f"unet: {params_m(unet):.2f} M parameters, channels {r.unet_channels}; text encoder "
            f"{params_m(te):.2f} M ({'trained' if r.train_text else 'frozen'})")
    unet.train()
    te.train(r.train_text)
    latents = latents_state["latents"]

    def step_fn(step):
        gen = step_generator(r.seed, step, "unet")
        rng = np.random.default_rng((r.seed, step, 2))
        idx = torch.randint(0, len(latents), (r.batch,), generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, r.unet_steps, g["base"], r)
        caps = captions_for(labels, idx.tolist(), rng, r.caption_dropout)
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.set_grad_enabled(r.train_text):
            hidden = te(ids).last_hidden_state
        loss = diffusion_loss(unet, sched, latents[idx], {"hidden": hidden, "added": None}, gen,
                              min_snr_gamma=r.min_snr_gamma).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        if ema is not None:
            ema.step(trained)
        return float(loss.detach()), opt.param_groups[0]["lr"]

    def snapshot(step, elapsed):
        return {"fixed": r.fixed(), "step": step, "vae_step": latents_state["vae_step"],
                "unet": unet.state_dict(), "text_encoder": te.state_dict(), "opt": opt.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "rng": torch.get_rng_state(),
                "elapsed": elapsed, "recipe": dataclasses.asdict(r)}

    state, done = train_loop("unet", path, state, r.unet_steps, step_fn, snapshot, save_every=save_every,
                             log_every=log_every, stopper=stopper)
    if ema is not None:
        ema.copy_to(trained)   # the exported model is the EMA one; the state file keeps the raw weights
    return unet.eval(), te.eval(), tok, state, done


# ---------------------------------------------------------------- stage 4: export

def export(r: Recipe, out: Path, unet, te, tok, vae, info: dict) -> Path:
    from studio.loading.components import Components
    from studio.loading.ldm_config import scheduler_config
    from studio.loading.ldm_export import save_ldm_single_file

    components = Components(family="sd1", unet=unet, vae=vae, text_encoder=te, tokenizer=tok,
                            scheduler_config=scheduler_config("epsilon"), source="tools.train_demo")
    meta = {"modelspec.title": "Demo shapes (toy model trained on the demo world)",
            "modelspec.architecture": "stable-diffusion-v1", "modelspec.resolution": f"{r.size}x{r.size}",
            "modelspec.description": "A toy trained on the studio's demo world: one flat-colour shape on a flat "
                                     "background, from prompts like 'a red circle on a blue background'. Native "
                                     f"size {r.size}x{r.size} px.",
            "demo.recipe": json.dumps(dataclasses.asdict(r)),
            "demo.training": json.dumps(info)}
    save_ldm_single_file(components, out, dtype=torch.float16, metadata=meta)
    mb = out.stat().st_size / 1e6
    log(f"export: {out} ({mb:.1f} MB fp16)")
    if mb > MAX_FILE_MB:
        log(f"export: WARNING the file is over {MAX_FILE_MB} MB; use narrower channels")
    demo_eval.write_card(out, r, info, None)
    return out


# ---------------------------------------------------------------- command line

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.train_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=("vae", "unet", "export", "all"), default=None,
                   help="what to run (default: all, or nothing but --eval when --eval is given alone)")
    p.add_argument("--steps", type=int, help="steps of the stage (for --stage all: UNet steps)")
    p.add_argument("--vae-steps", type=int, help="VAE steps (default 4000)")
    p.add_argument("--batch", type=int, help="UNet batch size (default 32)")
    p.add_argument("--vae-batch", type=int, help="VAE batch size (default 16)")
    p.add_argument("--size", type=int, help="native picture size in px, a multiple of 8 (default 64)")
    p.add_argument("--images", type=int, help="world pictures in the training set (default 8192)")
    p.add_argument("--seed", type=int, help="training seed (default 0)")
    p.add_argument("--lr", type=float, help="UNet learning rate (default 5e-4)")
    p.add_argument("--freeze-text", action="store_true", help="keep the text encoder at its random init")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the single file to write (default {DEFAULT_OUT})")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE,
                   help=f"resumable state folder (default {DEFAULT_STATE})")
    p.add_argument("--save-every", type=float, default=180.0, help="seconds between state saves (default 180)")
    p.add_argument("--log-every", type=int, help="steps between progress lines (default 20)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's choice; on a shared CPU use 1: two threads that other "
                        "jobs interrupt ran ten times slower here)")
    p.add_argument("--eval", type=int, nargs="?", const=100, default=None, metavar="N",
                   help="score N fixed prompt x seed pairs of --out through the studio (default N 100)")
    p.add_argument("--verbose-eval", action="store_true", help="print every eval generation")
    p.add_argument("--quick", action="store_true", help="a tiny run for tests (seconds)")
    return p.parse_args(argv)


def recipe_from(args) -> Recipe:
    r = Recipe.quick() if args.quick else Recipe()
    kw = {}
    for name in ("batch", "vae_batch", "size", "images", "seed"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.lr is not None:
        kw["unet_lr"] = args.lr
    if args.vae_steps is not None:
        kw["vae_steps"] = args.vae_steps
    if args.steps is not None:
        kw["vae_steps" if args.stage == "vae" else "unet_steps"] = args.steps
    if args.freeze_text:
        kw["train_text"] = False
    r = dataclasses.replace(r, **kw)
    if r.size % 8 or r.size < 32:
        raise StudioError(f"Size {r.size} is not a multiple of 8 of at least 32.", field="size", fix="use 64 or 128")
    if (r.size // 8) % (1 << (len(r.unet_channels) - 1)):
        raise StudioError(f"Size {r.size} gives latents the UNet cannot halve {len(r.unet_channels) - 1} times.",
                          field="size", fix="use a multiple of 32 px")
    if min(r.batch, r.vae_batch, r.images, r.vae_steps, r.unet_steps) < 1:
        raise StudioError("Batch, images and steps must be at least 1.", field="steps", fix="give positive numbers")
    return r


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except StudioError as e:
        log(f"error: {e}")
        return 2


def run(args) -> int:
    r = recipe_from(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    stage = args.stage or ("all" if args.eval is None else None)
    state_dir = args.state.expanduser()
    out = args.out.expanduser()
    if stage is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        if not train_and_export(r, stage, state_dir, out, args):
            return 0   # stopped early by a signal; the state is saved and a rerun continues
    if args.eval is not None:
        file_recipe, info = demo_eval.file_info(out, Recipe)
        scores = demo_eval.evaluate(out, args.eval, file_recipe.size, report=log if args.verbose_eval else None)
        log(demo_eval.summary(scores))
        demo_eval.write_card(out, file_recipe, info, scores)
    return 0


def train_and_export(r: Recipe, stage: str, state_dir: Path, out: Path, args) -> bool:
    """Run ``stage`` (vae / unet / all train; export only writes the current state). False when stopped."""
    log(f"train_demo: stage {stage}, state {state_dir}, torch threads {torch.get_num_threads()}")
    opts = dict(save_every=args.save_every, log_every=args.log_every or (1 if args.quick else 20))
    t = time.monotonic()
    images, labels = world_images(r)
    log(f"world: {len(images)} pictures at {r.size} px ({time.monotonic() - t:.1f} s)")
    if stage == "export":
        for name in ("vae.pt", "unet.pt"):
            saved = load_state(state_dir / name, r)
            if saved is None:
                raise StudioError(f"No {name} in {state_dir} to export.", field="state",
                                  fix="train first (--stage all), or point --state at the training folder")
            # export what is there: the stages run with their saved step as the goal, so nothing trains
            r = dataclasses.replace(r, **{f"{name[:-3]}_steps": max(1, saved["step"])})
    with Stopper() as stopper:
        vae, vae_state, done = train_vae(r, state_dir, images, stopper=stopper, **opts)
        if not done:
            return False
        if stage == "vae":
            return True
        latents = cached_latents(r, state_dir, vae, vae_state, images)
        unet, te, tok, unet_state, done = train_unet(r, state_dir, latents, labels, stopper=stopper, **opts)
        if not done:
            return False
    info = {"vae_steps": vae_state["step"], "unet_steps": unet_state["step"],
            "vae_minutes": round(vae_state.get("elapsed", 0) / 60, 1),
            "unet_minutes": round(unet_state.get("elapsed", 0) / 60, 1),
            "unet_loss": unet_state.get("loss"), "reconstruction": latents["reconstruction"]}
    export(r, out, unet, te, tok, vae, info)
    return True


if __name__ == "__main__":
    sys.exit(main())
