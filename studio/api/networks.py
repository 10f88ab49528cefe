"""A1111 routes for extra networks and upscalers: /loras, /refresh-loras, /embeddings, /refresh-embeddings,
/upscalers, /latent-upscale-modes."""
from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter
from pydantic import BaseModel, Field

from . import models as m

if TYPE_CHECKING:  # pragma: no cover
    from ..app import Studio


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict = Field(default_factory=dict)


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class LatentModeItem(BaseModel):
    name: str


def register_networks(r: APIRouter, studio: "Studio") -> None:
    """Add the extra-network and upscaler routes to ``r`` (the router carries auth and error handling)."""
    tags = ["sdapi"]

    def loras() -> list:
        return studio.loras.list()

    def refresh_loras() -> dict:
        studio.loras.refresh()
        return {}

    def embeddings() -> dict:
        return studio.embeddings.api_dict(studio.manager.current_components())

    def refresh_embeddings() -> dict:
        studio.embeddings.refresh()
        return {}

    def upscalers() -> list:
        ups = studio.engine.upscalers
        return [{"name": n, "scale": None} for n in ups.names() if not ups.get(n).is_latent]

    def latent_modes() -> list:
        ups = studio.engine.upscalers
        return [{"name": n} for n in ups.names() if ups.get(n).is_latent]

    # plain functions: FastAPI runs them in worker threads, so file scans never block the event loop
    r.add_api_route("/sdapi/v1/loras", loras, methods=["GET"], response_model=list[LoraItem],
                    tags=tags, summary="LoRA / LyCORIS files in models/Lora and models/LyCORIS")
    r.add_api_route("/sdapi/v1/refresh-loras", refresh_loras, methods=["POST"],
                    response_model=m.EmptyResponse, tags=tags)
    r.add_api_route("/sdapi/v1/embeddings", embeddings, methods=["GET"],
                    response_model=m.EmbeddingsResponse, tags=tags,
                    summary="Textual-inversion embeddings that fit the loaded model, and those skipped")
    r.add_api_route("/sdapi/v1/refresh-embeddings", refresh_embeddings, methods=["POST"],
                    response_model=m.EmptyResponse, tags=tags)
    r.add_api_route("/sdapi/v1/upscalers", upscalers, methods=["GET"], response_model=list[UpscalerItem],
                    tags=tags)
    r.add_api_route("/sdapi/v1/latent-upscale-modes", latent_modes, methods=["GET"],
                    response_model=list[LatentModeItem], tags=tags)
