"""The A1111 ControlNet extension's API: its ``/controlnet/*`` routes and ``alwayson_scripts.controlnet`` units."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from ..controlnet import ControlUnit
from ..controlnet.preprocessors import RESOLUTION_RANGE
from ..controlnet.units import _bool
from ..errors import StudioError
from .imagedata import decode_image, encode_png

if TYPE_CHECKING:  # pragma: no cover
    from ..app import Studio

API_VERSION = 2                 # what the extension's /controlnet/version answers
SCRIPT_NAME = "controlnet"      # alwayson_scripts keys are matched case-insensitively, as A1111 does
UNIT_PREFIX = "alwayson_scripts.controlnet.args"
_IMAGE_KEYS = ("image", "input_image", "mask", "mask_image")


class DetectRequest(BaseModel):
    """POST /controlnet/detect (the extension's body fields and defaults)."""

    controlnet_module: str = Field(default="none", description="Preprocessor name (see /controlnet/module_list).")
    model_config = ConfigDict(populate_by_name=True)
    # webuiapi's controlnet_detect sends the images as controlnet_images
    controlnet_input_images: list[str] = Field(default_factory=list, description="Base64 images (alias "
                                               "controlnet_images).",
                                               validation_alias=AliasChoices("controlnet_input_images",
                                                                             "controlnet_images"))
    controlnet_processor_res: int = Field(default=512, description="Preprocessor resolution (-1 = its default, "
                                          f"else {RESOLUTION_RANGE[0]} to {RESOLUTION_RANGE[1]}).")
    controlnet_threshold_a: float = Field(default=64, description="First slider (out of range = its default).")
    controlnet_threshold_b: float = Field(default=64, description="Second slider (out of range = its default).")
    controlnet_masks: list[str] | None = Field(default=None, description="Accepted and checked; no built-in "
                                                                          "preprocessor uses a mask.")
    low_vram: bool = Field(default=False, description="Accepted, ignored.")


class DetectResponse(BaseModel):
    info: str = Field(description='"Success"')
    images: list[str] = Field(description="The detected maps, base64 PNG (one per input image).")


class ModelListResponse(BaseModel):
    model_config = {"protected_namespaces": ()}
    model_list: list[str] = Field(description="ControlNet titles, e.g. 'control_v11p_sd15_canny [d14c016b]'.")


class ModuleListResponse(BaseModel):
    module_list: list[str]
    module_detail: dict[str, dict] = Field(description="{module: {model_free, sliders: [{name, value, min, max, "
                                                       "step}]}}")


def register_controlnet(router: APIRouter, studio: "Studio") -> None:
    """Add the extension's routes to ``router``."""
    tags = ["controlnet"]

    async def version() -> dict:
        return {"version": API_VERSION}

    def model_list(update: bool = Query(True, description="Re-read models/ControlNet first.")) -> dict:
        if update:
            studio.controlnets.refresh()
        return {"model_list": studio.controlnets.titles()}

    async def module_list(alias_names: bool = Query(False, description="Labels instead of names.")) -> dict:
        reg = studio.preprocessors
        detail = reg.module_detail()
        if alias_names:
            labels = {name: reg.get(name).label for name in detail}
            detail = {labels[name]: value for name, value in detail.items()}
        return {"module_list": list(detail), "module_detail": detail}

    async def settings() -> dict:
        return {"control_net_unit_count": studio.settings.controlnet_units}

    async def detect(req: DetectRequest) -> dict:
        return await run_in_threadpool(_detect, studio, req)

    router.add_api_route("/controlnet/version", version, methods=["GET"], tags=tags,
                         summary="The ControlNet extension API version")
    router.add_api_route("/controlnet/model_list", model_list, methods=["GET"], tags=tags,
                         response_model=ModelListResponse, summary="ControlNet models in models/ControlNet")
    router.add_api_route("/controlnet/module_list", module_list, methods=["GET"], tags=tags,
                         response_model=ModuleListResponse, summary="Preprocessors and their sliders")
    router.add_api_route("/controlnet/settings", settings, methods=["GET"], tags=tags,
                         summary="ControlNet settings (unit count)")
    router.add_api_route("/controlnet/detect", detect, methods=["POST"], tags=tags, response_model=DetectResponse,
                         summary="Run a preprocessor on images")


def _detect(studio: "Studio", req: DetectRequest) -> dict:
    """Run the preprocessor on each image; a missing annotator file is a 422 naming the file."""
    reg, max_pixels = studio.preprocessors, studio.settings.max_image_pixels
    module = reg.get(req.controlnet_module, field="controlnet_module").name
    lo, hi = RESOLUTION_RANGE
    res = req.controlnet_processor_res
    if res != -1 and not lo <= res <= hi:
        raise StudioError(f"controlnet_processor_res is {res}; it must be -1 (the preprocessor's default) or "
                          f"from {lo} to {hi}.", field="controlnet_processor_res",
                          fix=f"use -1 or a resolution from {lo} to {hi}, e.g. 512")
    if not req.controlnet_input_images:
        raise StudioError("No image was given.", field="controlnet_input_images",
                          fix="send one or more base64 images in controlnet_input_images")
    images = [decode_image(data, f"controlnet_input_images.{i}", max_pixels)
              for i, data in enumerate(req.controlnet_input_images)]
    for i, data in enumerate(req.controlnet_masks or []):
        decode_image(data, f"controlnet_masks.{i}", max_pixels)   # refused early when broken, as the images
    out = []
    for image in images:
        try:
            out.append(reg.run(module, image, req.controlnet_processor_res, threshold_a=req.controlnet_threshold_a,
                               threshold_b=req.controlnet_threshold_b))
        except StudioError as exc:
            if exc.field == "controlnet.module":   # the registry's name for the unit field
                exc.field = "controlnet_module"
            raise
    return {"info": "Success", "images": [encode_png(image) for image in out]}


# ---- alwayson_scripts ------------------------------------------------------------------------------------------
def units_from_alwayson(scripts: Mapping[str, Any] | None, studio: "Studio", notes: list[str]) -> tuple:
    """``alwayson_scripts`` -> the enabled ControlUnits; other scripts are noted and ignored.

    Errors name ``alwayson_scripts.controlnet.args[i].<field>``; unit images are decoded here (never opened as
    paths) with the studio's pixel cap, and each enabled unit's model must exist."""
    if scripts is None:
        return ()
    if not isinstance(scripts, Mapping):
        raise StudioError("alwayson_scripts must be an object.", field="alwayson_scripts")
    units: list[ControlUnit] = []
    for name, script in scripts.items():
        if str(name).lower() != SCRIPT_NAME:
            notes.append(f"alwayson_scripts.{name} is not available in the studio and was ignored")
            continue
        args = script.get("args", []) if isinstance(script, Mapping) else script
        if not isinstance(args, list):
            raise StudioError("alwayson_scripts.controlnet.args must be a list of units.", field=UNIT_PREFIX)
        for i, data in enumerate(args):
            if isinstance(data, Mapping) and not _bool(data.get("enabled", True), f"{UNIT_PREFIX}[{i}].enabled"):
                continue   # the extension skips disabled units without reading them
            unit = ControlUnit.from_api(_decode_images(data, i, studio.settings.max_image_pixels), i,
                                        studio.preprocessors)
            if unit.enabled:   # an unknown model is a 404 now rather than a failed job later
                if studio.controlnets.find(unit.model, field=f"{UNIT_PREFIX}[{i}].model") is None:
                    raise StudioError(f"ControlNet unit {i} is enabled but has no model.",
                                      field=f"{UNIT_PREFIX}[{i}].model",
                                      fix="set model to a title from /controlnet/model_list, or disable the unit")
                units.append(unit)
    return tuple(units)


def _decode_images(data: Any, index: int, max_pixels: int) -> Any:
    """The unit with its base64 images decoded ({"image": ..., "mask": ...} and [image, mask] forms too)."""
    if not isinstance(data, Mapping):
        return data
    d = dict(data)
    for key in _IMAGE_KEYS:
        value, field = d.get(key), f"{UNIT_PREFIX}[{index}].{key}"
        if isinstance(value, str):
            d[key] = decode_image(value, field, max_pixels) if value.strip() else None
        elif isinstance(value, Mapping):
            d[key] = {k: decode_image(v, f"{field}.{k}", max_pixels) if isinstance(v, str) and v.strip() else None
                      for k, v in value.items() if k in ("image", "mask")}
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, str) for v in value):
            d[key] = [decode_image(v, f"{field}.{j}", max_pixels) if v.strip() else None for j, v in enumerate(value)]
    return d


def rename_unit_field(field: str | None) -> str | None:
    """The engine's ``controlnet.units[i].x`` -> the API's ``alwayson_scripts.controlnet.args[i].x``."""
    if field and field.startswith("controlnet.units["):
        return UNIT_PREFIX + field[len("controlnet.units"):]
    return field
