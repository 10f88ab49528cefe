"""The A1111 "parameters" text (infotext): write it, parse it, and carry it in PNG / JPEG / WEBP files.

Writing follows processing.create_infotext of A1111 v1.10.1 and parsing infotext_utils.parse_generation_parameters,
so files move between A1111 (and its forks) and the studio unchanged.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import StudioError

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image
    from PIL.PngImagePlugin import PngInfo

    from .request import GenerationRequest

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")

# create_infotext's fixed keys, in its order. Extra parameters whose key is one of these take its place (a dict
# update keeps the position); other extras follow, then Version.
KEY_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Distilled CFG Scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
    "Variation seed strength", "Seed resize from", "Denoising strength", "Conditional mask weight", "Clip skip",
    "ENSD", "Token merging ratio", "Token merging ratio hr", "Init image hash", "RNG", "Tiling",
)
TAIL_KEYS = ("Version", "User")
# Not a PEP 440 version, so A1111's infotext_versions.parse_version gives None and its back-compat flags
# (Downcast alphas_cumprod, Old prompt editing timelines, Pad conds v0) stay off. A bare "0.1.0" parses and is
# older than 1.6.0, which would switch them all on when the image is pasted into A1111.
INFOTEXT_VERSION = f"studio-{__version__}"

_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_UC_UNICODE = b"UNICODE\x00"
_UC_ASCII = b"ASCII\x00\x00\x00"
_UC_JIS = b"JIS\x00\x00\x00\x00\x00"


# ---- writing -------------------------------------------------------------------------------------------------
def format_number(value: Any) -> str:
    """A value as A1111's UI writes it: 7.0 -> "7", 7.5 -> "7.5", True -> "True", text unchanged."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return str(int(value))
        return str(value)
    return str(value)


def quote(text: str) -> str:
    """JSON-quote a value that contains "," ":" or a newline (A1111 infotext_utils.quote)."""
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_params(params: dict) -> str:
    """The parameter line: "Key: value" joined by ", ", None values left out (a value equal to its key is written
    as the bare key, an A1111 quirk that keeps flags such as "Tiling" short)."""
    parts = []
    for key, value in params.items():
        if value is None:
            continue
        text = format_number(value)
        parts.append(key if key == text else f"{key}: {quote(text)}")
    return ", ".join(parts)


def format_infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """prompt, "Negative prompt: ..." line (only when non-empty), parameter line; stripped like A1111."""
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{format_params(params)}".strip()


def build_params(request: "GenerationRequest", *, seed: int, subseed: int | None = None, model_name: str | None,
                 model_hash: str | None, vae_name: str | None = None, vae_hash: str | None = None,
                 version: str | None, extra: dict | None = None, rng: str | None = None) -> dict:
    """The ordered parameter dict A1111 would write for this request and image (None values dropped).

    "Schedule type" is what A1111 reports: the chosen type, where "Automatic" becomes the sampler's default
    schedule when it has one (DPM++ 2M -> Karras) and stays "Automatic" otherwise (Euler a, DDIM, ...).
    ``rng`` is "CPU" when the noise came from the CPU (A1111 leaves the key out for GPU, its default).
    """
    from . import samplers

    try:
        sampler, _ = samplers.resolve_sampler(request.sampler_name, request.scheduler)
        schedule = samplers.effective_schedule(request.sampler_name, request.scheduler)
    except StudioError:  # an infotext is still worth writing for a name we cannot map
        sampler, schedule = request.sampler_name, request.scheduler or "Automatic"
    strength = request.subseed_strength or 0
    params: dict[str, Any] = dict.fromkeys(KEY_ORDER)
    params.update({
        "Steps": request.steps,
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": request.cfg_scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": model_hash or None,
        "Model": model_name or None,
        "VAE hash": vae_hash if vae_name and vae_hash else None,
        "VAE": vae_name or None,
        "Variation seed": (subseed if subseed is not None else request.subseed) if strength > 0 else None,
        "Variation seed strength": strength if strength > 0 else None,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
        "RNG": rng if rng and rng != "GPU" else None,
    })
    for key, value in (*tuple(request.extra_infotext), *((extra or {}).items())):
        if key not in TAIL_KEYS:
            params[key] = value
    params["Version"] = version or None
    return {k: v for k, v in params.items() if v is not None}


# ---- parsing -------------------------------------------------------------------------------------------------
_DEFAULTS = {
    "Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0, "Hires sampler": "Use same sampler",
    "Hires checkpoint": "Use same checkpoint", "Hires prompt": "", "Hires negative prompt": "",
    "Mask mode": "Inpaint masked", "Masked content": "original", "Inpaint area": "Whole picture",
    "Masked area padding": 32,
}
_LATE_DEFAULTS = {
    "RNG": "GPU", "Schedule type": "Automatic", "Schedule max sigma": 0, "Schedule min sigma": 0,
    "Schedule rho": 0, "VAE Encoder": "Full", "VAE Decoder": "Full", "FP8 weight": "Disable",
}


