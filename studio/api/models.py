"""Request and response bodies of the A1111-compatible API (field names, defaults and shapes of A1111 v1.10.1).

Every request field is optional, as in A1111 (its models are generated with ``Optional[...]``): ``null`` means
"the default". Fields A1111 accepts but the studio does not implement (restore_faces, tiling, scripts, ...) are
accepted and ignored, so a body written for A1111 is never refused for containing them; unknown keys are kept
(and echoed in ``parameters``) rather than rejected.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())


# ---- generation ------------------------------------------------------------------------------------------------
class GenerationBody(_Body):
    """The fields txt2img and img2img share (A1111's StableDiffusionProcessing + the API extras)."""

    prompt: Optional[str] = Field(default="", description="The prompt (A1111 prompt syntax).")
    negative_prompt: Optional[str] = Field(default="", description="The negative prompt.")
    styles: Optional[list[str]] = Field(default=None, description="Prompt style names (accepted; the studio has "
                                                                   "no styles yet, so they change nothing).")
    seed: Optional[int] = Field(default=-1, description="-1 = random; image i of the job uses seed + i.")
    subseed: Optional[int] = Field(default=-1, description="Variation seed (-1 = random).")
    subseed_strength: Optional[float] = Field(default=0.0, description="Variation strength 0..1.")
    seed_resize_from_h: Optional[int] = Field(default=-1, description="Accepted, ignored.")
    seed_resize_from_w: Optional[int] = Field(default=-1, description="Accepted, ignored.")
    sampler_name: Optional[str] = Field(default=None, description="Sampler, e.g. 'DPM++ 2M' or 'Euler a' "
                                                                  "(legacy names such as 'DPM++ 2M Karras' are split).")
    sampler_index: Optional[str] = Field(default="Euler", description="Old name of sampler_name; used when "
                                                                      "sampler_name is not given.")
    scheduler: Optional[str] = Field(default=None, description="Schedule type, e.g. 'Karras' (default Automatic).")
    batch_size: Optional[int] = Field(default=1, description="Images per batch.")
    n_iter: Optional[int] = Field(default=1, description="Batch count.")
    steps: Optional[int] = Field(default=50, description="Sampling steps (A1111's API default is 50).")
    cfg_scale: Optional[float] = Field(default=7.0, description="Classifier-free guidance scale.")
    distilled_cfg_scale: Optional[float] = Field(default=3.5, description="Forge's distilled guidance: the "
                                                 "guidance input of guidance-distilled models (FLUX.1 dev).")
    width: Optional[int] = Field(default=512, description="Width in pixels (multiple of 8).")
    height: Optional[int] = Field(default=512, description="Height in pixels (multiple of 8).")
    restore_faces: Optional[bool] = Field(default=None, description="Accepted, ignored (no face restoration).")
    tiling: Optional[bool] = Field(default=None, description="Accepted, ignored.")
    do_not_save_samples: Optional[bool] = Field(default=False, description="Accepted; use save_images.")
    do_not_save_grid: Optional[bool] = Field(default=False, description="Accepted, ignored (no grids).")
    eta: Optional[float] = Field(default=None, description="Accepted, ignored.")
    denoising_strength: Optional[float] = Field(default=None, description="Hires-fix denoising strength.")
    s_min_uncond: Optional[float] = Field(default=None, description="Accepted, ignored.")
    s_churn: Optional[float] = Field(default=None, description="Accepted, ignored.")
    s_tmax: Optional[float] = Field(default=None, description="Accepted, ignored.")
    s_tmin: Optional[float] = Field(default=None, description="Accepted, ignored.")
    s_noise: Optional[float] = Field(default=None, description="Accepted, ignored.")
    override_settings: Optional[dict[str, Any]] = Field(
        default=None, description="Options for this request only: sd_model_checkpoint, sd_vae, "
                                  "CLIP_stop_at_last_layers (others are ignored).")
    override_settings_restore_afterwards: Optional[bool] = Field(
        default=True, description="Make the previous checkpoint current again after the job.")
    refiner_checkpoint: Optional[str] = Field(default=None, description="Accepted, ignored (no refiner yet).")
    refiner_switch_at: Optional[float] = Field(default=None, description="Accepted, ignored.")
    disable_extra_networks: Optional[bool] = Field(default=False, description="Accepted, ignored.")
    comments: Optional[dict[str, Any]] = Field(default=None, description="Accepted, ignored.")
    force_task_id: Optional[str] = Field(default=None, max_length=200,
                                         description="Job id to use; poll GET /sdapi/v1/progress/{task_id} or "
                                                     "POST /internal/progress with it.")
    script_name: Optional[str] = Field(default=None, description="Accepted, ignored (no scripts).")
    script_args: Optional[list[Any]] = Field(default_factory=list, description="Accepted, ignored.")
    send_images: Optional[bool] = Field(default=True, description="Return the images in the response.")
    save_images: Optional[bool] = Field(default=False, description="Also save them to the outputs folder.")
    alwayson_scripts: Optional[dict[str, Any]] = Field(
        default_factory=dict, description='Always-on scripts: {"controlnet": {"args": [unit, ...]}} (the ControlNet '
                                         "extension's unit fields); other scripts are accepted and ignored.")
    infotext: Optional[str] = Field(default=None, description="An infotext whose values fill the fields this "
                                                              "body does not set.")


class Txt2ImgRequest(GenerationBody):
    """POST /sdapi/v1/txt2img (A1111's StableDiffusionProcessingTxt2Img + the API extras)."""

    firstpass_image: Optional[str] = Field(default=None, description="Accepted, ignored.")
    enable_hr: Optional[bool] = Field(default=False, description="Hires fix.")
    firstphase_width: Optional[int] = Field(default=0, description="Accepted, ignored (old hires fix).")
    firstphase_height: Optional[int] = Field(default=0, description="Accepted, ignored (old hires fix).")
    hr_scale: Optional[float] = Field(default=2.0, description="Hires upscale factor.")
    hr_upscaler: Optional[str] = Field(default=None, description="Hires upscaler (default Latent).")
    hr_second_pass_steps: Optional[int] = Field(default=0, description="Hires steps (0 = same as steps).")
    hr_resize_x: Optional[int] = Field(default=0, description="Hires target width (0 = use hr_scale).")
    hr_resize_y: Optional[int] = Field(default=0, description="Hires target height (0 = use hr_scale).")
    hr_checkpoint_name: Optional[str] = Field(default=None, description="Accepted, ignored.")
    hr_sampler_name: Optional[str] = Field(default=None, description="Hires sampler (default: same).")
    hr_scheduler: Optional[str] = Field(default=None, description="Hires schedule type (default: same).")
    hr_prompt: Optional[str] = Field(default="", description="Hires prompt (default: same).")
    hr_negative_prompt: Optional[str] = Field(default="", description="Hires negative prompt (default: same).")


class Img2ImgRequest(GenerationBody):
    """POST /sdapi/v1/img2img (A1111's StableDiffusionProcessingImg2Img + the API extras). A mask makes it an
    inpaint; the defaults are A1111's API defaults (inpaint_full_res true, padding 0, masked content "fill")."""

    init_images: Optional[list[Any]] = Field(default=None, description="Base64 images (a data: URL prefix is "
                                                                        "allowed); the first one is used.")
    resize_mode: Optional[int] = Field(default=0, description="0 just resize, 1 crop and resize, 2 resize and "
                                                              "fill, 3 just resize (latent upscale).")
    denoising_strength: Optional[float] = Field(default=0.75, description="How much of the init image changes.")
    image_cfg_scale: Optional[float] = Field(default=None, description="Accepted, ignored (instruct-pix2pix).")
    mask: Optional[str] = Field(default=None, description="Base64 mask: white = inpaint. Makes the job an inpaint.")
    mask_blur_x: Optional[int] = Field(default=4, description="Horizontal mask blur (see mask_blur).")
    mask_blur_y: Optional[int] = Field(default=4, description="Vertical mask blur (see mask_blur).")
    mask_blur: Optional[int] = Field(default=None, description="Mask blur in pixels; sets mask_blur_x and _y.")
    mask_round: Optional[bool] = Field(default=True, description="Accepted, ignored.")
    inpainting_fill: Optional[int] = Field(default=0, description="Masked content: 0 fill, 1 original, "
                                                                  "2 latent noise, 3 latent nothing.")
    inpaint_full_res: Optional[bool] = Field(default=True, description="Inpaint area: true = only masked, "
                                                                       "false = whole picture.")
    inpaint_full_res_padding: Optional[int] = Field(default=0, description="Only-masked padding in pixels.")
    inpainting_mask_invert: Optional[int] = Field(default=0, description="1 = inpaint what is not masked.")
    initial_noise_multiplier: Optional[float] = Field(default=None, description="Accepted, ignored.")
    latent_mask: Optional[str] = Field(default=None, description="Accepted, ignored.")
    include_init_images: Optional[bool] = Field(default=False, description="Echo init_images and mask in "
                                                                            "`parameters` (else they are null).")


class TextToImageResponse(BaseModel):
    images: Optional[list[str]] = Field(default=None, title="Image",
                                        description="The generated images, base64 PNG with their infotext.")
    parameters: dict = Field(description="The request as understood (every field, defaults included).")
    info: str = Field(description="JSON string: prompt, all_seeds, infotexts, sd_model_hash, ...")


class ImageToImageResponse(TextToImageResponse):
    """img2img's answer: the same shape as txt2img's."""


# ---- progress ------------------------------------------------------------------------------------------------
class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float = Field(title="Progress", description="The progress with a range of 0 to 1")
    eta_relative: float = Field(title="ETA in secs")
    state: ProgressState = Field(title="State", description="The current state snapshot")
    current_image: Optional[str] = Field(default=None, title="Current image",
                                         description="The live preview, base64 PNG (null when skipped or none).")
    textinfo: Optional[str] = Field(default=None, title="Info text")
    current_task: Optional[str] = Field(default=None, title="Current task", description="Id of the running job.")


class TaskProgressResponse(ProgressResponse):
    """GET /sdapi/v1/progress/{task_id}: the global shape plus where that job is."""

    task_id: str
    status: str = Field(description="queued | running | done | failed | interrupted")
    queue_position: Optional[int] = Field(default=None, description="0 running, 1 next, ...; null when finished")
    error: Optional[str] = Field(default=None, description="Why a failed job failed.")


class InternalProgressRequest(BaseModel):
    id_task: Optional[str] = Field(default=None, title="Task ID")
    id_live_preview: int = Field(default=-1, title="Live preview image ID")
    live_preview: bool = Field(default=True, title="Include live preview")


class InternalProgressResponse(BaseModel):
    active: bool = Field(title="Whether the task is being worked on right now")
    queued: bool = Field(title="Whether the task is in queue")
    completed: bool = Field(title="Whether the task has already finished")
    progress: Optional[float] = Field(default=None, title="Progress", description="0..1")
    eta: Optional[float] = Field(default=None, title="ETA in secs")
    live_preview: Optional[str] = Field(default=None, title="Live preview image", description="data: URL")
    id_live_preview: Optional[int] = Field(default=None, title="Live preview image ID")
    textinfo: Optional[str] = Field(default=None, title="Info text")


# ---- models, options, lists ----------------------------------------------------------------------------------
class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    title: str
    model_name: str
    hash: Optional[str] = None
    sha256: Optional[str] = None
    filename: str
    config: Optional[str] = None


class SDVaeItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model_name: str
    filename: str


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: Optional[list[str]] = None
    default_rho: Optional[float] = None
    need_inner_model: Optional[bool] = None


class EmbeddingItem(BaseModel):
    step: Optional[int] = None
    sd_checkpoint: Optional[str] = None
    sd_checkpoint_name: Optional[str] = None
    shape: Optional[int] = Field(default=None, description="Vector width (null when the file is unreadable)")
    vectors: int
    error: Optional[str] = Field(default=None, description="Why the file could not be read (skipped only)")


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem] = Field(default_factory=dict)
    skipped: dict[str, EmbeddingItem] = Field(default_factory=dict)


