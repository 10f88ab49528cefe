"""GPU checks on a real card: every mode under fp16, --no-half-vae, --medvram and --lowvram, out-of-memory
recovery, a LoRA in each offload mode and two-process training, on tiny models built in code (a few minutes).

    python -m tests.gpu.check                        # on the first CUDA device
    python -m tests.gpu.check --device cpu --quick   # smoke run: offload and multi-GPU checks SKIP

Prints one line per check, ``PASS|FAIL|SKIP name: detail``, and exits 1 on any FAIL. It drives the studio only
through its public entry points (``Studio``, ``GenerationRequest``, ``Settings``, the training launcher).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (name, settings) of the precision / offload variants every mode runs under; fp16 is the reference
VARIANTS = [("fp16", {}), ("no-half-vae", {"no_half_vae": True}), ("medvram", {"offload": "medvram"}),
            ("lowvram", {"offload": "lowvram"})]
MODES = ("txt2img", "img2img", "inpaint", "hires", "controlnet")
OFFLOADS = ("none", "medvram", "lowvram")
# mean absolute pixel difference (0-255) still counted as "the same image": offload runs the same kernels, an
# fp32 VAE differs from an fp16 one in the last bits of each pixel
SAME_MEAN = {"offload": 1.0, "no-half-vae": 3.0}
LORA_CHANGES = 1.0  # a LoRA must move the picture by more than this (mean absolute difference)
OOM_CAP = 2 << 30   # device memory the out-of-memory check may use: the tiny model and a normal job fit


class Skip(Exception):
    """A check that cannot run here (the reason is printed)."""


@dataclass
class Result:
    status: str
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail}"


@dataclass
class Env:
    """What every check shares: the options, a models/ tree written once, and reference images per mode."""

    device: str
    quick: bool
    root: Path
    size: int
    steps: int
    reference: dict = field(default_factory=dict)   # (mode) -> fp16 image; ("lora", offload) -> LoRA image
    _shared: tuple | None = None                     # (tag, context manager, studio) of the mode checks

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def models(self) -> Path:
        return self.root / "models"

    def settings(self, tag: str, **changes):
        from studio.settings import Settings

        return Settings(models_dir=str(self.models), data_dir=str(self.root / "data" / tag),
                        outdir=str(self.root / "outputs"), default_checkpoint="tiny-sd1.safetensors",
                        device=self.device, precision="fp16", save_images=False, preview_every=0,
                        **changes).validate()

    @contextlib.contextmanager
    def studio(self, tag: str, **changes) -> Iterator:
        from studio.app import Studio

        studio = Studio(self.settings(tag, **changes), load_extensions=False)
        try:
            yield studio
        finally:
            studio.close()
            _free(self)

    def shared(self, tag: str, **changes):
        """One Studio for consecutive checks with the same tag (the previous one is closed first)."""
        if self._shared is None or self._shared[0] != tag:
            self.close_shared()
            cm = self.studio(tag, **changes)
            self._shared = (tag, cm, cm.__enter__())
        return self._shared[2]

    def close_shared(self) -> None:
        if self._shared is not None:
            _tag, cm, _studio = self._shared
            self._shared = None
            cm.__exit__(None, None, None)


def _free(env: Env) -> None:
    import gc

    gc.collect()
    if env.cuda:
        import torch
        torch.cuda.empty_cache()


# ---- the world: checkpoint, ControlNet, LoRA ---------------------------------------------------------------
def build_models(root: Path) -> Path:
    """A models/ tree: the tiny SD1 as a single file, a canny ControlNet for it and a kohya LoRA over all layers."""
    from tests import controlnets, lorafiles, tinymodels

    models = root / "models"
    (models / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
    sd1 = tinymodels.make_tiny("sd1", seed=0)
    tinymodels.write_single_file(sd1, models / "Stable-diffusion" / "tiny-sd1.safetensors")
    (models / "ControlNet").mkdir(exist_ok=True)
    controlnets.write_ldm(controlnets.make_controlnet(sd1.unet, seed=1),
                          models / "ControlNet" / "control_tiny_canny.safetensors")
    tensors, _ = lorafiles.kohya_lora(sd1, seed=3, rank=8, alpha=8.0)
    lorafiles.write(models / "Lora" / "gpucheck.safetensors", tensors, lorafiles.metadata_for(sd1))
    return models


def picture(size: int):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (40, 120, 200))
    d = ImageDraw.Draw(img)
    d.rectangle((size // 4, size // 4, size // 2, size // 2), fill=(230, 200, 20), outline="black", width=2)
    d.ellipse((size // 2, size // 2, size - 4, size - 4), fill=(200, 30, 60), outline="black", width=2)
    return img


def mask(size: int):
    from PIL import Image, ImageDraw

    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).rectangle((size // 3, size // 3, 2 * size // 3, 2 * size // 3), fill=255)
    return m


def request(env: Env, mode: str, studio=None, **changes):
    """The GenerationRequest of one check mode at the check size."""
    from studio.request import GenerationRequest

    base = dict(prompt="a red cube on a table", negative_prompt="blurry", width=env.size, height=env.size,
                steps=env.steps, cfg_scale=5.0, seed=1234, sampler_name="Euler", save_images=False)
    if mode in ("img2img", "inpaint"):
        base.update(mode=mode, init_images=(picture(env.size),), denoising_strength=0.75)
    if mode == "inpaint":
        base.update(mask=mask(env.size), inpainting_fill=1)
    if mode == "hires":
        # a pixel upscaler: the first pass is decoded and re-encoded (the path an fp32 VAE beside fp16 broke)
        base.update(enable_hr=True, hr_scale=2.0, hr_upscaler="Lanczos", hr_second_pass_steps=env.steps,
                    hr_denoising_strength=0.6)
    if mode == "controlnet":
        from studio.controlnet import ControlUnit
        unit = ControlUnit.from_api({"enabled": True, "module": "canny", "model": "control_tiny_canny",
                                     "image": picture(env.size)}, 0, studio.preprocessors)
        base.update(controlnet_units=(unit,))
    return GenerationRequest(**{**base, **changes})


def pixels(img):
    import numpy as np
    return np.asarray(img.convert("RGB"), dtype=np.float32)


def mean_diff(a, b) -> float:
    import numpy as np
    return float(np.abs(pixels(a) - pixels(b)).mean())


def check_image(img, size: tuple[int, int]) -> str:
    """Raise AssertionError unless ``img`` is a real picture of ``size``; returns a short description."""
    arr = pixels(img)
    assert img.size == size, f"size {img.size}, expected {size}"
    assert arr.std() > 1.0, f"a flat image (std {arr.std():.2f}, mean {arr.mean():.1f}): NaNs or a black decode"
    return f"{img.size[0]}x{img.size[1]}, std {arr.std():.1f}"


# ---- checks ------------------------------------------------------------------------------------------------
def check_mode(env: Env, variant: str, changes: dict, mode: str) -> str:
    if changes.get("offload") and not env.cuda:
        raise Skip(f"--{changes['offload']} needs a CUDA device (on {env.device} the studio ignores it)")
    studio = env.shared(variant, **changes)
    result = studio.generate(request(env, mode, studio))
    want = (env.size * 2,) * 2 if mode == "hires" else (env.size,) * 2
    detail = check_image(result.images[0], want)
    if variant == "fp16":
        env.reference[mode] = result.images[0]
    else:
        diff = mean_diff(result.images[0], reference(env, mode))
        tol = SAME_MEAN["offload" if changes.get("offload") else variant]
        assert diff <= tol, f"differs from the fp16 image by {diff:.2f} (mean |Δpx|, tolerance {tol})"
        detail += f", {diff:.2f} from fp16"
    return detail


def reference(env: Env, mode: str):
    """The fp16 image of ``mode`` (made now if its check did not run, e.g. under --only)."""
    if mode not in env.reference:
        check_mode(env, "fp16", {}, mode)
    return env.reference[mode]


def check_oom(env: Env) -> str:
    """A job that runs out of device memory is answered with an error, and the next normal job succeeds."""
    import torch

    from studio.errors import StudioError

    env.close_shared()
    with env.studio("oom", max_batch_size=64) as studio, _memory_cap(env, OOM_CAP):
        studio.generate(request(env, "txt2img"))  # loads the model
        comps = studio.manager.current_components()
        before = torch.cuda.memory_allocated() if env.cuda else 0
        if env.cuda:  # the cap makes this fail on any card; the studio may also recover by itself (tiling)
            huge = request(env, "txt2img", width=2048, height=2048, batch_size=64, steps=2)
            how = f"batch 64 at 2048x2048 under a {OOM_CAP >> 30} GiB cap"
        else:  # no device memory to exhaust: the UNet raises what CUDA raises
            huge, how = request(env, "txt2img"), "simulated (the UNet raises OutOfMemoryError)"
            comps.unet.forward = _raise_oom
        first = "finished (the studio recovered inside the job)"
        try:
            studio.generate(huge)
        except StudioError as exc:
            first = f"error: {str(exc)[:90]}"
        finally:
            comps.unet.__dict__.pop("forward", None)
        result = studio.generate(request(env, "txt2img"))
        check_image(result.images[0], (env.size, env.size))
        detail = f"{how} -> {first}; next job ok"
        if env.cuda:
            _free(env)
            held = (torch.cuda.memory_allocated() - before) / 2**20
            assert held < 64, f"{held:.0f} MB still allocated after the failed job (its frames are kept alive)"
            detail += f", {held:+.0f} MB allocated vs before"
        return detail


@contextlib.contextmanager
def _memory_cap(env: Env, cap: int) -> Iterator[None]:
    """Cap this process's CUDA allocations (so the huge job fails on any card); lifted afterwards."""
    if not env.cuda:
        yield
        return
    import torch

    device = torch.device(env.device)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def _raise_oom(*args, **kwargs):
    import torch
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated by tests.gpu)")


