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
        from .versions import DatasetVersions
        self.versions = DatasetVersions(Path(self.settings.data_dir) / "dataset_versions")
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

    def dataset_names(self) -> list[str]:
        """The datasets in data/datasets (what "Send to dataset" offers)."""
        root = self.datasets_dir()
        return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) \
            if root.is_dir() else []

    def dataset_folder(self, dataset: str, field: str = "dataset") -> Path:
        """A dataset by name (data/datasets/<name>, created when new) or by folder path (inside the studio's
        folders)."""
        dataset = (dataset or "").strip()
        if not dataset:
            raise StudioError("No dataset named.", field=field, fix="pick a dataset or type a new name")
        if "/" in dataset or "\\" in dataset:
            return self.confine(dataset, field)
        return self.datasets_dir() / paths.plain_name(dataset, field)

    def add_to_dataset(self, dataset: str, image, caption: str | None = None, *, infotext: str = "",
                       name: str = "") -> tuple[Path, str, dict, bool]:
        """One picture (a file path or a PIL image) into a dataset, captioned with ``caption`` or else the prompt
        of its infotext (given, or read from the file): (the file, its caption, the dataset's version now,
        whether it was added). The same picture twice is kept once."""
        from PIL import Image
        from ..images import open_image
        from ..infotext import parse_infotext, read_infotext
        from .captions import caption_from_prompt
        from .dataset import IMAGE_EXTS, add_image
        from .versions import file_sha256
        root = self.dataset_folder(dataset)
        if isinstance(image, (str, os.PathLike)):
            open_image(os.fspath(image), field="image")     # a readable image within the size limit, or why not
            infotext = infotext or read_infotext(image) or ""
            if Path(image).suffix.lower() not in IMAGE_EXTS:
                with Image.open(image) as im:
                    image = im.convert("RGB")
        if caption is None:
            caption = caption_from_prompt(parse_infotext(infotext)["Prompt"]) if infotext.strip() else ""
        if isinstance(image, (str, os.PathLike)) and root.is_dir():
            # only files of the same size can be the same picture: a stat per file, no scan of the dataset
            size, digest = os.path.getsize(image), None
            for other in root.rglob("*"):
                if other.suffix.lower() in IMAGE_EXTS and other.is_file() and other.stat().st_size == size:
                    digest = digest or file_sha256(Path(image))
                    if file_sha256(other) == digest:
                        version = self.record_version(root)
                        rel = other.relative_to(root).as_posix()
                        return other, version["files"].get(rel, {}).get("caption", ""), version, False
        if root.is_dir() and not self.versions.versions(root):
            self.record_version(root)       # a folder made outside the studio: its state before, so "+1" shows
        ext = self._caption_extension(root)
        path = add_image(root, image, name or (Path(image).stem if isinstance(image, (str, os.PathLike)) else
                                                "image"), caption, ext, infotext=infotext)
        return path, caption, self.record_version(root), True

    @staticmethod
    def _caption_extension(root: Path) -> str:
        """``.caption`` where the folder's captions already are, else ``.txt``."""
        found = {p.suffix for p in root.rglob("*") if p.suffix in (".txt", ".caption")} if root.is_dir() else set()
        return ".caption" if found == {".caption"} else ".txt"

    def record_version(self, folder: str | os.PathLike, cfg: TrainConfig | None = None, *,
                       run: str | None = None) -> dict:
        """The folder's version now (``studio.training.versions``); ``run`` marks it as read by that run."""
        return self.versions.record(folder, self.scan(folder, cfg), run=run)

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
        self._note_dataset(cfg)
        return self.queue.submit(path, resume=resume)

    def _note_dataset(self, cfg: TrainConfig) -> None:
        """The dataset's version joins the run (the history shows it) and its manifest the run folder."""
        from .atomic import write_json
        from .versions import RUN_FILE
        version = self.record_version(cfg.dataset_dir, cfg, run=cfg.output_name)
        write_json(Path(cfg.run_dir) / RUN_FILE, {"dataset_dir": cfg.dataset_dir, **version})

    def run_dataset(self, run_dir: str | os.PathLike) -> dict | None:
        """What a run read (``dataset.json`` of its folder), or None for runs from before versions."""
        import json
        from .versions import RUN_FILE
        try:
            return json.loads((Path(run_dir) / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def finished_runs(self) -> list[tuple[str, Path]]:
        """(run name, its final file) of every run folder whose final LoRA / embedding / ControlNet exists,
        newest first: what can be refined."""
        out = []
        for toml in sorted(self.runs_dir.glob("*/run.toml"), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                cfg = TrainConfig.load(toml).resolved()
            except StudioError:
                continue          # a hand-edited run.toml that no longer parses: Load config says why
            final = Path(cfg.output_dir) / f"{cfg.output_name}.safetensors"
            if final.is_file() and not lock_owner(toml.parent):
                out.append((toml.parent.name, final))
        return out

    def refine_config(self, run_name: str) -> TrainConfig:
        """A finished run's config set to go on from its final file under a new output name (``<name>_r2``,
        ``_r3``...); the dataset stays the run's (point it at the pictures to refine on)."""
        import re
        run = paths.plain_name(run_name, "run")
        final = dict(self.finished_runs()).get(run)
        if final is None:
            raise StudioError(f"Run {run_name!r} has no finished file to refine.", field="run",
                              fix="pick a run that finished (its LoRA / embedding / ControlNet is in models/)")
        cfg = TrainConfig.load(self.runs_dir / run / "run.toml")
        stem = re.sub(r"_r\d+$", "", cfg.output_name)
        n = 2
        while (self.runs_dir / f"{stem}_r{n}").exists() or (final.parent / f"{stem}_r{n}.safetensors").exists():
            n += 1
        changes = {"controlnet_init": str(final)} if cfg.is_controlnet else {"network_weights": str(final)}
        return dataclasses.replace(cfg, **changes, output_name=f"{stem}_r{n}", run_dir="", resume=False)

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
        for entry in out:
            read = self.run_dataset(Path(entry["config"]).parent)
            if read:
                entry["dataset"] = {k: read.get(k) for k in ("dataset_dir", "version", "images", "time")}
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
