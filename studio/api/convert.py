"""A1111 request bodies -> GenerationRequest, and GenerationResult -> A1111 response bodies."""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Callable

from ..errors import StudioError
from ..infotext import INFOTEXT_VERSION, params_to_request_fields, parse_infotext
from ..request import GenerationRequest, GenerationResult
from ..samplers import effective_schedule, resolve_sampler
from .controlnet import rename_unit_field, units_from_alwayson
from .imagedata import encode_png
from .models import Img2ImgRequest, Txt2ImgRequest, GenerationBody
from .options import check_clip_skip, check_text

if TYPE_CHECKING:  # pragma: no cover
    from ..app import Studio
    from ..registry import CheckpointInfo
    from .options import OptionsStore

log = logging.getLogger(__name__)

# Fields A1111 accepts that change nothing here, with the value that means "not used".
IGNORED_FIELDS = {
    "restore_faces": (None, False), "tiling": (None, False), "eta": (None,), "s_min_uncond": (None,),
    "s_churn": (None, 0, 0.0), "s_tmax": (None, 0, 0.0), "s_tmin": (None, 0, 0.0), "s_noise": (None, 1, 1.0),
    "refiner_checkpoint": (None, "", "None"), "refiner_switch_at": (None,), "firstpass_image": (None, ""),
    "hr_checkpoint_name": (None, "", "Use same checkpoint"), "script_name": (None, ""), "script_args": (None, []),
    "styles": (None, []), "seed_resize_from_h": (None, -1, 0), "seed_resize_from_w": (None, -1, 0),
    "firstphase_width": (None, 0), "firstphase_height": (None, 0), "image_cfg_scale": (None,),
    "initial_noise_multiplier": (None, 1, 1.0), "latent_mask": (None, ""),
}
# override_settings keys that act on a request; others are accepted and ignored (as A1111 ignores unknown ones)
OVERRIDE_CHECKPOINT, OVERRIDE_VAE, OVERRIDE_CLIP_SKIP = "sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers"
OVERRIDE_RNG = "randn_source"   # A1111's "Random number generator source": "CPU", "GPU" (NV is refused)


def check_rng(value: Any, field: str) -> str:
    """An A1111 randn_source value as the request's ``rng``: "CPU" or "GPU" (the generation device)."""
    text = value.strip().upper() if isinstance(value, str) else value
    if text in ("CPU", "GPU"):
        return text
    if text == "NV":
        raise StudioError("randn_source 'NV' (A1111's emulation of NVIDIA GPU noise on the CPU) is not supported.",
                          field=field, fix="use 'CPU' (the same noise on every machine) or 'GPU'")
    raise StudioError(f"'{field}' is {value!r}; it must be 'CPU' or 'GPU'.", field=field, fix="use 'CPU' or 'GPU'")


def value(body: Any, name: str) -> Any:
    """A body field, with ``null`` meaning the field's default (A1111's fields are all Optional)."""
    got = getattr(body, name)
    if got is None:
        default = type(body).model_fields[name].get_default(call_default_factory=True)
        return default
    return got


def find_checkpoint(studio: "Studio", name: str, field: str) -> "CheckpointInfo":
    """A checkpoint in the model folder by title / name / hash. A Hugging Face repo id only with --allow-download
    (it is read from outside the model folders)."""
    info = studio.registry.find_checkpoint(check_text(name, field), field_name=field)
    if info.kind == "hub" and not studio.settings.allow_download:
        titles = ", ".join(i.title for i in studio.registry.checkpoints()) or "none: the folder is empty"
        raise StudioError(f"Checkpoint {name!r} was not found in {studio.settings.ckpt_path}.", field=field,
                          fix=f"choose one of: {titles}", status=404)
    return info


def apply_infotext(body: GenerationBody, studio: "Studio") -> tuple[dict, dict]:
    """Body fields and override settings from ``body.infotext`` for the fields the body does not set."""
    fields = params_to_request_fields(parse_infotext(body.infotext or ""))
    given = body.model_fields_set
    body_values: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for name, got in fields.items():
        if name == "checkpoint":
            try:  # as A1111: a model the text names but this install lacks is skipped
                overrides[OVERRIDE_CHECKPOINT] = find_checkpoint(studio, got, "infotext").title
            except StudioError as exc:
                log.info("infotext names a checkpoint that is not here; kept the current one (%s)", exc)
        elif name == "clip_skip":
            overrides[OVERRIDE_CLIP_SKIP] = got
        elif name == "rng":   # A1111 applies "RNG" as the randn_source override
            overrides[OVERRIDE_RNG] = got
        elif name not in given and name in type(body).model_fields:
            body_values[name] = got
    if "sampler_name" in body_values and "scheduler" not in given and "scheduler" not in body_values:
        body_values["scheduler"] = "Automatic"
    return body_values, overrides