def check_lora(env: Env, offload: str) -> str:
    """With the LoRA the image changes; it equals the no-offload LoRA image; without it, the base image is back."""
    if offload != "none" and not env.cuda:
        raise Skip(f"--{offload} needs a CUDA device (on {env.device} the studio ignores it)")
    env.close_shared()
    with env.studio(f"lora-{offload}", offload=offload) as studio:
        plain = studio.generate(request(env, "txt2img")).images[0]
        styled = studio.generate(request(env, "txt2img", prompt="a red cube on a table <lora:gpucheck:1>"))
        back = studio.generate(request(env, "txt2img")).images[0]
    img = styled.images[0]
    change = mean_diff(img, plain)
    assert change > LORA_CHANGES, f"the LoRA changed the image by only {change:.2f} (mean |Δpx|): not applied"
    assert mean_diff(back, plain) == 0, "the image without the LoRA differs from before it: weights not restored"
    detail = f"LoRA moves the image by {change:.1f}, restored exactly"
    if offload == "none":
        env.reference[("lora", "none")] = img
    else:
        if ("lora", "none") not in env.reference:
            check_lora(env, "none")
        diff = mean_diff(img, env.reference[("lora", "none")])
        assert diff <= SAME_MEAN["offload"], f"differs from the no-offload LoRA image by {diff:.2f}"
        detail += f", {diff:.2f} from no offload"
    return detail


