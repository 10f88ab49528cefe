"""The training loop: one ``Trainer`` runs a ``TrainConfig`` through accelerate.

Determinism for resume: the batch order is a function of (seed, epoch), and noise, timesteps, caption shuffles,
flips and class-image picks are drawn from generators seeded by (seed, epoch, batch index). The saved state is the
trained tensors, optimizer, lr scheduler and RNG (accelerate ``save_state``) plus ``trainer.json`` (position), so
a resumed run continues with exactly the losses of an uninterrupted one.

Several processes (``accelerate launch --num_processes N``): every process plans the same epoch (all batches) and
takes every N-th of it, the last round wrapping around so all take the same number of steps. The position is
global (optimizer steps, and batches of the epoch done by all processes together), so a run saved on N GPUs
resumes on any other number.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import StudioError
from . import export
from .buckets import LatentCache, epoch_batches, plan_buckets
from .captions import tag_frequency, training_caption
from .config import TrainConfig
from .dataset import scan_dataset
from .lifetime import OWNER_ENV, RunLock, start_time
from .losses import diffusion_loss, encode_text, flow_loss, step_generator
from .networks import build_network, with_ti_tokens
from .optim import make_optimizer, make_scheduler
from .progress import SAMPLES_DIR, STATE_DIR, ProgressWriter, StopRequest
from .sampling import read_prompts, render_samples

TEXT_CACHE_MAX = 4096      # entries, kept on the CPU (a few MB each for SDXL): moved to the device per batch


@dataclass
class TrainResult:
    output: Path | None
    steps: int
    total_steps: int
    losses: list[float] = field(default_factory=list)      # per optimizer step, this session
    stopped: bool = False
    samples: list[str] = field(default_factory=list)
    vae_encodes: int = 0
    intermediate: list[str] = field(default_factory=list)


def load_base(cfg: TrainConfig, dtype=torch.float32, device="cpu"):
    from ..loading.diffusers_folder import load_diffusers_folder
    from ..loading.single_file import load_single_file
    pred = None if cfg.prediction == "auto" else cfg.prediction
    from ..loading import companions
    from ..settings import Settings
    # separate text-encoder / VAE files of a transformer-only checkpoint: the folders the studio reads them from
    s = Settings(models_dir=cfg.models_dir or str(Path(cfg.base_model).resolve().parent.parent))
    parts = companions.find([*s.companion_paths, s.vae_path])
    if Path(cfg.base_model).is_dir():
        c = load_diffusers_folder(cfg.base_model, dtype=dtype, device=device)
        if pred:
            c.prediction_type = pred
        return c
    return load_single_file(cfg.base_model, dtype=dtype, device=device, prediction=pred, companions=parts)


class Trainer:
    """``Trainer(cfg).run()``; ``on_event`` receives every progress event in-process."""

    def __init__(self, cfg: TrainConfig, *, on_event: Callable[[dict], None] | None = None,
                 stop: StopRequest | None = None, write_progress: bool = True, lock: RunLock | None = None):
        # "auto" precision / checkpointing resolve here, per machine: run.toml keeps "auto" for a resume elsewhere
        self.cfg = cfg.resolved().validate().for_device(torch.cuda.is_available())
        self.run_dir = Path(self.cfg.run_dir)
        self.stop = stop or StopRequest(self.run_dir)
        self.lock = lock     # held by the caller (the CLI takes it before the class images); else run() takes it
        self.on_event = on_event
        self.write_progress = write_progress

    # ---- setup -----------------------------------------------------------------------------------------------
    def _setup(self):
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from diffusers import DDPMScheduler

        cfg = self.cfg
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # accelerate keeps its state per process; an earlier in-process run (tests, the CLI after class-image
            # generation) may have set another precision. Distributed launches are left alone.
            from accelerate.state import AcceleratorState
            AcceleratorState._reset_state(reset_partial_state=True)
        # the scheduler counts optimizer steps (we step it once per step): the same schedule on any number of
        # processes, and a state saved on N processes resumes on M (accelerate would step it N times per step)
        self.acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                               cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)
        set_seed(cfg.seed)   # adapter initialisation; per-step randomness has its own generators
        self.progress = ProgressWriter(self.run_dir / "progress.jsonl", self.on_event,
                                       enabled=self.write_progress and self.acc.is_main_process)
        dev = self.acc.device
        # frozen weights in the low precision (as diffusers' examples), trained tensors in fp32
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        # loaded in fp16 for bf16 too: the VAE then goes up to fp32 without passing through bf16's 8-bit mantissa
        self.c = c = load_base(cfg, dtype=torch.float32 if self.weight_dtype == torch.float32 else torch.float16,
                               device=dev)
        for name, m in c.modules().items():
            # the VAE only caches latents and decodes samples: fp32, as an fp16 SDXL VAE gives NaNs
            want = torch.float32 if name == "vae" else self.weight_dtype
            if next(m.parameters()).dtype != want:
                m.to(want)
        if cfg.is_ti and not c.spec.trains_embeddings:
            raise StudioError(f"Textual Inversion for {c.spec.label} is not supported yet.", field="method.method",
                              fix=f"train a LoRA for {c.spec.label}, or TI on a model of another family")
        self._check_family(c)
        c.vae.requires_grad_(False)
        self.noise_sched = None        # flow-matching families: flow_loss draws its own times
        if c.prediction_type != "flow":
            self.noise_sched = DDPMScheduler.from_config({**c.scheduler_config, "prediction_type": c.prediction_type})
        self.net = build_network(cfg, c)
        for ps in self.net.params.values():
            for p in ps:
                p.data = p.data.float()   # trained tensors stay fp32 whatever the frozen weights are
        if cfg.network_weights:
            from .refine import apply_network_weights
            got = apply_network_weights(self.net, cfg.network_weights, c.family)
            if self.acc.is_main_process:      # the child's stdout is the run's log
                new = f", {got['new']} new (not in the file: they start at zero)" if got["new"] else ""
                print(f"refining {Path(cfg.network_weights).name}: {got['loaded']} layer(s) loaded{new}", flush=True)
        if cfg.is_ti and self.weight_dtype != torch.float32:
            # TI's fp32 table inside a half-precision encoder: its rows enter the encoder at the encoder's dtype
            # (autocast alone does not do it: on the CPU it leaves layer_norm to fail on fp32 inputs)
            dtype = self.weight_dtype
            c.text_encoder.get_input_embeddings().register_forward_hook(lambda m, args, out: out.to(dtype))
        if cfg.checkpointing:
            if "unet" in self.net.modules or cfg.is_ti or cfg.is_controlnet or not cfg.train_unet:
                c.unet.enable_gradient_checkpointing()
            if "controlnet" in self.net.modules:
                self.net.modules["controlnet"].enable_gradient_checkpointing()
            for part in ("text_encoder", "text_encoder_2"):
                if part in self.net.modules:
                    self.net.modules[part].gradient_checkpointing_enable()
        self._data()
        self.pos = self._position()
        self.total_steps = self._total_steps(self.pos)
        self.opt = make_optimizer(cfg, self.net.params)
        self.lr_sched = make_scheduler(cfg, self.opt, self.total_steps)
        parts = list(self.net.modules)
        prepared = self.acc.prepare(*[self.net.modules[p] for p in parts], self.opt, self.lr_sched)
        self.models = dict(zip(parts, prepared[:len(parts)]))
        self.opt, self.lr_sched = prepared[len(parts):]
        self.acc.register_save_state_pre_hook(self._save_hook)
        self.acc.register_load_state_pre_hook(self._load_hook)

    def _check_family(self, c) -> None:
        """What this family's runs cannot do, refused before any work with the setting to change."""
        cfg, spec = self.cfg, c.spec
        if not cfg.is_ti and not cfg.is_controlnet and not spec.trains_lora:
            raise StudioError(f"LoRA training for {spec.label} is not supported yet.", field="model.base_model",
                              fix="train on a model of another family")
        if cfg.is_controlnet and not spec.controlnet:
            raise StudioError(f"ControlNet training for {spec.label} is not supported.", field="method.method",
                              fix="train a LoRA, or a ControlNet on a model of another family")
        if c.prediction_type != "flow":
            return
        if cfg.method not in ("lora", "dreambooth_lora"):
            raise StudioError(f"{cfg.method} for {spec.label} is not supported: kohya's {spec.label} files "
                              "hold plain LoRA layers.", field="method.method", fix="choose the LoRA method")
        if cfg.min_snr_gamma:
            raise StudioError(f"Min-SNR weighting is for noise-prediction models, not {spec.label}'s flow matching.",
                              field="training.min_snr_gamma", fix="set min_snr_gamma to 0")
        if cfg.network_weights:
            raise StudioError(f"Refining a {spec.label} LoRA is not supported yet.", field="network.network_weights",
                              fix="leave network_weights empty to train a new LoRA")

    def _data(self):
        cfg, c = self.cfg, self.c
        scan = scan_dataset(cfg.dataset_dir, min_side=cfg.min_image_side, repeats=cfg.repeats,
                            caption_extension=cfg.caption_extension)
        if not scan.items:
            raise StudioError(f"No usable images in {cfg.dataset_dir} ({len(scan.skipped)} skipped).",
                              field="dataset.dataset_dir", fix="add images (png/jpg/webp) of at least "
                              f"{cfg.min_image_side}px per side")
        self.scan = scan
        self.plan = plan_buckets(scan.items, resolution=cfg.resolution, enable=cfg.enable_buckets,
                                 min_reso=cfg.min_bucket_reso, max_reso=cfg.max_bucket_reso, step=cfg.bucket_step)
        self.cache = LatentCache(c.vae, mode=cfg.cache_latents, folder=self.run_dir / "latents")
        self.conditions: dict[Path, Path] = {}
        self.control_cache: dict[tuple, torch.Tensor] = {}
        if cfg.is_controlnet:
            from .conditions import condition_files
            self.conditions = condition_files(cfg, scan)
        self.class_items = []
        if cfg.method == "dreambooth_lora":
            from .dreambooth import class_items
            self.class_items = class_items(cfg)
        self.n_batches = n_batches = len(self._batches(0))          # all processes together
        self.rounds_per_epoch = math.ceil(n_batches / self.acc.num_processes)
        self.steps_per_epoch = max(1, math.ceil(self.rounds_per_epoch / cfg.grad_accum))
        self.text_cache: dict[str, dict] = {}
        self.cache_text = not cfg.train_text_encoder and not cfg.is_ti

    def _batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches, the same list on every process (``_run`` hands each its share)."""
        return epoch_batches(self.plan.sizes, [i.repeats for i in self.scan.items], self.cfg.batch_size,
                             self.cfg.seed, epoch)

    def _total_steps(self, pos: dict) -> int:
        """Optimizer steps of the run: ``max_steps``, else what the epochs left take on this many processes
        (a run resumed on another number of GPUs finishes the same epochs)."""
        if self.cfg.max_steps:
            return self.cfg.max_steps
        rounds = math.ceil(max(0, self.n_batches - pos["consumed"]) / self.acc.num_processes) \
            + max(0, self.cfg.epochs - pos["epoch"] - 1) * self.rounds_per_epoch
        return pos["step"] + math.ceil(rounds / self.cfg.grad_accum)

    # ---- state -----------------------------------------------------------------------------------------------
    def _save_hook(self, models, weights, output_dir):
        from safetensors.torch import save_file
        weights.clear()   # not the whole UNet: only what is trained
        if self.acc.is_main_process:    # the hook runs on every process; the tensors are the same on all
            save_file(self.net.trainable_state(), os.path.join(output_dir, "trained.safetensors"))

    def _load_hook(self, models, input_dir):
        from safetensors.torch import load_file
        models.clear()
        self.net.load_trainable_state(load_file(os.path.join(input_dir, "trained.safetensors")))

    def save_state(self, position: dict) -> None:
        """Write the state to a temp folder, then swap it in: a crash never leaves half a state.

        Every process calls accelerate's ``save_state`` (each writes its RNG state; the main one the weights and
        optimizer); only the main process empties and swaps the folders, with barriers between."""
        final = self.run_dir / STATE_DIR
        tmp, old = final.with_name(STATE_DIR + ".tmp"), final.with_name(STATE_DIR + ".old")
        main = self.acc.is_main_process
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()           # nobody writes into tmp before it is empty
        self.acc.save_state(str(tmp))
        self.acc.wait_for_everyone()           # every process's files are in tmp before it is swapped in
        if main:
            (tmp / "trainer.json").write_text(json.dumps(
                {**position, "num_processes": self.acc.num_processes}), encoding="utf-8")
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def _position(self) -> dict:
        """Where the run continues: optimizer steps, epoch, and batches of that epoch done by all processes."""
        file = self.run_dir / STATE_DIR / "trainer.json"
        if not self.cfg.resume or not file.is_file():
            return {"step": 0, "epoch": 0, "consumed": 0}
        pos = json.loads(file.read_text(encoding="utf-8"))
        # states written before positions were global: one process, whose batch index is the epoch's
        return {"step": pos["step"], "epoch": pos["epoch"], "consumed": pos.get("consumed", pos.get("batch", 0))}

    def _resume(self) -> dict:
        if self.pos["step"] or self.pos["consumed"] or self.pos["epoch"]:
            self.acc.load_state(str(self.run_dir / STATE_DIR))
            # states are saved right after an optimizer step; the process count may differ from the saved one
            # (whose per-process counters then do not all exist)
            self.acc.step = 0
        return self.pos

    # ---- one micro-batch -------------------------------------------------------------------------------------
    def _caption(self, item, rng) -> str:
        cfg = self.cfg
        text = item.caption or cfg.instance_prompt
        text = training_caption(text, rng, shuffle=cfg.shuffle_caption, keep_tokens=cfg.keep_tokens,
                                dropout=cfg.caption_dropout)
        return with_ti_tokens(text, self.net, cfg.token) if cfg.is_ti else text

    def _cond(self, captions: list[str], sizes) -> dict:
        kw = {p: self.models[p] for p in ("text_encoder", "text_encoder_2") if p in self.models}
        if not self.cache_text:
            return encode_text(self.c, captions, clip_skip=self.cfg.clip_skip, sizes=sizes, **kw)
        key = json.dumps([captions, sizes])
        if key not in self.text_cache:
            with torch.no_grad():
                if len(self.text_cache) >= TEXT_CACHE_MAX:
                    self.text_cache.pop(next(iter(self.text_cache)))
                cond = encode_text(self.c, captions, clip_skip=self.cfg.clip_skip, sizes=sizes)
                self.text_cache[key] = _tensors_to(cond, "cpu")
        return _tensors_to(self.text_cache[key], self.acc.device)

    def _micro_loss(self, batch: list[int], micro: str) -> tuple[torch.Tensor, float | None]:
        """``micro`` names the batch in the run ("epoch:index"): its seeds, whichever process computes it."""
        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}:{micro}:data")
        items = [self.scan.items[i] for i in batch]
        size = self.plan.sizes[batch[0]]
        flips = [cfg.flip and rng.random() < 0.5 for _ in items]
        latents = [self.cache.get(it.path, size, f) for it, f in zip(items, flips)]
        captions = [self._caption(it, rng) for it in items]
        if self.class_items:   # DreamBooth: as many class images as instance images, same bucket size
            picks = [self.class_items[rng.randrange(len(self.class_items))] for _ in items]
            latents += [self.cache.get(it.path, size, False) for it in picks]
            captions += [it.caption or cfg.class_prompt for it in picks]
        lat = torch.stack(latents).to(self.acc.device)
        with self.acc.autocast():
            # inside autocast: a TI run's fp32 embedding table feeds a half-precision encoder
            cond = self._cond(captions, [size] * len(captions))
            control = {}
            if self.conditions:
                control = {"controlnet": self.models["controlnet"],
                           "control": torch.stack([self._control(it.path, size, f) for it, f in zip(items, flips)])}
            denoiser = self.models.get("unet", self.c.unet)
            if self.noise_sched is None:
                loss = flow_loss(self.c.spec, denoiser, lat, cond, step_generator(cfg.seed, micro),
                                 sampling=cfg.timestep_sampling, shift=cfg.discrete_flow_shift,
                                 guidance=cfg.guidance_scale, noise_offset=cfg.noise_offset,
                                 weight_dtype=self.weight_dtype)
            else:
                loss = diffusion_loss(denoiser, self.noise_sched, lat, cond, step_generator(cfg.seed, micro),
                                      noise_offset=cfg.noise_offset, min_snr_gamma=cfg.min_snr_gamma,
                                      weight_dtype=self.weight_dtype, **control)
        if not self.class_items:
            return loss.mean(), None
        n = len(items)
        prior = loss[n:].mean()
        return loss[:n].mean() + cfg.prior_loss_weight * prior, float(prior.detach())

    def _control(self, image: Path, size: tuple[int, int], flip: bool) -> torch.Tensor:
        """The condition of ``image`` at its bucket size and flip, kept in RAM (3 bytes a pixel, as images)."""
        key = (image, size, flip)
        if key not in self.control_cache:
            from .conditions import load_condition
            self.control_cache[key] = load_condition(self.conditions[image], size, flip).mul(255).round().to(
                torch.uint8)
        return self.control_cache[key].float().div(255)

    # ---- outputs ---------------------------------------------------------------------------------------------
    def _run_info(self, step: int, epoch: int) -> export.RunInfo:
        from .optim import kohya_optimizer_name
        reg_dirs = {}
        for it in self.class_items:
            d = reg_dirs.setdefault(Path(self.cfg.class_images_dir).name, {"n_repeats": 1, "img_count": 0})
            d["img_count"] += 1
        return export.RunInfo(family=self.c.family, prediction=self.c.prediction_type, steps=step, epoch=epoch,
                              num_train_images=self.scan.num_images, tag_frequency=tag_frequency(self.scan.items),
                              dataset_dirs=self.scan.dirs, started_at=self.started,
                              base_hash=self.base_hashes[0], base_legacy_hash=self.base_hashes[1],
                              num_epochs=math.ceil(self.total_steps / self.steps_per_epoch),
                              max_train_steps=self.total_steps, num_batches_per_epoch=self.n_batches,
                              num_reg_images=len(self.class_items), reg_dataset_dirs=reg_dirs,
                              bucket_info=export.bucket_info(self.scan.items, self.plan) if self.cfg.enable_buckets
                              else None, optimizer=kohya_optimizer_name(self.cfg), session_id=self.session_id,
                              num_processes=self.acc.num_processes)

    def export(self, step: int, epoch: int, *, suffix: bool) -> Path:
        """Write the LoRA / embedding. ``epoch`` is what ``ss_epoch`` says (kohya: the epoch index for step
        saves, the number of epochs begun, a partial one included, for the last save)."""
        cfg = self.cfg
        path = export.output_path(cfg, step if suffix else None)
        info = self._run_info(step, epoch)
        info.finished_at = time.time()
        meta = export.lora_metadata(cfg, info)
        if cfg.is_controlnet:
            dtype = torch.float16 if cfg.mixed_precision in ("fp16", "bf16") else torch.float32
            export.save_controlnet(path, self.acc.unwrap_model(self.models["controlnet"]),
                                   export.controlnet_metadata(cfg, info), dtype=dtype,
                                   folder=self.run_dir / export.CONTROLNET_FOLDER if not suffix else None)
        elif cfg.is_ti:
            rows = self.net.trainable_state()["ti_rows"]
            export.save_embedding(path, rows, {k: v for k, v in meta.items() if k.startswith("modelspec.")
                                               or k in ("ss_steps", "ss_sd_model_name", "ss_base_model_version")})
        else:
            # bf16 runs save fp16 too (kohya_ss's default save precision): every LoRA loader reads fp16
            dtype = torch.float16 if cfg.mixed_precision in ("fp16", "bf16") else torch.float32
            tensors = export.network_state_dict({p: self.acc.unwrap_model(m) for p, m in self.models.items()},
                                                self.c.family)
            export.save_lora(path, tensors, meta, dtype=dtype)
        self.progress.emit({"type": "saved", "step": step, "path": str(path), "final": not suffix})
        return path

    def _samples(self, step: int) -> list[str]:
        if not self.prompts or not self.acc.is_main_process:
            return []
        filt = (lambda p: with_ti_tokens(p, self.net, self.cfg.token)) if self.cfg.is_ti else None
        control = {}
        if self.conditions:
            control = {"controlnet": self.acc.unwrap_model(self.models["controlnet"]),
                       "conditions": list(self.conditions.values())}
        events = render_samples(self.c, self.prompts, self.run_dir / SAMPLES_DIR, step,
                                clip_skip=self.cfg.clip_skip, prompt_filter=filt, stop=self.stop,
                                autocast=self.acc.autocast, **control)
        for e in events:
            self.progress.emit(e)
        return [e["path"] for e in events]

    # ---- the loop --------------------------------------------------------------------------------------------
    def _stopping(self) -> bool:
        """The stop decision, the same on every process: one rank leaving the loop alone would hang the rest."""
        stop = self.stop()
        if self.acc.num_processes > 1:
            flag = torch.tensor([1.0 if stop else 0.0], device=self.acc.device)
            stop = bool(self.acc.reduce(flag, reduction="sum").item() > 0)
        return stop

    def run(self) -> TrainResult:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        own_lock = None
        main = int(os.environ.get("RANK", "0")) == 0      # the others' errors go to their log (train.log)
        if self.lock is None and main:
            own_lock = RunLock(self.run_dir).acquire()   # before any write: the folder may be another's
        if not os.environ.get(OWNER_ENV):
            # the CLI: a stop file from an earlier run is stale. A studio's launch removed that one already, and a
            # newer file is a Stop pressed while this process was still starting: it counts.
            self.stop.clear_stale(start_time() or time.time())
        self.stop.install_signals()
        try:
            return self._run()
        except Exception as exc:
            ProgressWriter(self.run_dir / "progress.jsonl", self.on_event, self.write_progress and main).emit(
                {"type": "error", "message": str(exc), "field": getattr(exc, "field", None)})
            raise
        finally:
            self.stop.restore_signals()
            if main:
                self.stop.clear()      # honoured (or moot): a later run of this folder starts clean
            if own_lock:
                own_lock.release()

    def _run(self) -> TrainResult:
        cfg = self.cfg
        self.started = time.time()
        self.session_id = random.SystemRandom().randint(0, 2**32 - 1)   # kohya: which session made a file
        self._setup()
        acc, n_proc = self.acc, self.acc.num_processes
        self.base_hashes = export.base_hashes(cfg.base_model)
        self.prompts = read_prompts(cfg.sample_prompts, width=cfg.resolution, height=cfg.resolution,
                                    steps=cfg.sample_steps, seed=cfg.seed) if cfg.sample_prompts else []
        pos = self._resume()
        step, epoch, consumed = pos["step"], pos["epoch"], pos["consumed"]
        result = TrainResult(None, step, self.total_steps)
        self.progress.emit({"type": "start", "step": step, "total": self.total_steps, "method": cfg.method,
                            "images": self.scan.num_images, "skipped": self.scan.skipped,
                            "buckets": self.plan.report(self.scan.items), "resumed": step > 0,
                            "processes": n_proc})
        # disk cache: the main process encodes and writes, the others then read its files
        with acc.main_process_first() if cfg.cache_latents == "disk" else contextlib.nullcontext():
            self.cache.warm(self.scan.items, self.plan.sizes, cfg.flip, stop=self.stop)
        if step == 0 and cfg.sample_at_start and cfg.sample_every and not self.stop():
            result.samples += self._samples(0)
        for m in self.models.values():
            m.train()
        t0, acc_losses, prior = time.time(), [], None
        first_step = step
        while step < self.total_steps and not self._stopping():
            batches = self._batches(epoch)
            while consumed < len(batches) and step < self.total_steps:
                # round-robin over the epoch; the last round wraps around (as DistributedSampler pads)
                index = consumed + acc.process_index
                with acc.accumulate(*self.models.values()):
                    loss, prior = self._micro_loss(batches[index % len(batches)], f"{epoch}:{index}")
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_([p for ps in self.net.params.values() for p in ps], cfg.max_grad_norm)
                    self.opt.step()
                    if acc.sync_gradients:
                        self.lr_sched.step()
                    self.opt.zero_grad(set_to_none=True)
                    self.net.after_step()
                consumed = min(consumed + n_proc, len(batches))
                loss = loss.detach()
                acc_losses.append(float(acc.reduce(loss, reduction="mean") if n_proc > 1 else loss))
                if not acc.sync_gradients:
                    continue
                step += 1
                mean_loss = sum(acc_losses) / len(acc_losses)
                acc_losses = []
                result.losses.append(mean_loss)
                rate = (step - first_step) / max(time.time() - t0, 1e-9)
                self.progress.emit({"type": "step", "step": step, "total": self.total_steps, "loss": mean_loss,
                                    "prior_loss": prior, "lr": self.lr_sched.get_last_lr()[0],
                                    "it_s": rate, "eta": (self.total_steps - step) / rate if rate else None,
                                    "epoch": epoch})
                position = {"step": step, "epoch": epoch, "consumed": consumed}
                if cfg.sample_every and step % cfg.sample_every == 0 and not self.stop():
                    result.samples += self._samples(step)
                if cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps:
                    self.save_state(position)
                    if acc.is_main_process:
                        result.intermediate.append(str(self.export(step, epoch, suffix=True)))
                if self._stopping():
                    break
            if consumed >= len(batches):
                epoch, consumed = epoch + 1, 0
            if self._stopping():
                break
        result.steps = step
        result.stopped = step < self.total_steps
        self.save_state({"step": step, "epoch": epoch, "consumed": consumed})
        if acc.is_main_process:
            begun = epoch + (1 if consumed else 0)
            result.output = self.export(step, begun if result.stopped else math.ceil(
                self.total_steps / self.steps_per_epoch), suffix=False)
            # this session's samples; a resumed run that sampled nothing new: the run's earlier ones
            samples = result.samples or ([str(p) for p in (self.run_dir / SAMPLES_DIR).glob("*.png")]
                                         if pos["step"] else [])
            export.save_preview(result.output, samples)
        result.vae_encodes = self.cache.encodes
        self.progress.emit({"type": "stopped" if result.stopped else "done", "step": step,
                            "total": self.total_steps, "output": str(result.output), "vae_encodes": result.vae_encodes})
        acc.wait_for_everyone()       # the others leave once the main process has written the outputs
        acc.end_training()
        return result


def _tensors_to(tree, device):
    """A copy of a (nested dict / list of) tensors on ``device``; anything else as it is."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device, non_blocking=True)
    if isinstance(tree, dict):
        return {k: _tensors_to(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_tensors_to(v, device) for v in tree)
    return tree


def train(cfg: TrainConfig, **kw) -> TrainResult:
    return Trainer(cfg, **kw).run()
