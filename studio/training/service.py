"""``TrainingService``: what the Train tab (and the API) call. Owns the training queue of one Studio."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from .. import paths
from ..errors import StudioError
from .config import PATH_FIELDS, SECTION_OF, TrainConfig
from .dataset import DatasetScan, ImportReport, import_into, scan_dataset
from .lifetime import describe_owner, lock_owner, locked_error
from .runner import TrainingQueue


class TrainingService:
    """Start / stop / watch trainings of a ``Studio``.

    ``start`` fills the paths the studio knows (checkpoint by name, models/Lora or models/embeddings, the run
    folder under ``data/training/<name>``), validates, writes ``run.toml`` into the run folder and queues it.
    Before a run starts, DreamBooth class images are generated through ``studio.generate`` and the pipeline
    manager frees device memory."""

    def __init__(self, studio, num_processes: int = 1):
        self.studio = studio
        self.settings = studio.settings
        self.queue = TrainingQueue(before_start=self._before_start, after_end=self._after_end,
                                   num_processes=num_processes)

    # ---- config --------------------------------------------------------------------------------------------
    @property
    def runs_dir(self) -> Path:
        return Path(self.settings.data_dir) / "training"

    def datasets_dir(self) -> Path:
        return Path(self.settings.data_dir) / "datasets"

    def allowed_roots(self) -> tuple[Path, ...]:
        """The folders a request may name (``studio.paths``): the settings' folders, runs and datasets."""
        return paths.allowed_roots(self.settings, self.runs_dir, self.datasets_dir())

    def confine(self, path: str | os.PathLike, field: str) -> Path:
        """``path`` resolved, if it lies inside ``allowed_roots()``; else a StudioError naming ``field``."""
        return paths.confine(path, self.allowed_roots(), field)

    def complete(self, cfg: TrainConfig | dict, *, confined: bool = False) -> TrainConfig:
        """Fill studio-derived paths into a config (a checkpoint may be given by its name).

        ``confined`` (requests from the API and the Train tab): every path the config names must lie inside
        ``allowed_roots()``; a checkpoint named by its registry name is the registry's (it may be a symlink)."""
        if isinstance(cfg, dict):
            cfg = TrainConfig.from_dict(cfg)
        cfg = dataclasses.replace(cfg)
        s = self.settings
        if cfg.base_model:
            cfg.base_model = self._base_model(cfg.base_model, confined)
        cfg.models_dir = cfg.models_dir or str(Path(s.models_dir).resolve())
        out = s.embeddings_path if cfg.is_ti else s.controlnet_path if cfg.is_controlnet else s.lora_path
        cfg.output_dir = cfg.output_dir or str(out.resolve())
        if cfg.controlnet_init.strip() in ("None", "none"):
            cfg.controlnet_init = ""                       # the ControlNet lists' "None": start from the base UNet
        if cfg.controlnet_init:
            cfg.controlnet_init = self._controlnet(cfg.controlnet_init, confined)
        if cfg.network_weights:
            cfg.network_weights = self._weights(cfg.network_weights, cfg.is_ti, confined)
        if confined:
            cfg.output_name = paths.plain_name(cfg.output_name, "output.output_name")
        cfg.run_dir = cfg.run_dir or str((self.runs_dir / cfg.output_name).resolve())
        if confined:
            for name in PATH_FIELDS[1:]:                   # the base model was confined above
                if getattr(cfg, name):
                    self.confine(getattr(cfg, name), f"{SECTION_OF[name]}.{name}")
            prompts = cfg.sample_prompts
            if prompts and "\n" not in prompts and Path(prompts).is_file():   # read_prompts reads it as a file
                self.confine(prompts, "sampling.sample_prompts")
        return cfg.resolved().validate()

    def _base_model(self, value: str, confined: bool) -> str:
        field = "model.base_model"
        given = Path(value).expanduser()
        if confined and (given.is_absolute() or ".." in given.parts):
            return str(self.confine(value, field))          # validate() then says whether it exists
        if given.exists():
            return str(self.confine(value, field)) if confined else value
        return str(self.studio.registry.find_checkpoint(value, field).path)

    def _controlnet(self, value: str, confined: bool) -> str:
        """A ControlNet to go on from: a path, or a name from models/ControlNet (as the ControlNet units take)."""
        field = "controlnet.controlnet_init"
        given = Path(value).expanduser()
        if given.is_absolute() or ".." in given.parts or given.exists():
            return str(self.confine(value, field)) if confined else value
        return str(self.studio.controlnets.find(value, field).path)

    def _weights(self, value: str, ti: bool, confined: bool) -> str:
        """Weights to refine: a path, or a name from models/Lora (models/embeddings for TI)."""
        given = Path(value).expanduser()
        if given.is_absolute() or ".." in given.parts or given.exists():
            return str(self.confine(value, "network.network_weights")) if confined else value
        if ti:
            self.studio.embeddings.refresh_if_changed()
            path = self.studio.embeddings.path_of(value)
        else:
            self.studio.loras.refresh_if_changed()
            hit = self.studio.loras.find(value)
            path = hit and hit.path
        if path is None:
            kind = "embedding in models/embeddings" if ti else "LoRA in models/Lora"
            raise StudioError(f"No {kind} named {value!r} to refine.", field="network.network_weights",
                              fix="pick a finished run's output, or give the file's path")
        return str(path)

    def write_config(self, cfg: TrainConfig | dict, *, confined: bool = False) -> Path:
        cfg = self.complete(cfg, confined=confined)
        return cfg.save(Path(cfg.run_dir) / "run.toml")

    def load_config(self, path: str | os.PathLike) -> TrainConfig:
        """A TOML config named by a request (the Train tab's config path): confined like the paths inside it."""
        return TrainConfig.load(self.confine(path, "config_path"))

    # ---- datasets (the tab's drop zone and caption editor) --------------------------------------------------
    def import_dataset(self, source, name: str) -> tuple[Path, ImportReport]:
        """Dropped files / a folder / a zip -> ``data/datasets/<name>`` (nothing is written outside it)."""
        dest = self.datasets_dir() / paths.plain_name(name, "dataset_name")
        return dest, import_into(source, dest)

    def scan(self, folder: str | os.PathLike, cfg: TrainConfig | None = None) -> DatasetScan:
        cfg = cfg or TrainConfig()
        return scan_dataset(folder, min_side=cfg.min_image_side, repeats=cfg.repeats,
                            caption_extension=cfg.caption_extension)

    # ---- runs ----------------------------------------------------------------------------------------------
    def start(self, cfg: TrainConfig | dict | str | os.PathLike, *, resume: bool = False,
              confined: bool = False) -> str:
        """Queue a run (a config object, a dict as the tab's form gives it, or a TOML path); returns its id.
        ``confined``: the config comes from a request (see ``complete``)."""
        if isinstance(cfg, (str, os.PathLike)):
            cfg = self.load_config(cfg) if confined else TrainConfig.load(cfg)
        cfg = self.complete(cfg, confined=confined)
        if cfg.is_controlnet:
            from .conditions import preflight
            preflight(cfg, self.studio.preprocessors)  # pairs, preprocessor, family: refused before it is queued
        self.check_free(cfg.run_dir)           # before run.toml is rewritten under a running trainer
        path = self.write_config(cfg)
        return self.queue.submit(path, resume=resume)

    def resume(self, run_name: str) -> str:
        path = self.runs_dir / paths.plain_name(run_name, "run") / "run.toml"
        if not path.is_file():
            raise StudioError(f"No run named {run_name!r}.", field="run", fix="pick a run from the history")
        self.check_free(TrainConfig.load(path).resolved().run_dir)
        return self.queue.submit(path, resume=True)

    def check_free(self, run_dir: str | os.PathLike) -> None:
        """StudioError when a trainer holds ``run_dir`` (one of ours, or one a killed studio left behind) or a
        run of it is already queued: two trainers must never write one run folder."""
        owner = lock_owner(run_dir)
        if owner is not None:
            raise locked_error(run_dir, owner)
        if self.queue.run_dir_busy(run_dir):
            raise StudioError(f"Run {Path(run_dir).name!r} is already queued or running in this studio.",
                              field="output.output_name", fix="wait for it, or stop it first", status=409)

    def stop(self) -> bool:
        """Stop the running training (it saves state and a usable LoRA first)."""
        return self.queue.stop_current()

    def cancel(self, job_id: str) -> bool:
        return self.queue.cancel(job_id)

    def status(self) -> dict[str, Any]:
        cur = self.queue.current
        proc = cur and cur.get("process")
        return {"current": {"id": cur["id"], **(proc.status() if proc else {"state": cur["state"]})} if cur else None,
                "queued": [{"id": j["id"], "config": j["config"]} for j in self.queue.pending()]}

    def history(self) -> list[dict]:
        """Runs of this session first (newest first), then run folders found on disk."""
        out = [{"id": j["id"], "config": j["config"], "state": j["state"], "error": j["error"],
                **({"outputs": j["process"].status()["outputs"]} if j.get("process") else {})}
               for j in reversed(self.queue.finished)]
        seen = {o["config"] for o in out}
        busy = {str(j["config"]) for j in [self.queue.current, *self.queue.pending()] if j}
        for toml in sorted(self.runs_dir.glob("*/run.toml"), key=lambda p: p.stat().st_mtime, reverse=True):
            if str(toml) in seen:
                continue
            if str(toml) in busy:
                out.append({"id": None, "config": str(toml), "state": "running", "resumable": False})
                continue
            owner = lock_owner(toml.parent)
            if owner is not None:    # e.g. a trainer the previous studio process left running
                out.append({"id": None, "config": str(toml), "state": "running", "resumable": False,
                            "owner": owner, "note": f"trained by {describe_owner(owner)}, not this studio"})
                continue
            out.append({"id": None, "config": str(toml), "state": "on disk",
                        "resumable": (toml.parent / "state" / "trainer.json").is_file()})
        return out

    def wait(self, timeout: float | None = None) -> bool:
        return self.queue.wait_idle(timeout)

    # ---- hooks ---------------------------------------------------------------------------------------------
    def _before_start(self, job: dict) -> None:
        from .runner import prepare_class_images
        cfg = TrainConfig.load(job["config"])
        job["state"] = "preparing"
        prepare_class_images(cfg, self.studio)          # through the normal queue (studio.generate)
        if cfg.is_controlnet:
            from .conditions import prepare_conditions
            prepare_conditions(cfg, self.studio.preprocessors)
        self.studio.run_exclusive(self.studio.manager.unload_all, kind="train-start")

    def _after_end(self, job: dict) -> None:
        # new files in models/Lora or models/ControlNet: let whatever lists them rescan (the extra-networks panel)
        for name in ("loras", "lora_library", "adapters", "controlnets"):
            lib = getattr(self.studio, name, None)
            refresh = getattr(lib, "refresh", None)
            if callable(refresh):
                refresh()