def check_training(env: Env) -> str:
    """accelerate launch --num_processes 2 trains a LoRA on 7 images (ranks must agree on the step count)."""
    import torch

    gpus = torch.cuda.device_count() if env.cuda else 0
    if gpus < 2:
        raise Skip(f"needs 2 CUDA devices, found {gpus}")
    return train(env, processes=2)


def train(env: Env, processes: int) -> str:
    """Train a LoRA on 7 images in ``processes`` processes through the studio's launcher."""
    from studio.training import TrainConfig
    from studio.training.runner import launch_training
    from tests.training.conftest import write_dataset

    run = env.root / f"train{processes}"
    cfg = TrainConfig(base_model=str(env.models / "Stable-diffusion" / "tiny-sd1.safetensors"),
                      dataset_dir=str(write_dataset(run / "dataset", 7)), resolution=64, min_bucket_reso=64,
                      max_bucket_reso=128, min_image_side=32, rank=4, alpha=4.0, learning_rate=1e-3, epochs=3,
                      batch_size=2, seed=1, output_name="gpucheck", output_dir=str(run / "out"),
                      run_dir=str(run / "run"), save_every=2, sample_every=0)
    proc = launch_training(cfg.save(run / "run.toml"), num_processes=processes)
    try:
        code = proc.wait(timeout=600)
    except Exception:
        proc.kill()
        raise AssertionError(f"training in {processes} processes did not finish within 10 minutes "
                             "(a rank waiting forever?)") from None
    status = proc.status()
    assert code == 0 and status["state"] == "done", f"exit {code}, {status['state']}: {status['error']}"
    out = run / "out" / "gpucheck.safetensors"
    assert out.is_file(), f"{out} was not written"
    return f"{status['step']} steps in {processes} processes, {out.name} written"