def parse_infotext(text: str) -> dict:
    """Parse an infotext like A1111's parse_generation_parameters (values stay strings, as there).

    Adds "Prompt" and "Negative prompt"; "AxB" values become "<Key>-1"/"<Key>-2"; missing keys get A1111's
    defaults. A legacy combined sampler ("DPM++ 2M Karras") is split into Sampler + Schedule type, as A1111 does
    when it applies the text (get_sampler_and_scheduler), keeping the schedule explicit.
    """
    res: dict[str, Any] = {}
    prompt, negative_prompt, done_with_prompt = "", "", False
    *lines, lastline = (text or "").strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt

    for key, value in RE_PARAM.findall(lastline):
        if not value:  # A1111 fails on value[0] and skips the key
            continue
        if value[0] == '"' and value[-1] == '"':
            value = unquote(value)
        m = RE_IMAGESIZE.match(value)
        if m is not None:
            res[f"{key}-1"] = m.group(1)
            res[f"{key}-2"] = m.group(2)
        else:
            res[key] = value

    for key, value in _DEFAULTS.items():
        res.setdefault(key, value)
    if res.get("Hypernet") is not None:
        res["Prompt"] += f"<hypernet:{res['Hypernet']}:{res.get('Hypernet strength', '1.0')}>"
    _restore_old_hires_fix_params(res)
    for key, value in _LATE_DEFAULTS.items():
        res.setdefault(key, value)
    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False
    _backcompat(res)
    _split_sampler(res)
    return res


def _restore_old_hires_fix_params(res: dict) -> None:
    """Old hires-fix texts give "First pass size": turn it into Size + Hires resize (A1111 default options)."""
    fw, fh = res.get("First pass size-1"), res.get("First pass size-2")
    if fw is None or fh is None:
        return
    fw, fh = int(fw), int(fh)
    width, height = int(res.get("Size-1", 512)), int(res.get("Size-2", 512))
    if fw == 0 or fh == 0:
        scale = math.sqrt(512 * 512 / (width * height))
        fw, fh = math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64
    res["Size-1"], res["Size-2"] = fw, fh
    res["Hires resize-1"], res["Hires resize-2"] = width, height


def _backcompat(res: dict) -> None:
    """A1111 infotext_versions.backcompat: flags for texts written by older versions."""
    ver = _parse_version(res.get("Version"))
    if ver is None:
        return
    from packaging.version import Version

    if ver < Version("1.6.0") and "[" in res.get("Prompt", ""):
        res["Old prompt editing timelines"] = True
    if ver < Version("1.6.0") and res.get("Sampler", "") in ("DDIM", "PLMS"):
        res["Pad conds v0"] = True
    if ver < Version("v1.7.0-225"):
        res["Downcast alphas_cumprod"] = True
    if ver < Version("1.8.0") and res.get("Refiner"):
        res["Refiner switch by sampling steps"] = True


def _parse_version(text: Any):
    if not isinstance(text, str):
        return None
    m = re.match(r"([^-]+-[^-]+)-.*", text)
    if m:
        text = m.group(1)
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # pragma: no cover - packaging ships with every diffusers install
        return None
    try:
        return Version(text)
    except InvalidVersion:
        return None


def _split_sampler(res: dict) -> None:
    from . import samplers

    for skey, tkey in (("Sampler", "Schedule type"), ("Hires sampler", "Hires schedule type")):
        name = res.get(skey)
        if not isinstance(name, str):
            continue
        found = samplers.split_legacy_name(name)
        if found is None:
            continue  # unknown (an extension's sampler, "Use same sampler"): keep it as written
        res[skey] = found[0]
        if found[1] is not None:
            res[tkey] = found[1]


_INT_FIELDS = {"Steps": "steps", "Seed": "seed", "Size-1": "width", "Size-2": "height", "Clip skip": "clip_skip",
               "Variation seed": "subseed", "Hires steps": "hr_second_pass_steps", "Hires resize-1": "hr_resize_x",
               "Hires resize-2": "hr_resize_y", "Mask blur": "mask_blur",
               "Masked area padding": "inpaint_full_res_padding"}
_FLOAT_FIELDS = {"CFG scale": "cfg_scale", "Distilled CFG Scale": "distilled_cfg_scale",
                 "Variation seed strength": "subseed_strength",
                 "Denoising strength": "denoising_strength", "Hires upscale": "hr_scale"}