def common_fields(body: GenerationBody, studio: "Studio", options: "OptionsStore",
                  notes: list[str]) -> tuple[dict, Callable[[str], Any]]:
    """The GenerationRequest fields txt2img and img2img share, and ``get(name)``: a body field, filled from
    ``body.infotext`` when the body does not set it. Notes about ignored fields go to ``notes``."""
    infotext_values, infotext_overrides = apply_infotext(body, studio) if body.infotext else ({}, {})

    def get(name: str) -> Any:
        return infotext_values[name] if name in infotext_values else value(body, name)

    override = {**infotext_overrides, **(body.override_settings or {})}
    checkpoint = ""
    if override.get(OVERRIDE_CHECKPOINT) not in (None, ""):
        field = "override_settings." + OVERRIDE_CHECKPOINT if OVERRIDE_CHECKPOINT in (body.override_settings or {}) \
            else "infotext"
        checkpoint = find_checkpoint(studio, override[OVERRIDE_CHECKPOINT], field).title
    vae = override.get(OVERRIDE_VAE)
    if vae is not None:
        vae = check_text(vae, "override_settings." + OVERRIDE_VAE)
    else:
        vae = options.get(OVERRIDE_VAE) or studio.settings.default_vae or "Automatic"
    if vae not in ("Automatic", "None"):
        try:
            vae = studio.registry.find_vae(vae).name
        except StudioError as exc:
            exc.field = "override_settings." + OVERRIDE_VAE if OVERRIDE_VAE in override else "sd_vae"
            raise
    if override.get(OVERRIDE_CLIP_SKIP) is not None:
        field = "override_settings." + OVERRIDE_CLIP_SKIP
        clip_skip = check_clip_skip(override[OVERRIDE_CLIP_SKIP], field)
    else:
        clip_skip = check_clip_skip(options.get(OVERRIDE_CLIP_SKIP, 1), OVERRIDE_CLIP_SKIP)
    if override.get(OVERRIDE_RNG) is not None:
        field = "override_settings." + OVERRIDE_RNG if OVERRIDE_RNG in (body.override_settings or {}) else "infotext"
        rng = check_rng(override[OVERRIDE_RNG], field)
    else:
        stored = options.get(OVERRIDE_RNG)
        rng = check_rng(stored, OVERRIDE_RNG) if stored is not None else ""
    ignored = sorted(set(override) - {OVERRIDE_CHECKPOINT, OVERRIDE_VAE, OVERRIDE_CLIP_SKIP, OVERRIDE_RNG})
    if ignored:
        notes.append(f"override_settings ignored (not used by the studio): {', '.join(ignored)}")
    for name, unused in IGNORED_FIELDS.items():
        got = getattr(body, name, None)
        if got not in unused:
            notes.append(f"{name} is accepted for compatibility and ignored")
    fields = dict(
        prompt=get("prompt"), negative_prompt=get("negative_prompt"),
        sampler_name=get("sampler_name") or value(body, "sampler_index") or "Euler",
        scheduler=get("scheduler") or "Automatic", steps=get("steps"), cfg_scale=get("cfg_scale"),
        distilled_cfg_scale=get("distilled_cfg_scale"),
        width=get("width"), height=get("height"), batch_size=get("batch_size"), n_iter=get("n_iter"),
        seed=get("seed"), subseed=get("subseed"), subseed_strength=get("subseed_strength"), clip_skip=clip_skip,
        rng=rng,
        checkpoint=checkpoint, vae=vae, save_images=bool(value(body, "save_images")),
        controlnet_units=units_from_alwayson(body.alwayson_scripts, studio, notes),
    )
    return fields, get


