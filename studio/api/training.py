"""Training routes (a studio extension; A1111 has none): start / stop / status / history of ``studio.training``.

The body of ``/sdapi/v1/train/start`` is a ``TrainConfig`` as JSON, flat (``{"rank": 8}``) or sectioned like the
TOML file (``{"network": {"rank": 8}}``); the base model may be a checkpoint name from ``/sdapi/v1/sd-models``.
A bad value answers 422 with ``field`` = ``section.key`` (``training.max_steps``); so does a path outside the
studio's folders (``studio.paths``: ``output.output_dir``...). Runs share the UI's queue: one training at a time,
later ones wait.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from fastapi import APIRouter, Body
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from ..errors import StudioError
from .imagedata import decode_file

if TYPE_CHECKING:  # pragma: no cover
    from ..app import Studio


class TrainStartResponse(BaseModel):
    id: str = Field(description="Job id (see /sdapi/v1/train/status)")
    config: str = Field(description="The run.toml written for this run (`python launch.py --train <it>`)")
    output: str = Field(description="Where the final LoRA / embedding will be written")
    queued: int = Field(description="Trainings waiting before this one (0: it starts now)")


class TrainStopResponse(BaseModel):
    stopped: bool = Field(description="False when no training was running")


class TrainStatusResponse(BaseModel):
    current: Optional[dict[str, Any]] = Field(
        None, description="The running job: id, state, step, total, loss, lr, it_s, eta, epoch, losses [[step, "
                          "loss]], samples [{step, index, path, prompt}], outputs [paths], error, log, run_dir")
    queued: list[dict[str, Any]] = Field(default_factory=list)
    last: Optional[dict[str, Any]] = Field(None, description="The most recent finished job of this session "
                                                             "(same fields as current, without the log)")


class DatasetAddRequest(BaseModel):
    dataset: str = Field(description="A dataset name (data/datasets/<name>, created when new) or its folder")
    image: str = Field(description="The picture, base64 (PNG / JPEG / WEBP)")
    caption: Optional[str] = Field(None, description="The caption; null: the prompt of infotext / of the PNG")
    infotext: Optional[str] = Field(None, description="A1111 parameters of the picture (a txt2img answer's info)")
    name: Optional[str] = Field(None, description="File name wanted (without extension)")


class DatasetAddResponse(BaseModel):
    path: str = Field(description="The picture's file in the dataset")
    caption: str = Field(description="The caption written beside it")
    added: bool = Field(description="False when the same picture was there already")
    version: int = Field(description="The dataset's version now")
    images: int = Field(description="Pictures in the dataset now")


_START_EXAMPLE = {"base_model": "v1-5-pruned-emaonly.safetensors", "dataset_dir": "data/datasets/mychar",
                  "method": "lora", "rank": 8, "alpha": 4.0, "max_steps": 500, "output_name": "mychar",
                  "sample_prompts": "mychar, a portrait --w 512 --h 512 --d 1", "sample_every": 100}


def register_training(r: APIRouter, studio: "Studio") -> None:
    """Add the training routes to ``r`` (the router carries auth and the one error shape)."""
    svc = studio.training

    async def start(body: dict[str, Any] = Body(..., examples=[_START_EXAMPLE])) -> dict:
        body = dict(body)
        resume = body.pop("resume", False)
        if not isinstance(resume, bool):
            raise StudioError("resume should be true or false.", field="output.resume", fix="write a bool")

        def submit() -> dict:
            # validates (files included) and names the field on error; every path must lie in the studio's folders
            cfg = svc.complete(body, confined=True)
            job = svc.start(cfg, resume=resume)    # already checked: a checkpoint named by the registry stays usable
            queued = [q["id"] for q in svc.status()["queued"]]
            return {"id": job, "config": str(Path(cfg.run_dir) / "run.toml"),
                    "output": str(Path(cfg.output_dir) / f"{cfg.output_name}.safetensors"),
                    "queued": queued.index(job) if job in queued else 0}

        return await run_in_threadpool(submit)

    async def stop() -> dict:
        return {"stopped": svc.stop()}

    def status() -> dict:
        out = svc.status()
        finished = svc.queue.finished
        if finished:
            job = finished[-1]
            proc = job.get("process")
            info = proc.status() if proc else {}
            info.pop("log", None)
            out["last"] = {**info, "id": job["id"], "state": job["state"],
                           "error": job["error"] or info.get("error"), "config": job["config"]}
        return out

    def history() -> list:
        return svc.history()

    async def datasets() -> list:
        def listing() -> list:
            from ..training.versions import describe
            out = []
            for name in svc.dataset_names():
                folder = svc.datasets_dir() / name
                versions = svc.versions.versions(folder) or [svc.record_version(folder)]
                out.append({"name": name, "path": str(folder), "images": versions[-1]["images"],
                            "versions": [{**{k: v[k] for k in ("version", "time", "images", "runs")},
                                          "changes": describe(v)} for v in versions]})
            return out
        return await run_in_threadpool(listing)

    async def add(body: DatasetAddRequest) -> dict:
        def put() -> dict:
            import tempfile
            import io

            from PIL import Image
            raw, image = decode_file(body.image, "image")      # a real image within the size limit, or 422
            with Image.open(io.BytesIO(raw)) as head:
                kind = head.format
            suffix = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}.get(kind or "", ".png")
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / f"{Path(body.name or 'api').name}{suffix}"
                if kind in ("PNG", "JPEG", "WEBP"):
                    src.write_bytes(raw)                       # the file as sent: its infotext stays with it
                else:
                    image.convert("RGB").save(src, format="PNG")
                path, caption, version, added = svc.add_to_dataset(body.dataset, src, body.caption,
                                                                   infotext=body.infotext or "")
            return {"path": str(path), "caption": caption, "added": added, "version": version["version"],
                    "images": version["images"]}
        return await run_in_threadpool(put)

    tags = ["training"]
    r.add_api_route("/sdapi/v1/train/start", start, methods=["POST"], response_model=TrainStartResponse, tags=tags,
                    summary="Queue a training run (studio extension)",
                    description="TrainConfig fields as JSON (flat or in TOML sections). Paths the studio knows are "
                                "filled in: base_model by checkpoint name, models/Lora (models/embeddings for "
                                "Textual Inversion), data/training/<output_name>. 422 names `section.key`; every path must lie inside "
                                "the studio's folders (models and model folders, data, outputs).")
    r.add_api_route("/sdapi/v1/train/stop", stop, methods=["POST"], response_model=TrainStopResponse, tags=tags,
                    summary="Stop the running training (it saves its state and a usable file first)")
    r.add_api_route("/sdapi/v1/train/status", status, methods=["GET"], response_model=TrainStatusResponse,
                    tags=tags, summary="Progress, losses, samples and log of the running training")
    r.add_api_route("/sdapi/v1/train/datasets", datasets, methods=["GET"], response_model=list[dict[str, Any]],
                    tags=tags, summary="Datasets in data/datasets with their versions (and the runs that read each)")
    r.add_api_route("/sdapi/v1/train/datasets/add", add, methods=["POST"], response_model=DatasetAddResponse,
                    tags=tags, summary="Add a picture to a dataset (created when new), captioned with its prompt",
                    description="The caption is `caption`, else the prompt of `infotext`, else of the PNG's own "
                                "parameters, without extra-network tags. The same picture twice is kept once.")
    r.add_api_route("/sdapi/v1/train/history", history, methods=["GET"], response_model=list[dict[str, Any]],
                    tags=tags, summary="Runs of this session (newest first), then run folders found on disk")