_TEXT_FIELDS = {"Prompt": "prompt", "Negative prompt": "negative_prompt", "Sampler": "sampler_name",
                "Schedule type": "scheduler", "RNG": "rng"}


def params_to_request_fields(parsed: dict) -> dict:
    """Parsed infotext -> GenerationRequest keyword arguments (only what the text gives), typed.

    ``checkpoint`` is the "Model hash" when present (as A1111 looks the model up by it), else "Model".
    Raises StudioError naming the field when a number does not parse.
    """
    out: dict[str, Any] = {}
    for key, name in _TEXT_FIELDS.items():
        if key in parsed and parsed[key] is not None:
            out[name] = str(parsed[key])
    for table, convert in ((_INT_FIELDS, _to_int), (_FLOAT_FIELDS, float)):
        for key, name in table.items():
            if key not in parsed or parsed[key] in (None, ""):
                continue
            try:
                out[name] = convert(parsed[key])
            except (TypeError, ValueError):
                raise StudioError(f"Infotext value {key}: {parsed[key]!r} is not a number.", field=name,
                                  fix=f"correct '{key}' in the text") from None
    checkpoint = parsed.get("Model hash") or parsed.get("Model")
    if checkpoint:
        out["checkpoint"] = str(checkpoint)
    _img2img_fields(parsed, out)
    return out


_MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")


def _img2img_fields(parsed: dict, out: dict) -> None:
    """Hires-fix and inpaint keys, whose text values become the request's switches and indices."""
    if any(k in parsed for k in ("Hires upscale", "Hires upscaler")) or out.get("hr_resize_x"):
        out["enable_hr"] = True
        if "denoising_strength" in out:
            out["hr_denoising_strength"] = out["denoising_strength"]
        if parsed.get("Hires upscaler"):
            out["hr_upscaler"] = str(parsed["Hires upscaler"])
        sampler = parsed.get("Hires sampler")
        if sampler and sampler != "Use same sampler":
            out["hr_sampler_name"] = str(sampler)
        for key, name in (("Hires prompt", "hr_prompt"), ("Hires negative prompt", "hr_negative_prompt")):
            if parsed.get(key):
                out[name] = str(parsed[key])
    if str(parsed.get("Masked content", "")) in _MASKED_CONTENT:
        out["inpainting_fill"] = _MASKED_CONTENT.index(str(parsed["Masked content"]))
    out["inpaint_full_res"] = str(parsed.get("Inpaint area", "")) == "Only masked"
    out["inpainting_mask_invert"] = 1 if str(parsed.get("Mask mode", "")) == "Inpaint not masked" else 0


def _to_int(value: Any) -> int:
    if isinstance(value, int):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        as_float = float(text)  # "20.0" from a script that wrote floats
        if as_float != int(as_float):
            raise
        return int(as_float)


# ---- files ---------------------------------------------------------------------------------------------------
def png_text(infotext: str) -> "PngInfo":
    """PNG metadata with the "parameters" chunk (tEXt, or iTXt when the text is not Latin-1, as PIL decides)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", infotext)
    return info


def exif_bytes(infotext: str) -> bytes:
    """EXIF with the infotext as UserComment (UNICODE = UTF-16BE), as A1111 writes JPEG and WEBP files."""
    from PIL import Image

    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UC_UNICODE + infotext.encode("utf-16-be")
    return exif.tobytes()


def _decode_user_comment(raw: Any) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw.strip("\x00") or None
    raw = bytes(raw)
    prefix, body = raw[:8], raw[8:]
    if prefix == _UC_UNICODE:
        text = body.decode("utf-16-be", errors="replace")
    elif prefix == _UC_ASCII:
        text = body.decode("ascii", errors="replace")
    elif prefix == _UC_JIS:
        text = body.decode("shift_jis", errors="replace")
    else:  # undefined prefix: A1111 falls back to UTF-8 of the whole value
        text = raw.decode("utf-8", errors="ignore")
    return text.strip("\x00") or None


def read_infotext(image_or_path: "Image | str | os.PathLike | bytes") -> str | None:
    """The infotext stored in an image: PNG "parameters" text, else EXIF UserComment (JPEG / WEBP)."""
    from PIL import Image

    if isinstance(image_or_path, (str, os.PathLike, bytes)):
        import io

        source = io.BytesIO(image_or_path) if isinstance(image_or_path, bytes) else image_or_path
        with Image.open(source) as img:
            return _read_from_image(img)
    return _read_from_image(image_or_path)


def _read_from_image(img: "Image") -> str | None:
    info = getattr(img, "info", {}) or {}
    text = info.get("parameters")
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if text:
        return str(text)
    try:
        exif = img.getexif()
        comment = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except Exception:  # broken EXIF must not stop the rest of the image from loading
        comment = None
    return _decode_user_comment(comment)