def to_request(body: Txt2ImgRequest, studio: "Studio", options: "OptionsStore") -> tuple[GenerationRequest, list]:
    """Build the GenerationRequest for a txt2img body. Returns (request, notes about ignored fields)."""
    notes: list[str] = []
    fields, get = common_fields(body, studio, options, notes)
    denoise = get("denoising_strength")
    request = GenerationRequest(
        **fields, mode="txt2img",
        enable_hr=bool(value(body, "enable_hr")), hr_scale=get("hr_scale"),
        hr_upscaler=value(body, "hr_upscaler") or "Latent", hr_second_pass_steps=get("hr_second_pass_steps"),
        hr_resize_x=get("hr_resize_x"), hr_resize_y=get("hr_resize_y"),
        hr_denoising_strength=0.7 if denoise is None else denoise,   # A1111's hires default when not sent
        hr_sampler_name="" if body.hr_sampler_name in (None, "Use same sampler") else body.hr_sampler_name,
        hr_scheduler="" if body.hr_scheduler in (None, "Use same scheduler") else body.hr_scheduler,
        hr_prompt=value(body, "hr_prompt"), hr_negative_prompt=value(body, "hr_negative_prompt"),
    )
    return request, notes


def rename_field(exc: StudioError) -> StudioError:
    """Engine field names -> the API's (the body has no clip_skip / checkpoint / vae fields)."""
    mapping = {"clip_skip": "override_settings." + OVERRIDE_CLIP_SKIP,
               "checkpoint": "override_settings." + OVERRIDE_CHECKPOINT,
               "vae": "override_settings." + OVERRIDE_VAE, "hr_denoising_strength": "denoising_strength"}
    if exc.field in mapping:
        exc.field = mapping[exc.field]
    exc.field = rename_unit_field(exc.field)
    return exc


# ---- responses -----------------------------------------------------------------------------------------------
def inpainting_conditioning(studio: "Studio", result: GenerationResult | None) -> bool:
    """A1111's ``is_using_inpainting_conditioning``: the job's checkpoint has a 9-channel (inpainting) UNet.
    The result does not say so, hence the cached components of the checkpoint it names (nothing is loaded)."""
    if result is None or not result.model_name:
        return False
    try:
        info = studio.registry.find_checkpoint(result.model_hash or result.model_name)
    except StudioError:
        return False
    comps = studio.manager.cached_components(info)
    return bool(comps is not None and comps.is_inpaint)


def info_dict(request: GenerationRequest, result: GenerationResult | None, body: GenerationBody,
              warnings: list[str], inpainting: bool = False) -> dict:
    """The ``info`` object of A1111's Processed.js()."""
    try:
        sampler, _ = resolve_sampler(request.sampler_name, request.scheduler)
        schedule = effective_schedule(request.sampler_name, request.scheduler)
    except StudioError:
        sampler, schedule = request.sampler_name, request.scheduler
    r = result or GenerationResult()
    seeds = r.seeds or [request.seed]
    subseeds = r.subseeds or [request.subseed]
    prompts = r.prompts or [request.prompt]
    negatives = r.negative_prompts or [request.negative_prompt]
    if request.mode != "txt2img":
        denoise = request.denoising_strength
    else:
        denoise = request.hr_denoising_strength if request.enable_hr else None
    return {
        "prompt": prompts[0], "all_prompts": prompts,
        "negative_prompt": negatives[0], "all_negative_prompts": negatives,
        "seed": seeds[0], "all_seeds": seeds, "subseed": subseeds[0], "all_subseeds": subseeds,
        "subseed_strength": request.subseed_strength,
        "width": request.width, "height": request.height, "sampler_name": sampler,
        "cfg_scale": request.cfg_scale, "steps": request.steps, "batch_size": request.batch_size,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": r.model_name or None, "sd_model_hash": r.model_hash or None,
        "sd_vae_name": r.vae_name or None, "sd_vae_hash": r.vae_hash or None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": denoise,
        "extra_generation_params": {"Schedule type": schedule},
        "index_of_first_image": 0, "infotexts": list(r.infotexts), "styles": list(body.styles or []),
        "job_timestamp": r.job_timestamp, "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": inpainting, "version": INFOTEXT_VERSION,
        "interrupted": bool(r.interrupted) if result is not None else True,
        "job_id": r.job_id or None, "warnings": [*r.warnings, *warnings],
    }


def generation_response(request: GenerationRequest, result: GenerationResult | None, body: GenerationBody,
                        notes: list[str], inpainting: bool = False) -> dict:
    """The txt2img / img2img response body; PNG encoding runs here (call it in a worker thread).

    As in A1111, img2img's ``parameters`` echo init_images and mask only with include_init_images."""
    images: list[str] = []
    if result is not None and value(body, "send_images"):
        images = [encode_png(img, text) for img, text in zip(result.images, result.infotexts)]
    info = info_dict(request, result, body, notes, inpainting)
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters.update(init_images=None, mask=None)
    return {"images": images, "parameters": parameters, "info": json.dumps(info, ensure_ascii=False)}
