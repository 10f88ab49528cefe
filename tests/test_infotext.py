"""The A1111 infotext: exact writing, A1111-compatible parsing, and image metadata."""
import io
import random

import pytest
from PIL import Image

from studio.errors import StudioError
from studio.infotext import (build_params, exif_bytes, format_infotext, format_number, format_params,
                             params_to_request_fields, parse_infotext, png_text, read_infotext)
from studio.request import GenerationRequest

SPEC_EXAMPLE = (
    "<prompt>\n"
    "Negative prompt: <negative>\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, "
    "Model hash: 0123456789, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Clip skip: 2, Hires upscale: 2, "
    'Hires upscaler: Latent, Lora hashes: "castle: 0123456789ab", Version: v1.10.1'
)


def _infotext(request, **kw):
    args = dict(seed=1234, subseed=99, model_name="v1-5-pruned-emaonly", model_hash="0123456789",
                version="v1.10.1", extra=None)
    args.update(kw)
    return format_infotext(request.prompt, request.negative_prompt, build_params(request, **args))


# ---- writing ------------------------------------------------------------------------------------------------
def test_format_number():
    assert format_number(7.0) == "7"
    assert format_number(7.5) == "7.5"
    assert format_number(7) == "7"
    assert format_number(0.35) == "0.35"
    assert format_number(True) == "True"
    assert format_number("x") == "x"


def test_exact_text_of_spec_example():
    request = GenerationRequest(prompt="<prompt>", negative_prompt="<negative>", sampler_name="DPM++ 2M",
                                scheduler="Automatic", steps=20, cfg_scale=7.0, width=512, height=768, clip_skip=2)
    text = _infotext(request, seed=1234567890, extra={"Denoising strength": 0.7, "Hires upscale": 2,
                                                      "Hires upscaler": "Latent",
                                                      "Lora hashes": "castle: 0123456789ab"})
    assert text == SPEC_EXAMPLE


def test_key_order_and_optional_keys():
    request = GenerationRequest(prompt="p", sampler_name="Euler a", subseed_strength=0.25, clip_skip=2,
                                extra_infotext=(("Lora hashes", "a: 0123456789ab, b: ba9876543210"),))
    params = build_params(request, seed=5, subseed=6, model_name="m", model_hash="abcdef0123", vae_name="vae-ft",
                          vae_hash="1234567890", version="v1.10.1",
                          extra={"Hires upscale": 2, "Denoising strength": 0.5, "Version": "ignored"})
    assert list(params) == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
                            "VAE hash", "VAE", "Variation seed", "Variation seed strength", "Denoising strength",
                            "Clip skip", "Lora hashes", "Hires upscale", "Version"]
    assert params["Variation seed"] == 6 and params["Version"] == "v1.10.1"
    text = format_infotext("p", "", params)
    assert text == ("p\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 5, Size: 512x512, "
                    "Model hash: abcdef0123, Model: m, VAE hash: 1234567890, VAE: vae-ft, Variation seed: 6, "
                    "Variation seed strength: 0.25, Denoising strength: 0.5, Clip skip: 2, "
                    'Lora hashes: "a: 0123456789ab, b: ba9876543210", Hires upscale: 2, Version: v1.10.1')


def test_defaults_are_left_out():
    request = GenerationRequest(prompt="cat", sampler_name="DPM++ 2M", clip_skip=1, subseed_strength=0.0)
    params = build_params(request, seed=1, subseed=2, model_name="m", model_hash="0123456789", version="v1.10.1")
    assert "Clip skip" not in params and "Variation seed" not in params and "VAE" not in params
    assert "Negative prompt" not in format_infotext("cat", "", params)
    params = build_params(request, seed=1, subseed=2, model_name=None, model_hash=None, version=None)
    assert list(params) == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size"]