class MemoryResponse(BaseModel):
    ram: dict = Field(title="RAM", description="System memory stats (bytes)")
    cuda: dict = Field(title="CUDA", description="CUDA memory stats, or {'error': ...}")


class OptionsResponse(BaseModel):
    """GET /sdapi/v1/options: the options the studio understands plus every other key a client stored."""

    model_config = ConfigDict(extra="allow")
    sd_model_checkpoint: Optional[str] = None
    sd_checkpoint_hash: Optional[str] = None
    sd_vae: str = "Automatic"
    CLIP_stop_at_last_layers: int = 1
    samples_save: bool = True
    samples_format: str = "png"
    outdir_txt2img_samples: str = ""
    show_progress_every_n_steps: int = 1
    live_previews_enable: bool = True


class FlagsResponse(BaseModel):
    """GET /sdapi/v1/cmd-flags: A1111 flag names (passwords are never shown)."""

    model_config = ConfigDict(extra="allow")


class PNGInfoRequest(BaseModel):
    image: str = Field(title="Image", description="The base64 encoded image (PNG, JPEG or WEBP; a data: URL "
                                                  "prefix is allowed)")


class InterrogateRequest(BaseModel):
    image: str = Field("", title="Image", description="The base64 encoded image (a data: URL prefix is allowed)")
    model: str = Field("clip", title="Model", description="'clip' (a BLIP caption from models/captioners), "
                                                          "'deepdanbooru' (not available), or a folder name in "
                                                          "models/captioners")


class InterrogateResponse(BaseModel):
    caption: str = Field(title="Caption", description="The generated caption for the image.")


class PNGInfoResponse(BaseModel):
    info: str = Field(title="Image info", description="The infotext stored in the image ('' when none)")
    items: dict = Field(title="Items", description="The other text fields the image had")
    parameters: dict = Field(title="Parameters", description="The parsed infotext")


class ScriptsList(BaseModel):
    txt2img: Optional[list] = None
    img2img: Optional[list] = None


class PromptStyleItem(BaseModel):
    name: str
    prompt: Optional[str] = None
    negative_prompt: Optional[str] = None


class EmptyResponse(BaseModel):
    """{} – what A1111 answers for actions."""


class ErrorItem(BaseModel):
    loc: list[Any]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer of these routes."""

    error: str = Field(description="Kind of error, e.g. RequestValidationError, StudioError, HTTPException")
    detail: str = Field(description="A complete message naming the field and the fix")
    field: Optional[str] = Field(default=None, description="The request field at fault (dotted for nested)")
    errors: list[ErrorItem] = Field(default_factory=list, description="Each problem, FastAPI style")