# ---- the plan ----------------------------------------------------------------------------------------------
def plan(env: Env) -> list[tuple[str, Callable[[], str]]]:
    """(name, check) in running order. Consecutive mode checks of one variant share one Studio."""
    checks: list[tuple[str, Callable[[], str]]] = []
    for variant, changes in VARIANTS:
        for mode in MODES:
            checks.append((f"{variant}/{mode}", lambda v=variant, c=changes, m=mode: check_mode(env, v, c, m)))
    checks.append(("oom/recover", lambda: check_oom(env)))
    for offload in OFFLOADS:
        checks.append((f"lora/{offload}", lambda offload=offload: check_lora(env, offload)))
    checks.append(("train/2-process-7-images", lambda: check_training(env)))
    return checks


def run_check(name: str, fn: Callable[[], str]) -> Result:
    started = time.monotonic()
    try:
        detail = fn()
        status = "PASS"
    except Skip as exc:
        return Result("SKIP", name, str(exc))
    except AssertionError as exc:
        status, detail = "FAIL", str(exc) or "assertion failed"
    except Exception as exc:  # any error is a failed check; the rest still run
        status, detail = "FAIL", f"{type(exc).__name__}: {str(exc)[:300]}"
        if os.environ.get("GPU_CHECK_TRACEBACK"):
            traceback.print_exc()
    return Result(status, name, f"{detail} ({time.monotonic() - started:.1f}s)")


def make_env(device: str, quick: bool, root: Path, size: int | None = None, steps: int | None = None) -> Env:
    build_models(root)
    return Env(device=device, quick=quick, root=root, size=size or (64 if quick or device == "cpu" else 128),
               steps=steps or (2 if quick else 4))


def main(argv: list[str] | None = None, out=None) -> int:
    out = out or sys.stdout
    ap = argparse.ArgumentParser(prog="python -m tests.gpu.check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (a smoke run; default: cuda)")
    ap.add_argument("--quick", action="store_true", help="smaller images and fewer steps")
    ap.add_argument("--only", default="", help="run only checks whose name contains this (e.g. lora, fp16/)")
    ap.add_argument("--size", type=int, default=0, help="image side in pixels (default 128 on cuda, 64 on cpu)")
    args = ap.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("FAIL setup: no CUDA device (torch.cuda.is_available() is False); use --device cpu for a smoke run",
              file=out)
        return 1
    if args.device.startswith("cuda"):
        index = torch.device(args.device).index or 0
        props = torch.cuda.get_device_properties(index)
        print(f"# {props.name} ({props.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} device(s)), "
              f"torch {torch.__version__}, CUDA {torch.version.cuda}", file=out)
    results = []
    with tempfile.TemporaryDirectory(prefix="gpucheck-") as tmp:
        env = make_env(args.device, args.quick, Path(tmp), size=args.size or None)
        try:
            for name, fn in plan(env):
                if args.only in name:
                    results.append(run_check(name, fn))
                    print(results[-1].line(), file=out, flush=True)
        finally:
            env.close_shared()
    count = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"# {len(results)} checks: {count['PASS']} passed, {count['FAIL']} failed, {count['SKIP']} skipped",
          file=out)
    return 1 if count["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