@pytest.mark.parametrize("sampler, scheduler, written", [
    ("DPM++ 2M", "Automatic", ("DPM++ 2M", "Karras")),       # A1111 reports the resolved default schedule
    ("DPM++ 2M SDE", "Automatic", ("DPM++ 2M SDE", "Exponential")),
    ("Euler a", "Automatic", ("Euler a", "Automatic")),     # no default schedule: stays Automatic
    ("DDIM", "Automatic", ("DDIM", "Automatic")),
    ("Euler", "Karras", ("Euler", "Karras")),
    ("DPM++ 2M Karras", "Automatic", ("DPM++ 2M", "Karras")),  # legacy combined name is split
    ("k_euler_a", "sgm_uniform", ("Euler a", "SGM Uniform")),
    ("My Extension Sampler", "Automatic", ("My Extension Sampler", "Automatic")),  # unknown: written as given
])
def test_sampler_and_schedule_written(sampler, scheduler, written):
    request = GenerationRequest(sampler_name=sampler, scheduler=scheduler)
    params = build_params(request, seed=1, model_name="m", model_hash=None, version="v1.10.1")
    assert (params["Sampler"], params["Schedule type"]) == written


def test_quoting():
    assert format_params({"A": "x, y", "B": "k: v", "C": "two\nlines", "D": 'say "hi"', "E": None}) == \
        'A: "x, y", B: "k: v", C: "two\\nlines", D: say "hi"'
    assert format_params({"Lora hashes": "ü: 1"}) == 'Lora hashes: "ü: 1"'  # ensure_ascii=False
    assert format_params({"Tiling": "Tiling", "X": ""}) == "Tiling, X: "  # A1111's key == value quirk


# ---- round trip ---------------------------------------------------------------------------------------------
PROMPTS = [
    "a castle on a hill",
    "masterpiece, best quality, (blue eyes:1.2), <lora:castle:0.8>",
    "line one\nline two: with colon, and comma\n(((sky)))",
    "日本語のプロンプト, émoji 🎨, ünïcödé",
    'quotes "inside" and \\ backslash',
    "[from:to:0.5] AND other:1.2 BREAK next",
    "",
]
NEGATIVES = ["", "blurry, lowres", "bad hands\nworst quality: 1.4", "ñegative ✓"]


def _requests():
    rng = random.Random(1234)
    samplers = ["DPM++ 2M", "Euler a", "Euler", "DPM++ SDE", "DDIM", "UniPC", "DPM++ 2M SDE", "LMS", "Heun"]
    schedules = ["Automatic", "Karras", "Exponential", "Uniform", "SGM Uniform", "Beta"]
    for i in range(60):
        yield GenerationRequest(
            prompt=PROMPTS[i % len(PROMPTS)], negative_prompt=NEGATIVES[i % len(NEGATIVES)],
            sampler_name=rng.choice(samplers), scheduler=rng.choice(schedules), steps=rng.randint(1, 150),
            cfg_scale=rng.choice([1.0, 4.5, 7.0, 7.5, 12.25, 30.0]), width=rng.randrange(64, 2049, 8),
            height=rng.randrange(64, 2049, 8), seed=rng.randint(0, 2**32 - 1), subseed=rng.randint(0, 2**32 - 1),
            subseed_strength=rng.choice([0.0, 0.0, 0.1, 0.5, 1.0]), clip_skip=rng.choice([1, 1, 2, 3, 12]))


@pytest.mark.parametrize("request_", list(_requests()))
def test_round_trip(request_):
    from studio.samplers import effective_schedule

    text = _infotext(request_, seed=request_.seed, subseed=request_.subseed, model_hash="0123456789",
                     model_name="model name, with comma", extra={"Lora hashes": "castle: 0123456789ab"})
    parsed = parse_infotext(text)
    fields = params_to_request_fields(parsed)
    assert fields["prompt"] == request_.prompt
    assert fields["negative_prompt"] == request_.negative_prompt
    assert fields["sampler_name"] == request_.sampler_name
    assert fields["scheduler"] == effective_schedule(request_.sampler_name, request_.scheduler)
    for name in ("steps", "cfg_scale", "width", "height", "seed", "clip_skip"):
        assert fields[name] == getattr(request_, name), name
        assert type(fields[name]) is type(getattr(request_, name)), name
    if request_.subseed_strength > 0:
        assert fields["subseed"] == request_.subseed
        assert fields["subseed_strength"] == request_.subseed_strength
    else:
        assert "subseed" not in fields and "subseed_strength" not in fields
    assert fields["checkpoint"] == "0123456789"
    assert parsed["Model"] == "model name, with comma"
    assert parsed["Lora hashes"] == "castle: 0123456789ab"
    rebuilt = GenerationRequest(**fields)  # the fields are valid request arguments
    assert rebuilt.validate() is rebuilt
    # writing the parsed request again gives the same text
    assert _infotext(rebuilt, seed=rebuilt.seed, subseed=request_.subseed, model_hash="0123456789",
                     model_name="model name, with comma", extra={"Lora hashes": "castle: 0123456789ab"}) == text


# ---- parsing real A1111 texts -------------------------------------------------------------------------------
def test_parse_spec_example():
    parsed = parse_infotext(SPEC_EXAMPLE)
    assert parsed["Prompt"] == "<prompt>" and parsed["Negative prompt"] == "<negative>"
    assert parsed["Steps"] == "20" and parsed["Sampler"] == "DPM++ 2M" and parsed["Schedule type"] == "Karras"
    assert parsed["Size-1"] == "512" and parsed["Size-2"] == "768" and "Size" not in parsed
    assert parsed["Model hash"] == "0123456789" and parsed["Model"] == "v1-5-pruned-emaonly"
    assert parsed["Denoising strength"] == "0.7" and parsed["Clip skip"] == "2"
    assert parsed["Hires upscale"] == "2" and parsed["Hires upscaler"] == "Latent"
    assert parsed["Lora hashes"] == "castle: 0123456789ab" and parsed["Version"] == "v1.10.1"
    assert "Downcast alphas_cumprod" not in parsed
    assert list(parsed)[:3] == ["Prompt", "Negative prompt", "Steps"]


def test_parse_old_a1111_docstring_example():
    text = ("girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by "
            "Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
            "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly "
            "drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
            "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b")
    parsed = parse_infotext(text)
    assert parsed["Prompt"].startswith("girl with an artist's beret") and parsed["Prompt"].endswith("intricate")
    assert parsed["Negative prompt"].endswith("messy drawing")
    assert parsed["Model hash"] == "45dee52b"  # legacy 8-hex hash kept as written
    # defaults A1111 fills in
    assert parsed["Clip skip"] == "1" and parsed["Schedule type"] == "Automatic" and parsed["RNG"] == "GPU"
    assert parsed["Hires sampler"] == "Use same sampler" and parsed["Hires resize-1"] == 0
    assert parsed["Masked content"] == "original" and parsed["Masked area padding"] == 32
    assert parsed["VAE Decoder"] == "Full" and parsed["FP8 weight"] == "Disable"
    fields = params_to_request_fields(parsed)
    assert fields == {"prompt": parsed["Prompt"], "negative_prompt": parsed["Negative prompt"],
                      "sampler_name": "Euler a", "scheduler": "Automatic", "steps": 20, "seed": 965400086,
                      "width": 512, "height": 512, "clip_skip": 1, "cfg_scale": 7.0, "checkpoint": "45dee52b",
                      # A1111's defaults for the img2img keys the text leaves out
                      "hr_resize_x": 0, "hr_resize_y": 0, "inpaint_full_res": False, "inpaint_full_res_padding": 32,
                      "inpainting_fill": 1, "inpainting_mask_invert": 0, "rng": "GPU"}


def test_parse_v16_text_with_legacy_sampler_hires_and_hashes():
    text = ("masterpiece, best quality, 1girl, (blue eyes:1.2), <lora:add_detail:0.5>\n"
            "Negative prompt: (worst quality, low quality:1.4), easynegative\n"
            "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 3527353513, Size: 512x768, "
            "Model hash: 7f96a1a9ca, Model: AnythingV5_v5PrtRE, Denoising strength: 0.45, Clip skip: 2, "
            "ENSD: 31337, Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+ Anime6B, "
            'Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "easynegative: c74b4e810b03", Version: v1.6.0')
    parsed = parse_infotext(text)
    assert parsed["Sampler"] == "DPM++ 2M" and parsed["Schedule type"] == "Karras"
    assert parsed["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B" and parsed["Hires steps"] == "15"
    assert parsed["TI hashes"] == "easynegative: c74b4e810b03"
    assert parsed["ENSD"] == "31337"
    assert parsed["Downcast alphas_cumprod"] is True  # written before v1.7.0-225 (A1111 backcompat)
    fields = params_to_request_fields(parsed)
    assert fields["cfg_scale"] == 7.5 and fields["seed"] == 3527353513 and fields["height"] == 768
    assert (fields["sampler_name"], fields["scheduler"]) == ("DPM++ 2M", "Karras")


def test_parse_controlnet_and_escaped_quotes():
    unit = ("Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, Resize Mode: Crop and Resize, "
            "Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1, "
            "Pixel Perfect: False, Control Mode: Balanced")
    params = {"Steps": 20, "Sampler": "Euler a", "Seed": 1, "ControlNet 0": unit, "Note": 'say "hi", ok'}
    text = format_infotext("house", "", params)
    assert '"Module: canny, Model: control_v11p_sd15_canny [d14c016b]' in text
    parsed = parse_infotext(text)
    assert parsed["ControlNet 0"] == unit
    assert parsed["Note"] == 'say "hi", ok'


def test_parse_multiline_and_negative_prompt_lines():
    text = ("first line\n  second line  \nNegative prompt: neg one\nneg two\n"
            "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64")
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "first line\nsecond line"  # A1111 strips every line
    assert parsed["Negative prompt"] == "neg one\nneg two"
    # a later "Negative prompt:" line is also taken as a prefix and removed, as A1111 does
    parsed = parse_infotext("p\nNegative prompt: a\nNegative prompt: b\nSteps: 1, Sampler: Euler, Seed: 2")
    assert parsed["Prompt"] == "p" and parsed["Negative prompt"] == "a\nb"


def test_last_line_needs_three_params():
    parsed = parse_infotext("a prompt\nStyle: anime, Mood: calm")
    assert parsed["Prompt"] == "a prompt\nStyle: anime, Mood: calm"
    assert "Style" not in parsed
    assert parse_infotext("")["Prompt"] == ""


def test_parse_params_only_and_old_hires_fix():
    parsed = parse_infotext("Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 1024x1024, "
                            "First pass size: 0x0, Denoising strength: 0.7")
    assert parsed["Prompt"] == "" and parsed["Negative prompt"] == ""
    assert (parsed["Size-1"], parsed["Size-2"]) == (512, 512)
    assert (parsed["Hires resize-1"], parsed["Hires resize-2"]) == (1024, 1024)


def test_parse_unknown_sampler_kept_and_hires_sampler_split():
    parsed = parse_infotext("x\nSteps: 20, Sampler: Euler a CFG++, Seed: 1, Hires sampler: DPM++ 2M SDE Karras")
    assert parsed["Sampler"] == "Euler a CFG++"
    assert parsed["Hires sampler"] == "DPM++ 2M SDE" and parsed["Hires schedule type"] == "Karras"


def test_params_to_request_fields_errors_and_fallbacks():
    with pytest.raises(StudioError) as err:
        params_to_request_fields({"Steps": "many"})
    assert err.value.field == "steps"
    assert params_to_request_fields({"Steps": "20.0", "Model": "v1-5"}) == {
        "steps": 20, "checkpoint": "v1-5", "inpaint_full_res": False, "inpainting_mask_invert": 0}


# ---- files --------------------------------------------------------------------------------------------------
TEXT = "ünïcode prompt, 🎨\nNegative prompt: bad\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 8x8"


def test_png_round_trip(tmp_path):
    path = tmp_path / "00000-1.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=png_text(TEXT))
    assert read_infotext(path) == TEXT
    assert read_infotext(str(path)) == TEXT
    with Image.open(path) as img:
        assert read_infotext(img) == TEXT
    latin = tmp_path / "latin.png"
    Image.new("RGB", (8, 8)).save(latin, pnginfo=png_text("plain\nSteps: 1, Seed: 2, Size: 8x8"))
    assert b"tEXtparameters" in latin.read_bytes()  # plain text uses a tEXt chunk like A1111


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_exif_user_comment(fmt, tmp_path):
    path = tmp_path / f"x.{fmt.lower()}"
    Image.new("RGB", (8, 8)).save(path, format=fmt, exif=exif_bytes(TEXT))
    assert read_infotext(path) == TEXT
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format=fmt, exif=exif_bytes(TEXT))
    assert read_infotext(buf.getvalue()) == TEXT


def test_no_infotext(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    assert read_infotext(path) is None
    jpg = tmp_path / "plain.jpg"
    Image.new("RGB", (8, 8)).save(jpg)
    assert read_infotext(jpg) is None
